"""What "committed" means for one output folder (a local path or any fsspec URL).

The folder's layout is in `pipeline.core.layout`: data files at the top, everything else under
`.latentcache/`. latentcache owns that folder and the data files its records name.

    manifest.json   written at job start: `kind` (encode, decode, ...), `identity` (what every
                    shard must agree on: VAE fingerprint, scaling, preprocessing, format, ...),
                    `identity_hash`, `data_extension`, `code_version`, `shards` (name -> input
                    URL), `total_shards`, `created` (first start) and `updated` (latest start),
                    ISO 8601 UTC, plus what the job kind adds (`provenance`: the VAE's source...)
    records/<name>.json   per-shard record, written only AFTER its data file: name, input_url,
                    data_file, samples_read, samples_written, errors (SampleError dicts), bytes,
                    sha256, identity_hash, attempt, seconds, committed_at, counters
    compacted/*.parquet  records compacted into tables (columns `name`, `record`: the record's
                    JSON), so that planning the resume of a job of 100,000 shards reads a few
                    objects, not 100,000. The driver compacts the records of its run every
                    COMPACT_EVERY commits, and at the end of a run one of COMPACT_MIN shards or more
                    keeps all its records in one table. A table is written before the record files it
                    holds are removed, so a crash between leaves a record twice, never none; a
                    record file wins over a table (it is newer: a shard redone after compaction).
    errors.parquet  the job's sample errors (key, shard, stage, reason), written at the end
    SUCCESS         JSON summary, written only when every shard of the manifest is committed
    tmp/            temp files of in-flight writes; cleared at job start

A shard is committed when its record exists, parses, carries this job's identity hash, and its data
file exists with the recorded size (and sha256, when asked). This is checked, never assumed: a
record whose data is missing or wrong counts as not committed, and the shard is redone. The sizes
come from listings, not one lookup per file: on S3 one-page listings by name prefix, asked for at
once while the records are read (`_data_sizes`), so that 100,000 shards are not 100 pages in a row.

Folders written by latentcache 0.1 (bookkeeping at the top level, see `layout.LEGACY`) are read as
they are; a job is never resumed into one (`--overwrite` replaces it).

Readers on other machines (`latentcache status`) only need the URL: `Ledger(url).progress()`.
fsspec caches listings per filesystem instance, and other processes write here, so every check
invalidates the cache first.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.layout import CURRENT, LEGACY, Layout
from pipeline.core.layout import META_DIR, METADATA_KEY
from pipeline.core.sink import ShardStats, check_shard_name
from pipeline.core.storage import (LIST_PAGE, abort_multipart_uploads, join, name_prefixes, output_fs,
                                   prefix_lister, write_atomically, write_bytes_atomically)
from pipeline.samples import SampleError

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2
# Why the latest run stopped for good, written by the driver; removed when a new run starts.
FAILURE_FILE = f"{META_DIR}/failed.json"
_LEGACY_MANIFEST_VERSION = 1
_LEGACY_DATA_EXTENSIONS = ("parquet", "safetensors")
_ERROR_FIELDS = tuple(f.name for f in dataclasses.fields(SampleError))
_ERRORS_SCHEMA = pa.schema([pa.field(n, pa.string(), nullable=False) for n in _ERROR_FIELDS])
# Compacted records: one row per shard, its record as the JSON a record file holds (parsed and
# checked the same way), rows sorted by name in small row groups so one shard's row is found from
# the footer's statistics without reading the table.
_COMPACTED_SCHEMA = pa.schema([pa.field("name", pa.string(), nullable=False),
                               pa.field("record", pa.string(), nullable=False)])
_COMPACTED_ROWS = 256
# The driver writes the records of its run into a table every COMPACT_EVERY commits; at the end of a
# run, a job of COMPACT_MIN shards or more keeps all its records in one table (smaller ones keep their
# record files, which a person can read one by one).
COMPACT_EVERY = 1000
COMPACT_MIN = 256


T = TypeVar("T")

# Reads of the ledger (LIST of records, GET of a record or the manifest) meet transient faults on
# object stores: resets, timeouts, 503s, a GET whose checksum fails. They are retried with backoff.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.5
LIST_CONCURRENCY = 16  # LIST pages of the data files in flight at once (S3)
# Answers, not faults: retrying cannot change them.
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _transient_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError, TimeoutError]
    try:  # s3fs (aiobotocore) raises botocore's own types for some faults, FlexibleChecksumError among them
        from botocore.exceptions import BotoCoreError

        found.append(BotoCoreError)
    except ImportError:
        pass
    try:  # s3fs over aiohttp: a body cut short, again and again
        from aiohttp import ClientPayloadError

        found.append(ClientPayloadError)
    except ImportError:
        pass
    return tuple(found)


_TRANSIENT_ERRORS = _transient_errors()


def _starts_one(prefixes: Sequence[str], name: str) -> str | None:
    """The prefix of sorted, prefix-free `prefixes` that `name` starts with, if any."""
    i = bisect.bisect_right(prefixes, name) - 1
    return prefixes[i] if i >= 0 and name.startswith(prefixes[i]) else None


def _retried(what: str, read: Callable[[], T]) -> T:
    """`read()`, retried on transient storage errors with exponential backoff; after
    READ_ATTEMPTS a LedgerError naming `what`. Permanent answers (not found, denied) pass at once."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except _PERMANENT_OS_ERRORS:
            raise
        except _TRANSIENT_ERRORS as e:
            if attempt == READ_ATTEMPTS:
                raise LedgerError(f"{what} failed {READ_ATTEMPTS} times; last: {type(e).__name__}: {e}") from e
            delay = READ_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class LedgerError(RuntimeError):
    """The output folder's bookkeeping is missing, unreadable or inconsistent."""


class IncompatibleOutputError(LedgerError):
    """The output folder holds a job with a different identity (VAE, preprocessing, format...)."""


class ForeignObjectError(IncompatibleOutputError):
    """The job would write a name that the output folder holds already and latentcache did not write."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def identity_hash(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity's canonical JSON (sorted keys): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(*, kind: str, identity: Mapping[str, Any], shards: Mapping[str, str], data_extension: str,
                   code_version: str, **extra: Any) -> dict[str, Any]:
    """A manifest for `Ledger.open_job`: job kind, identity, input shards (name -> URL), the data
    files' extension, code version, and what the job kind adds (`provenance`; `data_dir` for data
    files kept in a subfolder; `outputs`, what the job writes over all shards, removed on reopening)."""
    return {**extra, "kind": kind, "identity": dict(identity), "shards": dict(shards),
            "data_extension": data_extension, "code_version": code_version}


def _is_data_file(rel: str) -> bool:
    """`name.ext` or `dir/name.ext`, neither part hidden or reserved: never outside the folder."""
    parts = rel.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(("_", ".")) for p in parts)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse_json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LedgerError(f"{where}: record is not valid JSON: {e}") from e


def _table_rows(blob: bytes, where: str, batch: int) -> Iterator[list[tuple[str, str]]]:
    """(name, record JSON) rows of a compacted table's bytes, `batch` at a time."""
    try:
        table = pq.ParquetFile(pa.BufferReader(blob))
        if table.schema_arrow.names != _COMPACTED_SCHEMA.names:
            raise LedgerError(f"{where} is not a table of latentcache records: columns "
                              f"{table.schema_arrow.names}; expected {_COMPACTED_SCHEMA.names}")
        for chunk in table.iter_batches(batch_size=batch):
            cols = chunk.to_pydict()
            yield list(zip(cols["name"], cols["record"]))
    except pa.ArrowException as e:
        raise LedgerError(f"{where} is not a table of latentcache records: {e}") from e


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any], *,
                         labels: tuple[str, str] = ("output has", "this job has")) -> list[str]:
    """`field: output has X, this job has Y` for each differing (dotted) identity field."""
    a, b = _flatten(old), _flatten(new)
    missing = "<absent>"
    return [f"{k}: {labels[0]} {a.get(k, missing)}, {labels[1]} {b.get(k, missing)}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _resume_hint(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """When only preprocessing settings differ (a default that changed between versions, say): the
    `--set` flags that make this run the job the output holds."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys or not all(k.startswith("preprocess.") and k in a for k in keys):
        return ""
    return "; to resume it as it was made: " + " ".join(f"--set {k}={json.dumps(a[k])}" for k in keys)


@dataclass(frozen=True)
class ShardRecord:
    """The ledger's statement that shard `name` is written: counts, errors and the data file's checksum."""

    name: str
    input_url: str
    data_file: str
    samples_read: int
    samples_written: int
    errors: tuple[SampleError, ...]
    bytes: int
    sha256: str
    identity_hash: str
    attempt: int = 1
    seconds: float = 0.0
    committed_at: str = ""
    counters: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # The input's version when it was read (size, ETag or mtime; `pipeline.io.shards.input_version`):
    # a resume redoes the shard when the listing gives another. Empty in records made before 2026-12-02.
    input_version: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: ShardStats, *, input_url: str, samples_read: int,
                   errors: list[SampleError] | tuple[SampleError, ...], identity_hash: str,
                   attempt: int = 1, seconds: float = 0.0, counters: Mapping[str, int] | None = None,
                   input_version: Mapping[str, Any] | None = None) -> ShardRecord:
        """The record for a shard that a writer just committed."""
        return cls(name=stats.name, input_url=input_url, data_file=stats.data_file or posixpath.basename(stats.path),
                   samples_read=samples_read, samples_written=stats.samples, errors=tuple(errors),
                   bytes=stats.bytes, sha256=stats.sha256, identity_hash=identity_hash,
                   attempt=attempt, seconds=seconds, counters=dict(counters or {}),
                   input_version=dict(input_version or {}))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["errors"] = [e.to_dict() for e in self.errors]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> ShardRecord:
        """Parse and type-check a record read from `where`; raises LedgerError naming the problem."""
        if not isinstance(data, dict):
            raise LedgerError(f"{where}: record is {type(data).__name__}; expected a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = {n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        absent = sorted(required - set(data))
        unknown = sorted(set(data) - set(fields))
        if absent or unknown:
            raise LedgerError(f"{where}: record is missing {absent} / has unknown {unknown}; "
                              f"expected fields {sorted(fields)}")
        types = {"name": str, "input_url": str, "data_file": str, "sha256": str, "identity_hash": str,
                 "committed_at": str, "samples_read": int, "samples_written": int, "bytes": int,
                 "attempt": int, "seconds": (int, float)}
        for k, t in types.items():
            if k in data and (not isinstance(data[k], t) or isinstance(data[k], bool)):
                raise LedgerError(f"{where}: {k}={data[k]!r} has the wrong type; expected {t}")
        version = data.get("input_version", {})
        if not isinstance(version, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                    for k, v in version.items()):
            raise LedgerError(f"{where}: input_version={version!r} must map names to strings or numbers")
        counters = data.get("counters", {})
        if not isinstance(counters, dict) or not all(isinstance(k, str) and isinstance(v, int)
                                                     and not isinstance(v, bool) for k, v in counters.items()):
            raise LedgerError(f"{where}: counters={counters!r} must map names to integers")
        errors = data["errors"]
        if not isinstance(errors, list):
            raise LedgerError(f"{where}: errors={errors!r} must be a list of SampleError objects")
        try:
            parsed = tuple(SampleError(**{k: str(e[k]) for k in _ERROR_FIELDS})
                           for e in errors)
        except (TypeError, KeyError) as e:
            raise LedgerError(f"{where}: an error entry lacks {e}; expected key, shard, stage, reason") from None
        if not _is_data_file(data["data_file"]):
            raise LedgerError(f"{where}: data_file={data['data_file']!r} must be a file name in the output folder "
                              "or in one subfolder of it")
        return cls(**{**data, "errors": parsed, "seconds": float(data.get("seconds", 0.0))})


@dataclass(frozen=True)
class JobProgress:
    """Counts over the committed shards of the manifest; `started` is the job's first start."""

    total_shards: int
    committed_shards: int
    samples_read: int
    samples_written: int
    samples_errored: int
    started: datetime | None
    last_update: datetime | None
    succeeded: bool = False

    @property
    def done(self) -> bool:
        return self.committed_shards == self.total_shards


class Ledger:
    """Records, checks and summarises the committed shards of one output folder."""

    def __init__(self, output_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs, self.root = output_fs(output_url, storage_options)
        self.url = self.fs.unstrip_protocol(self.root)
        self._manifest: dict[str, Any] | None = None
        self._table_names: dict[str, set[str]] = {}  # compacted table -> its shards, as last read
        self.layout: Layout = CURRENT
        if not self._exists(CURRENT.manifest) and self._exists(LEGACY.manifest):
            self.layout = LEGACY

    # --- paths and small I/O -----------------------------------------------------------------

    def _exists(self, rel: str) -> bool:
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    @property
    def legacy(self) -> bool:
        """Whether this folder was written by latentcache 0.1 (bookkeeping at the top level)."""
        return self.layout is LEGACY

    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def path_of(self, what: str) -> str:
        """The full URL of a bookkeeping file: `manifest`, `records`, `errors`, `success` or `tmp`."""
        return self.fs.unstrip_protocol(self._path(getattr(self.layout, what)))

    def _record_path(self, name: str) -> str:
        return self._path(self.layout.records, f"{name}.json")

    @property
    def _tmp(self) -> str:
        return self._path(self.layout.tmp)

    def _ls(self, path: str) -> list[dict[str, Any]]:
        """Entries of a folder, [] when it does not exist (a valid state: nothing written yet)."""
        def ls() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(path)
            return list(self.fs.ls(path, detail=True))

        try:
            return _retried(f"listing {self.fs.unstrip_protocol(path)}", ls)
        except FileNotFoundError:
            return []

    def _read_json(self, path: str) -> Any | None:
        """The parsed JSON at `path`, None when absent; raises LedgerError when unreadable JSON."""
        def get() -> bytes:
            self.fs.invalidate_cache(path)
            return self.fs.cat_file(path)

        try:
            raw = _retried(f"reading {self.fs.unstrip_protocol(path)}", get)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LedgerError(f"{self.fs.unstrip_protocol(path)} is not valid JSON: {e}") from e

    def _cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """Contents of `paths` in one batched read; files deleted meanwhile are left out, other errors raise."""
        out: dict[str, bytes] = {}
        todo = list(paths)

        def cat() -> None:
            # Only the paths still to read: a retry does not fetch again what already arrived.
            for p in todo:
                self.fs.invalidate_cache(p)
            failed: list[tuple[str, BaseException]] = []
            for path, value in self.fs.cat(list(todo), on_error="return").items():
                if isinstance(value, FileNotFoundError):
                    todo.remove(path)
                elif isinstance(value, BaseException):
                    failed.append((path, value))
                else:
                    out[path] = value
                    todo.remove(path)
            if failed:
                path, error = failed[0]
                if isinstance(error, _TRANSIENT_ERRORS) and not isinstance(error, _PERMANENT_OS_ERRORS):
                    raise error
                raise LedgerError(f"reading {self.fs.unstrip_protocol(path)} failed: {error!r}") from error

        if todo:
            _retried(f"reading {len(paths)} record(s) under {self.url}", cat)
        return out

    def _write_json(self, path: str, data: Any) -> None:
        write_bytes_atomically(self.fs, self._tmp, path, json.dumps(data, indent=1, sort_keys=True).encode())

    def _rm(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)
            for p in paths:
                self.fs.invalidate_cache(p)

    def _rm_if_exists(self, path: str) -> None:
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self._rm([path])

    def _sha256(self, path: str) -> str:
        return self.file_sha256(self.fs, path)

    @staticmethod
    def file_sha256(fs: Any, path: str) -> str:
        """sha256 of the file at `path`, read in 8 MiB chunks."""
        sha = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(8 * 2**20):
                sha.update(chunk)
        return sha.hexdigest()

    # --- manifest ----------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The job manifest, or None when the folder has none; raises LedgerError when malformed."""
        path = self._path(self.layout.manifest)
        data = self._read_json(path)
        if data is None:
            return None
        where = self.fs.unstrip_protocol(path)
        if not isinstance(data, dict) or not isinstance(data.get("identity"), dict) \
                or not isinstance(data.get("shards"), dict) or not isinstance(data.get("identity_hash"), str):
            raise LedgerError(f"{where}: not a latentcache manifest; expected an object with "
                              "identity, identity_hash and shards")
        expected = _LEGACY_MANIFEST_VERSION if self.legacy else MANIFEST_VERSION
        if data.get("version") != expected:
            raise LedgerError(f"{where}: manifest version {data.get('version')!r} is not supported; "
                              f"expected {expected}")
        if self.legacy:  # 0.1 wrote encode jobs only, and called the VAE's fingerprint `fingerprint`
            identity = {**data["identity"], "vae_fingerprint": data["identity"].get("fingerprint")}
            data = {**data, "identity": identity, "kind": "encode",
                    "data_extension": data["identity"].get("format", "parquet")}
        return data

    def _job(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = self.read_manifest()
        if self._manifest is None:
            raise LedgerError(f"no latentcache job at {self.url} ({self.layout.manifest} is missing)")
        return self._manifest

    @property
    def identity_hash(self) -> str:
        """The identity hash of the job in this folder (from its manifest)."""
        return self._job()["identity_hash"]

    @property
    def shards(self) -> dict[str, str]:
        """The job's input shards, name -> input URL."""
        return dict(self._job()["shards"])

    @property
    def manifest(self) -> dict[str, Any]:
        """The job's manifest (read once; raises LedgerError when the folder has no job)."""
        return dict(self._job())

    def open_job(self, manifest: Mapping[str, Any], *, overwrite: bool) -> None:
        """Start or resume the job described by `manifest` (see `build_manifest`) in this folder.

        Refuses a folder holding a job of another identity, or written by latentcache 0.1, unless
        `overwrite`, which first removes the files latentcache wrote there. Always removes a stale
        SUCCESS and leftover temp files.
        """
        identity, shards = manifest.get("identity"), manifest.get("shards")
        if not isinstance(identity, Mapping) or not identity:
            raise ValueError(f"manifest identity={identity!r} must be a non-empty mapping")
        if not isinstance(shards, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in shards.items()):
            raise ValueError("manifest shards must map shard name (str) to input URL (str)")
        for key in ("kind", "data_extension"):
            if not isinstance(manifest.get(key), str) or not manifest[key]:
                raise ValueError(f"manifest {key}={manifest.get(key)!r} must be a non-empty string")
        for name in shards:
            check_shard_name(name)
        try:
            old = self.read_manifest()
        except LedgerError as e:
            if not overwrite:
                raise LedgerError(f"{e}; use --overwrite to replace the output at {self.url}") from e
            old = None
        if old is not None and self.legacy and not overwrite:
            raise IncompatibleOutputError(
                f"output {self.url} was written by latentcache 0.1 (its bookkeeping is at the top level: "
                f"{LEGACY.manifest}); it can still be read, but a job is not resumed into it: use --overwrite "
                "to replace it, or choose another output")
        new_hash = identity_hash(identity)
        if old is not None and old["identity_hash"] != new_hash and not overwrite:
            diffs = identity_differences(old["identity"], identity) or ["identity_hash differs"]
            raise IncompatibleOutputError(
                f"output {self.url} holds the output of a different job: {'; '.join(diffs)}; "
                f"use --overwrite to replace it, or choose another output{_resume_hint(old['identity'], identity)}")
        self._rm_if_exists(self._path(self.layout.success))
        self._rm_if_exists(self._path(FAILURE_FILE))  # a new run: the last one's failure is history
        if old is not None:
            self._remove_job_outputs(old)
        if overwrite:
            self._wipe(old)
        self.cleanup_tmp()
        now = _now()
        resumed = old is not None and old["identity_hash"] == new_hash and not overwrite
        data = {**manifest, "version": MANIFEST_VERSION, "identity": dict(identity), "identity_hash": new_hash,
                "shards": dict(shards), "total_shards": len(shards),
                "created": old.get("created", now) if resumed else now, "updated": now}
        self._write_json(self._path(self.layout.manifest), data)
        self._manifest = data

    def foreign_objects(self, manifest: Mapping[str, Any]) -> list[str]:
        """The names this job would write (data files, whole-job outputs) that the folder holds
        already and no latentcache manifest or record of this folder accounts for: latentcache never
        replaces or removes an object it did not write (a dataset tool's `00000.parquet` beside its
        tars, say). Reads the manifest; lists the data folder only for names the old manifest does
        not hold (none, when a job resumes over the same shards), and reads the records only when
        one of those is present."""
        folder = str(manifest.get("data_dir", ""))
        prefix = f"{folder}/" if folder else ""

        def would_write(m: Mapping[str, Any]) -> set[str]:
            ext, sub = m.get("data_extension"), str(m.get("data_dir", ""))
            names = {f"{sub + '/' if sub else ''}{n}.{ext}" for n in m.get("shards", {})}
            return names | {o for o in m.get("outputs", ()) if isinstance(o, str) and not o.endswith("/")}

        try:
            old = self.read_manifest()
        except LedgerError:
            old = None
        # A resume of the same shards writes only names its manifest already holds: nothing to list.
        wanted = would_write(manifest) - (would_write(old) if old is not None else set())
        if not wanted:
            return []
        present = {prefix + posixpath.basename(e["name"])
                   for e in self._ls(self._path(folder) if folder else self.root) if e["type"] == "file"}
        if folder:
            present |= {posixpath.basename(e["name"]) for e in self._ls(self.root) if e["type"] == "file"}
        clash = wanted & present
        if clash and old is not None:
            for where, raw in self._raw_records().values():
                try:
                    clash.discard(ShardRecord.from_dict(_parse_json(raw, where), where=where).data_file)
                except LedgerError:
                    continue
        return sorted(clash)

    def refuse_foreign_objects(self, manifest: Mapping[str, Any]) -> None:
        """Raise ForeignObjectError naming what `foreign_objects` finds (even with --overwrite,
        which removes only what latentcache wrote)."""
        foreign = self.foreign_objects(manifest)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ForeignObjectError(
                f"output {self.url} already holds {len(foreign)} file(s) that this job would replace and that "
                f"latentcache did not write: {shown}. latentcache never replaces or removes a file it did not "
                f"write (not even with --overwrite); choose another output, e.g. {self.url.rstrip('/')}/latents "
                "or a folder of its own")

    def finished(self, manifest: Mapping[str, Any], *, verify_checksum: bool = False) -> list[ShardRecord] | None:
        """The committed records when this folder holds exactly this job (identity and shards) and
        it finished (SUCCESS, every shard still committed); else None. Reads only, writes nothing."""
        if self.legacy or not self._exists(self.layout.success):  # the usual case: one HEAD, no more reads
            return None
        try:
            old = self.read_manifest()
        except LedgerError:
            return None
        if old is None or old["identity_hash"] != identity_hash(manifest["identity"]) \
                or dict(old["shards"]) != dict(manifest["shards"]):
            return None
        self._manifest = old
        records = self.job_records(verify_checksum=verify_checksum)
        return records if {r.name for r in records} >= set(old["shards"]) else None

    def _remove_job_outputs(self, old: Mapping[str, Any]) -> None:
        """Remove what the old manifest lists as written over the whole job (`outputs`: the audit's
        report, say): it is rewritten at the end, and until then a stale one must not be read as this
        run's. Entries ending in '/' are folders of such files. Only names the manifest lists."""
        for rel in old.get("outputs", ()):
            if not isinstance(rel, str) or not _is_data_file(rel.rstrip("/")):
                logger.warning("manifest output %r is not a name inside the output folder; left alone", rel)
                continue
            if rel.endswith("/"):
                self._rm([e["name"] for e in self._ls(self._path(rel.rstrip("/"))) if e["type"] == "file"])
            else:
                self._rm_if_exists(self._path(rel))

    def _wipe(self, old: Mapping[str, Any] | None) -> None:
        """Remove what latentcache wrote here: marker, records, errors, temp files, manifest, and the
        data files that the old manifest or a record names. Nothing else is touched."""
        data_files: set[str] = set()
        folder = str((old or {}).get("data_dir", ""))
        if old is not None:
            data_files = {f"{folder + '/' if folder else ''}{n}.{old['data_extension']}" for n in old["shards"]}
        records = [e["name"] for e in self._ls(self._path(self.layout.records)) if e["type"] == "file"]
        tables = [e["name"] for e in self._ls(self._path(self.layout.compacted)) if e["type"] == "file"]
        for where, raw in self._raw_records().values():
            try:
                data_files.add(ShardRecord.from_dict(_parse_json(raw, where), where=where).data_file)
            except LedgerError as e:  # its data file is still covered by the manifest's names
                logger.warning("overwrite: ignoring unreadable record %s: %s", where, e)
        present = {posixpath.basename(e["name"]): e["name"] for e in self._ls(self.root) if e["type"] == "file"}
        if folder:
            present.update({f"{folder}/{posixpath.basename(e['name'])}": e["name"]
                            for e in self._ls(self._path(folder)) if e["type"] == "file"})
        # Marker and records first: a crash mid-wipe leaves data without records, i.e. uncommitted.
        for rel in (self.layout.success, self.layout.errors):
            self._rm_if_exists(self._path(rel))
        self._rm(records)
        self._rm(tables)
        self._rm([present[f] for f in sorted(data_files) if f in present])
        self.cleanup_tmp()
        self._rm_if_exists(self._path(self.layout.manifest))
        self._manifest = None
        self.layout = CURRENT  # a wiped 0.1 folder is rewritten in the current layout

    def cleanup_tmp(self) -> int:
        """Remove temp files left by a crashed run, and on S3 the unfinished multipart uploads of
        temp keys (a writer killed mid-upload leaves one, invisible to listings, billed); returns
        how many files. Call only when no writer runs."""
        stale = [e["name"] for e in self._ls(self._tmp) if e["type"] == "file"]
        if stale:
            logger.info("removing %d stale temp file(s) under %s", len(stale), self._tmp)
        self._rm(stale)
        aborted = abort_multipart_uploads(self.fs, self._tmp + "/")
        if aborted:
            logger.info("aborted %d unfinished multipart upload(s) under %s", aborted, self._tmp)
        return len(stale)

    def remove_tmp_dir(self) -> None:
        """At the end of a job, on a local disk: remove the temp folder once it is empty, so that a
        finished output holds no empty `tmp/` (object stores have no folders to leave)."""
        import errno

        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(self.fs, LocalFileSystem):
            return
        try:
            self.fs.rmdir(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:  # a file in it is a writer of another run: left alone
                raise

    # --- per-shard records -------------------------------------------------------------------

    def _check(self, record: ShardRecord, name: str, sizes: Mapping[str, int] | None,
               verify_checksum: bool) -> str | None:
        """Why `record` does not make shard `name` committed, or None when it does."""
        if record.name != name:
            return f"record names shard {record.name!r}"
        if record.identity_hash != self.identity_hash:
            return "record belongs to a job with another identity"
        planned = self._job()["shards"].get(name)
        if planned is not None and record.input_url != planned:
            return f"record was made from {record.input_url}; the job reads this shard from {planned}"
        data = self._path(record.data_file)
        if sizes is None:
            self.fs.invalidate_cache(data)
            try:
                size: int | None = self.fs.info(data)["size"]
            except FileNotFoundError:
                size = None
        else:
            size = sizes.get(record.data_file)
        if size is None:
            return f"data file {record.data_file} is missing"
        if size != record.bytes:
            return f"data file {record.data_file} has {size} bytes; the record says {record.bytes}"
        if verify_checksum and self._sha256(data) != record.sha256:
            return f"data file {record.data_file} does not match the recorded sha256"
        return None

    def committed(self, name: str, *, verify_checksum: bool = False) -> ShardRecord | None:
        """The record of shard `name` if it is committed (checked against the data file), else None."""
        path = self._record_path(name)
        try:
            data = self._read_json(path)
            where = self.fs.unstrip_protocol(path)
            if data is None:
                found = self._compacted_lookup(name)
                if found is not None:
                    where, raw = found
                    data = _parse_json(raw, where)
            record = None if data is None else ShardRecord.from_dict(data, where=where)
        except LedgerError as e:
            logger.warning("shard %s is not committed: %s", name, e)
            return None
        if record is None:
            return None
        reason = self._check(record, name, None, verify_checksum)
        if reason is not None:
            logger.warning("shard %s is not committed: %s", name, reason)
            return None
        return record

    def commit_record(self, record: ShardRecord) -> ShardRecord:
        """Write the record of a shard whose data file is already written; this commits the shard.
        Returns the record as written (with its commit time).

        Raises LedgerError when the record's identity is not this job's or its data file is
        missing or of another size: a record never points at data that is not there.
        """
        if record.identity_hash != self.identity_hash:
            raise LedgerError(f"record for shard {record.name} has identity {record.identity_hash[:12]}; "
                              f"the job at {self.url} has {self.identity_hash[:12]}")
        reason = self._check(record, record.name, None, verify_checksum=False)
        if reason is not None:
            raise LedgerError(f"cannot commit shard {record.name} at {self.url}: {reason}")
        if not record.committed_at:
            record = dataclasses.replace(record, committed_at=_now())
        self._write_json(self._record_path(record.name), record.to_dict())
        return record

    def discard(self, name: str) -> None:
        """Remove shard `name`'s record (not its data) before rewriting a shard that is not committed."""
        self._rm_if_exists(self._record_path(name))

    def discard_all(self, names: set[str] | dict[str, str]) -> int:
        """`discard` for many shards: one listing and one bulk delete (a job may have 100k shards)."""
        stale = [e["name"] for e in self._ls(self._path(self.layout.records))
                 if e["type"] == "file" and posixpath.basename(e["name"])[: -len(".json")] in names]
        self._rm(stale)
        return len(stale) + self._discard_compacted(set(names))

    # --- compacted records -------------------------------------------------------------------

    def _record_files(self) -> list[str]:
        return sorted(e["name"] for e in self._ls(self._path(self.layout.records))
                      if e["type"] == "file" and e["name"].endswith(".json"))

    def compacted_tables(self) -> list[str]:
        """Paths of the compacted record tables, oldest first (their names start with a UTC time)."""
        return sorted(e["name"] for e in self._ls(self._path(self.layout.compacted))
                      if e["type"] == "file" and e["name"].endswith(".parquet"))

    def iter_compacted(self, path: str, *, batch: int = _COMPACTED_ROWS) -> Iterator[list[tuple[str, str]]]:
        """(name, record JSON) rows of one compacted table, `batch` rows at a time; raises
        LedgerError naming the table when it is not one."""
        where = self.fs.unstrip_protocol(path)
        blob = _retried(f"reading {where}", lambda: self.fs.cat_file(path))
        yield from _table_rows(blob, where, batch)

    def _raw_records(self, files: list[str] | None = None,
                     tables: list[str] | None = None) -> dict[str, tuple[str, bytes | str]]:
        """Every record, unparsed: name -> (where it was read, JSON). The compacted tables are read
        first, oldest first, then the record files, which win (see the module docstring). `files`
        and `tables`: the listings, when the caller has them."""
        files = self._record_files() if files is None else files
        tables = self.compacted_tables() if tables is None else tables
        out: dict[str, tuple[str, bytes | str]] = {}
        self._table_names = {}
        for path, blob in sorted(self._cat_many(tables).items()):
            where = self.fs.unstrip_protocol(path)
            try:
                rows = [row for chunk in _table_rows(blob, where, 1 << 20) for row in chunk]
            except LedgerError as e:  # its shards read as not committed, and are redone
                logger.warning("%s; the shards it holds count as not committed", e)
                continue
            self._table_names[path] = {name for name, _ in rows}
            out.update((name, (f"{where}#{name}", raw)) for name, raw in rows)
        for path, raw in self._cat_many(files).items():
            out[posixpath.basename(path)[: -len(".json")]] = (self.fs.unstrip_protocol(path), raw)
        return out

    def _compacted_lookup(self, name: str) -> tuple[str, str] | None:
        """(where, record JSON) of shard `name` in the newest compacted table holding it, else None.
        Reads each table's footer and only the row groups whose name range covers `name`."""
        for path in reversed(self.compacted_tables()):
            where = self.fs.unstrip_protocol(path)
            try:
                with self.fs.open(path, "rb") as f:
                    table = pq.ParquetFile(f)
                    for i in range(table.metadata.num_row_groups):
                        stats = table.metadata.row_group(i).column(0).statistics
                        if stats is not None and stats.has_min_max and not stats.min <= name <= stats.max:
                            continue
                        rows = table.read_row_group(i).to_pydict()
                        for n, raw in zip(rows["name"], rows["record"]):
                            if n == name:
                                return f"{where}#{name}", raw
            except (pa.ArrowException, OSError, KeyError) as e:
                raise LedgerError(f"{where} is not a table of latentcache records: {e}") from e
        return None

    def _write_table(self, rows: Mapping[str, bytes | str]) -> str:
        """A new compacted table of `rows` (name -> record JSON); returns its path."""
        names = sorted(rows)
        table = pa.table({"name": names, "record": [_text(rows[n]) for n in names]}, schema=_COMPACTED_SCHEMA)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"identity_hash": self.identity_hash,
                                                                         "records": len(names)})})
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = self._path(self.layout.compacted, f"{stamp}-{uuid.uuid4().hex[:8]}.parquet")
        write_atomically(self.fs, self._tmp, path,
                         lambda f: pq.write_table(table, f, compression="zstd", row_group_size=_COMPACTED_ROWS))
        return path

    def compact(self, records: Sequence[ShardRecord]) -> int:
        """Move `records` (committed by this job, as its driver received them) from their record
        files into a new compacted table; returns how many. The table is written first."""
        if not records:
            return 0
        self._write_table({r.name: json.dumps(r.to_dict(), sort_keys=True) for r in records})
        self._rm_files([self._record_path(r.name) for r in records])
        return len(records)

    def compact_all(self, *, min_records: int | None = None) -> int:
        """At the end of a run: every record (tables and files) into one table, when there are at
        least `min_records` and they are not in one table already; returns how many it moved.
        Records that do not parse stay where they are (they are not committed, and verify names them)."""
        files, tables = self._record_files(), self.compacted_tables()
        if not files and len(tables) <= 1:
            return 0
        raw = self._raw_records()
        if len(raw) < (COMPACT_MIN if min_records is None else min_records):
            return 0
        good: dict[str, bytes | str] = {}
        for name, (where, text) in raw.items():
            try:
                ShardRecord.from_dict(_parse_json(text, where), where=where)
            except LedgerError:
                continue
            good[name] = text
        self._write_table(good)
        self._rm(tables)
        self._rm_files([p for p in files if posixpath.basename(p)[: -len(".json")] in good])
        self._table_names = {}
        return len(good)

    def _discard_compacted(self, names: set[str]) -> int:
        """Drop `names` from the compacted tables that hold them (each rewritten without them, the new
        table written before the old one is removed); returns how many rows were dropped."""
        if not names:
            return 0
        tables = self.compacted_tables()
        known = self._table_names
        dropped = 0
        for path in tables:
            if path in known and not known[path] & names:
                continue  # read at planning, and none of its rows is to be discarded
            try:
                rows = dict(row for chunk in self.iter_compacted(path, batch=1 << 20) for row in chunk)
            except LedgerError as e:
                logger.warning("%s; left as it is (its shards count as not committed)", e)
                continue
            hit = set(rows) & names
            if not hit:
                continue
            if len(hit) < len(rows):
                self._write_table({n: r for n, r in rows.items() if n not in hit})
            self._rm([path])
            dropped += len(hit)
        self._table_names = {}
        return dropped

    def _rm_files(self, paths: list[str]) -> None:
        """Remove files that should exist; one already gone (removed by a run that crashed after
        compacting it, say) is not an error."""
        try:
            self._rm(paths)
        except FileNotFoundError:
            for p in paths:
                self._rm_if_exists(p)

    def records(self, *, verify_checksum: bool = False) -> list[ShardRecord]:
        """The committed shards' records (any name), by name. Reads two listings and one batched
        read of the bookkeeping and, meanwhile, one listing of the data files (`_data_sizes`).
        With `verify_checksum`, each data file is also hashed against its record (in threads)."""
        files, tables = self._record_files(), self.compacted_tables()
        if not files and not tables:
            return []
        parsed: list[tuple[str, ShardRecord]] = []
        with ThreadPoolExecutor(max_workers=1) as background:
            # On S3 at 100,000 shards the listing is most of planning, so it runs while the records
            # are read and parsed. It may predate a record written meanwhile (a job running while
            # `status` reads), so whatever it misses is looked at again once the records are in.
            listing = background.submit(self._data_sizes)
            for name, (where, raw) in sorted(self._raw_records(files, tables).items()):
                try:
                    record = ShardRecord.from_dict(_parse_json(raw, where), where=where)
                except LedgerError as e:
                    logger.warning("shard %s is not committed: %s", name, e)
                    continue
                parsed.append((name, record))
            sizes = listing.result()
        again = {r.data_file for _, r in parsed if sizes.get(r.data_file) != r.bytes}
        if again:
            fresh = self._data_sizes(again)
            sizes = {**sizes, **fresh}
            for gone in again - fresh.keys():
                sizes.pop(gone, None)  # the new look found no file there (any earlier sighting is stale)
        out = []
        for name, record in parsed:
            reason = self._check(record, name, sizes, verify_checksum=False)
            if reason is not None:
                logger.warning("shard %s is not committed: %s", name, reason)
                continue
            out.append(record)
        if verify_checksum and out:
            with ThreadPoolExecutor(max_workers=min(8, len(out))) as pool:
                hashes = list(pool.map(lambda r: self._sha256(self._path(r.data_file)), out))
            damaged = {r.name for r, got in zip(out, hashes) if got != r.sha256}
            for name in sorted(damaged):
                logger.warning("shard %s is not committed: its data file does not match the recorded sha256", name)
            out = [r for r in out if r.name not in damaged]
        return out

    def _data_sizes(self, only: Collection[str] | None = None) -> dict[str, int]:
        """Data file (relative path) -> size, for every data file present (or those of `only`).

        Locally, one listing of the folder that holds them. On S3, the one-page prefixes of
        `_prefix_cut` are listed at once: 100,000 shards are 100 pages in flight, not 100 one after
        another. A name of `only` that no prefix covers is looked up alone; past a page of those,
        one listing of the folder answers for them all."""
        manifest = self._manifest if self._manifest is not None else self.read_manifest()
        folder = str(manifest.get("data_dir", "")) if manifest is not None else ""
        head = f"{folder}/" if folder else ""
        where = self._path(folder) if folder else self.root

        def in_folder(rel: str) -> bool:
            return rel.startswith(head) and "/" not in rel[len(head):]

        names = None if only is None else {rel[len(head):] for rel in only if in_folder(rel)}
        lookups = set() if only is None else {rel for rel in only if not in_folder(rel)}
        cut, exact = self._prefix_cut(manifest)
        prefixes, lone = cut, set(exact)
        if cut and names is not None:  # only the prefixes that cover a name asked for
            covering = {n: _starts_one(cut, n) for n in names}
            lone = {n for n, p in covering.items() if p is None}  # `exact` names among them
            prefixes = sorted({p for p in covering.values() if p is not None})
        sizes: dict[str, int] = {}

        def keep(entries: list[dict[str, Any]]) -> None:
            sizes.update((head + posixpath.basename(e["name"]), e["size"]) for e in entries if e["type"] == "file")

        if not cut or len(lone) > LIST_PAGE:
            if only is None or names:
                keep(self._ls(where))
        else:
            lister = prefix_lister(self.fs)
            assert lister is not None  # a cut is made only where the store lists by prefix
            if prefixes:
                with ThreadPoolExecutor(max_workers=min(LIST_CONCURRENCY, len(prefixes))) as pool:
                    for entries in pool.map(lambda p: _retried(f"listing {self.fs.unstrip_protocol(where)}/{p}*",
                                                               lambda: lister(where, p)), prefixes):
                        keep(entries)
            lookups |= {head + n for n in lone}
        for rel, size in self._sizes_of(sorted(lookups - sizes.keys())):
            if size is not None:
                sizes[rel] = size
        return sizes

    def _prefix_cut(self, manifest: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
        """`storage.name_prefixes` of the data files the manifest expects, on a store that lists by
        prefix; ([], []) where one listing of the folder costs less: a local disk, no manifest, or
        names with no shared stem (hashes), which cut into more than 4 prefixes per page of names."""
        if prefix_lister(self.fs) is None or manifest is None or not manifest.get("data_extension"):
            return [], []
        expected = [f"{n}.{manifest['data_extension']}" for n in manifest.get("shards", {})]
        prefixes, exact = name_prefixes(expected, per_prefix=LIST_PAGE)
        if len(prefixes) > 4 * -(-len(expected) // LIST_PAGE):
            return [], []
        return prefixes, exact

    def _sizes_of(self, rels: list[str]) -> list[tuple[str, int | None]]:
        """(rel, size of the file at rel or None when there is none), each looked up alone, in threads."""
        if not rels:
            return []
        with ThreadPoolExecutor(max_workers=min(LIST_CONCURRENCY, len(rels))) as pool:
            return list(zip(rels, pool.map(self._size_of, rels)))

    def _size_of(self, rel: str) -> int | None:
        """Size of the file at `rel` (relative to the output), None when there is none."""
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        try:
            return int(_retried(f"looking up {self.fs.unstrip_protocol(path)}", lambda: self.fs.info(path))["size"])
        except FileNotFoundError:
            return None

    def job_records(self, *, verify_checksum: bool = False) -> list[ShardRecord]:
        """The committed records of the manifest's shards, by name (`verify_checksum`: see `records`)."""
        names = self._job()["shards"]
        return [r for r in self.records(verify_checksum=verify_checksum) if r.name in names]

    # --- end of job --------------------------------------------------------------------------

    def write_errors_table(self) -> int:
        """Write the errors table from the committed shards' errors; returns the number of rows."""
        errors = [e for r in self.job_records() for e in r.errors]
        table = pa.Table.from_pylist([e.to_dict() for e in errors], schema=_ERRORS_SCHEMA)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"identity_hash": self.identity_hash})})
        write_atomically(self.fs, self._tmp, self._path(self.layout.errors),
                         lambda f: pq.write_table(table, f, compression="zstd"))
        return len(errors)

    def write_failure(self, reason: str, summary: Mapping[str, Any] | None = None) -> None:
        """Record why this run stopped for good (`status` says failed, with the reason, until a
        new run starts)."""
        self._write_json(self._path(FAILURE_FILE), {"reason": reason, "at": _now(), **dict(summary or {})})

    def read_failure(self) -> dict[str, Any] | None:
        return self._read_json(self._path(FAILURE_FILE))

    def read_success(self) -> dict[str, Any] | None:
        """The SUCCESS summary, or None when the job has not finished."""
        data = self._read_json(self._path(self.layout.success))
        return data if isinstance(data, dict) else None

    def write_success(self, summary: Mapping[str, Any]) -> None:
        """Write SUCCESS (the caller's summary plus the ledger's counts) once every shard is committed.

        Raises LedgerError naming the shards that are not committed.
        """
        records = self.job_records()
        missing = sorted(set(self._job()["shards"]) - {r.name for r in records})
        if missing:
            raise LedgerError(f"cannot mark {self.url} complete: {len(missing)} shard(s) not committed, "
                              f"e.g. {missing[:10]}")
        p = self._progress(records, succeeded=True)
        facts = {"identity_hash": self.identity_hash, "total_shards": p.total_shards,
                 "committed_shards": p.committed_shards, "samples_read": p.samples_read,
                 "samples_written": p.samples_written, "samples_errored": p.samples_errored,
                 "finished": _now()}
        self._write_json(self._path(self.layout.success), {**summary, **facts})

    def _progress(self, records: list[ShardRecord], *, succeeded: bool) -> JobProgress:
        job = self._job()
        times = [t for t in (_parse_time(r.committed_at) for r in records) if t is not None]
        return JobProgress(
            total_shards=len(job["shards"]), committed_shards=len(records),
            samples_read=sum(r.samples_read for r in records),
            samples_written=sum(r.samples_written for r in records),
            samples_errored=sum(len(r.errors) for r in records),
            started=_parse_time(job.get("created")),
            last_update=max(times, default=None) or _parse_time(job.get("updated")),
            succeeded=succeeded)

    def progress(self, records: list[ShardRecord] | None = None) -> JobProgress:
        """Where the job in this folder stands; reads only the folder, so it runs from any machine.

        `records` (from `job_records()`) saves reading them again when the caller has them.
        """
        self._manifest = None  # another process may have restarted the job
        records = self.job_records() if records is None else records
        # The marker says the job finished; it is believed only while every shard is still committed.
        complete = {r.name for r in records} >= set(self._job()["shards"])
        return self._progress(records, succeeded=complete and self._exists(self.layout.success))


__all__ = [
    "Ledger", "ShardRecord", "JobProgress", "LedgerError", "IncompatibleOutputError", "ForeignObjectError",
    "identity_hash", "identity_differences", "build_manifest", "METADATA_KEY", "COMPACT_EVERY", "COMPACT_MIN",
]
