"""Encoding one shard: read -> decode in threads -> batch per bucket -> VAE -> write -> commit.

`ShardEncoder` holds a codec and does the work for one shard at a time; it knows nothing of Ray,
so tests run it in-process. `EncodeActor` is the Ray actor around it: one per GPU (or CPU slot),
loading the VAE once inside the actor. A sample that fails becomes a `SampleError`; a shard that
fails raises, and the driver decides whether to retry.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from vae import NonFiniteError, VAECodec, load_vae

from . import __version__
from .config import EncodeConfig, VAEConfig, to_dict
from .ledger import Ledger, ShardRecord, identity_hash, job_identity
from .reader import iter_shard
from .samples import PreparedSample, RawSample, SampleError
from .transforms import SampleDecodeError, hflip, prepare, to_model_input
from .writers import InvalidRecordError, LatentRecord, ShardWriter, make_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: encode input shard `url` into output shard `name`; `attempt` counts from 1."""

    name: str
    url: str
    attempt: int = 1


@dataclass(frozen=True)
class ShardResult:
    """What a committed shard reports back to the driver."""

    name: str
    samples_read: int
    samples_written: int
    samples_errored: int
    bytes: int
    seconds: float
    fp32_fallbacks: int
    attempt: int


def build_codec(cfg: VAEConfig, storage_options: Mapping[str, Any] | None = None) -> VAECodec:
    """The codec a job's config asks for; `auto` picks CUDA + bfloat16 where present, else CPU + float32."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return load_vae(cfg.source, cfg.preset, device=device, dtype=dtype, seed=cfg.seed,
                    storage_options=storage_options, compile=cfg.compile)


def job_metadata(cfg: EncodeConfig, codec: VAECodec) -> dict[str, str]:
    """Metadata stamped into every output shard: which VAE, which scaling, which preprocessing."""
    return {
        "vae_fingerprint": codec.fingerprint,
        "vae_source": codec.source,
        "vae_random_weights": str(codec.random_weights).lower(),
        "preset": codec.preset.name,
        "scaling_factor": repr(codec.scaling_factor),
        "shift_factor": repr(codec.shift_factor),
        "compute_dtype": str(codec.dtype).removeprefix("torch."),
        "latent_dtype": cfg.latent_dtype,
        "resolution": str(cfg.preprocess.resolution),
        "preprocess": json.dumps(to_dict(cfg.preprocess), sort_keys=True),
        "code_version": __version__,
    }


def codec_identity(cfg: EncodeConfig, codec: VAECodec) -> dict[str, Any]:
    """What an output folder must agree on to be resumed; the compute dtype too, so a resumed job
    never mixes bfloat16 and float32 latents in one cache."""
    identity = job_identity(cfg, fingerprint=codec.fingerprint, preset=codec.preset.name,
                            scaling_factor=codec.scaling_factor, shift_factor=codec.shift_factor)
    return {**identity, "compute_dtype": str(codec.dtype).removeprefix("torch.")}


def _prepare_one(sample: RawSample, cfg: EncodeConfig) -> PreparedSample | SampleError:
    key, url = sample.get("__key__", ""), sample.get("__url__", "")
    try:
        return prepare(sample, cfg.preprocess)
    except SampleDecodeError as e:
        return SampleError(key=key, shard=url, stage=e.stage, reason=str(e))
    except Exception as e:  # a sample the decoders choke on in an unforeseen way is still one sample
        log.debug("unexpected error preparing %s from %s", key, url, exc_info=True)
        return SampleError(key=key, shard=url, stage="preprocess", reason=f"{type(e).__name__}: {e}")


def prepare_in_threads(items: Iterable[RawSample | SampleError], cfg: EncodeConfig, pool: ThreadPoolExecutor,
                       *, window: int) -> Iterator[PreparedSample | SampleError]:
    """Decode and resize in a thread pool (Pillow releases the GIL), in input order, at most `window`
    samples in flight so memory stays bounded while the model runs."""
    pending: collections.deque[Future | SampleError] = collections.deque()
    for item in items:
        pending.append(item if isinstance(item, SampleError) else pool.submit(_prepare_one, item, cfg))
        if len(pending) >= window:
            head = pending.popleft()
            yield head if isinstance(head, SampleError) else head.result()
    while pending:
        head = pending.popleft()
        yield head if isinstance(head, SampleError) else head.result()


class ShardEncoder:
    """Encodes shards with one codec. Thread-safe: reading and decoding of two shards may overlap,
    while model calls are serialised by a lock."""

    def __init__(self, cfg: EncodeConfig, codec: VAECodec) -> None:
        self.cfg = cfg
        self.codec = codec
        self.metadata = job_metadata(cfg, codec)
        self.identity_hash = identity_hash(codec_identity(cfg, codec))
        self.ledger = Ledger(cfg.output, cfg.storage_options)
        self._pool = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode")
        self._model_lock = threading.Lock()

    def _encode(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        """Scaled latents, log-variances, and how many samples needed the float32 fallback."""
        x = to_model_input(pixels)
        with self._model_lock:  # also makes the stats difference this call's own
            before = self.codec.stats.fp32_fallbacks
            mean, logvar = self.codec.encode(x)
            fallbacks = self.codec.stats.fp32_fallbacks - before
            latent = self.codec.scale(mean)
        return latent.cpu().numpy(), logvar.cpu().numpy(), fallbacks

    def _encode_batch(self, batch: list[PreparedSample], url: str, writer: ShardWriter,
                      errors: list[SampleError]) -> int:
        """Encode and add one batch; returns the number of float32 fallbacks it needed."""
        pixels = [s.pixels for s in batch]
        try:
            latent, logvar, fallbacks = self._encode(pixels)
            flipped = self._encode([hflip(p) for p in pixels]) if self.cfg.preprocess.flip else None
        except NonFiniteError as e:
            # Rare: non-finite even in float32. Record those samples and encode the rest alone.
            bad = set(e.indices)
            for i in sorted(bad):
                errors.append(SampleError(batch[i].key, url, "encode", str(e)))
            rest = [s for i, s in enumerate(batch) if i not in bad]
            return self._encode_batch(rest, url, writer, errors) if rest else 0
        for i, s in enumerate(batch):
            record = LatentRecord(
                key=s.key, latent=latent[i], logvar=logvar[i], original_size=s.original_size,
                crop_top_left=s.crop_top_left, target_size=s.target_size,
                latent_flip=None if flipped is None else flipped[0][i],
                logvar_flip=None if flipped is None else flipped[1][i], extras=s.extras)
            try:
                writer.add(record)
            except InvalidRecordError as e:
                errors.append(SampleError(s.key, url, "write", str(e)))
        return fallbacks + (flipped[2] if flipped is not None else 0)

    def process(self, task: ShardTask) -> ShardResult:
        """Encode and commit one shard. Raises on shard-level failure (nothing is committed then)."""
        start = time.perf_counter()
        cfg = self.cfg
        fallbacks = 0
        errors: list[SampleError] = []
        read = 0
        buckets: dict[tuple[int, int], list[PreparedSample]] = {}

        def counted(items: Iterable[RawSample | SampleError]) -> Iterator[RawSample | SampleError]:
            nonlocal read
            for item in items:
                read += 1
                yield item

        raw = counted(iter_shard(task.url, cfg.storage_options))
        window = max(2 * cfg.batch_size, 4 * cfg.decode_threads)
        with make_writer(cfg.format, cfg.output, task.name, self.metadata, latent_dtype=cfg.latent_dtype,
                         storage_options=cfg.storage_options) as writer:
            for item in prepare_in_threads(raw, cfg, self._pool, window=window):
                if isinstance(item, SampleError):
                    errors.append(item)
                    continue
                batch = buckets.setdefault(item.target_size, [])
                batch.append(item)
                if len(batch) >= cfg.batch_size:
                    fallbacks += self._encode_batch(batch, task.url, writer, errors)
                    buckets[item.target_size] = []
            for batch in buckets.values():
                if batch:
                    fallbacks += self._encode_batch(batch, task.url, writer, errors)
            if len(writer) + len(errors) != read:
                raise RuntimeError(f"shard {task.name}: {read} samples read but {len(writer)} written and "
                                   f"{len(errors)} errored; refusing to commit a shard that loses samples")
            stats = writer.commit()
        seconds = time.perf_counter() - start
        record = ShardRecord.from_stats(stats, input_url=task.url, samples_read=read, errors=errors,
                                        identity_hash=self.identity_hash, attempt=task.attempt, seconds=seconds)
        self.ledger.commit_record(record)
        return ShardResult(name=task.name, samples_read=read, samples_written=stats.samples,
                           samples_errored=len(errors), bytes=stats.bytes, seconds=seconds,
                           fp32_fallbacks=fallbacks,
                           attempt=task.attempt)


class EncodeActor:
    """The Ray actor: builds its own codec (weights are read here, not shipped through the object
    store) and encodes shards. Made remote by the driver with the resources it needs."""

    def __init__(self, cfg: EncodeConfig) -> None:
        # transforms checks sizes against both limits; lift Pillow's own (process-wide, so only
        # here in the actor's own process) when the config allows more.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, cfg.preprocess.max_image_pixels)
        self._encoder = ShardEncoder(cfg, build_codec(cfg.vae, cfg.storage_options))
        log.info("actor %d ready: %r", os.getpid(), self._encoder.codec)

    def describe(self) -> dict[str, Any]:
        codec = self._encoder.codec
        return {"identity": codec_identity(self._encoder.cfg, codec), "codec": repr(codec),
                "random_weights": codec.random_weights}

    def process(self, task: ShardTask) -> ShardResult:
        return self._encoder.process(task)
