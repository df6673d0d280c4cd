"""What the job kinds that run the VAE share: the codec a config asks for, the VAE's part of a
job's identity, the worker base that holds the codec, and the VAE's command-line flags."""

from __future__ import annotations

import argparse
import threading
from typing import Any, Callable, Mapping, Sequence, TypeVar

from vae import PRESETS, NonFiniteError, VAECodec, load_vae

from pipeline import __version__
from pipeline.config import VAEConfig
from pipeline.core.kind import JobPlan, ShardContext, ShardWorker
from pipeline.samples import SampleError

T = TypeVar("T")
R = TypeVar("R")

# The VAE's flags -> config keys, shared by every kind that runs the VAE.
VAE_FLAGS = {"vae": "vae.source", "preset": "vae.preset", "dtype": "vae.dtype", "device": "vae.device",
             "batch_size": "batch_size"}


def add_vae_arguments(p: argparse.ArgumentParser, *, vae_help: str) -> None:
    p.add_argument("--vae", help=vae_help)
    p.add_argument("--preset", help=f"VAE family: {', '.join(PRESETS)} (sets the architecture and scaling)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute precision")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--batch-size", type=int)


def compute_device_and_dtype(cfg: VAEConfig, device: str) -> tuple[str, str]:
    """The device and compute dtype a VAE config means on actors of `device` (cuda or cpu):
    `auto` picks bfloat16 on CUDA and float32 on the CPU."""
    chosen = device if cfg.device == "auto" else cfg.device
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if chosen.startswith("cuda") else "float32"
    return chosen, dtype


def build_codec(cfg: VAEConfig, storage_options: Mapping[str, Any] | None = None) -> VAECodec:
    """The codec a VAE config asks for, on this process's device."""
    import torch

    device, dtype = compute_device_and_dtype(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    return load_vae(cfg.source, cfg.preset, device=device, dtype=dtype, seed=cfg.seed,
                    storage_options=storage_options, compile=cfg.compile)


def vae_identity(fingerprint: str, preset: Any, compute_dtype: str) -> dict[str, Any]:
    """The VAE's part of a job identity: which weights, which latent scaling, which precision."""
    return {"vae_fingerprint": fingerprint, "preset": preset.name, **preset.scaling.identity(),
            "compute_dtype": compute_dtype}


def vae_provenance(cfg: VAEConfig, random_weights: bool) -> dict[str, Any]:
    """Where the VAE came from: enough for a decode job to load it again by default."""
    return {"vae_source": cfg.source, "vae_seed": cfg.seed, "vae_random_weights": random_weights,
            "code_version": __version__}


class WeightsChangedError(RuntimeError):
    """An actor loaded weights other than those the job was planned with."""


class VAEWorker(ShardWorker):
    """A shard worker holding one codec. Model calls are serialised by `model_lock`: two shards
    run at once per actor, and their reading and image work overlap the other's model steps."""

    def __init__(self, vae: VAEConfig, plan: JobPlan, *, storage_options: Mapping[str, Any] | None,
                 batch_size: int, threads: int) -> None:
        self.plan = plan
        self.vae = vae
        self.codec = build_codec(vae, storage_options)
        planned = plan.identity.get("vae_fingerprint")
        if self.codec.fingerprint != planned:
            # Also after a restart: the weights at the source may have changed since the job was planned.
            raise WeightsChangedError(f"the VAE at {vae.source!r} now has fingerprint {self.codec.fingerprint}; "
                                      f"the job was planned with {planned}")
        self.batch_size = batch_size
        self.threads = threads
        self.model_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        codec = self.codec
        identity = {**self.plan.identity,
                    **vae_identity(codec.fingerprint, codec.preset, str(codec.dtype).removeprefix("torch."))}
        return {"identity": identity, "summary": repr(codec)}

    def split_non_finite(self, batch: Sequence[T], ctx: ShardContext, stage: str,
                         run: Callable[[Sequence[T]], list[R]]) -> list[R | SampleError]:
        """`run(batch)`; when samples stay non-finite even in float32, those become SampleErrors
        and the rest of the batch runs again without them."""
        try:
            return list(run(batch))
        except NonFiniteError as e:
            bad = set(e.indices)
            errors: list[R | SampleError] = [SampleError(getattr(batch[i], "key"), ctx.task.url, stage, str(e))
                                             for i in sorted(bad)]
            rest = [item for i, item in enumerate(batch) if i not in bad]
            return errors + (self.split_non_finite(rest, ctx, stage, run) if rest else [])


__all__ = ["VAE_FLAGS", "VAEWorker", "WeightsChangedError", "add_vae_arguments", "build_codec",
           "compute_device_and_dtype", "vae_identity", "vae_provenance"]


