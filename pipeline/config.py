"""Typed, frozen job configuration.

Every job is described by one frozen dataclass tree, checked at construction. YAML files in
`configs/` map 1:1 onto these fields (unknown keys are errors), and command-line flags or
`--set section.field=value` override them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import yaml

FORMATS = ("parquet", "safetensors")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float16", "float32")
RESAMPLE_FILTERS = ("lanczos", "bicubic", "bilinear", "box")
IMAGE_FORMATS = ("png", "jpg", "webp")
SAMPLE_MODES = ("mode", "posterior")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not allowed; expected one of {list(allowed)}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input.

    resolution: side of the square centre crop, or with `buckets` the target area is resolution².
    buckets: aspect-ratio buckets of about resolution² pixels, sides multiples of `bucket_step`.
    flip: also encode the horizontally flipped image (stored beside the original latent).
    max_image_pixels: decompression-bomb limit; larger images are recorded as errors.
    jpeg_draft: decode a JPEG at least twice the size it is resized to at a reduced DCT scale (libjpeg's
      1/2, 1/4, 1/8; never below the size the resize needs): several times less CPU per image, and
      pixels that differ slightly from a full decode (47-52 dB PSNR; BENCHMARKS.md). On by default
      (off until 2026-12-01); `false` decodes in full, and resumes an output made before then.
    max_member_bytes: the most bytes one tar member (image, caption, any passthrough member) may
      declare; a larger one is never read (its data is skipped in the stream) and its sample is
      recorded as an error. Bounds what one sample holds in memory. 64 MiB by default.
    """

    resolution: int = 512
    buckets: bool = False
    bucket_step: int = 64
    max_aspect_ratio: float = 4.0
    flip: bool = False
    resample: str = "lanczos"
    max_image_pixels: int = 89_478_485
    jpeg_draft: bool = True
    max_member_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _check(self.bucket_step > 0 and self.bucket_step % 8 == 0,
               f"preprocess.bucket_step={self.bucket_step} must be a positive multiple of 8")
        _check(self.resolution >= self.bucket_step and self.resolution % 8 == 0,
               f"preprocess.resolution={self.resolution} must be a multiple of 8 and "
               f">= bucket_step ({self.bucket_step})")
        _check(self.max_aspect_ratio >= 1.0,
               f"preprocess.max_aspect_ratio={self.max_aspect_ratio} must be >= 1")
        _one_of("preprocess.resample", self.resample, RESAMPLE_FILTERS)
        _check(self.max_image_pixels > 0,
               f"preprocess.max_image_pixels={self.max_image_pixels} must be positive")
        _check(self.max_member_bytes > 0,
               f"preprocess.max_member_bytes={self.max_member_bytes} must be positive")


@dataclass(frozen=True)
class VAEConfig:
    """Which VAE, and how to run it.

    source: a local path, an fsspec URL, a diffusers folder, a Hugging Face repo id, or
      `random:PRESET` (random weights, for tests and demos only).
    dtype: compute precision; `auto` is bfloat16 on CUDA and float32 on CPU.
    """

    source: str = "random:tiny"
    preset: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    seed: int = 0

    # Subclasses whose source may come from elsewhere (the latents' manifest) set this.
    _source_optional: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check(bool(self.source) or self._source_optional,
               "vae.source must name the VAE weights (path, URL, repo id or random:PRESET)")
        _one_of("vae.dtype", self.dtype, COMPUTE_DTYPES)
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"vae.device={self.device!r} is not allowed; expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DecodeVAEConfig(VAEConfig):
    """The decode job's VAE: `source` empty (the default) takes the VAE named in the latents'
    manifest or shard metadata, with its preset and seed; dtype, device and compile apply either way."""

    source: str = ""
    _source_optional: ClassVar[bool] = True


@dataclass(frozen=True)
class RetryConfig:
    """When a failed shard is tried again, and when the job gives up."""

    max_attempts: int = 3
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0
    shard_timeout_s: float = 3600.0
    actor_start_timeout_s: float = 900.0
    # A task lost before it started (its actor was dead or restarting) costs no attempt, up to this
    # many times per shard: past it, actors die before they can begin anything, and it is charged.
    max_unstarted: int = 200

    def __post_init__(self) -> None:
        _check(self.max_attempts >= 1, f"retry.max_attempts={self.max_attempts} must be >= 1")
        _check(self.backoff_s >= 0 and self.backoff_max_s >= self.backoff_s,
               f"retry.backoff_s={self.backoff_s} and backoff_max_s={self.backoff_max_s} "
               "must satisfy 0 <= backoff_s <= backoff_max_s")
        _check(self.shard_timeout_s > 0, f"retry.shard_timeout_s={self.shard_timeout_s} must be positive")
        _check(self.max_unstarted >= 0, f"retry.max_unstarted={self.max_unstarted} must be >= 0")
        _check(self.actor_start_timeout_s > 0,
               f"retry.actor_start_timeout_s={self.actor_start_timeout_s} must be positive")


@dataclass(frozen=True)
class ResourcesConfig:
    """What each actor asks Ray for, and how the pool follows the cluster.

    num_gpus: GPUs per actor. Unset: 1 where the cluster has GPUs (or `vae.device` is cuda) and the
      job wants them, else 0. Set it (1 for one model per GPU) on an autoscaling cluster, so that a
      job started before its GPU nodes are up waits for them instead of running on CPU.
    num_cpus: CPUs per actor (its image-decode threads run on them). Unset: 1 beside a GPU; on CPU,
      the cluster's CPUs shared by the actors.
    memory_gb: memory per actor that Ray reserves when it places it (unset: none reserved).
    custom: custom Ray resources per actor, e.g. {accelerator_type:A100: 0.001} or a node label's resource.
    max_actors: the pool grows up to this many actors as nodes where they fit join (unset: `actors`
      when that is set, else as many as fit, up to one per shard still to do).
    wait_for_nodes_s: how long to wait for a node where one actor fits when the cluster has none
      (autoscaling clusters); 0 fails at once, naming what was asked and the largest node.
    autoscale: ask Ray's autoscaler for nodes for up to `max_actors` actors
      (ray.autoscaler.sdk.request_resources), released when the job ends.
    rescale_interval_s: how often the driver looks at the cluster's nodes to grow or shrink the pool.
    """

    num_gpus: float | None = None
    num_cpus: float | None = None
    memory_gb: float | None = None
    custom: Mapping[str, float] = field(default_factory=dict)
    max_actors: int | None = None
    wait_for_nodes_s: float = 0.0
    autoscale: bool = False
    rescale_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("num_gpus", "num_cpus", "memory_gb"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"resources.{name}={value} must be >= 0 (or unset)")
        _check(self.num_cpus is None or self.num_cpus > 0 or (self.num_gpus or 0) > 0,
               "resources.num_cpus=0 needs resources.num_gpus > 0: an actor must ask Ray for something")
        bad = {k: v for k, v in dict(self.custom).items()
               if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
        _check(not bad, f"resources.custom={dict(self.custom)}: {bad} are not positive amounts of named resources")
        _check(not ({"CPU", "GPU", "memory"} & set(self.custom)),
               "resources.custom must not name CPU, GPU or memory; use num_cpus, num_gpus and memory_gb")
        _check(self.max_actors is None or self.max_actors >= 1,
               f"resources.max_actors={self.max_actors} must be >= 1 (or unset)")
        _check(self.wait_for_nodes_s >= 0, f"resources.wait_for_nodes_s={self.wait_for_nodes_s} must be >= 0")
        _check(self.rescale_interval_s > 0,
               f"resources.rescale_interval_s={self.rescale_interval_s} must be positive")
        object.__setattr__(self, "custom", {k: float(v) for k, v in dict(self.custom).items()})


def _as_tuple(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    object.__setattr__(cfg, name, (value,) if isinstance(value, str) else tuple(value))


@dataclass(frozen=True)
class RunConfig:
    """What every job kind shares: where it reads and writes, retries, actors, the error budget.

    Job configs extend it with their own fields; YAML keeps them all at the top level.
    """

    input: tuple[str, ...] = ()
    output: str = ""
    retry: RetryConfig = field(default_factory=RetryConfig)
    # How many actors to start (and, unless resources.max_actors says more, the most); unset: as many as fit.
    actors: int | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_error_rate: float = 0.05
    min_samples_for_error_rate: int = 100
    overwrite: bool = False
    # Take over the output's lock although its driver may still run (see pipeline/core/lock.py).
    break_lock: bool = False
    # Hash every committed data file against its record before resuming (a rerun checks sizes
    # only); shards whose bytes changed are redone.
    recheck: bool = False
    # An input shard whose size or ETag/mtime changed since its output was committed (a dataset tool
    # still writing it, a file replaced): "redo" it (and say so), or stop with an "error".
    changed_inputs: str = "redo"
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _as_tuple(self, "input")
        _check(len(self.input) > 0, "input must name at least one shard URL, glob or folder")
        _check(bool(self.output), "output must name the output folder (local path or URL)")
        _check(self.actors is None or self.actors >= 1, f"actors={self.actors} must be >= 1 (or unset)")
        _check(self.actors is None or self.resources.max_actors is None or self.actors <= self.resources.max_actors,
               f"actors={self.actors} is more than resources.max_actors={self.resources.max_actors}")
        _check(0.0 <= self.max_error_rate <= 1.0, f"max_error_rate={self.max_error_rate} must be in [0, 1]")
        _check(self.changed_inputs in ("redo", "error"),
               f"changed_inputs={self.changed_inputs!r} must be 'redo' or 'error'")
        _check(self.min_samples_for_error_rate >= 0,
               f"min_samples_for_error_rate={self.min_samples_for_error_rate} must be >= 0")
        object.__setattr__(self, "storage_options", dict(self.storage_options))


@dataclass(frozen=True)
class VAEJobConfig(RunConfig):
    """What the job kinds that run the VAE add: model batches, and threads that prepare items for them."""

    batch_size: int = 8
    decode_threads: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.decode_threads >= 1, f"decode_threads={self.decode_threads} must be >= 1")


@dataclass(frozen=True)
class EncodeConfig(VAEJobConfig):
    """The encode job: image shards in, latent shards out.

    passthrough: the sample members kept beside each latent (`txt`, `json`, ...); every shard of a
      job has these columns. Unset: the non-image members of the first 16 samples of the first 4
      shards, found when the job is planned. Members outside the list are counted, not kept.
    """

    vae: VAEConfig = field(default_factory=VAEConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    format: str = "parquet"
    latent_dtype: str = "float16"
    passthrough: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("format", self.format, FORMATS)
        _one_of("latent_dtype", self.latent_dtype, STORAGE_DTYPES)
        if self.passthrough is not None:
            _as_tuple(self, "passthrough")
            bad = [e for e in self.passthrough if not e or e.startswith(("_", ".")) or "/" in e]
            _check(not bad, f"passthrough={list(self.passthrough)}: {bad} are not member extensions; "
                            "expected names such as txt or json")
            object.__setattr__(self, "passthrough", tuple(sorted(set(e.lower() for e in self.passthrough))))


@dataclass(frozen=True)
class DecodeConfig(VAEJobConfig):
    """The decode job: latent shards in, WebDataset image shards out.

    vae: `vae.source` unset takes the VAE named in the latents' manifest (or shard metadata); a VAE
      whose fingerprint differs from the latents' is refused.
    sample: `mode` decodes the stored mean; `posterior` decodes mean + std * eps from the stored
      log-variance, eps seeded per key by `seed`.
    """

    vae: DecodeVAEConfig = field(default_factory=DecodeVAEConfig)
    image_format: str = "png"
    quality: int = 95
    sample: str = "mode"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("image_format", self.image_format, IMAGE_FORMATS)
        _check(1 <= self.quality <= 100, f"quality={self.quality} must be in [1, 100]")
        _one_of("sample", self.sample, SAMPLE_MODES)


@dataclass(frozen=True)
class AuditConfig(VAEJobConfig):
    """The audit job: latents decoded and scored against their source images, with a report.

    input: the latents (an encode job's output folder, or latent shard files).
    source: the source image shards; unset, each latent shard's source is the input shard its
      encode job's manifest names. Joined to latent shards by shard name.
    samples: audit a seeded random sample of this many keys across the whole cache (0: every latent).
    worst: how many samples the report shows as the worst, and as a random pick.
    fail_under_psnr: the command exits non-zero when the mean PSNR is below this (the report is
      written either way).
    max_error_rate: 1.0 by default: an audit reports missing and unreadable samples, it does not stop on them.
    """

    vae: DecodeVAEConfig = field(default_factory=DecodeVAEConfig)
    source: tuple[str, ...] = ()
    samples: int = 0
    seed: int = 0
    worst: int = 16
    fail_under_psnr: float | None = None
    max_error_rate: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _as_tuple(self, "source")
        _check(self.samples >= 0, f"samples={self.samples} must be >= 0 (0 audits every latent)")
        _check(1 <= self.worst <= 1000, f"worst={self.worst} must be in [1, 1000]")


# --- YAML and overrides -------------------------------------------------------------------------


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, Mapping), f"{name} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        _check(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        return tuple(_coerce(name, args[0], v) for v in value)
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        _check(isinstance(value, Mapping), f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}") from None
        _check(tp is float or float(value) == converted, f"{name} must be an integer, got {value!r}")
        return converted
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool),
               f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Build the dataclass `cls` from a mapping whose keys are its field names (nested for sections)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"expected some of {sorted(prefix + k for k in known)}")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-data form of a config (YAML- and JSON-serialisable)."""
    out = dataclasses.asdict(cfg)

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(out)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`preprocess.resolution`) in a nested dict; values given as YAML scalars."""
    result = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    return result


def parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    """`--set key=value` items -> {dotted key: YAML scalar text}; raises ConfigError on a malformed one."""
    sets: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set preprocess.resolution=1024")
        sets[key.strip()] = value
    return sets


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with latentcache, by name (the file name without .yaml): installed
    as package data (`pipeline.configs`), or the checkout's `configs/` when run from one."""
    import importlib.resources

    try:
        folder = Path(str(importlib.resources.files("pipeline.configs")))
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parent.parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_default(cls: type, dotted: str) -> Any:
    """The default of a config field named by its dotted key (None when it has none)."""
    head, _, rest = dotted.partition(".")
    for f in dataclasses.fields(cls):
        if f.name != head:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return None
        if rest:
            return config_default(type(value), rest) if dataclasses.is_dataclass(value) else None
        return value
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file, or a shipped config by name (`sd15-512`), into a dict (validated
    later by `from_dict`)."""
    p = Path(path)
    if not p.is_file():
        shipped = shipped_configs()
        if str(path) in shipped:
            p = shipped[str(path)]
        elif p.is_dir():
            raise ConfigError(f"--config {path}: is a folder; expected a YAML file or a shipped config name")
        else:
            raise ConfigError(f"--config {path}: no such file, and no shipped config of that name; shipped: "
                              f"{sorted(shipped)} (`latentcache configs`)")
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
