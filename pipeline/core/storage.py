"""Storage helpers for every output: filesystems from URLs, and writes that appear whole or not at all.

`AtomicUpload` streams bytes into `<root>/<tmp>/<name>.<random>.<ext>` as they come (s3fs uploads
parts as its buffer fills, a local file is written through), then `commit()` checks the uploaded
size, moves the object under its final name (on S3 a server-side copy, so it appears whole) and
checks it again. A failure at any step removes the temporary object and raises `ShardWriteError`;
nothing partial is ever visible under the final name.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import secrets
from types import TracebackType
from typing import Any, BinaryIO, Callable, Mapping

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
            self._raw.close()
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
            if isinstance(e, Exception) and not isinstance(e, ShardWriteError):
                raise ShardWriteError(f"writing {self.url} failed: {type(e).__name__}: {e}") from e
            raise
        self._state = "committed"
        self.closed = True
        return self.bytes, self.sha256

    def abort(self) -> None:
        """Drop the upload (idempotent; a no-op after commit). Never raises: it runs while another
        error is on its way up; a temp file it cannot remove is logged and cleared at the next job start."""
        if self._state != "open":
            return
        self._state = "aborted"
        self.closed = True
        try:
            if isinstance(self._raw, AbstractBufferedFile):
                self._raw.discard()  # s3fs, gcsfs: drop the buffer and abort the multipart upload
            else:
                self._raw.close()
        except Exception as e:  # noqa: BLE001 - see the docstring; the removal below still runs
            log.warning("closing the temp file %s failed: %r", self.fs.unstrip_protocol(self.tmp_path), e)
        error = ShardWriteError(f"{self.url}: upload aborted")
        _remove_after_failure(self.fs, self.tmp_path, error)
        for note in getattr(error, "__notes__", ()):
            log.warning("%s", note)

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


__all__ = ["AtomicUpload", "ShardWriteError", "output_fs", "join", "ensure_dir", "write_atomically",
           "write_bytes_atomically"]
