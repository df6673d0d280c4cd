"""The encode job: WebDataset image shards in, latent shards (Parquet or safetensors) out.

Per shard: read the tar (pipeline.io.tar_reader) -> decode, orient, resize, crop in threads
(pipeline.transforms) -> batch per bucket -> VAE encode (fp32 fallback, tiles, OOM split) -> scale
-> the latent writer (pipeline.io.latent_writers).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Any, Hashable, Iterable, Mapping

import numpy as np
from PIL import Image

from vae import inspect_vae

from pipeline.config import EncodeConfig, to_dict
from pipeline.core.kind import JobKind, JobPlan, PlanContext, ShardContext, shard_metadata
from pipeline.core.ledger import Ledger, LedgerError
from pipeline.core.scheduler import ShardTask
from pipeline.io.latent_writers import LatentRecord, ShardWriter, make_writer
from pipeline.io.shards import list_inputs
from pipeline.io.tar_reader import ShardReadError, iter_shard
from pipeline.jobs.vae_worker import (VAE_FLAGS, VAEWorker, add_vae_arguments, compute_device_and_dtype,
                                      vae_identity, vae_provenance)
from pipeline.samples import PreparedSample, RawSample, SampleError
from pipeline.transforms import IMAGE_EXTENSIONS, SampleDecodeError, hflip, prepare, to_model_input

log = logging.getLogger(__name__)

# Where the passthrough members are found when the config names none: the first samples of the
# first shards (a streamed read of each shard's head, not of the shard).
PASSTHROUGH_PEEK_SHARDS = 4
PASSTHROUGH_PEEK_SAMPLES = 16
PASSTHROUGH_PEEK_TIMEOUT_S = 60.0


# Preprocessing fields that decide which samples are read, not what their latents are: left out of
# the identity, so changing them (or a release adding one) does not refuse a resume.
_NOT_IDENTITY = frozenset({"max_member_bytes"})


def preprocess_identity(preprocess: Any) -> dict[str, Any]:
    """The preprocessing as the job's identity records it (see _NOT_IDENTITY)."""
    return {k: v for k, v in to_dict(preprocess).items() if k not in _NOT_IDENTITY}


def _non_image_members(sample: RawSample) -> set[str]:
    return {k for k in sample if not k.startswith("__") and k not in IMAGE_EXTENSIONS}


def _peek_members(url: str, storage_options: Mapping[str, Any], max_member_bytes: int,
                  out: dict[str, set[str] | BaseException]) -> None:
    found: set[str] = set()
    try:
        for i, item in enumerate(iter_shard(url, storage_options, max_member_bytes=max_member_bytes)):
            if not isinstance(item, SampleError):
                found |= _non_image_members(item)
            if i + 1 >= PASSTHROUGH_PEEK_SAMPLES:
                break
    except ShardReadError as e:  # the shard itself is retried (and reported) by the job
        out[url] = e
        return
    out[url] = found


def find_passthrough(cfg: EncodeConfig, inputs: Mapping[str, str]) -> tuple[str, ...]:
    """The job's passthrough members: the config's; else those of the job already in the output
    (so a resume keeps its columns); else the non-image members of the first samples of the first
    shards. Raises ShardReadError when none of those shards can be read in time."""
    if cfg.passthrough is not None:
        return cfg.passthrough
    if not cfg.overwrite:
        try:
            old = Ledger(cfg.output, cfg.storage_options).read_manifest()
        except LedgerError:
            old = None  # open_job reports it
        if old is not None and old.get("kind") == "encode" and "passthrough" in old["identity"]:
            return tuple(old["identity"]["passthrough"])
    urls = list(inputs.values())[:PASSTHROUGH_PEEK_SHARDS]
    results: dict[str, set[str] | BaseException] = {}
    # Daemon threads with a deadline: a read that hangs (a stalled mount, a FIFO) must not hang the
    # driver; that shard is then only the job's to time out and report.
    limit = cfg.preprocess.max_member_bytes
    threads = [threading.Thread(target=_peek_members, args=(u, cfg.storage_options, limit, results), daemon=True,
                                name=f"peek-{i}") for i, u in enumerate(urls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + min(PASSTHROUGH_PEEK_TIMEOUT_S, cfg.retry.shard_timeout_s)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    found = set().union(*(r for r in results.values() if isinstance(r, set)))
    if not any(isinstance(r, set) for r in results.values()):
        failed = [r for r in results.values() if isinstance(r, BaseException)]
        why = f"{failed[0]}" if failed else f"reading them took over {PASSTHROUGH_PEEK_TIMEOUT_S:.0f} s"
        raise ShardReadError(urls[0], RuntimeError(
            f"{why}; the first shards were read to find the members to keep beside each latent: set "
            "`passthrough` (e.g. --set 'passthrough=[txt,json]') to skip this"))
    skipped = [u for u in urls if not isinstance(results.get(u), set)]
    if skipped:
        log.warning("could not read the head of %s to find passthrough members; using the others'", skipped)
    log.info("passthrough members (from the first samples of %d shard(s)): %s; set `passthrough` to choose",
             len(urls) - len(skipped), sorted(found))
    return tuple(sorted(found))


class EncodeWorker(VAEWorker):
    """Encodes image shards with one codec."""

    def __init__(self, cfg: EncodeConfig, plan: JobPlan) -> None:
        # transforms checks sizes against both limits; lift Pillow's own (process-wide, so only
        # here in the actor's own process) when the config allows more.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, cfg.preprocess.max_image_pixels)
        super().__init__(cfg.vae, plan, storage_options=cfg.storage_options, batch_size=cfg.batch_size,
                         threads=cfg.decode_threads)
        self.cfg = cfg
        self.passthrough: tuple[str, ...] = tuple(plan.identity["passthrough"])
        self._metadata = shard_metadata(plan)

    def read(self, task: ShardTask, ctx: ShardContext) -> Iterable[RawSample | SampleError]:
        return iter_shard(task.url, self.cfg.storage_options, max_member_bytes=self.cfg.preprocess.max_member_bytes)

    def key_of(self, item: RawSample) -> str:
        return item.get("__key__", "")

    def prepare(self, item: RawSample, task: ShardTask) -> PreparedSample | SampleError:
        try:
            return prepare(item, self.cfg.preprocess)
        except SampleDecodeError as e:
            return SampleError(key=self.key_of(item), shard=task.url, stage=e.stage, reason=str(e))

    def batch_key(self, prepared: PreparedSample) -> Hashable:
        return prepared.target_size

    def _encode(self, pixels: list[np.ndarray], ctx: ShardContext) -> tuple[np.ndarray, np.ndarray]:
        """Scaled latents and log-variances; counts the samples that needed the float32 fallback."""
        x = to_model_input(pixels, self.codec.device)
        with self.model_lock:  # also makes the stats difference this call's own
            before = self.codec.stats.fp32_fallbacks
            mean, logvar = self.codec.encode(x)
            ctx.count("fp32_fallbacks", self.codec.stats.fp32_fallbacks - before)
            latent = self.codec.scale(mean)
        return latent.cpu().numpy(), logvar.cpu().numpy()

    def _records(self, batch: list[PreparedSample], ctx: ShardContext) -> list[LatentRecord]:
        pixels = [s.pixels for s in batch]
        latent, logvar = self._encode(pixels, ctx)
        flipped = self._encode([hflip(p) for p in pixels], ctx) if self.cfg.preprocess.flip else None
        records = []
        for i, s in enumerate(batch):
            for ext in sorted(set(s.extras) - set(self.passthrough)):
                ctx.count(f"members_not_kept.{ext}")
            records.append(LatentRecord(
                key=s.key, latent=latent[i], logvar=logvar[i], original_size=s.original_size,
                crop_top_left=s.crop_top_left, target_size=s.target_size,
                latent_flip=None if flipped is None else flipped[0][i],
                logvar_flip=None if flipped is None else flipped[1][i],
                extras={k: v for k, v in s.extras.items() if k in self.passthrough}))
        return records

    def step(self, batch: list[PreparedSample], ctx: ShardContext) -> Iterable[LatentRecord | SampleError]:
        return self.split_non_finite(batch, ctx, "encode", lambda b: self._records(list(b), ctx))

    def open_sink(self, task: ShardTask) -> ShardWriter:
        cfg = self.cfg
        return make_writer(cfg.format, cfg.output, task.name, self._metadata, latent_dtype=cfg.latent_dtype,
                           columns=self.passthrough, storage_options=cfg.storage_options)


class EncodeJob(JobKind):
    """Image shards -> latent shards."""

    name = "encode"
    config_type = EncodeConfig
    help = "encode image shards into latent shards (resumable)"
    input_help = "image tar shard URLs: braces {000..009}, globs, or folders"
    flags = {**VAE_FLAGS, "format": "format", "resolution": "preprocess.resolution",
             "buckets": "preprocess.buckets", "flip": "preprocess.flip", "latent_dtype": "latent_dtype"}

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_vae_arguments(p, vae_help="weights: file, URL, diffusers folder, HF repo id, or random:PRESET")
        p.add_argument("--format", choices=["parquet", "safetensors"])
        p.add_argument("--resolution", type=int)
        p.add_argument("--buckets", action="store_const", const=True, help="aspect-ratio buckets")
        p.add_argument("--flip", action="store_const", const=True, help="also store latents of flipped images")
        p.add_argument("--latent-dtype", choices=["float16", "float32"], help="storage precision")

    def inputs(self, cfg: EncodeConfig) -> dict[str, str]:  # type: ignore[override]
        return list_inputs(cfg.input, cfg.storage_options)

    def wants_gpu(self, cfg: EncodeConfig) -> bool:  # type: ignore[override]
        return cfg.vae.device != "cpu"

    def requested_device(self, cfg: EncodeConfig) -> str:  # type: ignore[override]
        return cfg.vae.device

    def plan(self, cfg: EncodeConfig, inputs: Mapping[str, str], ctx: PlanContext) -> JobPlan:  # type: ignore[override]
        info = inspect_vae(cfg.vae.source, cfg.vae.preset, seed=cfg.vae.seed, storage_options=cfg.storage_options)
        _, compute_dtype = compute_device_and_dtype(cfg.vae, ctx.device)
        identity = {"kind": self.name, **vae_identity(info.fingerprint, info.preset, compute_dtype),
                    "preprocess": preprocess_identity(cfg.preprocess), "format": cfg.format, "latent_dtype": cfg.latent_dtype,
                    "passthrough": list(find_passthrough(cfg, inputs))}
        # `resolution` repeats preprocess.resolution, as 0.1's shard metadata had it, for readers that look there.
        provenance = {**vae_provenance(cfg.vae, info.random_weights), "resolution": cfg.preprocess.resolution}
        return JobPlan(inputs=dict(inputs), identity=identity, provenance=provenance, data_extension=cfg.format,
                       input_versions=dict(getattr(inputs, "versions", {})))

    def worker(self, cfg: EncodeConfig, plan: JobPlan) -> EncodeWorker:  # type: ignore[override]
        return EncodeWorker(cfg, plan)

    def shard_done(self, result: Any) -> None:
        dropped = {k.split(".", 1)[1]: v for k, v in result.counters.items() if k.startswith("members_not_kept.")}
        if dropped:
            log.warning("shard %s: members %s are not passthrough columns of this job and were not kept; "
                        "set `passthrough` to keep them", result.name, dropped)

    def describe_summary(self, counters: Mapping[str, int]) -> str:
        parts = []
        if counters.get("fp32_fallbacks"):
            parts.append(f"{counters['fp32_fallbacks']} sample(s) recomputed in float32")
        dropped = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("members_not_kept.")}
        if dropped:
            parts.append(f"members not kept, not in passthrough: {dropped} (set `passthrough` to keep them)")
        return ", ".join(parts)


__all__ = ["EncodeJob", "EncodeWorker", "find_passthrough"]
