"""Storage helpers for every output: filesystems from URLs, and writes that appear whole or not at all.

`AtomicUpload` streams bytes into `<root>/<tmp>/<name>.<random>.<ext>` as they come (s3fs uploads
parts as its buffer fills, a local file is written through), then `commit()` checks the uploaded
size, moves the object under its final name (on S3 a server-side copy, so it appears whole) and
checks it again. A failure at any step removes the temporary object and raises `ShardWriteError`;
nothing partial is ever visible under the final name. On S3 no multipart upload outlives its
AtomicUpload either (they are invisible to listings, and billed): a failed completion is aborted,
and so is one the store created for a request whose answer was lost (the client retried and made
another), found by listing the uploads of the temp key.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import posixpath
import secrets
from types import TracebackType
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import fsspec
from fsspec import AbstractFileSystem
from fsspec.spec import AbstractBufferedFile

log = logging.getLogger(__name__)

# Object stores have no directories, and `makedirs` on s3fs creates a missing bucket.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


class ShardWriteError(RuntimeError):
    """Serialising, uploading or moving a file failed; no file is left under the final name."""


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


def _s3_uploads_api(fs: AbstractFileSystem) -> Callable[..., Any] | None:
    """s3fs's `call_s3`, where `fs` is an S3 filesystem (the only store whose uploads are handled here)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    call = getattr(fs, "call_s3", None)
    return call if {"s3", "s3a"}.intersection(protocols) and callable(call) else None


LIST_PAGE = 1000  # the most keys one S3 LIST request answers with


def name_prefixes(names: Iterable[str], *, per_prefix: int = LIST_PAGE) -> tuple[list[str], list[str]]:
    """Cut `names` into disjoint prefixes, each shared by at most `per_prefix` of them, so that each
    prefix lists in one page and the pages can be asked for at once (an S3 LIST with a continuation
    token must wait for the page before it). A cut of the names' trie, at the shortest depth that
    fits: `part-000000` ... `part-099999` give `part-000` ... `part-099`.

    Returns (prefixes, exact), both sorted: no prefix starts another, every name starts exactly one
    prefix or is in `exact`, which holds the names that are themselves a prefix of more than
    `per_prefix` others (a listing by that name would cover them all; look them up by name)."""
    if per_prefix < 1:
        raise ValueError(f"per_prefix is {per_prefix}; expected at least 1")
    ordered = sorted(set(names))
    prefixes: list[str] = []
    exact: list[str] = []
    todo = [(0, len(ordered))] if ordered else []
    while todo:
        lo, hi = todo.pop()
        common = posixpath.commonprefix([ordered[lo], ordered[hi - 1]])  # sorted: the first and last share what all share
        if hi - lo <= per_prefix:
            prefixes.append(common)
            continue
        depth, i = len(common), lo
        if len(ordered[i]) == depth:  # the name is `common` itself, which sorts first
            exact.append(ordered[i])
            i += 1
        while i < hi:  # the rest share `common` and are longer, so they sort by their next character
            end = bisect.bisect_right(ordered, ordered[i][depth], i, hi, key=lambda name: name[depth])
            todo.append((i, end))
            i = end
    return sorted(prefixes), sorted(exact)


def prefix_lister(fs: AbstractFileSystem) -> Callable[[str, str], list[dict[str, Any]]] | None:
    """On S3, a function (folder, prefix) -> the entries of `folder` whose names start with `prefix`,
    listed afresh (no cached listing); None on other filesystems, which list a folder at once."""
    if _s3_uploads_api(fs) is None or not hasattr(fs, "_lsdir"):
        return None
    from fsspec.asyn import sync

    def ls(folder: str, prefix: str) -> list[dict[str, Any]]:
        # refresh: s3fs answers a prefix listing from its cache of the whole folder when it holds one.
        entries = list(sync(fs.loop, fs._lsdir, folder, prefix=prefix, refresh=True))  # type: ignore[attr-defined]
        # s3fs before 2026.6 cached a prefix's entries as the whole folder's listing.
        fs.invalidate_cache(folder)
        return entries

    return ls


def multipart_uploads(fs: AbstractFileSystem, prefix: str) -> Iterator[dict[str, Any]]:
    """The unfinished multipart uploads whose key starts with `prefix` (`bucket/key...`, no
    protocol) on an S3 filesystem, every page of them; nothing on other filesystems."""
    call = _s3_uploads_api(fs)
    if call is None:
        return
    bucket, key, _ = fs.split_path(prefix)  # type: ignore[attr-defined]
    if not key:
        raise ValueError(f"prefix {prefix!r} names a whole bucket; expected a key prefix inside it")
    markers: dict[str, str] = {}
    while True:
        page = call("list_multipart_uploads", Bucket=bucket, Prefix=key, **markers)
        for upload in page.get("Uploads", []):
            yield {**upload, "Bucket": bucket}
        if not page.get("IsTruncated"):
            return
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def abort_multipart_uploads(fs: AbstractFileSystem, prefix: str, *, exact: bool = False) -> int:
    """Abort the unfinished multipart uploads whose key starts with `prefix` (equals it, when
    `exact`) on an S3 filesystem; returns how many. A no-op (0) on other filesystems.

    Meant for temp keys, whose uploads nobody completes once their writer is gone: `prefix` is a
    path without protocol, `bucket/key...`. Raises what listing or aborting raises.
    """
    call = _s3_uploads_api(fs)
    key = fs.split_path(prefix)[1] if call is not None else ""  # type: ignore[attr-defined]
    aborted = 0
    for upload in list(multipart_uploads(fs, prefix)):
        if exact and upload["Key"] != key:
            continue
        try:
            call("abort_multipart_upload", Bucket=upload["Bucket"], Key=upload["Key"],  # type: ignore[misc]
                 UploadId=upload["UploadId"])
        except FileNotFoundError:
            pass  # NoSuchUpload: completed or aborted meanwhile, which is what was wanted
        aborted += 1
    return aborted


def _remove_after_failure(fs: AbstractFileSystem, path: str, error: BaseException) -> None:
    """Remove a temp file after a failure; a failed removal is attached to `error`, not hidden."""
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm_file(path)
    except Exception as cleanup:  # noqa: BLE001 - reported on the original error, which is re-raised
        error.add_note(f"also failed to remove temp file {fs.unstrip_protocol(path)}: {cleanup!r}")


class AtomicUpload:
    """A write-only binary file whose bytes appear under `final_path` only on `commit()`.

    Counts and hashes what passes through (`bytes`, `sha256`). Use as a context manager: leaving
    the block by an exception, or without `commit()`, aborts and removes the temporary object.
    """

    def __init__(self, fs: AbstractFileSystem, tmp_dir: str, final_path: str) -> None:
        self.fs = fs
        self.final_path = final_path
        base = posixpath.basename(final_path)
        stem, dot, ext = base.rpartition(".")
        if not dot:
            stem, ext = ext, ""
        self.tmp_path = join(tmp_dir, f"{stem}.{secrets.token_hex(8)}{dot}{ext}")
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.closed = False
        self._state = "open"  # -> "committed" | "aborted"
        try:
            ensure_dir(fs, tmp_dir)
            ensure_dir(fs, posixpath.dirname(final_path))
            self._raw: Any = fs.open(self.tmp_path, "wb")
        except Exception as e:
            raise ShardWriteError(f"cannot open a temp file for {fs.unstrip_protocol(final_path)}: "
                                  f"{type(e).__name__}: {e}") from e

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.final_path)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    # -- the file protocol that pyarrow, tarfile and friends use --

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise ShardWriteError(f"{self.url}: write after the upload was {self._state}")
        view = memoryview(data).cast("B")
        try:
            self._raw.write(view)
        except Exception as e:
            raise ShardWriteError(f"writing {self.url} failed: {type(e).__name__}: {e}") from e
        self._sha.update(view)
        self.bytes += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.bytes

    def flush(self) -> None:
        """A no-op: s3fs would upload a part per flush; parts go up as its buffer fills instead."""

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        """Libraries close the files they write; the upload ends only at commit() or abort()."""

    # -- ending --

    def commit(self) -> tuple[int, str]:
        """Finish the upload and move it under its final name; returns (bytes, sha256)."""
        if self._state != "open":
            raise ShardWriteError(f"{self.url}: commit after the upload was {self._state}")
        fs = self.fs
        try:
            try:
                self._raw.close()
            except BaseException:
                # s3fs marks the file closed even when completing its multipart upload failed, and
                # leaves the upload open on the store: abort it.
                self._discard_raw()
                raise
            fs.invalidate_cache(self.tmp_path)
            landed = fs.info(self.tmp_path)["size"]
            if landed != self.bytes:
                raise ShardWriteError(f"temp file {fs.unstrip_protocol(self.tmp_path)} has {landed} bytes; "
                                      f"expected the {self.bytes} bytes written")
            fs.mv(self.tmp_path, self.final_path)
            fs.invalidate_cache(self.final_path)
            moved = fs.info(self.final_path)["size"]
            if moved != self.bytes:  # never leave wrong bytes under the final name
                fs.rm_file(self.final_path)
                raise ShardWriteError(f"{self.url} had {moved} bytes after the move; expected {self.bytes}; "
                                      "removed it")
        except BaseException as e:
            self._state = "aborted"
            _remove_after_failure(fs, self.tmp_path, e)
            self._abort_stray_uploads(e)
            if isinstance(e, Exception) and not isinstance(e, ShardWriteError):
                raise ShardWriteError(f"writing {self.url} failed: {type(e).__name__}: {e}") from e
            raise
        self._state = "committed"
        self.closed = True
        self._abort_stray_uploads(None)
        return self.bytes, self.sha256

    def abort(self) -> None:
        """Drop the upload (idempotent; a no-op after commit). Never raises: it runs while another
        error is on its way up; a temp file it cannot remove is logged and cleared at the next job start."""
        if self._state != "open":
            return
        self._state = "aborted"
        self.closed = True
        self._discard_raw()
        error = ShardWriteError(f"{self.url}: upload aborted")
        _remove_after_failure(self.fs, self.tmp_path, error)
        self._abort_stray_uploads(error)
        for note in getattr(error, "__notes__", ()):
            log.warning("%s", note)

    def _discard_raw(self) -> None:
        """Drop the temp file's buffer and, on object stores, its multipart upload; never raises."""
        raw = self._raw
        try:
            if isinstance(raw, AbstractBufferedFile):
                raw.discard()  # s3fs, gcsfs: drop the buffer and abort the multipart upload
            else:
                raw.close()
        except Exception as e:  # noqa: BLE001 - runs on the way out of a failure; what is left is logged
            log.warning("discarding the temp file %s failed: %r", self.fs.unstrip_protocol(self.tmp_path), e)
        finally:
            if isinstance(raw, AbstractBufferedFile):
                # Inert from now on: after a failed discard, s3fs's __del__ would close the file at
                # garbage collection and complete its upload, publishing the temp object after it
                # was removed (and, after a good discard, fail noisily on its dropped buffer).
                raw.closed = True

    def _abort_stray_uploads(self, error: BaseException | None) -> None:
        """Abort multipart uploads of the temp key that nobody completes: one the store created for
        a request whose answer was lost (the client retried and made another), or one whose abort
        failed. Only when the file went multipart (it reached the block size); never raises: a
        failure is noted on `error`, or logged when the upload committed (an orphaned upload costs
        storage, not correctness)."""
        if self.bytes < getattr(self._raw, "blocksize", float("inf")) or _s3_uploads_api(self.fs) is None:
            return
        try:
            n = abort_multipart_uploads(self.fs, self.tmp_path, exact=True)
        except Exception as e:  # noqa: BLE001 - see the docstring
            message = f"could not abort the multipart uploads of {self.fs.unstrip_protocol(self.tmp_path)}: {e!r}"
            if error is None:
                log.warning("%s", message)
            else:
                error.add_note(message)
            return
        if n:
            log.info("aborted %d stray multipart upload(s) of %s", n, self.fs.unstrip_protocol(self.tmp_path))

    def __enter__(self) -> AtomicUpload:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._state == "open":
            self.abort()


def write_atomically(fs: AbstractFileSystem, tmp_dir: str, final_path: str,
                     serialize: Callable[[BinaryIO], None]) -> tuple[int, str]:
    """`serialize(f)` into an `AtomicUpload` and commit it; returns (bytes, sha256)."""
    with AtomicUpload(fs, tmp_dir, final_path) as out:
        try:
            serialize(out)  # type: ignore[arg-type]
        except ShardWriteError:
            raise
        except Exception as e:
            raise ShardWriteError(f"writing {out.url} failed: {type(e).__name__}: {e}") from e
        return out.commit()


def write_bytes_atomically(fs: AbstractFileSystem, tmp_dir: str, final_path: str, data: bytes) -> tuple[int, str]:
    """`write_atomically` for a small payload already in memory (records, manifests, markers)."""
    return write_atomically(fs, tmp_dir, final_path, lambda f: f.write(data))


__all__ = ["multipart_uploads", "AtomicUpload", "ShardWriteError", "output_fs", "join", "ensure_dir", "write_atomically",
           "write_bytes_atomically", "abort_multipart_uploads"]
