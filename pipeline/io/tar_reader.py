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
"""

from __future__ import annotations

import pickle
import re
import tarfile
import zlib
from typing import IO, Any, Iterator, Mapping

import fsspec
from webdataset.tariterators import base_plus_ext, group_by_keys, meta_prefix, meta_suffix

from pipeline.samples import RawSample, SampleError
from pipeline.io.shards import shard_name

# webdataset's tar_file_iterator skips these members (shard-level metadata such as __index__).
_SKIP_META = re.compile(r"__[^/]*__($|/)")
# A damaged tar surfaces as one of these; none of them comes from the storage layer.
_CORRUPT_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error)


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


class _StrictTarInfo(tarfile.TarInfo):
    """A TarInfo whose reading refuses a bad header where tarfile would quietly end the archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            # Not a HeaderError, so TarFile.next() lets it through instead of treating it as the end.
            what = "no end-of-archive marker" if isinstance(exc, tarfile.EmptyHeaderError) else exc
            raise tarfile.ReadError(f"{what} at byte {tarfile_.offset}") from exc


def _kind_of(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    return "special file (device or FIFO)"


def _members(fileobj: IO[bytes], url: str, flagged: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Tar members as webdataset's member dicts ({fname, data, __url__}); raises _CorruptTar on damage.

    Before raising for damage inside a member of a new key, yields webdataset's end-of-shard marker
    ({}) so that the complete sample before it is flushed; a sample the damage may have cut short is
    never yielded.
    """
    last_key: str | None = None
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StrictTarInfo)
    except _CORRUPT_TAR_ERRORS as exc:
        raise _CorruptTar(None, f"{type(exc).__name__}: {exc}") from exc
    with stream:
        entries = iter(stream)
        while True:
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
            key = base_plus_ext(info.name)[0]
            if not info.isreg():
                # Never followed (a link may point anywhere), never dropped: its sample is recorded.
                if key is not None:
                    target = f" to {info.linkname!r}" if info.linkname else ""
                    flagged.setdefault(key, f"member {info.name!r} is a {_kind_of(info)}{target}; "
                                            "expected regular files only")
                    yield {"fname": info.name, "data": b"", "__url__": url}
                    last_key = key
                continue
            try:
                data = stream.extractfile(info).read()
            except _CORRUPT_TAR_ERRORS as exc:
                if key is not None and last_key is not None and key != last_key:
                    yield {}
                raise _CorruptTar(key or last_key, f"{type(exc).__name__}: {exc} in member {info.name!r}") from exc
            yield {"fname": info.name, "data": data, "__url__": url}
            if key is not None:
                last_key = key
            stream.members = []  # as webdataset does: a long shard must not keep every TarInfo


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


def _samples(fileobj: IO[bytes], url: str) -> Iterator[RawSample | SampleError]:
    flagged: dict[str, str] = {}
    seen: set[str] = set()
    count = 0
    grouped = group_by_keys(_drop_duplicate_members(_members(fileobj, url, flagged), flagged))
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


def iter_shard(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[RawSample | SampleError]:
    """Stream the samples of one WebDataset tar shard, in tar order.

    Yields raw samples ({"__key__", "__url__", "<ext>": bytes, ...}; extensions lower-cased; keys keep
    their folder prefix) and SampleErrors for damaged samples. Raises ShardReadError for failures
    a retry may fix.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fileobj = fs.open(path, "rb")
    except Exception as exc:
        raise ShardReadError(url, exc) from exc
    with fileobj:
        samples = _samples(fileobj, url)
        while True:
            # Only the reading is wrapped; an exception thrown into this generator at `yield` is not ours.
            try:
                item = next(samples)
            except StopIteration:
                return
            except Exception as exc:
                raise ShardReadError(url, exc) from exc
            yield item
