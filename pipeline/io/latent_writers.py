"""Latent shard writers: one Parquet or safetensors file per input shard, streamed, committed atomically.

A writer takes `LatentRecord`s for one shard (checked and converted to the storage dtype on `add`)
and streams them out as they come, so its memory does not grow with the shard: Parquet one row
group at a time into `<output>/.latentcache/tmp/<name>.<random>.parquet` (s3fs uploads parts as its
buffer fills); safetensors, whose header (with every tensor's offset) comes first, spools tensor
bytes to a local temporary file and uploads header + data at `commit()`. `commit()` then moves the
temp object to `<output>/<name>.<ext>` (`fs.mv`; on S3 a server-side copy, so the object appears
whole), checks its size, and returns `ShardStats` with the byte size and sha256 of what was
written. A failed write or move raises `ShardWriteError` and removes the temp file; nothing partial
is ever visible under the final name. The per-shard ledger record (see `pipeline.core.ledger`) is written
by the caller after `commit()` returns.

Every shard of a job has the same columns: the passthrough members are given to the writer
(`columns`), and a record carrying another member is refused.

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
    <ext> ...                                  one column per passthrough member (`columns`),
                                               sorted by name; string for text-like extensions
                                               (see TEXT_EXTENSIONS), binary otherwise; null
                                               where a sample lacks the member

The element type is `halffloat` for latent_dtype=float16 (Parquet FLOAT16 logical type; pyarrow
>= 15 round-trips it bit-exactly) and `float` for float32. Pages carry CRC checksums. The schema
metadata key `latentcache` holds the shard metadata as a JSON object: the caller's keys (VAE
fingerprint, preset, scaling, shift, preprocessing, code version, ...) plus `schema_version`,
`format`, `storage_dtype` and `shard`.

safetensors layout (one file per shard; bucketed shards mix shapes, so one tensor per sample):

    latent.000017, logvar.000017           (C, h, w) in the storage dtype, sample index 17
    latent_flip.000017, logvar_flip.000017 present only for samples with a flipped latent
    extras.<ext>.000017                    uint8 bytes of a passthrough member (text as UTF-8)
    __metadata__["latentcache"]            the shard metadata JSON (as for Parquet)
    __metadata__["samples"]                JSON list, in sample order, of {index, key,
                                           original_size, crop_top_left, target_size,
                                           latent_shape, flip, members}; members names the
                                           passthrough members stored as tensors (schema 1 kept
                                           them in `extras`, text as str and binary as base64,
                                           which readers still accept)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.layout import METADATA_KEY
from pipeline.core.sink import InvalidRecordError, ShardSink, ShardStats
from pipeline.core.storage import ShardWriteError

SCHEMA_VERSION = "2"
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
log = logging.getLogger(__name__)
# A row group (and the records buffered for it) holds about this many bytes: memory per writer.
ROW_GROUP_BYTES = 32 * 2**20
_COPY_CHUNK = 8 * 2**20


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


# --- writers --------------------------------------------------------------------------------------


def _pair(value: Any, what: str, key: str, *, minimum: int) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidRecordError(f"sample {key!r}: {what}={value!r} must be two integers") from None
    if a < minimum or b < minimum:
        raise InvalidRecordError(f"sample {key!r}: {what}={value!r} must be >= {minimum}")
    return a, b




def _check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    bad = [c for c in columns if not isinstance(c, str) or not c or c.startswith("_") or c in RESERVED_COLUMNS]
    if bad:
        raise ValueError(f"passthrough columns {bad!r} are not allowed; expected non-empty names not starting "
                         f"with '_' and not one of {sorted(RESERVED_COLUMNS)}")
    return tuple(sorted(set(columns)))


class ShardWriter(ShardSink):
    """Streams the latent records of one shard into one file; see the module docstring.

    columns: the passthrough members every record may carry (the job's, the same for each shard).
    """

    format: ClassVar[str] = ""

    def __init__(self, output_url: str, name: str, metadata: Mapping[str, str], *,
                 latent_dtype: str = "float16", columns: Sequence[str] = (),
                 storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(output_url, name, storage_options=storage_options)
        if latent_dtype not in STORAGE_DTYPES:
            raise ValueError(f"latent_dtype={latent_dtype!r} is not allowed; expected one of {list(STORAGE_DTYPES)}")
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"shard metadata must map str to str; got non-str entries {bad!r}")
        self.latent_dtype = latent_dtype
        self.columns = _check_columns(columns)
        self._dtype = STORAGE_DTYPES[latent_dtype]
        own = {"schema_version": SCHEMA_VERSION, "format": self.format,
               "storage_dtype": latent_dtype, "shard": name}
        clash = {k: metadata[k] for k in _OWN_METADATA if k in metadata and metadata[k] != own[k]}
        if clash:
            expected = {k: own[k] for k in clash}
            raise ValueError(f"shard metadata keys {sorted(clash)} are set by the writer; "
                             f"got {clash!r}, expected {expected!r} or absent")
        self.metadata: dict[str, str] = {**metadata, **own}

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

    def _accept(self, record: LatentRecord) -> LatentRecord:
        """Refuses a bad shape, non-finite values, a member outside `columns`, or text that is not UTF-8."""
        key = record.key
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
            if ext not in self.columns:
                raise InvalidRecordError(f"sample {key!r}: member {ext!r} is not one of this job's passthrough "
                                         f"columns {list(self.columns)}")
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidRecordError(f"sample {key!r}: extra {ext!r} is {type(value).__name__}; expected bytes")
            data = bytes(value)
            if is_text_extension(ext):
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidRecordError(f"sample {key!r}: text member {ext!r} is not UTF-8 ({e})") from None
            if ext == "json":  # readers (LatentDataset) parse it: one that does not parse fails here, not in training
                try:
                    json.loads(data)
                except ValueError as e:
                    raise InvalidRecordError(f"sample {key!r}: json member is not valid JSON ({e})") from None
            extras[ext] = data
        return LatentRecord(
            key=key, latent=latent, logvar=logvar,
            original_size=_pair(record.original_size, "original_size", key, minimum=1),
            crop_top_left=_pair(record.crop_top_left, "crop_top_left", key, minimum=0),
            target_size=_pair(record.target_size, "target_size", key, minimum=1),
            latent_flip=latent_flip, logvar_flip=logvar_flip, extras=extras)

    def _metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)


def _record_bytes(r: LatentRecord) -> int:
    return (r.latent.nbytes * (4 if r.latent_flip is not None else 2) + sum(len(v) for v in r.extras.values())
            + len(r.key) + 64)


class ParquetShardWriter(ShardWriter):
    """One row per sample, written a row group at a time; see the module docstring for the schema."""

    extension = "parquet"
    format = "parquet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._schema = self.schema()
        self._buffer: list[LatentRecord] = []
        self._buffered_bytes = 0
        self._pq: pq.ParquetWriter | None = None

    def schema(self) -> pa.Schema:
        """The Parquet schema of this shard: the fixed columns, the passthrough `columns`, the metadata."""
        value = pa.float16() if self._dtype is np.float16 else pa.float32()
        fields = [pa.field("key", pa.string(), nullable=False),
                  pa.field("latent", pa.list_(value), nullable=False),
                  pa.field("latent_shape", pa.list_(pa.int32()), nullable=False),
                  pa.field("logvar", pa.list_(value), nullable=False),
                  pa.field("latent_flip", pa.list_(value)),
                  pa.field("logvar_flip", pa.list_(value))]
        fields += [pa.field(c, pa.int32(), nullable=False) for c in SIZE_COLUMNS]
        fields += [pa.field(ext, pa.string() if is_text_extension(ext) else pa.binary()) for ext in self.columns]
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

    def _batch(self, records: list[LatentRecord]) -> pa.RecordBatch:
        schema = self._schema
        columns: dict[str, pa.Array] = {"key": pa.array([r.key for r in records], type=pa.string())}
        for name in LATENT_COLUMNS:
            columns[name] = self._list_column([getattr(r, name) for r in records], schema.field(name).type)
        columns["latent_shape"] = pa.array([list(r.latent.shape) for r in records], type=pa.list_(pa.int32()))
        sizes = {"original_height": lambda r: r.original_size[0], "original_width": lambda r: r.original_size[1],
                 "crop_top": lambda r: r.crop_top_left[0], "crop_left": lambda r: r.crop_top_left[1],
                 "target_height": lambda r: r.target_size[0], "target_width": lambda r: r.target_size[1]}
        for name, get in sizes.items():
            columns[name] = pa.array([get(r) for r in records], type=pa.int32())
        for ext in self.columns:
            text = is_text_extension(ext)
            values = [r.extras.get(ext) for r in records]
            columns[ext] = pa.array([None if v is None else (v.decode("utf-8") if text else v) for v in values],
                                    type=schema.field(ext).type)
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def _writer(self) -> pq.ParquetWriter:
        if self._pq is None:
            self._pq = pq.ParquetWriter(
                self.out, self._schema, compression="zstd",
                use_dictionary=[e for e in self.columns if is_text_extension(e)],
                write_statistics=["key", *SIZE_COLUMNS], write_page_checksum=True)
        return self._pq

    def _flush(self) -> None:
        if self._buffer:
            self._writer().write_batch(self._batch(self._buffer), row_group_size=len(self._buffer))
            self._buffer = []
            self._buffered_bytes = 0

    def _write(self, record: LatentRecord) -> None:
        self._buffer.append(record)
        self._buffered_bytes += _record_bytes(record)
        if self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _finish(self) -> None:
        self._flush()
        self._writer().close()  # the footer; AtomicUpload.close() leaves the upload open for commit

    def _release(self) -> None:
        self._buffer = []
        self._buffered_bytes = 0
        if self._pq is not None and self._state == "aborted":
            writer, self._pq = self._pq, None
            try:
                # Closed here, before the upload is dropped: left to the garbage collector, pyarrow
                # would write its footer into a discarded upload and print the error it gets.
                writer.close()
            except (OSError, ShardWriteError):  # the shard is being thrown away; its footer does not matter
                log.debug("closing the Parquet writer of aborted shard %s", self.name, exc_info=True)


_SAFETENSORS_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}
# safetensors refuses headers above 100 MB; stay well below, since the header is held in memory.
SAFETENSORS_MAX_HEADER = 64 * 2**20


class SafetensorsShardWriter(ShardWriter):
    """One tensor per sample and field, spooled to a local temporary file until the header is known."""

    extension = "safetensors"
    format = "safetensors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spool: Any = tempfile.TemporaryFile(prefix=f"latentcache-{self.name}-", suffix=".spool")
        self._tensors: dict[str, dict[str, Any]] = {}
        self._samples: list[str] = []  # each sample's JSON, joined into the header's list at the end
        self._offset = 0

    def _tensor(self, name: str, arr: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        self._spool.write(data)
        self._tensors[name] = {"dtype": _SAFETENSORS_DTYPES[arr.dtype], "shape": list(arr.shape),
                               "data_offsets": [self._offset, self._offset + data.nbytes]}
        self._offset += data.nbytes

    def _write(self, r: LatentRecord) -> None:
        i = len(self._samples)
        suffix = f"{i:06d}"
        self._tensor(f"latent.{suffix}", r.latent)
        self._tensor(f"logvar.{suffix}", r.logvar)
        if r.latent_flip is not None:
            self._tensor(f"latent_flip.{suffix}", r.latent_flip)
            self._tensor(f"logvar_flip.{suffix}", r.logvar_flip)  # type: ignore[arg-type]
        members = sorted(r.extras)
        for ext in members:  # in the data section, not the header: a header is held whole in memory
            self._tensor(f"extras.{ext}.{suffix}", np.frombuffer(r.extras[ext], dtype=np.uint8))
        self._samples.append(json.dumps({
            "index": i, "key": r.key,
            "original_size": list(r.original_size), "crop_top_left": list(r.crop_top_left),
            "target_size": list(r.target_size), "latent_shape": list(r.latent.shape),
            "flip": r.latent_flip is not None, "extras": {}, "members": members,
        }, ensure_ascii=False))

    def _finish(self) -> None:
        metadata = {METADATA_KEY: self._metadata_json(), "samples": "[" + ",".join(self._samples) + "]"}
        header = json.dumps({"__metadata__": metadata, **self._tensors}, ensure_ascii=False).encode("utf-8")
        header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        if len(header) > SAFETENSORS_MAX_HEADER:
            raise ShardWriteError(f"shard {self.name}: the safetensors header of {len(self._samples)} samples is "
                                  f"{len(header) / 2**20:.0f} MiB, over the {SAFETENSORS_MAX_HEADER // 2**20} MiB "
                                  "readers accept; write smaller shards or use format=parquet")
        self.out.write(len(header).to_bytes(8, "little"))
        self.out.write(header)
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, self.out, _COPY_CHUNK)

    def _release(self) -> None:
        self._spool.close()
        self._tensors = {}
        self._samples = []


WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "safetensors": SafetensorsShardWriter}


def make_writer(format: str, output_url: str, name: str, metadata: Mapping[str, str], *,
                latent_dtype: str = "float16", columns: Sequence[str] = (),
                storage_options: Mapping[str, Any] | None = None) -> ShardWriter:
    """A writer for shard `name` under `output_url` in `format` (parquet or safetensors)."""
    try:
        cls = WRITERS[format]
    except KeyError:
        raise ValueError(f"format={format!r} is not allowed; expected one of {sorted(WRITERS)}") from None
    return cls(output_url, name, metadata, latent_dtype=latent_dtype, columns=columns,
               storage_options=storage_options)


__all__ = [
    "LatentRecord", "ShardStats", "ShardWriter", "ParquetShardWriter", "SafetensorsShardWriter",
    "InvalidRecordError", "ShardWriteError", "make_writer", "is_text_extension",
    "METADATA_KEY", "TEXT_EXTENSIONS", "WRITERS",
]
