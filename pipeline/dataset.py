"""The training reader: a PyTorch `IterableDataset` over latent shards, on any fsspec URL.

`LatentDataset(url)` streams the committed latent shards of an output folder (or the shard files
given) shard by shard, row batch by row batch, never downloading the whole dataset first. Shards
are split over distributed ranks and DataLoader workers: in epoch order, shard i goes to global
worker i mod (world_size * num_workers), global worker = rank * num_workers + worker id. With
fewer shards than workers, some workers yield nothing (an exact partition, no duplicates).

Every sample is a dict:

    key               str
    latent            float32 tensor (C, h, w): the scaled posterior mean (sample="mode"), or a
                      seeded posterior sample scaled the same way (sample="posterior")
    latent_flip       the same for the horizontally flipped image; only when the shard has it
    original_size     (h, w) of the source image    } SDXL micro-conditioning
    crop_top_left     (top, left)                    }
    target_size       (h, w) fed to the VAE          }
    <ext>             each passthrough member by its extension: text as str, `json` (and any
                      `*.json`) parsed with json.loads, binary as bytes; absent when the sample
                      lacks it

All shards must agree on `vae_fingerprint`, `preset`, the latent scaling (`scaling_factor`,
`shift_factor`, and `latents_mean`/`latents_std` where the VAE normalises per channel) and
`preprocess` (and the fingerprint must equal `expect_fingerprint` when given); this is checked in
`__init__` from each shard's footer/header and refused with `IncompatibleShardsError`.

Latent shapes may differ between samples (bucketed caches); `ShapeBatched` / `batch_by_shape`
make batches of one shape each. A training loop (one process per GPU, under torchrun):

    import torch
    from torch.utils.data import DataLoader
    from pipeline.dataset import LatentDataset, ShapeBatched

    # rank and world size come from torch.distributed once init_process_group() has run
    ds = LatentDataset("s3://my-bucket/latents/sdxl-1024", sample="posterior", shuffle=True,
                       seed=1234, expect_fingerprint="<the VAE fingerprint you train with>")
    loader = DataLoader(ShapeBatched(ds, batch_size=32, drop_last=True), batch_size=None,
                        num_workers=4, pin_memory=True)
    for epoch in range(num_epochs):
        ds.set_epoch(epoch)  # before iterating: a new shard order, buffer shuffle and noise
        for batch in loader:
            latents = batch["latent"].cuda(non_blocking=True)  # (B, C, h, w), already scaled
            captions = batch["txt"]                             # list of str
            time_ids = torch.tensor([[*o, *c, *t] for o, c, t in zip(
                batch["original_size"], batch["crop_top_left"], batch["target_size"])])
            ...

Notes: keep `persistent_workers=False` (the default), since workers take a copy of the dataset,
epoch included, each time the loader is iterated. With `DataLoader(batch_size=None)` PyTorch
converts tuples to lists (`original_size` arrives as [h, w]). With `drop_last=True` each worker
drops its own partial batches, up to (number of shapes) x (batch_size - 1) samples per worker and
epoch. `ds.metadata` is the first shard's metadata dict (str values; `scaling_factor`,
`shift_factor`, `vae_fingerprint`, ... are the same in every shard), and `ds.scaling` the latent
scaling it records (a `vae.presets.LatentScaling`: `ds.scaling.unscale(latent)` is what the VAE
decodes).

Memory per worker: `shuffle_buffer` samples as stored (float16 latents, plus log-variance with
sample="posterior"), plus what `pipeline.io.latent_reader` holds for the one open shard (a Parquet row
batch of 64 rows; a safetensors read-ahead block), plus (number of distinct shapes) x batch_size
samples in ShapeBatched.
"""

from __future__ import annotations

import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.config import SAMPLE_MODES
from pipeline.io.latent_reader import read_latents, read_shard_metadata, shard_urls
from pipeline.posterior import generator, sample_scaled, seed_of
from vae.presets import LatentScaling

logger = logging.getLogger(__name__)

# Shard metadata that every shard of one dataset must agree on.
COMPATIBILITY_KEYS = ("vae_fingerprint", "preset", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
                      "preprocess")
_OWN_FIELDS = frozenset({"key", "latent", "latent_flip", "original_size", "crop_top_left", "target_size"})
_METADATA_THREADS = 16

Sample = dict[str, Any]
_Raw = tuple[str, np.ndarray, dict]


class IncompatibleShardsError(ValueError):
    """Shards of one dataset disagree on the VAE, scaling or preprocessing, or on the expected fingerprint."""


def _comparable(key: str, value: str | None) -> Any:
    """A metadata value in the form it is compared in: floats as float, preprocess as parsed JSON."""
    if value is None:
        return None
    try:
        if key in ("scaling_factor", "shift_factor"):
            return float(value)
        if key in ("preprocess", "latents_mean", "latents_std"):
            return json.loads(value)
    except (TypeError, ValueError):
        pass
    return value


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor owning writable memory (no copy when the array already is one)."""
    out = np.asarray(array, dtype=np.float32)
    if not (out.flags.writeable and out.flags.c_contiguous):
        out = np.array(out, dtype=np.float32, order="C")
    return torch.from_numpy(out)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else the arguments (default 0, 1)."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name}={value!r} is not allowed; expected an int or None")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dist_rank, dist_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        given = {"rank": (rank, dist_rank), "world_size": (world_size, dist_world)}
        clash = {k: v for k, (v, d) in given.items() if v is not None and v != d}
        if clash:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in clash.items())} disagrees with "
                             f"torch.distributed (rank {dist_rank} of {dist_world}); expected the "
                             "same values or None")
        rank, world_size = dist_rank, dist_world
    elif (rank is None) != (world_size is None):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: expected both or neither "
                         "(without torch.distributed they default to 0 and 1)")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is not allowed; expected an int >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not allowed; expected 0 <= rank < world_size={world_size}, "
                         f"i.e. in [0, {world_size})")
    return rank, world_size


def _check_compatible(urls: list[str], metas: list[dict[str, str]], expect_fingerprint: str | None) -> None:
    """Raise IncompatibleShardsError at the first shard that disagrees with the first one or with
    `expect_fingerprint`."""
    first_url, first = urls[0], metas[0]
    for url, meta in zip(urls, metas):
        if expect_fingerprint is not None and meta.get("vae_fingerprint") != expect_fingerprint:
            raise IncompatibleShardsError(
                f"latent shard {url} has vae_fingerprint {meta.get('vae_fingerprint')!r}; expected "
                f"{expect_fingerprint!r} (expect_fingerprint): it was encoded with another VAE")
        diffs = [f"{k}: {first_url} has {first.get(k)!r}, {url} has {meta.get(k)!r}"
                 for k in COMPATIBILITY_KEYS if _comparable(k, first.get(k)) != _comparable(k, meta.get(k))]
        if diffs:
            raise IncompatibleShardsError(
                "latent shards disagree on " + "; ".join(diffs) + "; one dataset must come from one "
                "VAE, one latent scaling and one preprocessing (read them as separate datasets)")


def _buffer_shuffle(items: Iterable[_Raw], size: int, rng: random.Random) -> Iterator[_Raw]:
    """Shuffle within a buffer of `size` items: memory bounded, each item yielded once."""
    buffer: list[_Raw] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class LatentDataset(IterableDataset):
    """Samples of the committed latent shards at `url` (an output folder, a shard file, or a list of
    them); see the module docstring for the sample dict and the split over ranks and workers.

    rank, world_size: this process's place among the training processes; taken from
        torch.distributed when it is initialised (then they may be omitted), else default 0 and 1.
    sample: "mode" (the stored scaled mean) or "posterior" (mean + gain * std * eps, gain the
        scaling_factor, per channel divided by latents_std where set; eps ~ N(0, 1) seeded from
        (seed, epoch, key): reproducible whatever the worker layout).
    seed: seeds the shard order, the buffer shuffle and the posterior noise.
    expect_fingerprint: refuse shards whose vae_fingerprint differs.
    shuffle: a seeded shard order per epoch (the same on every rank) and a shuffle of samples
        within a buffer of `shuffle_buffer` samples.
    """

    def __init__(self, url: str | Sequence[str], *, rank: int | None = None, world_size: int | None = None,
                 sample: str = "mode", seed: int = 0, expect_fingerprint: str | None = None,
                 shuffle: bool = False, storage_options: Mapping[str, Any] | None = None,
                 shuffle_buffer: int = 1000) -> None:
        super().__init__()
        if sample not in SAMPLE_MODES:
            raise ValueError(f"sample={sample!r} is not allowed; expected one of {list(SAMPLE_MODES)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} is not allowed; expected an int")
        if not isinstance(shuffle_buffer, int) or isinstance(shuffle_buffer, bool) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r} is not allowed; expected an int >= 1")
        if expect_fingerprint is not None and (not isinstance(expect_fingerprint, str) or not expect_fingerprint):
            raise ValueError(f"expect_fingerprint={expect_fingerprint!r} is not allowed; "
                             "expected a non-empty str or None")
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.sample = sample
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = shuffle_buffer
        self.storage_options = dict(storage_options or {})
        self.epoch = 0

        self.shards: list[str] = shard_urls(url, self.storage_options)
        if not self.shards:
            raise ValueError(f"no committed latent shards at {url!r}; expected an output folder with "
                             "committed shards, or shard files")
        if len(set(self.shards)) != len(self.shards):
            dupes = sorted({u for u in self.shards if self.shards.count(u) > 1})
            raise ValueError(f"shards {dupes[:5]} are given more than once; expected each shard once")
        with ThreadPoolExecutor(min(_METADATA_THREADS, len(self.shards))) as pool:
            metas = list(pool.map(lambda u: read_shard_metadata(u, self.storage_options), self.shards))
        _check_compatible(self.shards, metas, expect_fingerprint)
        self.metadata: dict[str, str] = dict(metas[0])
        self.scaling_factor: float | None = _comparable("scaling_factor", self.metadata.get("scaling_factor"))
        self.scaling: LatentScaling | None
        try:
            self.scaling = LatentScaling.from_metadata(self.metadata, where=f"latent shard {self.shards[0]}")
        except ValueError as e:
            if sample == "posterior":
                raise ValueError(f"sample='posterior' needs the shards' latent scaling: {e}") from None
            self.scaling = None  # the stored latents are yielded as they are; nothing to scale

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (call before iterating the DataLoader): it changes the shuffled shard
        order, the buffer shuffle and the posterior noise, identically on every rank."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} is not allowed; expected an int >= 0")
        self.epoch = epoch

    def shard_order(self) -> list[str]:
        """This epoch's shard order (shuffled with (seed, epoch) when shuffle=True), the same on every rank."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(seed_of(self.seed, self.epoch, "shards")).shuffle(order)
        return order

    def worker_shards(self, worker_id: int = 0, num_workers: int = 1) -> list[str]:
        """The shards that DataLoader worker `worker_id` of `num_workers` on this rank reads this epoch."""
        total = self.world_size * num_workers
        return self.shard_order()[self.rank * num_workers + worker_id::total]

    def _raw(self, shards: list[str]) -> Iterator[_Raw]:
        posterior = self.sample == "posterior"
        for url in shards:
            yield from read_latents(url, self.storage_options, with_logvar=posterior)

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.worker_shards(worker_id, num_workers)
        if not mine:
            logger.warning("rank %d worker %d has no shards: %d shard(s) over %d worker(s) in all",
                           self.rank, worker_id, len(self.shards), self.world_size * num_workers)
        raw = self._raw(mine)
        if self.shuffle:
            rng = random.Random(seed_of(self.seed, self.epoch, "buffer", self.rank, worker_id, num_workers))
            raw = _buffer_shuffle(raw, self.shuffle_buffer, rng)
        for key, latent, meta in raw:
            yield self._sample(key, latent, meta)

    def _sample(self, key: str, latent: np.ndarray, meta: dict[str, Any]) -> Sample:
        out: Sample = {"key": key}
        flip = meta.get("latent_flip")
        if self.sample == "posterior":
            g = generator(self.seed, self.epoch, key)
            out["latent"] = self._posterior(latent, meta["logvar"], g)
            if flip is not None:
                out["latent_flip"] = self._posterior(flip, meta["logvar_flip"], g)
        else:
            out["latent"] = _tensor(latent)
            if flip is not None:
                out["latent_flip"] = _tensor(flip)
        out["original_size"] = tuple(meta["original_size"])
        out["crop_top_left"] = tuple(meta["crop_top_left"])
        out["target_size"] = tuple(meta["target_size"])
        for ext, value in meta["extras"].items():
            if ext in _OWN_FIELDS:
                raise ValueError(f"sample {key!r} in shard {meta['shard']}: passthrough member {ext!r} "
                                 f"clashes with a sample field; expected none of {sorted(_OWN_FIELDS)}")
            if ext.rsplit(".", 1)[-1].lower() == "json" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"sample {key!r} in shard {meta['shard']}: member {ext!r} is not "
                                     f"valid JSON: {e}") from None
            out[ext] = value
        return out

    def _posterior(self, mean: np.ndarray, logvar: np.ndarray, g: torch.Generator) -> torch.Tensor:
        """See pipeline.posterior: the scaled mean plus scaled noise, scale(z) for z ~ N(mean, var)."""
        assert self.scaling is not None  # checked in __init__ for sample="posterior"
        return sample_scaled(_tensor(mean), _tensor(logvar), self.scaling, g)

    def __repr__(self) -> str:
        return (f"LatentDataset({len(self.shards)} shards, rank {self.rank}/{self.world_size}, "
                f"sample={self.sample!r}, shuffle={self.shuffle}, seed={self.seed}, epoch={self.epoch})")


def _collate(samples: list[Sample]) -> dict[str, Any]:
    """One batch: `latent` stacked, `latent_flip` stacked when every sample has it (else a list
    with None for the missing ones), every other field a list (None where a sample lacks it)."""
    fields: dict[str, None] = {}
    for s in samples:
        fields.update(dict.fromkeys(s))
    batch: dict[str, Any] = {}
    for name in fields:
        values = [s.get(name) for s in samples]
        if name == "latent" or (name == "latent_flip" and all(v is not None for v in values)):
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


def batch_by_shape(samples: Iterable[Sample], batch_size: int, *, drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Batches of `batch_size` samples whose latents share one shape (see `_collate` for the dict).

    Keeps one pending list per distinct shape, so memory is bounded by (number of shapes) x
    batch_size samples. At the end the partial batches follow, in order of first appearance of
    their shape, unless `drop_last`.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; expected an int >= 1")
    pending: dict[tuple[int, ...], list[Sample]] = {}
    for s in samples:
        bucket = pending.setdefault(tuple(s["latent"].shape), [])
        bucket.append(s)
        if len(bucket) == batch_size:
            yield _collate(bucket)
            bucket.clear()
    if not drop_last:
        for bucket in pending.values():
            if bucket:
                yield _collate(bucket)


class ShapeBatched(IterableDataset):
    """`batch_by_shape` over a dataset, as a dataset: batching runs inside each DataLoader worker.

    Use with `DataLoader(ShapeBatched(ds, batch_size), batch_size=None, num_workers=...)`.
    """

    def __init__(self, dataset: LatentDataset | IterableDataset, batch_size: int, *, drop_last: bool = False) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; expected an int >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped dataset."""
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return batch_by_shape(iter(self.dataset), self.batch_size, drop_last=self.drop_last)


__all__ = ["LatentDataset", "ShapeBatched", "batch_by_shape", "IncompatibleShardsError",
           "COMPATIBILITY_KEYS", "SAMPLE_MODES"]
