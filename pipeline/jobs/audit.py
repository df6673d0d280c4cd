"""The audit job: latents decoded and scored against the source images they were made from.

Per latent shard: read the chosen latents, read the source shard alongside (the input shard the
encode job's manifest names, or `--source`), prepare each source image exactly as the encoder did
(the preprocessing in the shard's metadata: resize, crop, buckets; the flipped latent against the
flipped image), decode, and score (pipeline.metrics). Every source key that is neither in the
latents nor in the encode job's errors is recorded as missing. Each shard writes a part
`parts/<shard>.parquet`: one row per scored latent plus previews of its worst and random picks;
once every part is committed the driver writes the report (pipeline.report).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vae import NonFiniteError

from pipeline.config import AuditConfig, PreprocessConfig, VAEConfig, from_dict
from pipeline.core.kind import (JobKind, JobPlan, PermanentShardError, PlanContext, PlanError, ShardContext,
                                shard_metadata)
from pipeline.core.layout import METADATA_KEY
from pipeline.core.ledger import Ledger, LedgerError
from pipeline.core.scheduler import ShardTask
from pipeline.core.sink import ShardSink
from pipeline.io.latent_reader import is_shard_file, read_latents, shard_keys
from pipeline.io.shards import check_unique_names, expand_inputs
from pipeline.io.tar_reader import ShardReadError, iter_shard
from pipeline.jobs.decode import (check_latent_shard, latent_shard_inputs, plan_latents_vae, vae_worker_args)
from pipeline.jobs.vae_worker import VAE_FLAGS, VAEWorker, add_vae_arguments, vae_provenance
from pipeline.metrics import Scores, latent_channel_stats, png_bytes, score, to_pixels, triptych
from pipeline.samples import RawSample, SampleError
from pipeline.transforms import SampleDecodeError, hflip, prepare

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
# What the report writes over the whole job (pipeline.report); removed when the audit runs again.
REPORT_OUTPUTS = ("report.html", "summary.json", "metrics.parquet", "images/")
# The source is read forward beside the latents; samples a later latent wants are held until then.
# The encoder writes in source order (buckets reorder within a few batches), so little is held;
# more than this means the source is not the one that was encoded, and the shard fails loudly.
MAX_HELD_BYTES = 256 * 2**20
_ROWS_PER_GROUP = 4096


def pick_value(seed: int, shard: str, key: str, flipped: bool) -> float:
    """A seeded uniform value in [0, 1) per latent: the report's random pick is the smallest ones,
    so the same seed shows the same samples, whichever actor scored them."""
    digest = hashlib.sha256(f"{seed}\0{shard}\0{key}\0{int(flipped)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def sample_rows(counts: Mapping[str, int], n: int, seed: int) -> dict[str, list[int]]:
    """A seeded sample of `n` distinct rows across shards of `counts` rows each (in name order):
    shard name -> sorted row indices; shards without a pick map to []. All rows when n >= total."""
    names = sorted(counts)
    total = sum(counts[name] for name in names)
    if n >= total:
        return {name: list(range(counts[name])) for name in names}
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    starts = np.cumsum([0] + [counts[name] for name in names])
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        lo, hi = np.searchsorted(picked, [starts[i], starts[i + 1]])
        out[name] = (picked[lo:hi] - starts[i]).tolist()
    return out


class LowestK:
    """The `k` items of lowest rank seen so far, memory bounded by k; ties keep the earlier item.
    `make` builds the item only when it is kept (a preview costs a PNG's worth of work)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, Any]] = []  # (-rank, -order, item): heap[0] is the one to drop
        self._n = 0

    def offer(self, rank: float, make: Callable[[], Any]) -> None:
        self._n += 1
        if len(self._heap) >= self.k and -self._heap[0][0] <= rank:
            return
        entry = (-rank, -self._n, make())
        if len(self._heap) >= self.k:
            heapq.heapreplace(self._heap, entry)
        else:
            heapq.heappush(self._heap, entry)

    def items(self) -> list[Any]:
        """The kept items, lowest rank first (earlier first among equals)."""
        return [item for _, _, item in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]


# --- items between the stages ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AuditItem:
    """One latent key as read: its latent (and the flipped one when stored), its source sample."""

    key: str
    latents: tuple[np.ndarray, ...]
    source: RawSample | None
    source_url: str
    meta: Mapping[str, Any]
    preprocess: PreprocessConfig


@dataclass(frozen=True, eq=False)
class Variant:
    """One latent to score: the image it should reconstruct (uint8, as the encoder saw it)."""

    flipped: bool
    latent: np.ndarray  # float32 (C, h, w)
    pixels: np.ndarray  # uint8 (H, W, 3)
    finite: bool


@dataclass(frozen=True, eq=False)
class PreparedAudit:
    key: str
    variants: tuple[Variant, ...]
    source_url: str


@dataclass(frozen=True, eq=False)
class AuditRow:
    """The scores of one latent; `recon` and `pixels` stay only until the part writer has seen them."""

    flipped: bool
    scores: Scores | None
    latent_non_finite: bool
    output_non_finite: bool
    latent_mean: np.ndarray
    latent_std: np.ndarray
    pixels: np.ndarray
    recon: np.ndarray | None


@dataclass(frozen=True, eq=False)
class AuditRecord:
    """What the part writer takes per key: one row, or two with the flipped latent."""

    key: str
    source_url: str
    rows: tuple[AuditRow, ...]


# --- reading the source beside the latents -----------------------------------------------------


class SourceStream:
    """One forward read of a source shard: `find(key)` reads on until the key's sample, holding the
    samples a later latent wants; every key seen is kept in `seen` for the completeness count."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, wanted: set[str]) -> None:
        self.url = url
        self.seen: set[str] = set()
        self._wanted = wanted
        self._held: dict[str, tuple[RawSample, int]] = {}
        self._held_bytes = 0
        self._items = iter_shard(url, storage_options)
        self._done = False

    def _advance(self, hold: bool) -> bool:
        try:
            item = next(self._items)
        except StopIteration:
            self._done = True
            return False
        if isinstance(item, SampleError):
            self.seen.add(item.key)
            return True
        key = item.get("__key__", "")
        self.seen.add(key)
        if hold and key in self._wanted:
            size = sum(len(v) for v in item.values() if isinstance(v, bytes))
            self._held[key] = (item, size)
            self._held_bytes += size
            if self._held_bytes > MAX_HELD_BYTES:
                raise ShardReadError(self.url, RuntimeError(
                    f"over {MAX_HELD_BYTES >> 20} MiB of samples read ahead without finding the next latent's "
                    "key: the source shard does not hold the latents' samples in their order (was it changed "
                    "since it was encoded? pass the right one with --source)"))
        return True

    def find(self, key: str) -> RawSample | None:
        while key not in self._held and not self._done:
            self._advance(hold=True)
        sample, size = self._held.pop(key, (None, 0))
        self._held_bytes -= size
        return sample

    def drain(self) -> None:
        """Read the rest of the shard for its keys only."""
        self._held.clear()
        self._held_bytes = 0
        while not self._done:
            self._advance(hold=False)


def preprocess_of(meta: Mapping[str, str], url: str) -> PreprocessConfig:
    """The preprocessing an encode job stamped into its shard's metadata."""
    raw = meta.get("preprocess")
    if raw is None:
        raise PermanentShardError(f"latent shard {url} does not record its preprocessing (no 'preprocess' "
                                  "metadata); its source images cannot be prepared as the encoder saw them")
    return from_dict(PreprocessConfig, json.loads(raw), prefix="preprocess.")


# --- the worker -----------------------------------------------------------------------------------


class AuditWorker(VAEWorker):
    """Decodes the chosen latents of a shard and scores each against its prepared source image."""

    def __init__(self, cfg: AuditConfig, plan: JobPlan) -> None:
        super().__init__(VAEConfig(**plan.worker_args["vae"]), plan, storage_options=cfg.storage_options,
                         batch_size=cfg.batch_size, threads=cfg.decode_threads)
        self.cfg = cfg
        self.shards: Mapping[str, Mapping[str, Any]] = plan.worker_args["shards"]
        self._metadata = shard_metadata(plan)
        # Scoring (SSIM) costs about what a small decoder does; it runs in threads beside the model.
        self._scoring = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="score")

    def _encode_errors(self, spec: Mapping[str, Any], name: str) -> set[str] | None:
        """The keys the encode job recorded as errors for this shard, None when its ledger is not known."""
        if not spec.get("latents"):
            return None
        record = Ledger(spec["latents"], self.cfg.storage_options).committed(name)
        if record is None:
            raise LedgerError(f"latent shard {name} is no longer committed in {spec['latents']}")
        return {e.key for e in record.errors}

    def read(self, task: ShardTask, ctx: ShardContext) -> Iterator[AuditItem | SampleError]:
        so = self.cfg.storage_options
        spec = self.shards[task.name]
        meta = check_latent_shard(task.url, self.codec, so)
        preprocess = preprocess_of(meta, task.url)
        keys = shard_keys(task.url, so)
        rows = spec["rows"]
        selected = set(range(len(keys))) if rows is None else set(rows)
        source = SourceStream(spec["source"], so, {keys[i] for i in selected})
        # A shard none of whose latents a sampled audit picked is still read at the source, for completeness.
        for i, (key, latent, lmeta) in enumerate(read_latents(task.url, so) if selected else ()):
            if i not in selected:
                continue
            flip = lmeta["latent_flip"]
            yield AuditItem(key, (latent,) if flip is None else (latent, flip), source.find(key), spec["source"],
                            lmeta, preprocess)
        source.drain()
        errored = self._encode_errors(spec, task.name)
        ctx.count("source_samples", len(source.seen))
        ctx.count("latents", len(keys))
        if errored is not None:
            ctx.count("encode_errors", len(errored))
        accounted = set(keys) | (errored or set())
        why = ("in the source shard but neither in the latents nor in the encode job's errors" if errored is not None
               else "in the source shard but not in the latents (the encode job's errors are not known here)")
        for key in sorted(source.seen - accounted):
            yield SampleError(key, spec["source"], "missing", why)

    def key_of(self, item: AuditItem) -> str:
        return item.key

    def prepare(self, item: AuditItem, task: ShardTask) -> PreparedAudit | SampleError:
        def bad(why: str) -> SampleError:
            return SampleError(item.key, item.source_url, "source", why)

        if item.source is None:
            return bad(f"key {item.key!r} of latent shard {task.url} is not in its source shard {item.source_url}")
        try:
            prepared = prepare(item.source, item.preprocess)
        except SampleDecodeError as e:
            return SampleError(item.key, item.source_url, e.stage, f"source image: {e}")
        meta = item.meta
        seen = (tuple(prepared.original_size), tuple(prepared.crop_top_left), tuple(prepared.target_size))
        encoded = (tuple(meta["original_size"]), tuple(meta["crop_top_left"]), tuple(meta["target_size"]))
        if seen != encoded:
            return bad(f"the source image prepares to size {seen[0]}, crop {seen[1]}, target {seen[2]}; the latent "
                       f"was made from {encoded[0]}, {encoded[1]}, {encoded[2]}: the source changed since it was encoded")
        f = self.codec.downsample_factor
        expected = (self.codec.config.latent_channels, prepared.target_size[0] // f, prepared.target_size[1] // f)
        variants = []
        for flipped, latent in zip((False, True), item.latents):
            if tuple(latent.shape) != expected:
                return bad(f"latent has shape {tuple(latent.shape)}; expected {expected} for a "
                           f"{prepared.target_size[1]}x{prepared.target_size[0]} image")
            z = latent.astype(np.float32)
            variants.append(Variant(flipped, z, hflip(prepared.pixels) if flipped else prepared.pixels,
                                    bool(np.isfinite(z).all())))
        return PreparedAudit(item.key, tuple(variants), item.source_url)

    def batch_key(self, prepared: PreparedAudit) -> Hashable:
        return prepared.variants[0].latent.shape

    def _decode(self, latents: list[np.ndarray]) -> list[np.ndarray | None]:
        """Decoder outputs (3, H, W) in [-1, 1]; None where the output stays non-finite in float32."""
        out: list[np.ndarray | None] = [None] * len(latents)
        todo = list(range(len(latents)))
        while todo:
            z = torch.from_numpy(np.stack([latents[i] for i in todo]))
            try:
                with self.model_lock:
                    images = self.codec.decode(self.codec.unscale(z)).cpu().numpy()
            except NonFiniteError as e:
                bad = {todo[i] for i in e.indices}
                todo = [i for i in todo if i not in bad]
                continue
            for i, image in zip(todo, images):
                out[i] = image
            break
        return out

    def _row(self, v: Variant, image: np.ndarray | None) -> AuditRow:
        mean, std = latent_channel_stats(v.latent)
        if image is None:
            return AuditRow(v.flipped, None, not v.finite, v.finite, mean, std, v.pixels, None)
        return AuditRow(v.flipped, score(v.pixels, image), False, False, mean, std, v.pixels, to_pixels(image))

    def step(self, batch: list[PreparedAudit], ctx: ShardContext) -> list[AuditRecord]:
        variants = [v for p in batch for v in p.variants]
        finite = [i for i, v in enumerate(variants) if v.finite]
        images: list[np.ndarray | None] = [None] * len(variants)
        for i, image in zip(finite, self._decode([variants[i].latent for i in finite]) if finite else []):
            images[i] = image
        rows = list(self._scoring.map(self._row, variants, images))
        ctx.count("scored", sum(r.scores is not None for r in rows))
        records, at = [], 0
        for p in batch:
            n = len(p.variants)
            records.append(AuditRecord(p.key, p.source_url, tuple(rows[at:at + n])))
            at += n
        return records

    def open_sink(self, task: ShardTask) -> AuditPartWriter:
        return AuditPartWriter(self.cfg.output, task.name, self._metadata, worst=self.cfg.worst, seed=self.cfg.seed,
                               storage_options=self.cfg.storage_options)


# --- the part writer ---------------------------------------------------------------------------

PART_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("flipped", pa.bool_(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("psnr", pa.float64()),
    pa.field("ssim", pa.float64()),
    pa.field("mae", pa.float64()),
    pa.field("clipped_fraction", pa.float64()),
    pa.field("saturated", pa.bool_(), nullable=False),
    pa.field("latent_non_finite", pa.bool_(), nullable=False),
    pa.field("output_non_finite", pa.bool_(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("latent_mean", pa.list_(pa.float32()), nullable=False),
    pa.field("latent_std", pa.list_(pa.float32()), nullable=False),
    pa.field("pick", pa.float64(), nullable=False),
    # "metrics" for the scores; "worst" and "random" rows carry only a preview (a PNG triptych).
    pa.field("role", pa.string(), nullable=False),
    pa.field("preview", pa.binary()),
])
METRIC_COLUMNS = [f.name for f in PART_SCHEMA if f.name not in ("role", "preview", "pick")]


def _preview_maker(key: str, row: AuditRow) -> Callable[[], tuple[str, bool, np.ndarray]]:
    picture: list[tuple[str, bool, np.ndarray]] = []

    def make() -> tuple[str, bool, np.ndarray]:
        if not picture:  # one triptych, whether the row is kept as a worst or a random pick
            picture.append((key, row.flipped, triptych(row.pixels, row.recon)))
        return picture[0]

    return make


class AuditPartWriter(ShardSink):
    """Metric rows streamed a row group at a time; the shard's `worst` lowest-PSNR and `worst`
    random picks kept as small previews (memory bounded by that count) and written last."""

    extension = "parquet"

    def __init__(self, output_url: str, name: str, metadata: Mapping[str, str], *, worst: int, seed: int,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(output_url, name, storage_options=storage_options, data_dir=PARTS_DIR)
        self._schema = PART_SCHEMA.with_metadata({METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})
        self._seed = seed
        self._rows: list[dict[str, Any]] = []
        self._worst = LowestK(worst)
        self._random = LowestK(worst)
        self._pq: pq.ParquetWriter | None = None

    def _writer(self) -> pq.ParquetWriter:
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.out, self._schema, compression="zstd", write_page_checksum=True)
        return self._pq

    def _flush(self) -> None:
        if self._rows:
            self._writer().write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def _write(self, record: AuditRecord) -> None:
        for row in record.rows:
            s = row.scores
            pick = pick_value(self._seed, self.name, record.key, row.flipped)
            self._rows.append({
                "key": record.key, "flipped": row.flipped, "shard": self.name, "source": record.source_url,
                "psnr": None if s is None else s.psnr, "ssim": None if s is None else s.ssim,
                "mae": None if s is None else s.mae, "clipped_fraction": None if s is None else s.clipped_fraction,
                "saturated": bool(s is not None and s.saturated), "latent_non_finite": row.latent_non_finite,
                "output_non_finite": row.output_non_finite, "height": int(row.pixels.shape[0]),
                "width": int(row.pixels.shape[1]), "latent_mean": row.latent_mean.astype(np.float32).tolist(),
                "latent_std": row.latent_std.astype(np.float32).tolist(), "pick": pick, "role": "metrics",
                "preview": None})
            preview = _preview_maker(record.key, row)
            # Unscored latents (non-finite) rank below every scored one: they are the worst there is.
            self._worst.offer(-np.inf if s is None else s.psnr, preview)
            self._random.offer(pick, preview)
        if len(self._rows) >= _ROWS_PER_GROUP:
            self._flush()

    def _finish(self) -> None:
        self._flush()
        previews = []
        for role, kept in (("worst", self._worst), ("random", self._random)):
            for key, flipped, picture in kept.items():
                previews.append({"key": key, "flipped": flipped, "shard": self.name, "source": "",
                                 "saturated": False, "latent_non_finite": False, "output_non_finite": False,
                                 "height": int(picture.shape[0]), "width": int(picture.shape[1]),
                                 "latent_mean": [], "latent_std": [], "pick": 0.0, "role": role,
                                 "preview": png_bytes(picture)})
        if previews:
            self._writer().write_table(pa.Table.from_pylist(previews, schema=self._schema))
        self._writer().close()

    def _release(self) -> None:
        self._rows = []
        self._worst, self._random = LowestK(self._worst.k), LowestK(self._random.k)
        if self._pq is not None and self._state == "aborted":
            writer, self._pq = self._pq, None
            try:
                writer.close()  # before the upload is dropped, so pyarrow does not write into it later
            except OSError:
                log.debug("closing the Parquet writer of aborted part %s", self.name, exc_info=True)


# --- the job kind ------------------------------------------------------------------------------


class AuditJob(JobKind):
    """Latent shards -> scores against their sources, and a report."""

    name = "audit"
    config_type = AuditConfig
    help = "decode latents and score them against their source images; writes metrics and report.html"
    input_help = "latent shards: an encode job's output folder, or shard files (braces and globs allowed)"
    flags = {**VAE_FLAGS, "latents": "input", "source": "source", "sample": "samples", "seed": "seed",
             "worst": "worst", "fail_under_psnr": "fail_under_psnr"}

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_vae_arguments(p, vae_help="weights (default: the VAE named in the latents' manifest)")
        p.add_argument("--latents", nargs="+", help="the latents to audit (same as --input)")
        p.add_argument("--source", nargs="+", help="source image shards (default: the encode job's inputs)")
        p.add_argument("--sample", type=int, metavar="N", help="audit a seeded random sample of N keys (default: all)")
        p.add_argument("--seed", type=int, help="seed of the sample and of the report's random pick")
        p.add_argument("--worst", type=int, metavar="K", help="samples shown as the worst, and as a random pick")
        p.add_argument("--fail-under-psnr", type=float, metavar="DB",
                       help="exit non-zero when the mean PSNR is below this (the report is written either way)")

    def inputs(self, cfg: AuditConfig) -> dict[str, str]:  # type: ignore[override]
        return latent_shard_inputs(cfg.input, cfg.storage_options, job=self.name)

    def wants_gpu(self, cfg: AuditConfig) -> bool:  # type: ignore[override]
        return cfg.vae.device != "cpu"

    def requested_device(self, cfg: AuditConfig) -> str:  # type: ignore[override]
        return cfg.vae.device

    @staticmethod
    def _sources(cfg: AuditConfig, inputs: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Latent shard name -> source shard URL, and -> the latents' output folder (for its errors)."""
        folders: dict[str, str] = {}
        planned: dict[str, str] = {}
        for pattern in cfg.input:
            if is_shard_file(pattern) or any(c in pattern for c in "*?[{"):
                continue
            manifest = Ledger(pattern, cfg.storage_options).read_manifest()
            # Input names are unique (inputs() refuses two URLs of one name), so a name the folder's
            # manifest holds is that folder's shard.
            for name in set(inputs) & set((manifest or {}).get("shards", {})):
                folders[name] = pattern
                planned[name] = manifest["shards"][name]
        if cfg.source:
            planned = check_unique_names(expand_inputs(cfg.source, cfg.storage_options))
        missing = sorted(set(inputs) - set(planned))
        if missing:
            where = "--source" if cfg.source else "the latents' manifest (shard files were given)"
            raise PlanError(f"{len(missing)} latent shard(s) have no source shard in {where}, e.g. {missing[:5]}; "
                            "pass --source with the image shards they were encoded from")
        return {name: planned[name] for name in inputs}, folders

    @staticmethod
    def _rows(cfg: AuditConfig, inputs: Mapping[str, str]) -> dict[str, list[int] | None]:
        if not cfg.samples:
            return {name: None for name in inputs}
        with ThreadPoolExecutor(max_workers=16) as pool:
            counts = dict(zip(inputs, pool.map(lambda u: len(shard_keys(u, cfg.storage_options)), inputs.values())))
        total = sum(counts.values())
        if cfg.samples >= total:
            log.info("--sample %d covers all %d latents: auditing every one", cfg.samples, total)
        return dict(sample_rows(counts, cfg.samples, cfg.seed))

    def plan(self, cfg: AuditConfig, inputs: Mapping[str, str], ctx: PlanContext) -> JobPlan:  # type: ignore[override]
        vae, info, vae_part, _, latents_hash = plan_latents_vae(cfg, list(inputs.values()), ctx)
        sources, folders = self._sources(cfg, inputs)
        rows = self._rows(cfg, inputs)
        identity: dict[str, Any] = {
            "kind": self.name, **vae_part, "samples": cfg.samples, "seed": cfg.seed, "worst": cfg.worst,
            "sources_hash": hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()}
        if latents_hash is not None:
            identity["latents_identity_hash"] = latents_hash
        shards = {name: {"source": sources[name], "rows": rows[name], "latents": folders.get(name)} for name in inputs}
        provenance = {**vae_provenance(vae, info.random_weights), "latents": list(cfg.input)}
        return JobPlan(inputs=dict(inputs), identity=identity, provenance=provenance, data_extension="parquet",
                       worker_args={"vae": vae_worker_args(vae), "shards": shards}, data_dir=PARTS_DIR,
                       outputs=REPORT_OUTPUTS)

    def worker(self, cfg: AuditConfig, plan: JobPlan) -> AuditWorker:  # type: ignore[override]
        return AuditWorker(cfg, plan)

    def finish(self, cfg: AuditConfig, plan: JobPlan, ledger: Ledger) -> Mapping[str, Any]:  # type: ignore[override]
        from pipeline.report import write_report

        return write_report(cfg, plan, ledger)

    def verdict(self, cfg: AuditConfig, summary: Any) -> str | None:  # type: ignore[override]
        if cfg.fail_under_psnr is None:
            return None
        mean = summary.result.get("psnr_mean")
        if mean is None:
            return f"no latent could be scored, so the mean PSNR is not above {cfg.fail_under_psnr} dB"
        if mean < cfg.fail_under_psnr:
            return (f"mean PSNR {mean:.2f} dB is below --fail-under-psnr {cfg.fail_under_psnr} dB "
                    f"(report: {summary.result.get('report')})")
        return None

    def describe_summary(self, counters: Mapping[str, int]) -> str:
        return f"{counters.get('scored', 0)} latent(s) scored"


__all__ = ["AuditJob", "AuditWorker", "AuditPartWriter", "LowestK", "SourceStream", "sample_rows", "pick_value",
           "PART_SCHEMA", "METRIC_COLUMNS", "PARTS_DIR"]
