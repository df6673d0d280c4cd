"""The decode job: latent shards in, WebDataset image shards out, one tar per latent shard.

Each sample comes out under its original key: `<key>.<png|jpg|webp>` (the VAE's decode of the
unscaled latent, mapped to uint8 by clamp and round), its passthrough members as they were, and
`<key>.latentcache.json` (sizes, crop, VAE fingerprint, latent shard). The VAE is by default the
one named in the latents' manifest (or shard metadata); another VAE is refused by fingerprint.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from vae import PRESETS, inspect_vae
from vae.presets import LatentScaling

from pipeline.config import DecodeConfig, VAEConfig
from pipeline.core.kind import JobKind, JobPlan, PermanentShardError, PlanContext, PlanError, ShardContext
from pipeline.core.ledger import Ledger
from pipeline.core.scheduler import ShardTask
from pipeline.io.latent_reader import expand_latent_inputs, is_shard_file, read_latents, read_shard_metadata
from pipeline.io.tar_writer import TarSample, TarShardWriter
from pipeline.jobs.vae_worker import (VAE_FLAGS, VAEWorker, add_vae_arguments, compute_device_and_dtype,
                                      vae_identity, vae_provenance)
from pipeline.posterior import generator, sample_scaled
from pipeline.samples import SampleError

log = logging.getLogger(__name__)

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
INFO_MEMBER = "latentcache.json"


def latent_shard_name(url: str) -> str:
    """`.../train-000001.parquet` -> `train-000001`."""
    stem = posixpath.basename(url.rstrip("/")).rpartition(".")[0]
    if not stem:
        raise PlanError(f"latent shard {url!r} has no file name to derive an output name from")
    return stem


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3): clamp, then round."""
    pixels = ((images.float() + 1.0) * 127.5).clamp_(0, 255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    options: dict[str, Any] = {"compress_level": 6} if fmt == "png" else {"quality": quality}
    Image.fromarray(pixels, "RGB").save(buf, format=_PIL_FORMATS[fmt], **options)
    return buf.getvalue()


@dataclass(frozen=True, eq=False)
class PreparedLatent:
    """One latent ready for the decoder: the scaled latent (or a posterior sample of it) in float32,
    with the sample's metadata; `step` unscales it."""

    key: str
    latent: np.ndarray
    meta: Mapping[str, Any]


def _provenance_of_shard(url: str, cfg: DecodeConfig) -> dict[str, Any]:
    meta = read_shard_metadata(url, cfg.storage_options)
    return {"vae_source": meta.get("vae_source"), "vae_seed": int(meta.get("vae_seed", "0"))}


def _latents_identity(urls: list[str], cfg: DecodeConfig) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """The identity, provenance and identity hash of the latents: from the encode jobs' manifests
    where the inputs are their folders (which must agree on the VAE), else from the first shard's
    metadata. Every shard is checked again by the workers before it is decoded."""
    found: list[tuple[str, dict[str, Any]]] = []
    for pattern in cfg.input:
        if is_shard_file(pattern):
            continue
        manifest = Ledger(pattern, cfg.storage_options).read_manifest()
        if manifest is not None:
            found.append((pattern, manifest))
    for pattern, manifest in found[1:]:
        theirs, first = manifest["identity"].get("vae_fingerprint"), found[0][1]["identity"].get("vae_fingerprint")
        if theirs != first:
            raise PlanError(f"inputs {found[0][0]} and {pattern} were made with different VAEs ({first} and "
                            f"{theirs}); decode them as separate jobs")
    if found:
        manifest = found[0][1]
        # An output of latentcache 0.1 has no provenance in its manifest; its shards name the VAE.
        provenance = dict(manifest.get("provenance") or _provenance_of_shard(urls[0], cfg))
        return dict(manifest["identity"]), provenance, manifest["identity_hash"] if len(found) == 1 else None
    meta = read_shard_metadata(urls[0], cfg.storage_options)
    identity = {"vae_fingerprint": meta.get("vae_fingerprint"), "preset": meta.get("preset")}
    return identity, _provenance_of_shard(urls[0], cfg), None


def latent_shard_inputs(patterns: Sequence[str], storage_options: Mapping[str, Any] | None, *,
                        job: str) -> dict[str, str]:
    """Latent shard name -> URL for a job that reads latents; raises PlanError when there are none,
    or when two shards share a name (their outputs would collide)."""
    urls = expand_latent_inputs(patterns, storage_options)
    if not urls:
        raise PlanError(f"input {list(patterns)}: no committed latent shards to {job}")
    names: dict[str, str] = {}
    for url in urls:
        name = latent_shard_name(url)
        if name in names and names[name] != url:
            raise PlanError(f"latent shards {names[name]} and {url} have the same name {name}; "
                            f"{job} them into different outputs")
        names[name] = url
    return names


def check_latent_shard(url: str, codec: Any, storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """The shard's metadata, once it is known to be made with `codec`'s VAE and scaling; else
    PermanentShardError (no retry decodes another VAE's latents right)."""
    meta = read_shard_metadata(url, storage_options)
    fingerprint = meta.get("vae_fingerprint")
    if fingerprint != codec.fingerprint:
        raise PermanentShardError(f"latent shard {url} was made with the VAE {fingerprint}; this job decodes "
                                  f"with {codec.fingerprint} ({codec.source})")
    try:
        scaling = LatentScaling.from_metadata(meta, where=f"latent shard {url}")
    except ValueError as e:
        raise PermanentShardError(str(e)) from None
    if scaling != codec.scaling:
        raise PermanentShardError(f"latent shard {url} is scaled with {scaling.describe()}; the "
                                  f"{codec.preset.name} VAE uses {codec.scaling.describe()}")
    return meta


def latents_vae_config(vae: VAEConfig, provenance: Mapping[str, Any], preset: str | None) -> VAEConfig:
    """`vae.source` as given, else the latents' own VAE (source, preset, seed), run as `vae` says."""
    run = {"dtype": vae.dtype, "device": vae.device, "compile": vae.compile}
    if vae.source:
        return VAEConfig(source=vae.source, preset=vae.preset, seed=vae.seed, **run)
    source = provenance.get("vae_source")
    if not source:
        raise PlanError("the latents do not name the VAE that made them (no vae_source in their manifest "
                        "or metadata); pass --vae and --preset")
    # A VAE read from a diffusers config has no preset name of ours ("custom"): its config decides.
    known = preset if preset in PRESETS and not str(source).startswith("random:") else None
    return VAEConfig(source=str(source), preset=known, seed=int(provenance.get("vae_seed", 0)), **run)


def plan_latents_vae(cfg: DecodeConfig | Any, urls: list[str], ctx: PlanContext) -> tuple[VAEConfig, Any, dict, dict, str | None]:
    """The VAE that decodes the latents at `urls` (checked against their fingerprint), its info, the
    VAE's part of the job identity, the latents' provenance and their identity hash (see `_latents_identity`)."""
    latents, provenance, latents_hash = _latents_identity(urls, cfg)
    vae = latents_vae_config(cfg.vae, provenance, latents.get("preset"))
    info = inspect_vae(vae.source, vae.preset, seed=vae.seed, storage_options=cfg.storage_options)
    if info.fingerprint != latents.get("vae_fingerprint"):
        raise PlanError(f"the VAE {vae.source!r} has fingerprint {info.fingerprint}, but the latents were "
                        f"made with {latents.get('vae_fingerprint')} ({provenance.get('vae_source')!r}); "
                        "decoding them with another VAE gives wrong images")
    _, compute_dtype = compute_device_and_dtype(vae, ctx.device)
    return vae, info, vae_identity(info.fingerprint, info.preset, compute_dtype), provenance, latents_hash


def vae_worker_args(vae: VAEConfig) -> dict[str, Any]:
    return {"source": vae.source, "preset": vae.preset, "seed": vae.seed, "dtype": vae.dtype,
            "device": vae.device, "compile": vae.compile}


class DecodeWorker(VAEWorker):
    """Decodes latent shards with one codec; images are encoded to PNG/JPEG/WebP outside the model lock."""

    def __init__(self, cfg: DecodeConfig, plan: JobPlan) -> None:
        super().__init__(VAEConfig(**plan.worker_args["vae"]), plan, storage_options=cfg.storage_options,
                         batch_size=cfg.batch_size, threads=cfg.decode_threads)
        self.cfg = cfg

    def read(self, task: ShardTask, ctx: ShardContext) -> Iterable[tuple[str, np.ndarray, dict]]:
        check_latent_shard(task.url, self.codec, self.cfg.storage_options)
        return read_latents(task.url, self.cfg.storage_options, with_logvar=self.cfg.sample == "posterior")

    def key_of(self, item: tuple[str, np.ndarray, dict]) -> str:
        return item[0]

    def prepare(self, item: tuple[str, np.ndarray, dict], task: ShardTask) -> PreparedLatent | SampleError:
        key, latent, meta = item
        channels = self.codec.config.latent_channels

        def bad(why: str) -> SampleError:
            return SampleError(key, task.url, "preprocess", f"latent {why}")

        if latent.ndim != 3 or latent.shape[0] != channels or min(latent.shape[1:]) < 1:
            return bad(f"has shape {tuple(latent.shape)}; expected ({channels}, h, w) for the "
                       f"{self.codec.preset.name} VAE")
        z = latent.astype(np.float32)
        if not np.isfinite(z).all():
            return bad(f"has {int((~np.isfinite(z)).sum())} non-finite value(s); expected finite values")
        if self.cfg.sample == "posterior":
            logvar = meta.get("logvar")
            if logvar is None or logvar.shape != latent.shape or not np.isfinite(logvar).all():
                return bad("has no finite log-variance of its shape to sample the posterior from")
            z = sample_scaled(torch.from_numpy(z), torch.from_numpy(logvar.astype(np.float32)),
                              self.codec.scaling, generator(self.cfg.seed, key)).numpy()
        return PreparedLatent(key, z, meta)

    def batch_key(self, prepared: PreparedLatent) -> Hashable:
        return prepared.latent.shape

    def _decode(self, batch: list[PreparedLatent]) -> list[np.ndarray]:
        z = torch.from_numpy(np.stack([p.latent for p in batch]))
        with self.model_lock:
            images = self.codec.decode(self.codec.unscale(z))
        return list(to_uint8(images))

    def _sample(self, p: PreparedLatent, image: np.ndarray, url: str) -> TarSample | SampleError:
        meta = p.meta
        members = {self.cfg.image_format: encode_image(image, self.cfg.image_format, self.cfg.quality)}
        for ext, value in meta["extras"].items():
            if ext in members or ext == INFO_MEMBER:
                return SampleError(p.key, url, "write", f"passthrough member {ext!r} clashes with a member this "
                                                        "job writes")
            members[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        members[INFO_MEMBER] = json.dumps({
            "original_size": list(meta["original_size"]), "crop_top_left": list(meta["crop_top_left"]),
            "target_size": list(meta["target_size"]), "latent_shape": list(p.latent.shape),
            "vae_fingerprint": self.codec.fingerprint, "latent_shard": meta["shard"], "sample": self.cfg.sample,
        }, sort_keys=True).encode()
        return TarSample(p.key, members)

    def step(self, batch: list[PreparedLatent], ctx: ShardContext) -> Iterable[TarSample | SampleError]:
        decoded = self.split_non_finite(batch, ctx, "decode", lambda b: list(zip(b, self._decode(list(b)))))
        # Image encoding runs here, outside the model lock, while the other shard's batch decodes.
        return [d if isinstance(d, SampleError) else self._sample(d[0], d[1], ctx.task.url) for d in decoded]

    def open_sink(self, task: ShardTask) -> TarShardWriter:
        return TarShardWriter(self.cfg.output, task.name, storage_options=self.cfg.storage_options)


class DecodeJob(JobKind):
    """Latent shards -> WebDataset image shards."""

    name = "decode"
    config_type = DecodeConfig
    help = "decode latent shards back into WebDataset image shards (resumable)"
    input_help = ("latent shards: an encode job's output folder, or shard files (braces {000..009} and "
                  "globs allowed)")
    flags = {**VAE_FLAGS, "image_format": "image_format", "quality": "quality", "sample": "sample", "seed": "seed"}

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_vae_arguments(p, vae_help="weights (default: the VAE named in the latents' manifest)")
        p.add_argument("--image-format", choices=list(_PIL_FORMATS))
        p.add_argument("--quality", type=int, help="JPEG/WebP quality (1-100)")
        p.add_argument("--sample", choices=["mode", "posterior"],
                       help="decode the stored mean (mode) or a seeded sample of the posterior")
        p.add_argument("--seed", type=int, help="seed of the posterior samples")

    def inputs(self, cfg: DecodeConfig) -> dict[str, str]:  # type: ignore[override]
        return latent_shard_inputs(cfg.input, cfg.storage_options, job=self.name)

    def wants_gpu(self, cfg: DecodeConfig) -> bool:  # type: ignore[override]
        return cfg.vae.device != "cpu"

    def requested_device(self, cfg: DecodeConfig) -> str:  # type: ignore[override]
        return cfg.vae.device

    def plan(self, cfg: DecodeConfig, inputs: Mapping[str, str], ctx: PlanContext) -> JobPlan:  # type: ignore[override]
        vae, info, vae_part, _, latents_hash = plan_latents_vae(cfg, list(inputs.values()), ctx)
        identity: dict[str, Any] = {"kind": self.name, **vae_part, "image_format": cfg.image_format,
                                    "sample": cfg.sample}
        if cfg.image_format != "png":
            identity["quality"] = cfg.quality
        if cfg.sample == "posterior":
            identity["seed"] = cfg.seed
        if latents_hash is not None:  # another encode job's latents into the same output are another job
            identity["latents_identity_hash"] = latents_hash
        return JobPlan(inputs=dict(inputs), identity=identity, provenance=vae_provenance(vae, info.random_weights),
                       data_extension=TarShardWriter.extension, worker_args={"vae": vae_worker_args(vae)})

    def worker(self, cfg: DecodeConfig, plan: JobPlan) -> DecodeWorker:  # type: ignore[override]
        return DecodeWorker(cfg, plan)


__all__ = ["DecodeJob", "DecodeWorker", "to_uint8", "INFO_MEMBER", "check_latent_shard", "latents_vae_config",
           "plan_latents_vae", "vae_worker_args", "latent_shard_inputs"]
