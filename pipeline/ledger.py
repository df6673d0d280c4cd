"""What "committed" means for one output folder (a local path or any fsspec URL).

Layout of an output folder; latentcache owns every name starting with `_` and the data files it
wrote:

    _latentcache.json        job manifest, written at job start: `identity` (VAE fingerprint, preset,
                             scaling/shift, preprocessing, format, latent_dtype), `identity_hash`,
                             `code_version`, `shards` (name -> input URL), `total_shards`,
                             `created` (first start) and `updated` (latest start), ISO 8601 UTC
    <name>.parquet|.safetensors   one data file per input shard (see pipeline.writers)
    _records/<name>.json     per-shard record, written only AFTER its data file: name, input_url,
                             data_file, samples_read, samples_written, errors (SampleError dicts),
                             bytes, sha256, identity_hash, attempt, seconds, committed_at
    _errors.parquet          the job's sample errors (key, shard, stage, reason), written at the end
    _SUCCESS                 JSON summary, written only when every shard of the manifest is committed
    _tmp/                    temp files of in-flight writes; cleared at job start

A shard is committed when its record exists, parses, carries this job's identity hash, and its data
file exists with the recorded size (and sha256, when asked). This is checked, never assumed: a
record whose data is missing or wrong counts as not committed, and the shard is redone.

Readers on other machines (`latentcache status`) only need the URL: `Ledger(url).progress()`.
fsspec caches listings per filesystem instance, and other processes write here, so every check
invalidates the cache first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import EncodeConfig, to_dict
from pipeline.samples import SampleError
from pipeline.writers import (METADATA_KEY, WRITERS, ShardStats, join, output_fs,
                              write_atomically, write_bytes_atomically)

logger = logging.getLogger(__name__)

MANIFEST = "_latentcache.json"
RECORDS_DIR = "_records"
ERRORS_TABLE = "_errors.parquet"
SUCCESS = "_SUCCESS"
TMP_DIR = "_tmp"
MANIFEST_VERSION = 1
_DATA_EXTENSIONS = tuple(cls.extension for cls in WRITERS.values())
_ERROR_FIELDS = tuple(f.name for f in dataclasses.fields(SampleError))
_ERRORS_SCHEMA = pa.schema([pa.field(n, pa.string(), nullable=False) for n in _ERROR_FIELDS])


class LedgerError(RuntimeError):
    """The output folder's bookkeeping is missing, unreadable or inconsistent."""


class IncompatibleOutputError(LedgerError):
    """The output folder holds a job with a different identity (VAE, preprocessing, format...)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _parse_time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def identity_hash(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity's canonical JSON (sorted keys): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def job_identity(config: EncodeConfig, *, fingerprint: str, preset: str, scaling_factor: float,
                 shift_factor: float) -> dict[str, Any]:
    """Everything that changes the bytes of a latent shard; a resumed job must match it exactly."""
    return {"fingerprint": fingerprint, "preset": preset, "scaling_factor": float(scaling_factor),
            "shift_factor": float(shift_factor), "preprocess": to_dict(config.preprocess),
            "format": config.format, "latent_dtype": config.latent_dtype}


def build_manifest(*, identity: Mapping[str, Any], shards: Mapping[str, str], code_version: str,
                   **extra: Any) -> dict[str, Any]:
    """A manifest for `Ledger.open_job`: identity, input shards (name -> URL), code version, extras."""
    return {**extra, "identity": dict(identity), "shards": dict(shards), "code_version": code_version}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field: output has X, this job has Y` for each differing (dotted) identity field."""
    a, b = _flatten(old), _flatten(new)
    missing = "<absent>"
    return [f"{k}: output has {a.get(k, missing)}, this job has {b.get(k, missing)}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


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

    @classmethod
    def from_stats(cls, stats: ShardStats, *, input_url: str, samples_read: int,
                   errors: list[SampleError] | tuple[SampleError, ...], identity_hash: str,
                   attempt: int = 1, seconds: float = 0.0) -> ShardRecord:
        """The record for a shard that a writer just committed."""
        return cls(name=stats.name, input_url=input_url, data_file=posixpath.basename(stats.path),
                   samples_read=samples_read, samples_written=stats.samples, errors=tuple(errors),
                   bytes=stats.bytes, sha256=stats.sha256, identity_hash=identity_hash,
                   attempt=attempt, seconds=seconds)

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
        errors = data["errors"]
        if not isinstance(errors, list):
            raise LedgerError(f"{where}: errors={errors!r} must be a list of SampleError objects")
        try:
            parsed = tuple(SampleError(**{k: str(e[k]) for k in _ERROR_FIELDS})
                           for e in errors)
        except (TypeError, KeyError) as e:
            raise LedgerError(f"{where}: an error entry lacks {e}; expected key, shard, stage, reason") from None
        if posixpath.basename(data["data_file"]) != data["data_file"] or data["data_file"].startswith("_"):
            raise LedgerError(f"{where}: data_file={data['data_file']!r} must be a file name in the output folder")
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

    # --- paths and small I/O -----------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _record_path(self, name: str) -> str:
        return self._path(RECORDS_DIR, f"{name}.json")

    def _ls(self, path: str) -> list[dict[str, Any]]:
        """Entries of a folder, [] when it does not exist (a valid state: nothing written yet)."""
        self.fs.invalidate_cache(path)
        try:
            return list(self.fs.ls(path, detail=True))
        except FileNotFoundError:
            return []

    def _read_json(self, path: str) -> Any | None:
        """The parsed JSON at `path`, None when absent; raises LedgerError when unreadable JSON."""
        self.fs.invalidate_cache(path)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LedgerError(f"{self.fs.unstrip_protocol(path)} is not valid JSON: {e}") from e

    def _cat_many(self, paths: list[str]) -> dict[str, bytes]:
        """Contents of `paths` in one batched read; files deleted meanwhile are left out, other errors raise."""
        if not paths:
            return {}
        for p in paths:
            self.fs.invalidate_cache(p)
        out = {}
        for path, value in self.fs.cat(paths, on_error="return").items():
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise LedgerError(f"reading {self.fs.unstrip_protocol(path)} failed: {value!r}") from value
            out[path] = value
        return out

    def _write_json(self, path: str, data: Any) -> None:
        write_bytes_atomically(self.fs, self.root, path, json.dumps(data, indent=1, sort_keys=True).encode())

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
        sha = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(8 * 2**20):
                sha.update(chunk)
        return sha.hexdigest()

    # --- manifest ----------------------------------------------------------------------------

    def read_manifest(self) -> dict[str, Any] | None:
        """The job manifest, or None when the folder has none; raises LedgerError when malformed."""
        path = self._path(MANIFEST)
        data = self._read_json(path)
        if data is None:
            return None
        where = self.fs.unstrip_protocol(path)
        if not isinstance(data, dict) or not isinstance(data.get("identity"), dict) \
                or not isinstance(data.get("shards"), dict) or not isinstance(data.get("identity_hash"), str):
            raise LedgerError(f"{where}: not a latentcache manifest; expected an object with "
                              "identity, identity_hash and shards")
        if data.get("version") != MANIFEST_VERSION:
            raise LedgerError(f"{where}: manifest version {data.get('version')!r} is not supported; "
                              f"expected {MANIFEST_VERSION}")
        return data

    def _job(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = self.read_manifest()
        if self._manifest is None:
            raise LedgerError(f"no latentcache job at {self.url} ({MANIFEST} is missing)")
        return self._manifest

    @property
    def identity_hash(self) -> str:
        """The identity hash of the job in this folder (from its manifest)."""
        return self._job()["identity_hash"]

    @property
    def shards(self) -> dict[str, str]:
        """The job's input shards, name -> input URL."""
        return dict(self._job()["shards"])

    def open_job(self, manifest: Mapping[str, Any], *, overwrite: bool) -> None:
        """Start or resume the job described by `manifest` (see `build_manifest`) in this folder.

        Refuses a folder holding a job of another identity unless `overwrite`, which removes the
        files latentcache owns there first. Always removes a stale _SUCCESS and leftover temp files.
        """
        identity, shards = manifest.get("identity"), manifest.get("shards")
        if not isinstance(identity, Mapping) or not identity:
            raise ValueError(f"manifest identity={identity!r} must be a non-empty mapping (see job_identity)")
        if not isinstance(shards, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in shards.items()):
            raise ValueError("manifest shards must map shard name (str) to input URL (str)")
        bad = sorted(n for n in shards if not n or n[0] in "_." or "/" in n)
        if bad:
            raise ValueError(f"shard names {bad[:5]} are not allowed; expected file stems without '/' "
                             "that do not start with '_' or '.'")
        try:
            old = self.read_manifest()
        except LedgerError as e:
            if not overwrite:
                raise LedgerError(f"{e}; use --overwrite to replace the output at {self.url}") from e
            old = None
        new_hash = identity_hash(identity)
        if old is not None and old["identity_hash"] != new_hash and not overwrite:
            diffs = identity_differences(old["identity"], identity) or ["identity_hash differs"]
            raise IncompatibleOutputError(
                f"output {self.url} holds latents of a different job: {'; '.join(diffs)}; "
                "use --overwrite to replace them, or choose another output")
        self._rm_if_exists(self._path(SUCCESS))
        if overwrite:
            self._wipe(old, shards)
        self.cleanup_tmp()
        now = _now()
        resumed = old is not None and old["identity_hash"] == new_hash and not overwrite
        data = {**manifest, "version": MANIFEST_VERSION, "identity": dict(identity), "identity_hash": new_hash,
                "shards": dict(shards), "total_shards": len(shards),
                "created": old.get("created", now) if resumed else now, "updated": now}
        self._write_json(self._path(MANIFEST), data)
        self._manifest = data

    def _wipe(self, old: Mapping[str, Any] | None, new_shards: Mapping[str, str]) -> None:
        """Remove what latentcache owns here: marker, records, errors, temp files, manifest, data."""
        names = set(new_shards) | set(old["shards"] if old else ())
        data_files = {f"{n}.{ext}" for n in names for ext in _DATA_EXTENSIONS}
        records = [e["name"] for e in self._ls(self._path(RECORDS_DIR)) if e["type"] == "file"]
        for path, raw in self._cat_many(records).items():
            try:
                data_files.add(ShardRecord.from_dict(json.loads(raw), where=path).data_file)
            except (LedgerError, ValueError) as e:  # its data file is still covered by the names above
                logger.warning("overwrite: ignoring unreadable record %s: %s", path, e)
        present = {posixpath.basename(e["name"]): e["name"] for e in self._ls(self.root) if e["type"] == "file"}
        # Marker and records first: a crash mid-wipe leaves data without records, i.e. uncommitted.
        self._rm([present[n] for n in (SUCCESS, ERRORS_TABLE) if n in present])
        self._rm(records)
        self._rm([present[f] for f in sorted(data_files) if f in present])
        self.cleanup_tmp()
        self._rm([present[MANIFEST]] if MANIFEST in present else [])
        self._manifest = None

    def cleanup_tmp(self) -> int:
        """Remove temp files left by a crashed run; returns how many. Call only when no writer runs."""
        stale = [e["name"] for e in self._ls(self._path(TMP_DIR)) if e["type"] == "file"]
        if stale:
            logger.info("removing %d stale temp file(s) under %s", len(stale), self._path(TMP_DIR))
        self._rm(stale)
        return len(stale)

    # --- per-shard records -------------------------------------------------------------------

    def _check(self, record: ShardRecord, name: str, sizes: Mapping[str, int] | None,
               verify_checksum: bool) -> str | None:
        """Why `record` does not make shard `name` committed, or None when it does."""
        if record.name != name:
            return f"record names shard {record.name!r}"
        if record.identity_hash != self.identity_hash:
            return "record belongs to a job with another identity"
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
            record = None if data is None else ShardRecord.from_dict(data, where=self.fs.unstrip_protocol(path))
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

    def commit_record(self, record: ShardRecord) -> None:
        """Write the record of a shard whose data file is already written; this commits the shard.

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

    def discard(self, name: str) -> None:
        """Remove shard `name`'s record (not its data) before rewriting a shard that is not committed."""
        self._rm_if_exists(self._record_path(name))

    def discard_all(self, names: set[str] | dict[str, str]) -> int:
        """`discard` for many shards: one listing and one bulk delete (a job may have 100k shards)."""
        stale = [e["name"] for e in self._ls(self._path(RECORDS_DIR))
                 if e["type"] == "file" and posixpath.basename(e["name"])[: -len(".json")] in names]
        self._rm(stale)
        return len(stale)

    def records(self) -> list[ShardRecord]:
        """The committed shards' records (any name), by name; two listings and one batched read."""
        paths = sorted(e["name"] for e in self._ls(self._path(RECORDS_DIR))
                       if e["type"] == "file" and e["name"].endswith(".json"))
        if not paths:
            return []
        sizes = {posixpath.basename(e["name"]): e["size"] for e in self._ls(self.root) if e["type"] == "file"}
        out = []
        for path, raw in sorted(self._cat_many(paths).items()):
            name = posixpath.basename(path)[: -len(".json")]
            try:
                record = ShardRecord.from_dict(json.loads(raw), where=self.fs.unstrip_protocol(path))
            except (LedgerError, ValueError) as e:
                logger.warning("shard %s is not committed: %s", name, e)
                continue
            reason = self._check(record, name, sizes, verify_checksum=False)
            if reason is not None:
                logger.warning("shard %s is not committed: %s", name, reason)
                continue
            out.append(record)
        return out

    def job_records(self) -> list[ShardRecord]:
        """The committed records of the manifest's shards, by name."""
        names = self._job()["shards"]
        return [r for r in self.records() if r.name in names]

    # --- end of job --------------------------------------------------------------------------

    def write_errors_table(self) -> int:
        """Write `_errors.parquet` from the committed shards' errors; returns the number of rows."""
        errors = [e for r in self.job_records() for e in r.errors]
        table = pa.Table.from_pylist([e.to_dict() for e in errors], schema=_ERRORS_SCHEMA)
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"identity_hash": self.identity_hash})})
        write_atomically(self.fs, self.root, self._path(ERRORS_TABLE),
                         lambda f: pq.write_table(table, f, compression="zstd"))
        return len(errors)

    def write_success(self, summary: Mapping[str, Any]) -> None:
        """Write `_SUCCESS` (the caller's summary plus the ledger's counts) once every shard is committed.

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
        self._write_json(self._path(SUCCESS), {**summary, **facts})

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
        self.fs.invalidate_cache(self._path(SUCCESS))
        return self._progress(records, succeeded=self.fs.exists(self._path(SUCCESS)))


__all__ = [
    "Ledger", "ShardRecord", "JobProgress", "LedgerError", "IncompatibleOutputError",
    "identity_hash", "identity_differences", "job_identity", "build_manifest",
    "MANIFEST", "RECORDS_DIR", "ERRORS_TABLE", "SUCCESS", "TMP_DIR",
]
