"""`latentcache verify`: an output folder checked against its own bookkeeping, from any machine.

`verify_output(url)` reads the manifest and every record (see `pipeline.core.ledger`), lists the
folder, and opens each data file's metadata only: a Parquet footer (schema, row count, the
`latentcache` metadata) and its key column, a safetensors header, a tar's member headers (and the
small `<key>.latentcache.json` members of a decode job). What it finds is a list of `Violation`s,
each with a `kind`:

    manifest           the manifest cannot be read
    record             a record does not parse, or names another shard, input URL or data file
    orphan_record      a record of a shard that the manifest does not list
    uncommitted        a shard of the manifest without a record
    missing_data       a record whose data file is not there
    size               a data file whose size is not the recorded one
    checksum           (checksums=True) a data file whose sha256 is not the recorded one
    unreadable         a data file that does not open as its format (footer, header, tar headers)
    schema             a data file whose columns, tensors or members are not those its job writes
    identity           a record or data file made with another identity than the manifest's (VAE
                       fingerprint, scaling, preprocessing, format, ...): one identity throughout
    count              a data file holding another number of samples than its record says
    reconcile          a record whose written + errored samples are not the samples it read
    duplicate_key      a key in two data files, or twice in one
    stray_temp         a file under the temp folder, or an unfinished multipart upload under the
                       output: a write in flight, or one a crash left
    stray_file         a file in the records folder that is not a record
    unrecorded_data    a data file no record vouches for (the folder's readers would read it)
    source_missing     (source=...) a source key neither written nor among its shard's errors, or a
                       source shard without a committed output shard
    source_unreadable  (source=...) a source shard that cannot be read
    marker             SUCCESS missing with every shard committed, present with some not, or
                       stating other totals than the records
    errors_table       errors.parquet missing after SUCCESS, or with another row count than the
                       records' errors

Memory does not grow with the folder's samples: records are read and checked in batches of
RECORD_BATCH, shards in a thread pool, and a shard's keys are kept only as 64-bit hashes (with the
index of their file) for the duplicate check; the few colliding hashes are resolved back to keys by
reading just the files that hold them again. The listings (names and sizes) are kept: they are one
entry per shard, as the manifest is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.core.kind import JobPlan, shard_metadata
from pipeline.core.layout import METADATA_KEY, is_reserved
from pipeline.core.ledger import Ledger, LedgerError, ShardRecord
from pipeline.io.shards import version_change
from pipeline.io.latent_reader import parse_safetensors_header

log = logging.getLogger(__name__)

# Records read (and shards checked) per batch: what is held at once, whatever the shard count.
RECORD_BATCH = 32
# Keys named in one violation's message before the rest are only counted.
MAX_NAMED_KEYS = 10
_MAX_PROBLEMS = 5
_MAX_INFO_BYTES = 1 << 20
_SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32"}
_HASH_BATCH = 4096
_NO_VALUE = "<absent>"
# Footers, headers and key columns are read with one request each, not a readahead block (s3fs
# reads 50 MiB ahead by default: a whole shard to look at its footer). A tar's headers sit between
# its members, so it is read ahead in blocks of this size instead.
_METADATA_OPEN = {"cache_type": "none"}
_TAR_OPEN = {"cache_type": "readahead", "block_size": 8 * 2**20}


class NoJobError(LookupError):
    """There is no latentcache job at the URL (no manifest): nothing to verify against."""


@dataclass(frozen=True)
class Violation:
    """One finding: its `kind` (see the module docstring), the shard it concerns ("" for none),
    what was found against what was expected, and the file (relative to the output, or a source URL)."""

    kind: str
    shard: str
    message: str
    file: str = ""

    def line(self) -> str:
        return f"{self.kind}: {self.file or self.shard}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on one output folder: its violations (none when `ok`, sorted by shard) and what
    was checked: shards with a record, their samples (as their data files hold them, or their
    records say where a file does not open) and data bytes, the source shards read, notes on
    what could not be checked."""

    url: str
    job_kind: str
    violations: tuple[Violation, ...]
    shards_checked: int
    samples: int
    bytes: int
    seconds: float
    checksums: bool = False
    source_shards: int = 0
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def counts(self) -> dict[str, int]:
        """Violations per kind."""
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.kind] = out.get(v.kind, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["violations"] = [dataclasses.asdict(v) for v in self.violations]
        out["notes"] = list(self.notes)
        out["ok"] = self.ok
        return out


def format_report(report: VerifyReport) -> str:
    """One line per violation (`kind: file: what was found; what was expected`), the notes, then
    the verdict with what was checked."""
    lines = [v.line() for v in report.violations]
    lines += [f"note: {n}" for n in report.notes]
    what = (f"{report.job_kind} output {report.url}: {report.shards_checked} shard(s), {report.samples} "
            f"sample(s), {report.bytes} bytes checked{' with sha256' if report.checksums else ''}"
            f"{f', keys of {report.source_shards} source shard(s)' if report.source_shards else ''} "
            f"in {report.seconds:.1f} s")
    if report.ok:
        lines.append(f"OK: {what}")
    else:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.counts().items()))
        lines.append(f"FAILED: {len(report.violations)} violation(s) ({kinds}): {what}")
    return "\n".join(lines)


# --- keys as hashes ---------------------------------------------------------------------------------


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    """64-bit hashes (blake2b) of keys, as uint64: 8 bytes a key instead of the key itself.
    Deterministic across processes (Python's hash() is salted)."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


class _KeyIndex:
    """Every key's hash with the index of the file holding it, appended shard by shard."""

    def __init__(self) -> None:
        self._hashes: list[np.ndarray] = []
        self._files: list[np.ndarray] = []

    def add(self, hashes: np.ndarray, file_index: int) -> None:
        if len(hashes):
            self._hashes.append(hashes)
            self._files.append(np.full(len(hashes), file_index, dtype=np.uint32))

    def collisions(self) -> tuple[np.ndarray, np.ndarray]:
        """(hashes seen more than once, sorted; indices of the files holding them)."""
        if not self._hashes:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        hashes = np.concatenate(self._hashes)
        files = np.concatenate(self._files)
        self._hashes, self._files = [hashes], [files]
        ordered = np.sort(hashes)
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        del ordered
        if not len(repeated):
            return repeated, np.zeros(0, np.uint32)
        return repeated, np.unique(files[np.isin(hashes, repeated)])


# --- what a data file holds, per job kind -------------------------------------------------------------


@dataclass
class _Facts:
    """What opening a data file told: its sample count (None when unknown), its keys, its problems
    as (kind, message)."""

    samples: int | None
    keys: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _short(value: Any, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _joined(problems: list[str]) -> str:
    more = f"; and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
    return "; ".join(problems[:_MAX_PROBLEMS]) + more


def _expected_metadata(identity: Mapping[str, Any]) -> dict[str, str]:
    """The identity as the writers stamp it into each data file (strings; nested values as JSON)."""
    return shard_metadata(JobPlan(inputs={}, identity=identity, provenance={}, data_extension=""))


class _Inspector:
    """Opens one job kind's data files, metadata only, and says what they hold against what the
    manifest says they must."""

    def __init__(self, identity: Mapping[str, Any], *, legacy: bool) -> None:
        self.identity = identity
        self.legacy = legacy
        self.expected = ({"vae_fingerprint": str(identity.get("vae_fingerprint"))} if legacy
                         else _expected_metadata(identity))

    def inspect(self, fs: AbstractFileSystem, path: str, name: str, size: int) -> _Facts:
        return _Facts(samples=None)

    def _identity_problems(self, raw: Any, name: str, own: Mapping[str, str]) -> list[tuple[str, str]]:
        """Problems of the `latentcache` metadata: absent, not a JSON object, or not the manifest's identity."""
        if raw is None:
            return [("identity", (f"has no {METADATA_KEY!r} metadata; expected the job's identity "
                                  f"(VAE fingerprint {self.identity.get('vae_fingerprint')})"))]
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return [("identity", f"its {METADATA_KEY!r} metadata is not JSON ({e})")]
        if not isinstance(meta, dict):
            return [("identity", f"its {METADATA_KEY!r} metadata is a {type(meta).__name__}; expected an object")]
        if self.legacy and "vae_fingerprint" not in meta:  # 0.1 called it `fingerprint`
            meta = {**meta, "vae_fingerprint": meta.get("fingerprint")}
        wanted = {**self.expected, **own}
        diffs = [f"{k} is {_short(meta.get(k, _NO_VALUE))}; the manifest has {_short(v)}"
                 for k, v in wanted.items() if meta.get(k) != v]
        return [("identity", f"metadata differs from the job's identity: {_joined(diffs)}")] if diffs else []


class _ParquetInspector(_Inspector):
    """Parquet data files: the footer (schema, metadata) and the columns that hold the keys."""

    expected_schema: pa.Schema | None = None

    def inspect(self, fs: AbstractFileSystem, path: str, name: str, size: int) -> _Facts:
        try:
            with fs.open(path, "rb", **_METADATA_OPEN) as f:
                # Page checksums are checked on what is read (the keys), as the readers check them.
                pf = pq.ParquetFile(f, page_checksum_verification=True)
                schema = pf.schema_arrow
                problems = self._schema_problems(schema)
                problems += self._identity_problems((schema.metadata or {}).get(METADATA_KEY.encode()), name,
                                                    self.own_metadata(name))
                samples, keys = self.samples_and_keys(pf, schema)
        except (OSError, ValueError, pa.ArrowException) as e:
            return _Facts(samples=None, problems=[("unreadable", f"does not open as Parquet: {_short(e, 300)}")])
        return _Facts(samples=samples, keys=keys, problems=problems)

    def own_metadata(self, name: str) -> dict[str, str]:
        return {}

    def _schema_problems(self, schema: pa.Schema) -> list[tuple[str, str]]:
        expected = self.expected_schema
        if expected is None:
            return []
        got = {f.name: f for f in schema}
        problems = [f"column {f.name} is missing" for f in expected if f.name not in got]
        problems += [f"column {n} is not one of the job's" for n in schema.names if expected.get_field_index(n) < 0]
        for f in expected:
            g = got.get(f.name)
            if g is not None and (g.type != f.type or g.nullable != f.nullable):
                problems.append(f"column {f.name} is {g.type}{'' if g.nullable else ' not null'}; expected "
                                f"{f.type}{'' if f.nullable else ' not null'}")
        if not problems and schema.names != expected.names:
            problems.append(f"columns are in the order {schema.names}; expected {expected.names}")
        return [("schema", f"schema differs from the job's: {_joined(problems)}")] if problems else []

    def samples_and_keys(self, pf: pq.ParquetFile, schema: pa.Schema) -> tuple[int | None, list[str]]:
        if "key" not in schema.names:
            return None, []
        keys: list[str] = []
        for batch in pf.iter_batches(columns=["key"], batch_size=65536):
            keys.extend(batch.column(0).to_pylist())
        return pf.metadata.num_rows, keys


class _LatentParquetInspector(_ParquetInspector):
    """An encode job's Parquet shards: one row per sample; the schema is the writer's own."""

    def __init__(self, identity: Mapping[str, Any], *, legacy: bool, url: str,
                 storage_options: Mapping[str, Any] | None) -> None:
        super().__init__(identity, legacy=legacy)
        if not legacy:
            from pipeline.io.latent_writers import ParquetShardWriter

            # The writer's schema is the one source of truth; building a writer opens no file.
            writer = ParquetShardWriter(url, "verify", {}, latent_dtype=str(identity.get("latent_dtype", "float16")),
                                        columns=tuple(identity.get("passthrough", ())), storage_options=storage_options)
            self.expected_schema = writer.schema().remove_metadata()

    def own_metadata(self, name: str) -> dict[str, str]:
        if self.legacy:
            return {}
        return {"format": "parquet", "storage_dtype": str(self.identity.get("latent_dtype")), "shard": name}


class _AuditPartInspector(_ParquetInspector):
    """An audit job's parts: metric rows (two per key with a flipped latent) and preview rows."""

    def __init__(self, identity: Mapping[str, Any], *, legacy: bool) -> None:
        super().__init__(identity, legacy=legacy)
        from pipeline.jobs.audit import PART_SCHEMA

        self.expected_schema = PART_SCHEMA.remove_metadata()

    def samples_and_keys(self, pf: pq.ParquetFile, schema: pa.Schema) -> tuple[int | None, list[str]]:
        if not {"key", "role", "flipped"} <= set(schema.names):
            return None, []
        keys: list[str] = []
        for batch in pf.iter_batches(columns=["key", "role", "flipped"], batch_size=65536):
            key, role, flipped = (batch.column(i).to_pylist() for i in range(3))
            # One metric row per key unflipped: a sample of the shard (previews repeat keys).
            keys.extend(k for k, r, fl in zip(key, role, flipped) if r == "metrics" and not fl)
        return len(keys), keys


class _SafetensorsInspector(_Inspector):
    """An encode job's safetensors shards: the header (per-sample JSON, tensor names, dtypes,
    shapes, offsets) against the layout the writer makes (pipeline.io.latent_writers)."""

    def inspect(self, fs: AbstractFileSystem, path: str, name: str, size: int) -> _Facts:
        try:
            with fs.open(path, "rb", **_METADATA_OPEN) as f:
                header, length = parse_safetensors_header(f.read, name, file_size=size)
            meta = header.pop("__metadata__", None) or {}
            samples = json.loads(meta["samples"]) if "samples" in meta else None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            return _Facts(samples=None, problems=[("unreadable", f"does not open as safetensors: {_short(e, 300)}")])
        problems = self._identity_problems(meta.get(METADATA_KEY), name, self.own_metadata(name))
        if not isinstance(samples, list):
            problems.append(("schema", "header has no 'samples' list; expected one entry per sample"))
            return _Facts(samples=None, problems=problems)
        try:
            keys, layout = self._layout(samples, header, size - 8 - length)
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a header of the wrong shape
            return _Facts(samples=None, problems=problems + [("unreadable", f"header is malformed: {_short(e, 300)}")])
        if layout:
            problems.append(("schema", f"tensors differ from the job's layout: {_joined(layout)}"))
        return _Facts(samples=len(samples), keys=keys, problems=problems)

    def own_metadata(self, name: str) -> dict[str, str]:
        if self.legacy:
            return {}
        return {"format": "safetensors", "storage_dtype": str(self.identity.get("latent_dtype")), "shard": name}

    def _layout(self, samples: list[Any], tensors: dict[str, Any], data_bytes: int) -> tuple[list[str], list[str]]:
        """The keys, and how the tensors differ from one per sample and field, back to back."""
        dtype = _SAFETENSORS_DTYPES.get(str(self.identity.get("latent_dtype")))
        columns = set(self.identity.get("passthrough", ()))
        keys: list[str] = []
        problems: list[str] = []
        spans: list[tuple[int, int]] = []
        for i, s in enumerate(samples):
            if not isinstance(s, dict) or not isinstance(s.get("key"), str):
                problems.append(f"sample entry {i} has no key")
                continue
            keys.append(s["key"])
            if s.get("index") != i:
                problems.append(f"sample {s['key']!r} is entry {i} but has index {s.get('index')!r}")
                continue
            suffix = f"{i:06d}"
            shape = s.get("latent_shape")
            names = [(f"latent.{suffix}", dtype, shape), (f"logvar.{suffix}", dtype, shape)]
            if s.get("flip"):
                names += [(f"latent_flip.{suffix}", dtype, shape), (f"logvar_flip.{suffix}", dtype, shape)]
            members = s.get("members", [])
            if not self.legacy and set(members) - columns:
                problems.append(f"sample {s['key']!r} has members {sorted(set(members) - columns)} outside the "
                                f"job's passthrough {sorted(columns)}")
            names += [(f"extras.{m}.{suffix}", "U8", None) for m in members]
            for tensor, want_dtype, want_shape in names:
                entry = tensors.pop(tensor, None)
                if not isinstance(entry, dict):
                    problems.append(f"tensor {tensor} of sample {s['key']!r} is missing")
                    continue
                if want_dtype is not None and entry.get("dtype") != want_dtype:
                    problems.append(f"tensor {tensor} is {entry.get('dtype')}; expected {want_dtype}")
                if want_shape is not None and entry.get("shape") != want_shape:
                    problems.append(f"tensor {tensor} has shape {entry.get('shape')}; expected {want_shape}")
                offsets = entry.get("data_offsets")
                if isinstance(offsets, list) and len(offsets) == 2:
                    spans.append((int(offsets[0]), int(offsets[1])))
        if tensors:
            problems.append(f"{len(tensors)} tensor(s) belong to no sample, e.g. {sorted(tensors)[:3]}")
        at = 0
        for start, end in sorted(spans):
            if start != at or end < start:
                problems.append(f"tensor data at bytes {start}-{end} does not follow on from byte {at}")
                break
            at = end
        else:
            if at != data_bytes:
                problems.append(f"tensors end at byte {at} of a data section of {data_bytes} bytes")
        return keys, problems


class _TarInspector(_Inspector):
    """A decode job's WebDataset tars: member headers only (the data is skipped over), plus each
    sample's small info member for the VAE fingerprint it was decoded with."""

    def __init__(self, identity: Mapping[str, Any], *, legacy: bool) -> None:
        super().__init__(identity, legacy=legacy)
        from pipeline.jobs.decode import INFO_MEMBER

        self.info_member = INFO_MEMBER
        self.image = str(identity.get("image_format", "png"))

    def inspect(self, fs: AbstractFileSystem, path: str, name: str, size: int) -> _Facts:
        from webdataset.tariterators import base_plus_ext

        from pipeline.io.tar_reader import _StrictTarInfo  # the reader's own strictness about bad headers

        keys: list[str] = []
        schema: list[str] = []
        identity: list[str] = []
        members: set[str] = set()

        def end_sample() -> None:
            if keys:
                absent = sorted({self.image, self.info_member} - members)
                if absent:
                    schema.append(f"sample {keys[-1]!r} lacks member(s) {absent}")

        try:
            with fs.open(path, "rb", **_TAR_OPEN) as f, \
                    tarfile.open(fileobj=f, mode="r:", tarinfo=_StrictTarInfo) as tar:
                while (info := tar.next()) is not None:
                    tar.members = []  # a long shard must not keep every TarInfo
                    key, ext = base_plus_ext(info.name)
                    if not info.isreg() or key is None:
                        schema.append(f"member {info.name!r} is not a regular <key>.<ext> file")
                        continue
                    if not keys or key != keys[-1]:
                        end_sample()
                        keys.append(key)  # a key that comes back later is a duplicate: the key check finds it
                        members = set()
                    if ext in members:
                        schema.append(f"sample {key!r} has two {ext!r} members")
                    members.add(ext)
                    if ext == self.info_member:
                        identity.extend(self._info_problems(key, tar.extractfile(info).read(_MAX_INFO_BYTES)))
                end_sample()
        except (OSError, EOFError, tarfile.TarError, ValueError) as e:
            return _Facts(samples=None, problems=[("unreadable", f"does not open as a tar: {_short(e, 300)}")])
        problems = [("schema", f"members differ from the job's: {_joined(schema)}")] if schema else []
        if identity:
            problems.append(("identity", f"samples were decoded with another VAE: {_joined(identity)}"))
        return _Facts(samples=len(keys), keys=keys, problems=problems)

    def _info_problems(self, key: str, raw: bytes) -> list[str]:
        try:
            info = json.loads(raw)
            found = info.get("vae_fingerprint") if isinstance(info, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return [f"{key}.{self.info_member} is not JSON"]
        want = self.identity.get("vae_fingerprint")
        return [] if found == want else [f"{key} has VAE fingerprint {found}; the manifest has {want}"]


def _inspector(kind: str, identity: Mapping[str, Any], extension: str, *, legacy: bool, url: str,
               storage_options: Mapping[str, Any] | None) -> _Inspector | None:
    """The inspector of a job kind's data files, None for a kind this module does not know."""
    if kind == "encode" and extension == "parquet":
        return _LatentParquetInspector(identity, legacy=legacy, url=url, storage_options=storage_options)
    if kind == "encode" and extension == "safetensors":
        return _SafetensorsInspector(identity, legacy=legacy)
    if kind == "decode" and extension == "tar":
        return _TarInspector(identity, legacy=legacy)
    if kind == "audit" and extension == "parquet":
        return _AuditPartInspector(identity, legacy=legacy)
    return None


# --- the verification ---------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What checking one shard (or one unrecorded data file) found."""

    violations: list[Violation]
    hashes: np.ndarray
    file_index: int
    samples: int = 0
    bytes: int = 0
    checked: bool = False


def _chunks(items: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _stem(url: str) -> str:
    return posixpath.basename(url.rstrip("/")).rpartition(".")[0]


class _Verifier:
    """One run of `verify_output`; see there."""

    def __init__(self, url: str, *, source: Sequence[str] | None, checksums: bool,
                 storage_options: Mapping[str, Any] | None, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.url = url
        self.source = list(source or [])
        self.checksums = checksums
        self.storage_options = dict(storage_options or {})
        self.workers = workers
        self.ledger = Ledger(url, storage_options)
        self.fs = self.ledger.fs
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.keys = _KeyIndex()
        self.files: list[tuple[str, str]] = []  # file index -> (shard name, relative path)
        self.samples = self.bytes = self.checked = 0
        self.totals = {"samples_read": 0, "samples_written": 0, "samples_errored": 0}
        # From the manifest, in _open.
        self.kind = "unknown"
        self.extension = self.data_dir = self.identity_hash = ""
        self.shards: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self.source_versions: dict[str, dict[str, Any]] = {}  # source shard -> its version in the listing
        self.sizes: dict[str, int] = {}
        self.inspector: _Inspector | None = None
        self.tables: list[str] = []  # compacted record tables
        self.recorded: set[str] = set()  # shards with a record (file or table row), as read

    # --- small helpers -------------------------------------------------------------------------

    def _rel(self, path: str) -> str:
        return path.removeprefix(self.ledger.root.rstrip("/") + "/")

    def _add(self, kind: str, shard: str, message: str, file: str = "") -> None:
        self.violations.append(Violation(kind, shard, message, file))

    def _data_file(self, name: str) -> str:
        return f"{self.data_dir}/{name}.{self.extension}" if self.data_dir else f"{name}.{self.extension}"

    def _size(self, rel: str) -> int | None:
        if rel in self.sizes:
            return self.sizes[rel]
        if posixpath.dirname(rel) == self.data_dir and rel.endswith(f".{self.extension}"):
            return None  # in the folder listed, so not there
        path = self.ledger._path(rel)
        self.fs.invalidate_cache(path)
        try:
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None

    # --- listings ------------------------------------------------------------------------------

    def _list_data(self) -> dict[str, int]:
        """Data file (relative path) -> size, from one listing of the folder that holds them."""
        folder = self.ledger._path(self.data_dir) if self.data_dir else self.ledger.root
        prefix = f"{self.data_dir}/" if self.data_dir else ""
        suffix = f".{self.extension}"
        return {prefix + posixpath.basename(e["name"]): int(e["size"]) for e in self.ledger._ls(folder)
                if e["type"] == "file" and not is_reserved(posixpath.basename(e["name"]))
                and e["name"].endswith(suffix)}

    def _list_temp(self) -> None:
        tmp = self.ledger._path(self.ledger.layout.tmp)
        self.fs.invalidate_cache(tmp)
        try:
            found = sorted(self.fs.find(tmp))
        except FileNotFoundError:
            found = []
        for path in found:
            self._add("stray_temp", "", "temporary file left under the temp folder: a write in flight or a "
                                        "crashed one; expected none once a job has ended", self._rel(path))
        self._list_multipart_uploads()

    def _list_multipart_uploads(self) -> None:
        """Object stores keep the parts of an upload that never completed, invisible to listings."""
        from pipeline.core.storage import multipart_uploads

        if "/" not in self.ledger.root:
            return
        prefix = self.ledger.root.rstrip("/") + "/"
        try:
            uploads = list(multipart_uploads(self.fs, prefix))
        except (OSError, ValueError) as e:
            self.notes.append(f"could not list unfinished multipart uploads under {prefix}: {e}")
            return
        key_prefix = prefix.split("/", 1)[1]
        for u in uploads:
            self._add("stray_temp", "", f"unfinished multipart upload (started {u.get('Initiated')}): a write "
                                        "in flight or a crashed one; expected none once a job has ended",
                      str(u["Key"])[len(key_prefix):])

    def _list_records(self) -> list[str]:
        """The shards with a record file; also lists the compacted tables (`self.tables`)."""
        names = []
        for e in self.ledger._ls(self.ledger._path(self.ledger.layout.records)):
            base = posixpath.basename(e["name"])
            if e["type"] == "file" and base.endswith(".json"):
                names.append(base[: -len(".json")])
            else:
                self._add("stray_file", "", "not a record in the records folder; expected only <shard>.json files",
                          self._rel(e["name"]))
        for e in self.ledger._ls(self.ledger._path(self.ledger.layout.compacted)):
            if e["type"] != "file" or not e["name"].endswith(".parquet"):
                self._add("stray_file", "", "not a table of records in the compacted folder; expected only "
                                            "*.parquet tables", self._rel(e["name"]))
        self.tables = self.ledger.compacted_tables()
        return sorted(names)

    def _record_batches(self, files: Sequence[str]) -> Iterator[list[tuple[str, str, bytes | str]]]:
        """(name, where, JSON) of every record, about RECORD_BATCH at a time: the record files, then
        the rows of the compacted tables that no file (or newer table) overrides. `self.recorded`
        collects the names seen."""
        for chunk in _chunks(files, RECORD_BATCH):
            paths = {self.ledger._record_path(n): n for n in chunk}
            raw = {posixpath.basename(p)[: -len(".json")]: v for p, v in self.ledger._cat_many(list(paths)).items()}
            batch = []
            for path, name in paths.items():
                if name not in raw:
                    self._add("record", name, "record vanished while verifying (a job is running here?)",
                              self._rel(path))
                    continue
                batch.append((name, self._rel(path), raw[name]))
            self.recorded.update(chunk)
            yield batch
        for table in reversed(self.tables):  # newest first: a shard in two tables is the newer's
            rel = self._rel(table)
            try:
                for rows in self.ledger.iter_compacted(table, batch=RECORD_BATCH):
                    batch = [(n, f"{rel}#{n}", r) for n, r in rows if n not in self.recorded]
                    self.recorded.update(n for n, _, _ in batch)
                    yield batch
            except LedgerError as e:
                self._add("record", "", f"compacted table does not read: {_short(e, 300)}", rel)

    def _sources(self) -> dict[str, str]:
        """Source shard name -> URL (raises ShardListingError when a pattern lists nothing)."""
        if not self.source:
            return {}
        if self.kind == "encode":
            from pipeline.io.shards import list_inputs

            listed = list_inputs(self.source, self.storage_options)
            self.source_versions = listed.versions
            return dict(listed)
        from pipeline.io.latent_reader import expand_latent_inputs
        from pipeline.io.shards import DuplicateShardNameError

        out: dict[str, str] = {}
        for u in expand_latent_inputs(self.source, self.storage_options):
            if out.setdefault(_stem(u), u) != u:
                raise DuplicateShardNameError(f"source shards {out[_stem(u)]} and {u} have the same name")
        return out

    def _source_keys(self, url: str) -> Iterator[str]:
        if self.kind == "encode":
            from pipeline.io.tar_reader import iter_shard
            from pipeline.samples import SampleError

            # The job's own reader, so a key means what it meant to the job (a truncated tar's
            # `<shard>:<truncated>`, a repeated key): one sample in memory at a time.
            for item in iter_shard(url, self.storage_options):
                yield item.key if isinstance(item, SampleError) else item.get("__key__", "")
        else:
            from pipeline.io.latent_reader import shard_keys

            yield from shard_keys(url, self.storage_options)

    # --- one shard -----------------------------------------------------------------------------

    def _check(self, name: str, record: ShardRecord, file_index: int) -> _Outcome:
        out: list[Violation] = []
        record_file = self._rel(self.ledger._record_path(name))

        def add(kind: str, message: str, file: str = record.data_file) -> None:
            out.append(Violation(kind, name, message, file))

        planned = self.shards.get(name)
        if record.name != name:
            add("record", f"record of shard {name} names shard {record.name!r}", record_file)
        if planned is None:
            add("orphan_record", f"record of a shard the manifest does not list (it lists {len(self.shards)})",
                record_file)
        elif record.input_url != planned:
            add("record", f"record was made from {record.input_url}; the manifest reads this shard from {planned}",
                record_file)
        if record.identity_hash != self.identity_hash:
            add("identity", f"record has identity hash {record.identity_hash[:12]}; the manifest has "
                            f"{self.identity_hash[:12]} (another VAE, preprocessing or format)", record_file)
        if record.data_file != self._data_file(name):
            add("record", f"record names data file {record.data_file}; expected {self._data_file(name)}", record_file)
        if record.samples_written + len(record.errors) != record.samples_read:
            add("reconcile", f"record says {record.samples_read} read but {record.samples_written} written + "
                             f"{len(record.errors)} errored = {record.samples_written + len(record.errors)}",
                record_file)
        size = self._size(record.data_file)
        if size is None:
            add("missing_data", f"data file is missing; its record says {record.bytes} bytes were written")
            return _Outcome(out, np.zeros(0, np.uint64), file_index, checked=True)
        if size != record.bytes:
            add("size", f"data file has {size} bytes; its record says {record.bytes}")
        path = self.ledger._path(record.data_file)
        if self.checksums:
            try:
                sha = self.ledger._sha256(path)
            except OSError as e:
                add("unreadable", f"cannot be read for its sha256: {e}")
            else:
                if sha != record.sha256:
                    add("checksum", f"data file has sha256 {sha[:16]}...; its record says {record.sha256[:16]}...")
        facts = self.inspector.inspect(self.fs, path, name, size) if self.inspector else _Facts(samples=None)
        for kind, message in facts.problems:
            add(kind, message)
        if facts.samples is not None and facts.samples != record.samples_written:
            add("count", f"data file holds {facts.samples} sample(s); its record says {record.samples_written} "
                         "were written")
        hashes = key_hashes(facts.keys)
        source = self.sources.get(name)
        if source is not None and facts.samples is not None:  # keys unknown: the file's own finding says why
            out.extend(self._check_source(name, source, hashes, record))
        samples = facts.samples if facts.samples is not None else record.samples_written
        return _Outcome(out, hashes, file_index, samples=samples, bytes=size, checked=True)

    def _check_source(self, name: str, url: str, written: np.ndarray, record: ShardRecord) -> list[Violation]:
        """Every key of the source shard is written or among the record's errors (compared as hashes)."""
        accounted = np.union1d(written, key_hashes(e.key for e in record.errors))
        missing: list[str] = []
        n_missing = 0
        batch: list[str] = []

        def flush() -> None:
            nonlocal n_missing
            h = key_hashes(batch)
            at = np.minimum(np.searchsorted(accounted, h), max(len(accounted) - 1, 0))
            found = accounted[at] == h if len(accounted) else np.zeros(len(h), bool)
            for key, ok in zip(batch, found):
                if not ok:
                    n_missing += 1
                    if len(missing) < MAX_NAMED_KEYS:
                        missing.append(key)
            batch.clear()

        from pipeline.io.tar_reader import ShardReadError

        try:
            for key in self._source_keys(url):
                batch.append(key)
                if len(batch) >= _HASH_BATCH:
                    flush()
            flush()
        except (ShardReadError, OSError, ValueError, KeyError, pa.ArrowException) as e:
            # A source that cannot be read is a finding about that shard, not the end of the check.
            return [Violation("source_unreadable", name, f"source shard cannot be read: {type(e).__name__}: "
                                                         f"{_short(e, 300)}", url)]
        if not n_missing:
            return []
        more = f" and {n_missing - len(missing)} more" if n_missing > len(missing) else ""
        return [Violation("source_missing", name,
                          f"{n_missing} key(s) of the source shard are neither written nor recorded as errors: "
                          f"{', '.join(repr(k) for k in missing)}{more}", url)]

    def _inspect_unrecorded(self, rel: str, file_index: int) -> _Outcome:
        """A data file no record vouches for: only its keys matter (for the duplicate check)."""
        facts = self.inspector.inspect(self.fs, self.ledger._path(rel), _stem(rel), self.sizes[rel]) \
            if self.inspector else _Facts(samples=None)
        return _Outcome([], key_hashes(facts.keys), file_index)

    def _fold(self, outcome: _Outcome) -> None:
        self.violations.extend(outcome.violations)
        self.keys.add(outcome.hashes, outcome.file_index)
        if outcome.checked:
            self.checked += 1
            self.samples += outcome.samples
            self.bytes += outcome.bytes

    # --- the whole folder ----------------------------------------------------------------------

    def run(self) -> VerifyReport:
        t0 = time.monotonic()
        try:
            manifest = self.ledger.read_manifest()
        except LedgerError as e:
            self._add("manifest", "", str(e), self.ledger.layout.manifest)
            return self._report(t0, "unknown")
        if manifest is None:
            raise NoJobError(f"no latentcache job at {self.ledger.url}: {self.ledger.layout.manifest} is missing; "
                             "expected the output folder of an encode, decode or audit job")
        self._open(manifest)
        self.sizes = self._list_data()
        self._list_temp()
        names = self._list_records()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="verify") as pool:
            referenced, committed = self._check_records(pool, names)
            self._check_unrecorded(pool, sorted(set(self.sizes) - referenced))
            self._duplicates(pool)
        for name in sorted(set(self.shards) - self.recorded):
            self._add("uncommitted", name, "shard of the manifest has no record: it is not committed",
                      self._rel(self.ledger._record_path(name)))
        for name, url in sorted(self.sources.items()):
            if name not in committed:
                self._add("source_missing", name, "source shard has no committed shard in the output: none of its "
                                                  "keys are written or recorded as errors", url)
        self._check_end_of_job(committed)
        return self._report(t0, self.kind)

    def _open(self, manifest: Mapping[str, Any]) -> None:
        """What the manifest says every shard must agree on, the inspector of its data files, the sources."""
        self.kind = str(manifest.get("kind", "encode"))
        self.extension = str(manifest["data_extension"])
        self.data_dir = str(manifest.get("data_dir", ""))
        self.shards = dict(manifest["shards"])
        self.identity_hash = str(manifest["identity_hash"])
        identity = dict(manifest["identity"])
        self.inspector = _inspector(self.kind, identity, self.extension, legacy=self.ledger.legacy, url=self.url,
                                    storage_options=self.storage_options)
        if self.inspector is None:
            self.notes.append(f"data files of a {self.kind!r} job ({self.extension}) are checked by size only")
        self.sources = self._sources()
        if self.sources and self.kind == "audit" and identity.get("samples"):
            self.notes.append(f"the audit scored a sample of {identity['samples']} keys, so its source shards are "
                              "not checked for completeness")
            self.sources = {}

    def _check_records(self, pool: ThreadPoolExecutor, names: Sequence[str]) -> tuple[set[str], set[str]]:
        """Every record and its data file, RECORD_BATCH at a time; returns the data files the records
        name and the shards whose records parse."""
        referenced: set[str] = set()
        committed: set[str] = set()
        for batch in self._record_batches(names):
            tasks = []
            for name, record in self._parse_records(batch):
                referenced.add(record.data_file)
                committed.add(name)
                self._count(name, record)
                how = version_change(record.input_version, self.source_versions.get(name, {}))
                if how is not None:
                    self._add("source_changed", name, f"the source shard changed since this shard was committed "
                                                      f"({how}): a rerun redoes it", self.sources.get(name, ""))
                tasks.append((name, record, len(self.files)))
                self.files.append((name, record.data_file))
            for outcome in pool.map(lambda t: self._check(*t), tasks):
                self._fold(outcome)
        return referenced, committed

    def _check_unrecorded(self, pool: ThreadPoolExecutor, unrecorded: list[str]) -> None:
        """Data files no record vouches for: named, and their keys added for the duplicate check."""
        tasks = []
        for rel in unrecorded:
            stem = _stem(rel)
            whose = f" (shard {stem} of the manifest)" if stem in self.shards else ""
            self._add("unrecorded_data", stem, f"data file with no record{whose}: the folder's readers would "
                                               "read it, but no record vouches for it", rel)
            tasks.append((rel, len(self.files)))
            self.files.append((stem, rel))
        for outcome in pool.map(lambda t: self._inspect_unrecorded(*t), tasks):
            self._fold(outcome)

    def _parse_records(self, batch: Sequence[tuple[str, str, bytes | str]]) -> list[tuple[str, ShardRecord]]:
        """The batch's records, parsed; unparseable ones are violations."""
        out = []
        for name, rel, raw in batch:
            try:
                out.append((name, ShardRecord.from_dict(json.loads(raw), where=rel)))
            except (LedgerError, ValueError) as e:
                self._add("record", name, f"record does not parse: {_short(e, 300)}", rel)
        return out

    def _count(self, name: str, record: ShardRecord) -> None:
        if name in self.shards:
            self.totals["samples_read"] += record.samples_read
            self.totals["samples_written"] += record.samples_written
            self.totals["samples_errored"] += len(record.errors)

    def _duplicates(self, pool: ThreadPoolExecutor) -> None:
        """Resolve the repeated hashes to keys by reading only the files that hold them again."""
        repeated, involved = self.keys.collisions()
        if not len(repeated):
            return

        def colliding(index: int) -> tuple[int, list[str]]:
            name, rel = self.files[int(index)]
            size = self._size(rel) or 0
            keys = self.inspector.inspect(self.fs, self.ledger._path(rel), name, size).keys if self.inspector else []
            hit = np.isin(key_hashes(keys), repeated)
            return int(index), [k for k, h in zip(keys, hit) if h]

        where: dict[str, list[int]] = {}
        for index, keys in pool.map(colliding, involved.tolist()):
            for key in keys:
                where.setdefault(key, []).append(index)
        groups: dict[tuple[int, ...], list[str]] = {}
        for key, indices in where.items():
            if len(indices) > 1:  # one occurrence each: distinct keys whose hashes collide
                groups.setdefault(tuple(sorted(indices)), []).append(key)
        for indices, keys in sorted(groups.items()):
            files = [self.files[i][1] for i in indices]
            distinct = list(dict.fromkeys(files))
            place = (f"twice in {distinct[0]}" if len(distinct) == 1
                     else f"in {len(distinct)} data files: {', '.join(distinct)}")
            keys.sort()
            more = f" and {len(keys) - MAX_NAMED_KEYS} more" if len(keys) > MAX_NAMED_KEYS else ""
            self._add("duplicate_key", self.files[indices[0]][0],
                      f"{len(keys)} key(s) {place}; expected each key once: "
                      f"{', '.join(repr(k) for k in keys[:MAX_NAMED_KEYS])}{more}", ", ".join(distinct))

    def _check_end_of_job(self, committed: set[str]) -> None:
        """SUCCESS and the errors table against the records."""
        ledger = self.ledger
        success_file = ledger.layout.success
        try:
            success = ledger.read_success()
        except LedgerError as e:
            self._add("marker", "", str(e), success_file)
            return
        complete = set(self.shards) <= committed
        if success is None:
            if complete:
                self._add("marker", "", "every shard has a record but there is no SUCCESS marker: the job did not "
                                        "finish", success_file)
            return
        if not complete:
            self._add("marker", "", f"SUCCESS says the job finished, but {len(set(self.shards) - committed)} shard(s) "
                                    "have no valid record", success_file)
        diffs = [f"{k} {success.get(k)} (records: {v})" for k, v in self.totals.items() if success.get(k) != v]
        if success.get("identity_hash") != self.identity_hash:
            diffs.append(f"identity_hash {_short(success.get('identity_hash'), 12)} "
                         f"(manifest: {self.identity_hash[:12]})")
        if diffs:
            self._add("marker", "", f"SUCCESS states {'; '.join(diffs)}", success_file)
        errors_file = ledger.layout.errors
        path = ledger._path(errors_file)
        ledger.fs.invalidate_cache(path)
        try:
            with ledger.fs.open(path, "rb") as f:
                rows = pq.read_metadata(f).num_rows
        except FileNotFoundError:
            self._add("errors_table", "", f"missing after SUCCESS; expected {self.totals['samples_errored']} rows",
                      errors_file)
            return
        except (OSError, ValueError, pa.ArrowException) as e:
            self._add("errors_table", "", f"does not open as Parquet: {_short(e, 300)}", errors_file)
            return
        if rows != self.totals["samples_errored"]:
            self._add("errors_table", "", f"has {rows} rows; the records hold {self.totals['samples_errored']} "
                                          "errors", errors_file)

    def _report(self, t0: float, kind: str) -> VerifyReport:
        ordered = sorted(self.violations, key=lambda v: (v.shard, v.file, v.kind, v.message))
        return VerifyReport(url=self.ledger.url, job_kind=kind, violations=tuple(ordered),
                            shards_checked=self.checked, samples=self.samples, bytes=self.bytes,
                            seconds=time.monotonic() - t0, checksums=self.checksums,
                            source_shards=len(self.sources), notes=tuple(self.notes))


def verify_output(url: str, *, source: Sequence[str] | None = None, checksums: bool = False,
                  storage_options: Mapping[str, Any] | None = None, workers: int = 8) -> VerifyReport:
    """Check the output folder at `url` against its manifest and records; see the module docstring.

    source: input shard patterns (image tars for an encode job, latent shards or an encode output
      folder for decode and audit jobs); each of their keys must be written or among the errors of
      its shard's record. checksums: also compare each data file's sha256 (reads every byte).
    Raises NoJobError when there is no job at `url`, ShardListingError when `source` lists nothing.
    """
    return _Verifier(url, source=source, checksums=checksums, storage_options=storage_options,
                     workers=workers).run()


__all__ = ["MAX_NAMED_KEYS", "RECORD_BATCH", "NoJobError", "VerifyReport", "Violation", "format_report", "key_hashes",
           "verify_output"]
