"""Reading latent shards back: one shard file, or every committed shard of an output folder.

`read_latents` yields `(key, latent, meta)` per sample, where `latent` is the scaled posterior mean
as stored, shaped (C, h, w), in the storage dtype (float16 or float32; cast as needed), and `meta`
holds:

    shard             the shard name
    original_size     (h, w) of the source image
    crop_top_left     (top, left)
    target_size       (h, w) of the image fed to the VAE
    latent_flip       (C, h, w) latent of the flipped image, or None
    extras            passthrough members by extension: str for text-like ones, bytes otherwise
    shard_metadata    the shard's metadata dict (VAE fingerprint, preset, scaling, ...)
    logvar, logvar_flip   only with `with_logvar=True`

For a folder with a job manifest (either layout, see pipeline.core.layout), only committed shards
are read (see pipeline.core.ledger), in name order. A folder without a manifest (e.g. shards copied
elsewhere) yields every `*.parquet` and `*.safetensors` file not starting with `_` or `.`; files
under final names are whole by construction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.numpy
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.layout import is_reserved
from pipeline.core.storage import join, output_fs
from pipeline.core.ledger import Ledger, LedgerError
from pipeline.io.latent_writers import (LATENT_COLUMNS, METADATA_KEY, RESERVED_COLUMNS, SIZE_COLUMNS, WRITERS,
                              is_text_extension)

logger = logging.getLogger(__name__)

_EXTENSIONS = {cls.extension: fmt for fmt, cls in WRITERS.items()}


class CorruptShardError(OSError):
    """A latent shard's bytes are damaged (a page checksum does not match): never read as valid."""
_BATCH_ROWS = 64


def _format_of(path: str) -> str | None:
    return _EXTENSIONS.get(path.rsplit(".", 1)[-1]) if "." in posixpath.basename(path) else None


def is_shard_file(url: str) -> bool:
    """Whether `url` names a latent shard file (by its extension) rather than a folder."""
    return _format_of(url.rstrip("/")) is not None


def _shard_metadata(raw: str | bytes | None, where: str) -> dict[str, str]:
    if raw is None:
        raise ValueError(f"{where} is not a latentcache shard: no {METADATA_KEY!r} metadata")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: the {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {METADATA_KEY!r} metadata is {type(data).__name__}; expected a JSON object")
    return data


# What safetensors itself accepts as a header.
MAX_SAFETENSORS_HEADER = 100 * 2**20


def parse_safetensors_header(read: Callable[[int], bytes], where: str,
                             file_size: int | None = None) -> tuple[dict[str, Any], int]:
    """(the JSON header, its length) of a safetensors file read through `read(n)`: an 8-byte
    little-endian length, then JSON. Raises ValueError naming `where` for a length out of range (or
    past `file_size`) or a header that is not a JSON object."""
    length = int.from_bytes(read(8), "little")
    limit = MAX_SAFETENSORS_HEADER if file_size is None else min(MAX_SAFETENSORS_HEADER, max(file_size - 8, 0))
    if not 0 < length <= limit:
        raise ValueError(f"{where}: safetensors header length {length} is out of range (1 to {limit} bytes)")
    try:
        header = json.loads(read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: safetensors header is a {type(header).__name__}; expected an object")
    return header, length


def _safetensors_header(fs: AbstractFileSystem, path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file, via two reads."""
    with fs.open(path, "rb") as f:
        return parse_safetensors_header(f.read, fs.unstrip_protocol(path))[0]


def read_shard_metadata(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The shard-level metadata of one shard file (the writer's `metadata` plus its own keys)."""
    fs, path = output_fs(url, storage_options)
    where = fs.unstrip_protocol(path)
    fmt = _format_of(path)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return _shard_metadata(meta.get(METADATA_KEY.encode()), where)
    if fmt == "safetensors":
        return _shard_metadata(_safetensors_header(fs, path).get("__metadata__", {}).get(METADATA_KEY), where)
    raise ValueError(f"{where}: unknown shard file type; expected a name ending in {sorted(_EXTENSIONS)}")


def shard_keys(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The sample keys of one shard file, in stored order, without reading its latents (Parquet:
    the key column; safetensors: the header)."""
    fs, path = output_fs(url, storage_options)
    fmt = _format_of(path)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=["key"]).column("key").to_pylist()
    if fmt == "safetensors":
        meta = _safetensors_header(fs, path).get("__metadata__", {})
        if "samples" not in meta:
            raise ValueError(f"{fs.unstrip_protocol(path)}: no 'samples' metadata; expected the per-sample JSON list")
        return [s["key"] for s in json.loads(meta["samples"])]
    raise ValueError(f"{fs.unstrip_protocol(path)}: unknown shard file type; expected a name ending in "
                     f"{sorted(_EXTENSIONS)}")


def _lists(column: pa.Array, shapes: list[list[int]]) -> list[np.ndarray | None]:
    """A list<float> column -> one (C, h, w) array (copied) or None per row."""
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    return [None if nulls[i] else values[offsets[i]:offsets[i + 1]].reshape(shapes[i]).copy()
            for i in range(len(column))]


def _read_parquet(fs: AbstractFileSystem, path: str, name: str,
                  with_logvar: bool) -> Iterator[tuple[str, np.ndarray, dict]]:
    where = fs.unstrip_protocol(path)
    with fs.open(path, "rb") as f:
        try:
            yield from _parquet_rows(pq.ParquetFile(f, page_checksum_verification=True), name, where, with_logvar)
        except OSError as e:
            if "checksum" in str(e).lower() or "corrupt" in str(e).lower():
                raise _damaged(where, str(e)) from e
            raise


def _parquet_rows(pf: pq.ParquetFile, name: str, where: str,
                  with_logvar: bool) -> Iterator[tuple[str, np.ndarray, dict]]:
    schema = pf.schema_arrow
    shard_meta = _shard_metadata((schema.metadata or {}).get(METADATA_KEY.encode()), where)
    extras = [n for n in schema.names if n not in RESERVED_COLUMNS]
    skip = set() if with_logvar else {"logvar", "logvar_flip"}
    columns = [n for n in schema.names if n not in skip]
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        shapes = batch.column("latent_shape").to_pylist()
        arrays = {n: _lists(batch.column(n), shapes) for n in LATENT_COLUMNS if n not in skip}
        ints = {n: batch.column(n).to_pylist() for n in SIZE_COLUMNS}
        extra_values = {e: batch.column(e).to_pylist() for e in extras}
        for i, key in enumerate(batch.column("key").to_pylist()):
            meta: dict[str, Any] = {
                "shard": name,
                "original_size": (ints["original_height"][i], ints["original_width"][i]),
                "crop_top_left": (ints["crop_top"][i], ints["crop_left"][i]),
                "target_size": (ints["target_height"][i], ints["target_width"][i]),
                "latent_flip": arrays["latent_flip"][i],
                "extras": {e: v[i] for e, v in extra_values.items() if v[i] is not None},
                "shard_metadata": shard_meta,
            }
            if with_logvar:
                meta["logvar"], meta["logvar_flip"] = arrays["logvar"][i], arrays["logvar_flip"][i]
            yield key, arrays["latent"][i], meta


_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8}



class _HashedStream:
    """A forward-only reader over a file that hashes every byte it passes, skipped ones included."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.pos = 0
        self.sha = hashlib.sha256()

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.pos += len(data)
        return data

    def skip_to(self, offset: int) -> None:
        while self.pos < offset:
            if not self.read(min(8 * 2**20, offset - self.pos)):
                return

    def finish(self) -> str:
        while self.read(8 * 2**20):
            pass
        return self.sha.hexdigest()


def _recorded_sha256(fs: AbstractFileSystem, path: str) -> str | None:
    """The sha256 that the job's record gives for the data file at `path`, when its folder holds a
    latentcache job that recorded it; else None (a shard copied elsewhere is read as it is)."""
    folder, base = posixpath.split(path)
    ledger = Ledger(fs.unstrip_protocol(folder))
    try:
        if ledger.read_manifest() is None:
            return None
    except LedgerError:
        return None
    record = ledger.committed(base.rpartition(".")[0])
    return record.sha256 if record is not None and record.data_file == base else None


def _read_safetensors(fs: AbstractFileSystem, path: str, name: str, with_logvar: bool,
                      sha256: str | None = None) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Samples of a safetensors shard. With the record's `sha256`, every byte is hashed as the file
    streams past (one forward pass) and a mismatch raises CorruptShardError at the end of the shard:
    safetensors has no checksums of its own, so a flipped byte would otherwise read as valid."""
    where = fs.unstrip_protocol(path)
    if sha256 is None and isinstance(fs, LocalFileSystem):  # memory-mapped, tensors loaded one at a time
        with safetensors.safe_open(path, framework="numpy") as handle:
            yield from _safetensors_samples(handle.metadata() or {}, handle.get_tensor, where, name, with_logvar)
        return
    # The header, then each tensor by its offsets, in file order (read ahead by fsspec's cache),
    # so a shard is streamed rather than held whole.
    opened = open(path, "rb", buffering=2**20) if isinstance(fs, LocalFileSystem) else \
        fs.open(path, "rb", cache_type="readahead", block_size=8 * 2**20)
    with opened as f:
        stream = _HashedStream(f)
        try:
            header, length = parse_safetensors_header(stream.read, where)
        except ValueError as e:
            if sha256:
                raise _damaged(where, str(e)) from e
            raise
        base = 8 + length

        def get(tensor: str) -> np.ndarray:
            entry = header[tensor]
            start, end = entry["data_offsets"]
            if base + start < stream.pos:  # the writer lays tensors out in the order they are read
                if sha256 is not None:
                    raise _damaged(where, f"tensor {tensor} lies before data already read")
                f.seek(base + start)  # a file nothing vouches for: random access, nothing to hash
                stream.pos = base + start
            stream.skip_to(base + start)
            raw = stream.read(end - start)
            if len(raw) != end - start:
                raise ValueError(f"{where}: tensor {tensor} is cut short ({len(raw)} of {end - start} bytes)")
            return np.frombuffer(raw, dtype=_NP_DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()

        yield from _safetensors_samples(header.get("__metadata__", {}), get, where, name, with_logvar)
        if sha256 is not None:
            got = stream.finish()
            if got != sha256:
                raise _damaged(where, f"its sha256 {got[:16]}... differs from the record's {sha256[:16]}...")


def _damaged(where: str, why: str) -> CorruptShardError:
    return CorruptShardError(f"{where} is damaged: {why}; rerun the job with --recheck to rewrite it")


def _safetensors_samples(header_meta: Mapping[str, str], get: Any, where: str, name: str,
                         with_logvar: bool) -> Iterator[tuple[str, np.ndarray, dict]]:
    shard_meta = _shard_metadata(header_meta.get(METADATA_KEY), where)
    if "samples" not in header_meta:
        raise ValueError(f"{where}: no 'samples' metadata; expected the per-sample JSON list")
    for s in json.loads(header_meta["samples"]):
        suffix = f"{s['index']:06d}"
        # In the order the writer laid the tensors out, so a remote read only moves forward.
        latent = get(f"latent.{suffix}")
        logvar = get(f"logvar.{suffix}") if with_logvar else None
        latent_flip = get(f"latent_flip.{suffix}") if s["flip"] else None
        logvar_flip = get(f"logvar_flip.{suffix}") if s["flip"] and with_logvar else None
        extras = {e: (v if is_text_extension(e) else base64.b64decode(v))  # schema 1 kept binary as base64
                  for e, v in s["extras"].items()}
        for e in s.get("members", ()):
            data = get(f"extras.{e}.{suffix}").tobytes()
            extras[e] = data.decode("utf-8") if is_text_extension(e) else data
        meta: dict[str, Any] = {
            "shard": name,
            "original_size": tuple(s["original_size"]),
            "crop_top_left": tuple(s["crop_top_left"]),
            "target_size": tuple(s["target_size"]),
            "latent_flip": latent_flip,
            "extras": extras,
            "shard_metadata": shard_meta,
        }
        if with_logvar:
            meta["logvar"], meta["logvar_flip"] = logvar, logvar_flip
        yield s["key"], latent, meta


def _check_kind(manifest: Mapping[str, Any], url: str) -> None:
    if manifest.get("kind", "encode") != "encode":
        raise ValueError(f"{url} holds the output of a {manifest['kind']!r} job, not latent shards; "
                         "expected the output folder of an encode job")


def _shard_files(fs: AbstractFileSystem, root: str, url: str,
                 storage_options: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The data files of a folder, each with its recorded sha256: the committed shards when it has
    a manifest, else every data file (with None: nothing vouches for them)."""
    ledger = Ledger(url, storage_options)
    manifest = ledger.read_manifest()
    if manifest is not None:
        _check_kind(manifest, url)
        return {join(root, r.data_file): r.sha256 for r in ledger.job_records()}
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no latent shards at {url}: the folder does not exist") from None
    files = sorted(e["name"] for e in entries if e["type"] == "file"
                   and not is_reserved(posixpath.basename(e["name"])) and _format_of(e["name"]))
    logger.info("%s has no latentcache manifest; reading all %d data files", url, len(files))
    return dict.fromkeys(files)


def shard_urls(url: str | Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The latent shard files behind `url`, as full URLs: the committed shards of an output folder
    (every data file of a folder without a job manifest), a shard file itself, or for a list of
    URLs, each of them expanded so, in the order given."""
    if not isinstance(url, str):
        return [u for one in url for u in shard_urls(one, storage_options)]
    fs, path = output_fs(url, storage_options)
    files = [path] if _format_of(path) else list(_shard_files(fs, path, url, storage_options))
    return [fs.unstrip_protocol(f) if "://" in url else f for f in files]


def expand_latent_inputs(patterns: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Latent shard URLs from input patterns: output folders (their committed shards), shard files,
    brace patterns of them (each must exist) and globs (which must match), expanded as
    `pipeline.io.shards.expand_inputs` expands tar patterns. De-duplicated, in order. Raises
    ShardListingError naming the pattern when a named shard is missing or nothing matches."""
    import braceexpand

    from pipeline.io.shards import ShardListingError, expand_inputs

    suffixes = tuple(f".{ext}" for ext in sorted(_EXTENSIONS))
    out: list[str] = []
    for pattern in patterns:
        subs = list(braceexpand.braceexpand(pattern))
        folders = [sub for sub in subs if not is_shard_file(sub) and not any(c in sub for c in "*?[")]
        if len(folders) < len(subs):  # shard files and globs: listed and checked like tar inputs
            files = expand_inputs([pattern] if not folders else [s for s in subs if s not in folders],
                                  storage_options, suffixes=suffixes)
            out.extend(u for u in files if not any(is_reserved(part) for part in u.split("/")))
        for sub in folders:  # an output folder: its committed shards only
            try:
                found = shard_urls(sub, storage_options)
            except FileNotFoundError as e:
                raise ShardListingError(pattern, str(e)) from e
            if not found:
                raise ShardListingError(pattern, f"folder {sub!r} holds no committed latent shards")
            out.extend(found)
    return list(dict.fromkeys(out))


def read_latents(url: str, storage_options: Mapping[str, Any] | None = None, *,
                 with_logvar: bool = False) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield (key, latent (C, h, w), meta) for one shard file or every committed shard of a folder."""
    fs, path = output_fs(url, storage_options)
    if _format_of(path):
        files = {path: None if path.endswith(".parquet") else _recorded_sha256(fs, path)}
    else:
        files = _shard_files(fs, path, url, storage_options)
    for file, sha256 in files.items():
        name, _, ext = posixpath.basename(file).rpartition(".")
        if _EXTENSIONS[ext] == "parquet":  # page checksums: pyarrow verifies them as it reads
            yield from _read_parquet(fs, file, name, with_logvar)
        else:
            yield from _read_safetensors(fs, file, name, with_logvar, sha256)


__all__ = ["MAX_SAFETENSORS_HEADER", "parse_safetensors_header", "CorruptShardError", "expand_latent_inputs", "is_shard_file", "read_latents", "read_shard_metadata",
           "shard_keys", "shard_urls"]
