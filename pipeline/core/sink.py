"""The sink contract: where a shard's outputs go, one sample at a time, committed whole or not at all.

A job kind's writer subclasses `ShardSink`: `_accept` checks and converts one record (raising
`InvalidRecordError` for a bad one, which the shard skeleton records as that sample's error and goes
on), `_write` streams it out, `_finish` writes what ends the file (a footer, a header). The base owns
the rest: one upload per shard through `AtomicUpload` (temp name, then the final name), unique keys,
the count, and the context-manager rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Mapping

from pipeline.core.layout import CURRENT
from pipeline.core.storage import AtomicUpload, ShardWriteError, join, output_fs


class InvalidRecordError(ValueError):
    """`add` refused a record; the shard is unchanged, and the caller may record a SampleError."""


@dataclass(frozen=True)
class ShardStats:
    """What `commit()` wrote: the shard name, its full URL, sample count, byte size and sha256;
    `data_file` is its path relative to the output folder (`name.ext`, or `dir/name.ext`)."""

    name: str
    path: str
    samples: int
    bytes: int
    sha256: str
    data_file: str = ""


def check_shard_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name[0] in "_.":
        raise ValueError(f"shard name {name!r} is not allowed; expected a non-empty file stem "
                         "without '/' that does not start with '_' or '.'")


class ShardSink:
    """Streams one shard's records into `<output>/<name>.<extension>` (or `<output>/<data_dir>/...`
    for a job kind that keeps its shards in a subfolder); see the module docstring.

    Use as a context manager: an exception inside the block aborts the shard; leaving the block
    normally without `commit()` aborts it and raises, since that is a caller bug.
    """

    extension: ClassVar[str] = ""

    def __init__(self, output_url: str, name: str, *, storage_options: Mapping[str, Any] | None = None,
                 data_dir: str = "") -> None:
        check_shard_name(name)
        if data_dir:
            check_shard_name(data_dir)
        self.name = name
        self._fs, self._root = output_fs(output_url, storage_options)
        self.data_file = f"{data_dir}/{name}.{self.extension}" if data_dir else f"{name}.{self.extension}"
        self.path = join(self._root, self.data_file)
        self._upload: AtomicUpload | None = None
        self._keys: set[str] = set()
        self._state = "open"  # -> "committed" | "aborted"

    def __len__(self) -> int:
        return len(self._keys)

    def __enter__(self) -> ShardSink:
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

    @property
    def out(self) -> AtomicUpload:
        """The temp upload, opened on first use (a shard aborted before any write leaves nothing)."""
        if self._upload is None:
            self._upload = AtomicUpload(self._fs, join(self._root, CURRENT.tmp), self.path)
        return self._upload

    def add(self, record: Any) -> None:
        """Check, convert and stream one record. Raises InvalidRecordError (the shard is unchanged)
        for a duplicate or empty key or a record the format cannot hold."""
        if self._state != "open":
            raise ShardWriteError(f"shard {self.name}: add() after the shard was {self._state}")
        key = getattr(record, "key", None)
        if not isinstance(key, str) or not key:
            raise InvalidRecordError(f"sample key {key!r} must be a non-empty string")
        if key in self._keys:
            raise InvalidRecordError(f"sample {key!r} appears twice in shard {self.name}; keys must be unique")
        converted = self._accept(record)
        try:
            self._write(converted)
        except BaseException:
            self.abort()
            raise
        self._keys.add(key)

    def commit(self) -> ShardStats:
        """End the file, move it under its final name, and return what was written."""
        if self._state != "open":
            raise ShardWriteError(f"shard {self.name}: commit() after the shard was {self._state}")
        self._state = "committing"
        try:
            self._finish()
            size, sha = self.out.commit()
        except BaseException:
            self._state = "aborted"
            self._release()
            if self._upload is not None:
                self._upload.abort()
            raise
        self._state = "committed"
        self._release()
        return ShardStats(name=self.name, path=self._fs.unstrip_protocol(self.path),
                          samples=len(self._keys), bytes=size, sha256=sha, data_file=self.data_file)

    def abort(self) -> None:
        """Drop the shard and its temp file; idempotent and a no-op after a successful commit."""
        if self._state in ("open", "committing"):
            self._state = "aborted"
            self._release()
            if self._upload is not None:
                self._upload.abort()

    # -- for subclasses --

    def _accept(self, record: Any) -> Any:
        """Check and convert one record; raise InvalidRecordError for a bad one."""
        return record

    def _write(self, record: Any) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Write what ends the file (everything still buffered, a footer, a header)."""

    def _release(self) -> None:
        """Free buffers and local spool files (called once the shard is committed or aborted)."""


__all__ = ["InvalidRecordError", "ShardSink", "ShardStats", "check_shard_name"]
