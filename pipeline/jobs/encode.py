"""The encode job: WebDataset image shards in, latent shards (Parquet or safetensors) out.

Per shard: read the tar (pipeline.io.tar_reader) -> decode, orient, resize, crop in threads
(pipeline.transforms) -> batch per bucket -> VAE encode (fp32 fallback, tiles, OOM split) -> scale
-> the latent writer (pipeline.io.latent_writers).
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Any, Hashable, Iterable, Mapping

import numpy as np
from PIL import Image

from vae import NonFiniteError, VAECodec, inspect_vae, load_vae

from pipeline import __version__
from pipeline.config import EncodeConfig, VAEConfig, to_dict
from pipeline.core.kind import JobKind, JobPlan, PlanContext, ShardContext, ShardWorker
from pipeline.core.scheduler import ShardTask
from pipeline.core.ledger import Ledger, LedgerError
from pipeline.io.tar_reader import ShardReadError, iter_shard
from pipeline.samples import PreparedSample, RawSample, SampleError
from pipeline.io.shards import check_unique_names, expand_inputs
from pipeline.transforms import IMAGE_EXTENSIONS, SampleDecodeError, hflip, prepare, to_model_input
from pipeline.io.latent_writers import LatentRecord, ShardWriter, make_writer

log = logging.getLogger(__name__)

# Samples of the first shard looked at to find the passthrough members, when the config names none.
PASSTHROUGH_PEEK = 16


def compute_device_and_dtype(cfg: VAEConfig, device: str) -> tuple[str, str]:
    """The device and compute dtype a VAE config means on actors of `device` (cuda or cpu):
    `auto` picks bfloat16 on CUDA and float32 on the CPU."""
    chosen = device if cfg.device == "auto" else cfg.device
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if chosen.startswith("cuda") else "float32"
    return chosen, dtype


def build_codec(cfg: VAEConfig, storage_options: Mapping[str, Any] | None = None) -> VAECodec:
    """The codec a job's VAE config asks for, on this process's device."""
    import torch

    device, dtype = compute_device_and_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    return load_vae(cfg.source, cfg.preset, device=device, dtype=dtype, seed=cfg.seed,
                    storage_options=storage_options, compile=cfg.compile)


def vae_identity(fingerprint: str, preset: Any, compute_dtype: str) -> dict[str, Any]:
    """The VAE's part of a job identity: which weights, which latent scaling, which precision."""
    return {"vae_fingerprint": fingerprint, "preset": preset.name, "scaling_factor": float(preset.scaling_factor),
            "shift_factor": float(preset.shift_factor), "compute_dtype": compute_dtype}


def vae_provenance(cfg: VAEConfig, random_weights: bool) -> dict[str, Any]:
    """Where the VAE came from: enough for a decode job to load it again by default."""
    return {"vae_source": cfg.source, "vae_seed": cfg.seed, "vae_random_weights": random_weights,
            "code_version": __version__}


def _non_image_members(sample: RawSample) -> set[str]:
    return {k for k in sample if not k.startswith("__") and k not in IMAGE_EXTENSIONS}


def find_passthrough(cfg: EncodeConfig, inputs: Mapping[str, str]) -> tuple[str, ...]:
    """The job's passthrough members: the config's; else those of the job already in the output
    (so a resume keeps its columns); else the non-image members of the first samples of the first
    shard."""
    if cfg.passthrough is not None:
        return cfg.passthrough
    try:
        old = Ledger(cfg.output, cfg.storage_options).read_manifest()
    except LedgerError:
        old = None  # open_job reports it
    if old is not None and old.get("kind") == "encode" and "passthrough" in old["identity"]:
        return tuple(old["identity"]["passthrough"])
    first = next(iter(inputs.values()))
    found: set[str] = set()
    seen = 0
    try:
        for item in iter_shard(first, cfg.storage_options):
            if not isinstance(item, SampleError):
                found |= _non_image_members(item)
            seen += 1
            if seen >= PASSTHROUGH_PEEK:
                break
    except ShardReadError as e:
        raise ShardReadError(first, RuntimeError(
            f"{e.cause}; it was read to find the members to keep beside each latent: set `passthrough` "
            "(e.g. --set 'passthrough=[txt,json]') to skip this")) from e
    return tuple(sorted(found))


class EncodeWorker(ShardWorker):
    """Encodes shards with one codec; model calls are serialised by a lock."""

    def __init__(self, cfg: EncodeConfig, plan: JobPlan) -> None:
        # transforms checks sizes against both limits; lift Pillow's own (process-wide, so only
        # here in the actor's own process) when the config allows more.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, cfg.preprocess.max_image_pixels)
        self.cfg = cfg
        self.plan = plan
        self.codec = build_codec(cfg.vae, cfg.storage_options)
        self.passthrough: tuple[str, ...] = tuple(plan.identity["passthrough"])
        self.batch_size = cfg.batch_size
        self.threads = cfg.decode_threads
        self._metadata = shard_metadata_of(plan)
        self._model_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        codec = self.codec
        identity = {**self.plan.identity,
                    **vae_identity(codec.fingerprint, codec.preset, str(codec.dtype).removeprefix("torch."))}
        return {"identity": identity, "summary": repr(codec), "random_weights": codec.random_weights}

    def read(self, task: ShardTask) -> Iterable[RawSample | SampleError]:
        return iter_shard(task.url, self.cfg.storage_options)

    def key_of(self, item: RawSample) -> str:
        return item.get("__key__", "")

    def prepare(self, item: RawSample, task: ShardTask) -> PreparedSample | SampleError:
        try:
            return prepare(item, self.cfg.preprocess)
        except SampleDecodeError as e:
            return SampleError(key=self.key_of(item), shard=task.url, stage=e.stage, reason=str(e))

    def batch_key(self, prepared: PreparedSample) -> Hashable:
        return prepared.target_size

    def _encode(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        """Scaled latents, log-variances, and how many samples needed the float32 fallback."""
        x = to_model_input(pixels)
        with self._model_lock:  # also makes the stats difference this call's own
            before = self.codec.stats.fp32_fallbacks
            mean, logvar = self.codec.encode(x)
            fallbacks = self.codec.stats.fp32_fallbacks - before
            latent = self.codec.scale(mean)
        return latent.cpu().numpy(), logvar.cpu().numpy(), fallbacks

    def step(self, batch: list[PreparedSample], ctx: ShardContext) -> Iterable[LatentRecord | SampleError]:
        url = ctx.task.url
        pixels = [s.pixels for s in batch]
        try:
            latent, logvar, fallbacks = self._encode(pixels)
            flipped = self._encode([hflip(p) for p in pixels]) if self.cfg.preprocess.flip else None
        except NonFiniteError as e:
            # Rare: non-finite even in float32. Record those samples and encode the rest alone.
            bad = set(e.indices)
            out: list[LatentRecord | SampleError] = [SampleError(batch[i].key, url, "encode", str(e))
                                                     for i in sorted(bad)]
            rest = [s for i, s in enumerate(batch) if i not in bad]
            return out + (list(self.step(rest, ctx)) if rest else [])
        ctx.count("fp32_fallbacks", fallbacks + (flipped[2] if flipped is not None else 0))
        records: list[LatentRecord | SampleError] = []
        for i, s in enumerate(batch):
            dropped = sorted(set(s.extras) - set(self.passthrough))
            if dropped:
                ctx.count("members_not_kept", len(dropped))
                log.debug("sample %s: members %s are not passthrough columns of this job", s.key, dropped)
            records.append(LatentRecord(
                key=s.key, latent=latent[i], logvar=logvar[i], original_size=s.original_size,
                crop_top_left=s.crop_top_left, target_size=s.target_size,
                latent_flip=None if flipped is None else flipped[0][i],
                logvar_flip=None if flipped is None else flipped[1][i],
                extras={k: v for k, v in s.extras.items() if k in self.passthrough}))
        return records

    def open_sink(self, task: ShardTask) -> ShardWriter:
        cfg = self.cfg
        return make_writer(cfg.format, cfg.output, task.name, self._metadata, latent_dtype=cfg.latent_dtype,
                           columns=self.passthrough, storage_options=cfg.storage_options)


def shard_metadata_of(plan: JobPlan) -> dict[str, str]:
    from pipeline.core.kind import shard_metadata

    return shard_metadata(plan)


class EncodeJob(JobKind):
    """Image shards -> latent shards."""

    name = "encode"
    config_type = EncodeConfig
    help = "encode image shards into latent shards (resumable)"
    flags = {
        "vae": "vae.source", "preset": "vae.preset", "dtype": "vae.dtype", "device": "vae.device",
        "format": "format", "resolution": "preprocess.resolution", "buckets": "preprocess.buckets",
        "flip": "preprocess.flip", "batch_size": "batch_size", "latent_dtype": "latent_dtype",
    }

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--vae", help="weights: file, URL, diffusers folder, HF repo id, or random:PRESET")
        p.add_argument("--preset", help="VAE family: sd15, sdxl, sd3, flux, tiny (sets scaling)")
        p.add_argument("--format", choices=["parquet", "safetensors"])
        p.add_argument("--resolution", type=int)
        p.add_argument("--buckets", action="store_const", const=True, help="aspect-ratio buckets")
        p.add_argument("--flip", action="store_const", const=True, help="also store latents of flipped images")
        p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute precision")
        p.add_argument("--device", help="auto, cpu, cuda")
        p.add_argument("--latent-dtype", choices=["float16", "float32"], help="storage precision")
        p.add_argument("--batch-size", type=int)

    def inputs(self, cfg: EncodeConfig) -> dict[str, str]:  # type: ignore[override]
        return check_unique_names(expand_inputs(cfg.input, cfg.storage_options))

    def wants_gpu(self, cfg: EncodeConfig) -> bool:  # type: ignore[override]
        return cfg.vae.device != "cpu"

    def plan(self, cfg: EncodeConfig, inputs: Mapping[str, str], ctx: PlanContext) -> JobPlan:  # type: ignore[override]
        info = inspect_vae(cfg.vae.source, cfg.vae.preset, seed=cfg.vae.seed, storage_options=cfg.storage_options)
        _, compute_dtype = compute_device_and_dtype(cfg.vae, ctx.device)
        identity = {"kind": self.name, **vae_identity(info.fingerprint, info.preset, compute_dtype),
                    "preprocess": to_dict(cfg.preprocess), "format": cfg.format, "latent_dtype": cfg.latent_dtype,
                    "passthrough": list(find_passthrough(cfg, inputs))}
        return JobPlan(inputs=dict(inputs), identity=identity,
                       provenance=vae_provenance(cfg.vae, info.random_weights), data_extension=cfg.format)

    def worker(self, cfg: EncodeConfig, plan: JobPlan) -> EncodeWorker:  # type: ignore[override]
        return EncodeWorker(cfg, plan)

    def describe_summary(self, counters: Mapping[str, int]) -> str:
        parts = []
        if counters.get("fp32_fallbacks"):
            parts.append(f"{counters['fp32_fallbacks']} sample(s) recomputed in float32")
        if counters.get("members_not_kept"):
            parts.append(f"{counters['members_not_kept']} member(s) not kept (not in passthrough)")
        return ", ".join(parts)


__all__ = ["EncodeJob", "EncodeWorker", "build_codec", "compute_device_and_dtype", "find_passthrough",
           "vae_identity", "vae_provenance"]
