"""Latent shard writers: one Parquet or safetensors file per input shard, committed atomically.

A writer collects `LatentRecord`s for one shard (converted to the storage dtype on `add`), then
`commit()` serialises them to `<output>/_tmp/<name>.<random>.<ext>`, checks the uploaded size,
moves the file to `<output>/<name>.<ext>` (`fs.mv`; on S3 a server-side copy, so the object appears
whole), checks the final size, and returns `ShardStats` with the byte size and sha256 of what was
written. A failed write or move raises `ShardWriteError` and removes the temp file; nothing partial
is ever visible under the final name. The per-shard ledger record (see `pipeline.ledger`) is
written by the caller after `commit()` returns.

Parquet schema (one row per sample, columns in this order):

    key               string
    latent            list<halffloat | float>  scaled posterior mean, flattened in C order
    latent_shape      list<int32>              (C, h, w); shared by every latent/logvar column
    logvar            list<halffloat | float>  posterior log-variance (unscaled), same encoding
    latent_flip       list<...>, nullable      latent of the horizontally flipped image
    logvar_flip       list<...>, nullable
    original_height, original_width   int32    size of the source image
    crop_top, crop_left               int32    crop offset in the resized image
    target_height, target_width       int32    size of the image fed to the VAE
    <ext> ...                                  one column per passthrough WebDataset member,
                                               sorted by name; string for text-like extensions
                                               (see TEXT_EXTENSIONS), binary otherwise; null
                                               where a sample lacks the member

The element type is `halffloat` for latent_dtype=float16 (Parquet FLOAT16 logical type; pyarrow
>= 15 round-trips it bit-exactly) and `float` for float32. The schema metadata key `latentcache`
holds the shard metadata as a JSON object: the caller's keys (VAE fingerprint, preset, scaling,
shift, preprocessing, code version, ...) plus `schema_version`, `format`, `storage_dtype` and
`shard`.

safetensors layout (one file per shard; bucketed shards mix shapes, so one tensor per sample):

    latent.000017, logvar.000017           (C, h, w) in the storage dtype, sample index 17
    latent_flip.000017, logvar_flip.000017 present only for samples with a flipped latent
    __metadata__["latentcache"]            the shard metadata JSON (as for Parquet)
    __metadata__["samples"]                JSON list, in sample order, of {index, key,
                                           original_size, crop_top_left, target_size,
                                           latent_shape, flip, extras}; extras hold text as str
                                           and binary members as base64 str
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import secrets
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO, Callable, ClassVar, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy
from fsspec import AbstractFileSystem

METADATA_KEY = "latentcache"
SCHEMA_VERSION = "1"
STORAGE_DTYPES: dict[str, type[np.floating]] = {"float16": np.float16, "float32": np.float32}
TEXT_EXTENSIONS = frozenset({
    "txt", "text", "caption", "captions", "json", "jsonl", "cls", "cls2", "id", "index", "tags",
    "url", "md", "csv", "tsv", "yaml", "yml", "xml", "html",
})
LATENT_COLUMNS = ("latent", "logvar", "latent_flip", "logvar_flip")
SIZE_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left",
                "target_height", "target_width")
RESERVED_COLUMNS = frozenset({"key", "latent_shape", *LATENT_COLUMNS, *SIZE_COLUMNS})
# Writer-owned keys in the shard metadata; the caller may not give them other values.
_OWN_METADATA = ("schema_version", "format", "storage_dtype", "shard")
# Object stores have no directories, and `makedirs` on s3fs creates a missing bucket.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
_ROW_GROUP_BYTES = 128 * 2**20


class InvalidRecordError(ValueError):
    """`add` refused a record; the shard is unchanged, and the caller may record a SampleError."""


class ShardWriteError(RuntimeError):
    """Serialising, uploading or moving a shard file failed; no file is left under the final name."""


def is_text_extension(ext: str) -> bool:
    """Whether a passthrough member is stored as text (by its last dotted part: `caption.txt`)."""
    return ext.rsplit(".", 1)[-1].lower() in TEXT_EXTENSIONS


@dataclass
class LatentRecord:
    """One encoded sample: scaled posterior mean, unscaled log-variance, geometry and passthrough."""

    key: str
    latent: np.ndarray
    logvar: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    latent_flip: np.ndarray | None = None
    logvar_flip: np.ndarray | None = None
    extras: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardStats:
    """What `commit()` wrote: the shard name, its full URL, sample count, byte size and sha256."""

    name: str
    path: str
    samples: int
    bytes: int
    sha256: str


# --- storage helpers (shared with the ledger) ----------------------------------------------------


def output_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and protocol-less root path for an output folder URL (or local path)."""
    if not url:
        raise ValueError("output URL is empty; expected a local path or an fsspec URL such as s3://bucket/out")
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, root.rstrip("/") or root


def join(root: str, *parts: str) -> str:
    """Join path parts with `/` (fsspec paths are POSIX-style on every filesystem)."""
    return posixpath.join(root, *parts)


def ensure_dir(fs: AbstractFileSystem, path: str) -> None:
    """Create a directory where the filesystem has directories; object stores need none."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if not _OBJECT_STORES.intersection(protocols):
        fs.makedirs(path, exist_ok=True)


class _HashingWriter:
    """A write-only file wrapper that counts and hashes the bytes passing through."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self.bytes += view.nbytes
        self._raw.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True  # the underlying file is closed by its owner

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def _remove_after_failure(fs: AbstractFileSystem, path: str, error: BaseException) -> None:
    """Remove a temp file after a failure; a failed removal is attached to `error`, not hidden."""
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm_file(path)
    except Exception as cleanup:  # noqa: BLE001 - reported on the original error, which is re-raised
        error.add_note(f"also failed to remove temp file {fs.unstrip_protocol(path)}: {cleanup!r}")


def write_atomically(fs: AbstractFileSystem, root: str, final_path: str,
                     serialize: Callable[[BinaryIO], None]) -> tuple[int, str]:
    """Write via `<root>/_tmp/` and move to `final_path`; returns (bytes, sha256) of what was written.

    Raises ShardWriteError (chained to the cause) when writing, checking or moving fails; the temp
    file is removed then, and nothing is created under `final_path` by a failed write.
    """
    base = posixpath.basename(final_path)
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem = ext
    tmp_path = join(root, "_tmp", f"{stem}.{secrets.token_hex(8)}{dot}{ext}")
    final_url = fs.unstrip_protocol(final_path)
    try:
        ensure_dir(fs, posixpath.dirname(tmp_path))
        ensure_dir(fs, posixpath.dirname(final_path))
        with fs.open(tmp_path, "wb") as raw:
            out = _HashingWriter(raw)
            serialize(out)  # type: ignore[arg-type]
        fs.invalidate_cache(tmp_path)
        landed = fs.info(tmp_path)["size"]
        if landed != out.bytes:
            raise ShardWriteError(f"temp file {fs.unstrip_protocol(tmp_path)} has {landed} bytes; "
                                  f"expected the {out.bytes} bytes written")
        fs.mv(tmp_path, final_path)
        fs.invalidate_cache(final_path)
        moved = fs.info(final_path)["size"]
        if moved != out.bytes:  # never leave wrong bytes under the final name
            fs.rm_file(final_path)
            raise ShardWriteError(f"{final_url} had {moved} bytes after the move; expected {out.bytes}; removed it")
    except Exception as e:
        _remove_after_failure(fs, tmp_path, e)
        if isinstance(e, ShardWriteError):
            raise
        raise ShardWriteError(f"writing {final_url} failed: {type(e).__name__}: {e}") from e
    except BaseException as e:  # KeyboardInterrupt etc.: clean up, re-raise unchanged
        _remove_after_failure(fs, tmp_path, e)
        raise
    return out.bytes, out.sha256


def write_bytes_atomically(fs: AbstractFileSystem, root: str, final_path: str, data: bytes) -> tuple[int, str]:
    """`write_atomically` for a small payload already in memory (records, manifests, markers)."""
    return write_atomically(fs, root, final_path, lambda f: f.write(data))


# --- writers --------------------------------------------------------------------------------------


def _pair(value: Any, what: str, key: str, *, minimum: int) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidRecordError(f"sample {key!r}: {what}={value!r} must be two integers") from None
    if a < minimum or b < minimum:
        raise InvalidRecordError(f"sample {key!r}: {what}={value!r} must be >= {minimum}")
    return a, b


class ShardWriter:
    """Collects the records of one shard and commits them as one file; see the module docstring.

    Use as a context manager: an exception inside the block aborts the shard; leaving the block
    normally without `commit()` aborts it and raises, since that is a caller bug.
    """

    extension: ClassVar[str] = ""
    format: ClassVar[str] = ""

    def __init__(self, output_url: str, name: str, metadata: Mapping[str, str], *,
                 latent_dtype: str = "float16", storage_options: Mapping[str, Any] | None = None) -> None:
        if not name or "/" in name or "\\" in name or name[0] in "_.":
            raise ValueError(f"shard name {name!r} is not allowed; expected a non-empty file stem "
                             "without '/' that does not start with '_' or '.'")
        if latent_dtype not in STORAGE_DTYPES:
            raise ValueError(f"latent_dtype={latent_dtype!r} is not allowed; expected one of {list(STORAGE_DTYPES)}")
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"shard metadata must map str to str; got non-str entries {bad!r}")
        self.name = name
        self.latent_dtype = latent_dtype
        self._dtype = STORAGE_DTYPES[latent_dtype]
        self._fs, self._root = output_fs(output_url, storage_options)
        self.path = join(self._root, f"{name}.{self.extension}")
        own = {"schema_version": SCHEMA_VERSION, "format": self.format,
               "storage_dtype": latent_dtype, "shard": name}
        clash = {k: metadata[k] for k in _OWN_METADATA if k in metadata and metadata[k] != own[k]}
        if clash:
            expected = {k: own[k] for k in clash}
            raise ValueError(f"shard metadata keys {sorted(clash)} are set by the writer; "
                             f"got {clash!r}, expected {expected!r} or absent")
        self.metadata: dict[str, str] = {**metadata, **own}
        self._records: list[LatentRecord] = []
        self._keys: set[str] = set()
        self._state = "open"  # -> "committed" | "aborted"

    def __len__(self) -> int:
        return len(self._records)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            return
        if self._state == "open":
            self.abort()
            raise ShardWriteError(f"shard {self.name}: left the `with` block without commit(); "
                                  "nothing was written")

    # -- records --

    def _array(self, value: Any, what: str, key: str, shape: tuple[int, ...] | None) -> np.ndarray:
        arr = np.asarray(value)
        if arr.ndim != 3 or arr.dtype.kind != "f":
            raise InvalidRecordError(f"sample {key!r}: {what} has shape {arr.shape} and dtype {arr.dtype}; "
                                     "expected a 3-d (C, h, w) float array")
        if shape is not None and arr.shape != shape:
            raise InvalidRecordError(f"sample {key!r}: {what} has shape {arr.shape}; expected {shape} "
                                     "(the latent's shape)")
        with np.errstate(over="ignore"):  # overflow to inf is checked just below, with a better message
            stored = np.ascontiguousarray(arr, dtype=self._dtype)
        if not np.isfinite(stored).all():
            raise InvalidRecordError(f"sample {key!r}: {what} has non-finite values in {self.latent_dtype} "
                                     f"(max |x| = {float(np.nanmax(np.abs(arr.astype(np.float64)))):g}); "
                                     "expected finite values within the storage dtype's range")
        return stored

    def add(self, record: LatentRecord) -> None:
        """Validate, convert to the storage dtype, and buffer one sample.

        Raises InvalidRecordError (the shard is unchanged) for a duplicate or empty key, a bad shape,
        non-finite values, a reserved or malformed extension, or text that is not UTF-8.
        """
        if self._state != "open":
            raise ShardWriteError(f"shard {self.name}: add() after the shard was {self._state}")
        key = record.key
        if not isinstance(key, str) or not key:
            raise InvalidRecordError(f"sample key {key!r} must be a non-empty string")
        if key in self._keys:
            raise InvalidRecordError(f"sample {key!r} appears twice in shard {self.name}; keys must be unique")
        latent = self._array(record.latent, "latent", key, None)
        logvar = self._array(record.logvar, "logvar", key, latent.shape)
        if (record.latent_flip is None) != (record.logvar_flip is None):
            raise InvalidRecordError(f"sample {key!r}: latent_flip and logvar_flip must both be given or both None")
        latent_flip = logvar_flip = None
        if record.latent_flip is not None:
            latent_flip = self._array(record.latent_flip, "latent_flip", key, latent.shape)
            logvar_flip = self._array(record.logvar_flip, "logvar_flip", key, latent.shape)
        extras: dict[str, bytes] = {}
        for ext, value in record.extras.items():
            if not isinstance(ext, str) or not ext or ext.startswith("_") or ext in RESERVED_COLUMNS:
                raise InvalidRecordError(f"sample {key!r}: extension {ext!r} is not allowed; expected a "
                                         f"non-empty name not starting with '_' and not one of {sorted(RESERVED_COLUMNS)}")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidRecordError(f"sample {key!r}: extra {ext!r} is {type(value).__name__}; expected bytes")
            data = bytes(value)
            if is_text_extension(ext):
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidRecordError(f"sample {key!r}: text member {ext!r} is not UTF-8 ({e})") from None
            extras[ext] = data
        self._records.append(LatentRecord(
            key=key, latent=latent, logvar=logvar,
            original_size=_pair(record.original_size, "original_size", key, minimum=1),
            crop_top_left=_pair(record.crop_top_left, "crop_top_left", key, minimum=0),
            target_size=_pair(record.target_size, "target_size", key, minimum=1),
            latent_flip=latent_flip, logvar_flip=logvar_flip, extras=extras))
        self._keys.add(key)

    # -- commit / abort --

    def commit(self) -> ShardStats:
        """Write the shard file (temp name, then the final name) and return what was written."""
        if self._state != "open":
            raise ShardWriteError(f"shard {self.name}: commit() after the shard was {self._state}")
        self._state = "committing"
        try:
            size, sha = write_atomically(self._fs, self._root, self.path, self._serialize)
        except BaseException:
            self._state = "aborted"
            self._records.clear()
            raise
        self._state = "committed"
        samples = len(self._records)
        self._records.clear()
        return ShardStats(name=self.name, path=self._fs.unstrip_protocol(self.path),
                          samples=samples, bytes=size, sha256=sha)

    def abort(self) -> None:
        """Drop the buffered records; idempotent and a no-op after a successful commit.

        The temp file only exists inside `commit()`, which removes it on any failure.
        """
        if self._state in ("open", "committing"):
            self._state = "aborted"
        self._records.clear()

    def _metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)

    def _serialize(self, out: BinaryIO) -> None:
        raise NotImplementedError


class ParquetShardWriter(ShardWriter):
    """One row per sample; see the module docstring for the schema."""

    extension = "parquet"
    format = "parquet"

    def _extension_columns(self) -> list[str]:
        return sorted({ext for r in self._records for ext in r.extras})

    def schema(self, extensions: list[str] | None = None) -> pa.Schema:
        """The Parquet schema for the records buffered so far (passthrough columns `extensions`,
        computed from the records when not given), with the shard metadata."""
        value = pa.float16() if self._dtype is np.float16 else pa.float32()
        fields = [pa.field("key", pa.string(), nullable=False),
                  pa.field("latent", pa.list_(value), nullable=False),
                  pa.field("latent_shape", pa.list_(pa.int32()), nullable=False),
                  pa.field("logvar", pa.list_(value), nullable=False),
                  pa.field("latent_flip", pa.list_(value)),
                  pa.field("logvar_flip", pa.list_(value))]
        fields += [pa.field(c, pa.int32(), nullable=False) for c in SIZE_COLUMNS]
        fields += [pa.field(ext, pa.string() if is_text_extension(ext) else pa.binary())
                   for ext in (self._extension_columns() if extensions is None else extensions)]
        return pa.schema(fields, metadata={METADATA_KEY: self._metadata_json()})

    @staticmethod
    def _list_column(arrays: list[np.ndarray | None], type_: pa.DataType) -> pa.Array:
        lengths = np.array([0 if a is None else a.size for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        present = [a.ravel() for a in arrays if a is not None]
        values = np.concatenate(present) if present else np.zeros(0, dtype=type_.value_type.to_pandas_dtype())
        mask = pa.array([a is None for a in arrays], type=pa.bool_())
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type),
                                        type=type_, mask=mask if any(a is None for a in arrays) else None)

    def _batch(self, records: list[LatentRecord], schema: pa.Schema, extensions: list[str]) -> pa.RecordBatch:
        columns: dict[str, pa.Array] = {"key": pa.array([r.key for r in records], type=pa.string())}
        for name in LATENT_COLUMNS:
            columns[name] = self._list_column([getattr(r, name) for r in records], schema.field(name).type)
        columns["latent_shape"] = pa.array([list(r.latent.shape) for r in records], type=pa.list_(pa.int32()))
        sizes = {"original_height": lambda r: r.original_size[0], "original_width": lambda r: r.original_size[1],
                 "crop_top": lambda r: r.crop_top_left[0], "crop_left": lambda r: r.crop_top_left[1],
                 "target_height": lambda r: r.target_size[0], "target_width": lambda r: r.target_size[1]}
        for name, get in sizes.items():
            columns[name] = pa.array([get(r) for r in records], type=pa.int32())
        for ext in extensions:
            text = is_text_extension(ext)
            values = [r.extras.get(ext) for r in records]
            columns[ext] = pa.array([None if v is None else (v.decode("utf-8") if text else v) for v in values],
                                    type=schema.field(ext).type)
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def _rows_per_group(self) -> int:
        if not self._records:
            return 1
        total = sum(r.latent.nbytes * (4 if r.latent_flip is not None else 2) for r in self._records)
        return max(1, int(_ROW_GROUP_BYTES // max(1, total // len(self._records))))

    def _serialize(self, out: BinaryIO) -> None:
        extensions = self._extension_columns()  # one scan of the records, not one per row group
        schema = self.schema(extensions)
        scalar_columns = ["key", *SIZE_COLUMNS]
        dictionary_columns = [e for e in extensions if is_text_extension(e)]
        step = self._rows_per_group()
        with pq.ParquetWriter(out, schema, compression="zstd", use_dictionary=dictionary_columns,
                              write_statistics=scalar_columns) as writer:
            for start in range(0, len(self._records), step):
                writer.write_batch(self._batch(self._records[start:start + step], schema, extensions),
                                   row_group_size=step)


class SafetensorsShardWriter(ShardWriter):
    """One tensor per sample and field; sample fields in the `samples` metadata JSON."""

    extension = "safetensors"
    format = "safetensors"

    def _serialize(self, out: BinaryIO) -> None:
        tensors: dict[str, np.ndarray] = {}
        samples: list[dict[str, Any]] = []
        for i, r in enumerate(self._records):
            suffix = f"{i:06d}"
            tensors[f"latent.{suffix}"] = r.latent
            tensors[f"logvar.{suffix}"] = r.logvar
            if r.latent_flip is not None:
                tensors[f"latent_flip.{suffix}"] = r.latent_flip
                tensors[f"logvar_flip.{suffix}"] = r.logvar_flip  # type: ignore[assignment]
            samples.append({
                "index": i, "key": r.key,
                "original_size": list(r.original_size), "crop_top_left": list(r.crop_top_left),
                "target_size": list(r.target_size), "latent_shape": list(r.latent.shape),
                "flip": r.latent_flip is not None,
                "extras": {ext: (v.decode("utf-8") if is_text_extension(ext) else base64.b64encode(v).decode("ascii"))
                           for ext, v in sorted(r.extras.items())},
            })
        metadata = {METADATA_KEY: self._metadata_json(), "samples": json.dumps(samples)}
        out.write(safetensors.numpy.save(tensors, metadata=metadata))


WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "safetensors": SafetensorsShardWriter}


def make_writer(format: str, output_url: str, name: str, metadata: Mapping[str, str], *,
                latent_dtype: str = "float16", storage_options: Mapping[str, Any] | None = None) -> ShardWriter:
    """A writer for shard `name` under `output_url` in `format` (parquet or safetensors)."""
    try:
        cls = WRITERS[format]
    except KeyError:
        raise ValueError(f"format={format!r} is not allowed; expected one of {sorted(WRITERS)}") from None
    return cls(output_url, name, metadata, latent_dtype=latent_dtype, storage_options=storage_options)


__all__ = [
    "LatentRecord", "ShardStats", "ShardWriter", "ParquetShardWriter", "SafetensorsShardWriter",
    "InvalidRecordError", "ShardWriteError", "make_writer", "is_text_extension",
    "METADATA_KEY", "TEXT_EXTENSIONS",
]
