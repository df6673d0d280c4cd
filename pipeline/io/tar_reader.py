"""Shard URL -> samples: stream a WebDataset tar from any fsspec filesystem and group it by key.

The tar is read front to back from an fsspec file object (nothing is downloaded to disk first) and
members are grouped into samples by webdataset's own `group_by_keys`, so keys and extensions mean
exactly what they mean to webdataset.

What is retried is decided here:
- A truncated or corrupt tar is a property of the data: retrying cannot help. The samples before
  the damage are yielded, then one `SampleError(stage="read")`, and the shard ends.
- Anything else (I/O, connection, permission, an object that vanished) raises `ShardReadError`,
  and the driver retries the whole shard.

Deliberate differences from webdataset's `tar_file_iterator`:
- CPython's tarfile treats a missing, short or garbled header after the first member as the end of
  the archive, so webdataset silently drops everything after it. Here such a tar counts as corrupt.
  A tar without its end-of-archive blocks (cut exactly at a member boundary) is therefore reported
  too, with the last sample, which may be missing members.
- A sample with two members of the same extension (`a.jpg` twice), where webdataset raises and ends
  the shard, becomes a SampleError for that key. A key that comes back later in the shard,
  separated by other samples, becomes a SampleError for the second occurrence; the first is kept.
- Members whose name has no extension (`README`) are dropped, as webdataset's grouping does.
- A symlink, hardlink or special-file member is never followed: its sample becomes a SampleError
  naming it (webdataset skips such members, so a sample made of them would vanish).
- A member whose header declares more than `max_member_bytes` (a passthrough caption of 10 GB, a
  sparse member whose holes expand to a terabyte, a gzip bomb) is never read: its data is skipped
  in the stream and its sample becomes a SampleError naming the size and the limit. Members that no
  sample keeps (no extension, shard metadata) are skipped unread too.
- Names that webdataset would take apart wrongly are their sample's SampleError, never passed on:
  a name that is not UTF-8 (reported under an escaped key, so the error can be stored), an absolute
  name or one with a '..' segment (a path outside the shard), and an extension webdataset reserves
  for the sample's own fields (`k.__key__`, where webdataset raises and ends the shard).
- A gzip, bzip2 or xz tar is decompressed at most a read's worth at a time (tarfile's own `r|*`
  inflates a whole 10 KB block in one call: 786 bytes of bzip2 are 1 GiB), and its damage counts as
  a corrupt tar, like a plain tar's.
- Memory stays bounded whatever the headers claim: a pax or GNU long-name header over
  `_MAX_EXTENDED_HEADER_BYTES` or a run of extended headers too long to follow counts as a corrupt
  tar, and a member whose declared size runs past the end of the file ends the shard as truncated
  instead of being skipped block by block forever.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import pickle
import re
import tarfile
import zlib
from typing import IO, Any, Iterator, Mapping

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys, meta_prefix, meta_suffix

from pipeline.config import PreprocessConfig
from pipeline.io.shards import shard_name
from pipeline.samples import RawSample, SampleError

# webdataset's tar_file_iterator skips these members (shard-level metadata such as __index__).
_SKIP_META = re.compile(r"__[^/]*__($|/)")
# A damaged tar surfaces as one of these: storage failures come wrapped in _StorageFailure (see
# _Source), so an OSError here is a decompressor's (bzip2's "Invalid data stream", a bad gzip
# header). RecursionError: tarfile follows a run of pax / GNU long-name headers by recursion.
_CORRUPT_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, RecursionError)
# The members limit when the caller gives none: the config's default, so every reader of image
# shards (encode, audit, the passthrough peek) is bounded the same way. Read at call time.
DEFAULT_MAX_MEMBER_BYTES: int = PreprocessConfig.max_member_bytes
# tarfile reads a pax or GNU long-name header whole before the member it describes; real ones hold
# a long name or a few attributes, so anything this large is hostile (a 10 GB "header").
_MAX_EXTENDED_HEADER_BYTES = 1 << 20
_EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                          tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# Empty reads in a row after which the file is taken to have ended inside a member. tarfile skips a
# member's data by reading it block by block and ignores a short read, so a header that declares
# 2**60 bytes in a 1 KB file would otherwise spin for ever. A complete tar needs one or two.
_MAX_EMPTY_READS = 8
# The extension of the stand-in member for a refused one: it only has to put its key into the
# grouping (so the sample is reported, not lost); its value is never used.
_REFUSED_EXT = "__refused__"


class ShardReadError(Exception):
    """A shard could not be read for a reason that a retry may fix (I/O, network, permission)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"cannot read shard {url}: {type(cause).__name__}: {cause}")
        self.url = url
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions; the default reduce would call __init__ with the message only. Some
        # storage-client errors do not pickle: those travel as an OSError carrying their text.
        try:
            pickle.dumps(self.cause)
            cause = self.cause
        except Exception:
            cause = OSError(f"{type(self.cause).__name__}: {self.cause}")
        return (type(self), (self.url, cause))


class _CorruptTar(Exception):
    """Internal: the tar is damaged; `key` is the sample it broke inside, when known."""

    def __init__(self, key: str | None, detail: str) -> None:
        super().__init__(detail)
        self.key = key
        self.detail = detail


class _StorageFailure(Exception):
    """Internal: reading the shard's file failed in the storage layer; `cause` is what it raised."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class _Source:
    """The shard's file object, read through: whatever its reads raise comes out as _StorageFailure,
    so a retryable I/O error is never taken for damage, nor a decompressor's OSError for I/O."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._fileobj = fileobj
        self._head = b""

    def peek(self, size: int) -> bytes:
        """The first `size` bytes (fewer at the end of the file), still to be read."""
        while len(self._head) < size:
            more = self._raw(size - len(self._head))
            if not more:
                break
            self._head += more
        return self._head

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._raw(size)
        if size < 0:
            out, self._head = self._head + self._raw(-1), b""
        elif size < len(self._head):
            out, self._head = self._head[:size], self._head[size:]
        else:  # a short read: every reader here reads again until it has enough or gets b""
            out, self._head = self._head, b""
        return out

    def _raw(self, size: int) -> bytes:
        try:
            return self._fileobj.read(size)
        except Exception as exc:
            raise _StorageFailure(exc) from exc


def _decompressed(source: _Source) -> IO[bytes] | _Source:
    """The tar's bytes: through the stdlib's decompressing readers when the file starts like gzip,
    bzip2 or xz (the same magic numbers tarfile's `r|*` looks for). Those inflate at most what each
    read asks for, where tarfile's own stream inflates whole input blocks."""
    head = source.peek(10)
    if head.startswith(b"\x1f\x8b\x08"):
        return gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[arg-type]
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return bz2.BZ2File(source)  # type: ignore[arg-type]
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lzma.LZMAFile(source)  # type: ignore[arg-type]
    return source


class _EOFGuard:
    """The shard's file object as tarfile sees it; raises EOFError once reads keep coming back empty.

    tarfile stops at the first empty read and moves on, so skipping the data of a member whose
    header declares more bytes than the file holds would loop for as long as the header claims.
    """

    def __init__(self, fileobj: IO[bytes] | _Source) -> None:
        # read1 on the decompressing readers: their read(n) reads on until it has n bytes, so a
        # stream cut short would raise with up to a block of good data not yet handed over.
        self._read = getattr(fileobj, "read1", fileobj.read)
        self._empty = 0
        self.count = 0  # tar bytes read so far (after decompression)

    def read(self, size: int = -1) -> bytes:
        data = self._read(size)
        self.count += len(data)
        if data or size == 0:
            self._empty = 0
            return data
        self._empty += 1
        if self._empty > _MAX_EMPTY_READS:
            raise EOFError("unexpected end of data: the file ends inside a member whose header declares more bytes")
        return data


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose reading refuses a bad header where tarfile would quietly end the archive,
    and an extended header too large to hold in memory."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            # Not a HeaderError, so TarFile.next() lets it through instead of treating it as the end.
            what = "no end-of-archive marker" if isinstance(exc, tarfile.EmptyHeaderError) else exc
            raise tarfile.ReadError(f"{what} at byte {tarfile_.offset}") from exc

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile reads these headers' data whole, before anything else could check its size.
        if self.type in _EXTENDED_HEADER_TYPES and self.size > _MAX_EXTENDED_HEADER_BYTES:
            raise tarfile.ReadError(f"extended header of {self.size} bytes at byte {self.offset}, over the "
                                    f"limit of {_MAX_EXTENDED_HEADER_BYTES} bytes for pax and GNU long-name headers")
        return super()._proc_member(tarfile_)


def _kind_of(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.type in tarfile.SUPPORTED_TYPES:
        return "special file (device or FIFO)"
    return f"member of unknown type {info.type!r}"


def _safe_name(name: str) -> tuple[str, str | None]:
    """(name as reported, why it is refused or None).

    tarfile decodes names with surrogateescape, so bytes that are not UTF-8 arrive as lone
    surrogates, which no Parquet string, JSON record or log can hold: they are shown as \\xNN
    escapes (the same for every member of the sample, so it still groups as one).
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace"), f"member name {raw!r} is not valid UTF-8; expected UTF-8 names"
    return name, None


def _refusal(name: str, key: str, ext: str) -> str | None:
    """Why a member's name is refused (its sample becomes a SampleError), or None."""
    segments = re.split(r"[/\\]", key)
    if name.startswith("/") or ".." in segments:
        return (f"member {name!r} is an absolute path or has a '..' segment; expected a relative path "
                "inside the shard")
    ext = ext.lower()
    if ext.startswith("__") and ext.endswith("__"):
        return (f"member {name!r} has the extension {ext!r}, which webdataset reserves for the sample's own "
                "fields; expected a member extension such as jpg or txt")
    return None


def _members(fileobj: IO[bytes], url: str, flagged: dict[str, str],
             max_member_bytes: int) -> Iterator[dict[str, Any]]:
    """Tar members as webdataset's member dicts ({fname, data, __url__}); raises _CorruptTar on damage.

    A member whose sample must be refused (a link, a special file, a bad name, too many bytes) is
    recorded in `flagged` under its key and passed on as an empty stand-in, so that its sample is
    grouped and reported; its data is never read.

    Before raising for damage inside a member of a new key, yields webdataset's end-of-shard marker
    ({}) so that the complete sample before it is flushed; a sample the damage may have cut short is
    never yielded.
    """
    last_key: str | None = None
    guard = _EOFGuard(_decompressed(_Source(fileobj)))
    try:
        stream = tarfile.open(fileobj=guard, mode="r|", tarinfo=_StrictTarInfo)  # type: ignore[arg-type]
    except _CORRUPT_TAR_ERRORS as exc:
        raise _CorruptTar(None, f"{type(exc).__name__}: {exc}") from exc
    with stream:
        entries = iter(stream)
        while True:
            stream.members = []  # as webdataset does: a long shard must not keep every TarInfo
            try:
                info = next(entries)
            except StopIteration:
                return
            except _CORRUPT_TAR_ERRORS as exc:
                # The next member's name is unknown, so the last sample may be incomplete.
                raise _CorruptTar(last_key, f"{type(exc).__name__}: {exc}") from exc
            if (info.name.startswith(meta_prefix) and info.name.endswith(meta_suffix) and "/" not in info.name) \
                    or _SKIP_META.match(info.name) or info.isdir():
                continue
            name, why = _safe_name(info.name)
            key, ext = base_plus_ext(name)
            if key is None:
                continue  # no extension: group_by_keys would drop it, so it is not read at all
            why = why or _refusal(name, key, ext)
            if why is None and not info.isreg():
                # Never followed (a link may point anywhere), never dropped: its sample is recorded.
                target = f" to {info.linkname!r}" if info.linkname else ""
                why = f"member {name!r} is a {_kind_of(info)}{target}; expected regular files only"
            if why is None and info.size > max_member_bytes:
                why = (f"member {name!r} is {info.size} bytes, over the limit max_member_bytes={max_member_bytes}; "
                       "not read (raise preprocess.max_member_bytes to keep larger members)")
            if why is not None:
                flagged.setdefault(key, why)
                # Unread: tarfile skips the data (guarded by _EOFGuard) when it reads the next header.
                yield {"fname": f"{key}.{_REFUSED_EXT}", "data": b"", "__url__": url}
                last_key = key
                continue
            try:
                data = stream.extractfile(info).read()
            except _CORRUPT_TAR_ERRORS as exc:
                if last_key is not None and key != last_key:
                    yield {}
                end = info.offset_data + info.size
                short = (f"; the tar ends after {guard.count:,} bytes, and this member's {info.size:,} bytes "
                         f"run to byte {end:,} (a file cut short, as a tool still writing it leaves it)"
                         if guard.count < end else "")
                raise _CorruptTar(key, f"{type(exc).__name__}: {exc} in member {name!r}{short}") from exc
            yield {"fname": name, "data": data, "__url__": url}
            last_key = key


def _drop_duplicate_members(members: Iterator[dict[str, Any]], flagged: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Pass members on, dropping a repeated (key, extension) and recording its key in `flagged`."""
    key_now: str | None = None
    exts: set[str] = set()
    for member in members:
        if not member:  # end-of-shard marker
            key_now, exts = None, set()
            yield member
            continue
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            yield member  # no extension: group_by_keys drops it
            continue
        ext = ext.lower()  # group_by_keys lower-cases too, so a.JPG and a.jpg collide
        if key != key_now:
            key_now, exts = key, set()
        if ext in exts:
            flagged.setdefault(key, f"duplicate member {member['fname']!r}: the sample has two {ext!r} members; "
                                    "expected one member per extension")
            continue
        exts.add(ext)
        yield member


def _samples(fileobj: IO[bytes], url: str, max_member_bytes: int) -> Iterator[RawSample | SampleError]:
    flagged: dict[str, str] = {}
    seen: set[str] = set()
    count = 0
    grouped = group_by_keys(_drop_duplicate_members(_members(fileobj, url, flagged, max_member_bytes), flagged))
    try:
        for sample in grouped:
            count += 1
            key = sample["__key__"]
            reason = flagged.pop(key, None)
            if key in seen:
                reason = ("key repeats an earlier sample of this shard, with other samples between; "
                          "expected all members of a sample to be adjacent in the tar")
            seen.add(key)
            yield SampleError(key=key, shard=url, stage="read", reason=reason) if reason else sample
    except _CorruptTar as exc:
        yield SampleError(key=exc.key or f"{shard_name(url)}:<truncated>", shard=url, stage="read",
                          reason=f"truncated or corrupt tar after {count} samples: {exc.detail}")


def iter_shard(url: str, storage_options: Mapping[str, Any] | None = None, *,
               max_member_bytes: int | None = None) -> Iterator[RawSample | SampleError]:
    """Stream the samples of one WebDataset tar shard, in tar order.

    Yields raw samples ({"__key__", "__url__", "<ext>": bytes, ...}; extensions lower-cased; keys keep
    their folder prefix) and SampleErrors for damaged samples. Raises ShardReadError for failures
    a retry may fix. Plain and compressed (gzip, bzip2, xz) tars are read alike.

    max_member_bytes: a member whose header declares more bytes is not read; its sample is a
    SampleError. None: DEFAULT_MAX_MEMBER_BYTES (preprocess.max_member_bytes's default).
    """
    limit = DEFAULT_MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"max_member_bytes={max_member_bytes!r} is not allowed; expected an int >= 0 or None")
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fileobj = fs.open(path, "rb")
    except Exception as exc:
        raise ShardReadError(url, exc) from exc
    with fileobj:
        samples = _samples(fileobj, url, limit)
        while True:
            # Only the reading is wrapped; an exception thrown into this generator at `yield` is not ours.
            try:
                item = next(samples)
            except StopIteration:
                return
            except _StorageFailure as exc:
                raise ShardReadError(url, exc.cause) from exc.cause
            except Exception as exc:
                raise ShardReadError(url, exc) from exc
            yield item
