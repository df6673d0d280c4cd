"""WebDataset tar shard writer: each sample's members under `<key>.<ext>`, streamed as they come.

Member names come from sample keys, so a key that would escape the shard's folder or that tar
and WebDataset readers take apart differently (`../x`, `/abs`, `a/../../b`, `a.b`, control
characters) is refused with InvalidRecordError: the sample is recorded as an error, never written.
Members are written with mtime 0 and fixed owner and mode, so a retried shard has the same bytes.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.core.sink import InvalidRecordError, ShardSink


@dataclass
class TarSample:
    """One sample of a tar shard: its key and its members, extension -> bytes, in write order."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)


def check_member_key(key: str) -> None:
    """Raise InvalidRecordError unless `key` is safe as the stem of tar member names."""
    def refuse(why: str) -> None:
        raise InvalidRecordError(f"sample key {key!r} cannot name tar members: {why}; expected a relative "
                                 "path of plain names, such as 'part/000123'")

    if not isinstance(key, str) or not key:
        refuse("it is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        refuse("it holds control characters")
    if "\\" in key:
        refuse("it holds a backslash")
    if key.startswith("/"):
        refuse("it is an absolute path")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        refuse("it has an empty, '.' or '..' path segment")
    if "." in parts[-1]:
        refuse("its last segment holds a '.', where WebDataset readers split the key from the extension")


class TarShardWriter(ShardSink):
    """Streams `TarSample`s into `<output>/<name>.tar`; committed atomically like every sink."""

    extension = "tar"

    def __init__(self, output_url: str, name: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(output_url, name, storage_options=storage_options)
        self._tar: tarfile.TarFile | None = None

    def _accept(self, sample: TarSample) -> TarSample:
        check_member_key(sample.key)
        for ext, data in sample.members.items():
            if not ext or ext.startswith(".") or "/" in ext or any(ord(c) < 32 for c in ext):
                raise InvalidRecordError(f"sample {sample.key!r}: member extension {ext!r} is not allowed; "
                                         "expected a name such as png or txt")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidRecordError(f"sample {sample.key!r}: member {ext!r} is {type(data).__name__}; "
                                         "expected bytes")
        return sample

    def _write(self, sample: TarSample) -> None:
        if self._tar is None:
            self._tar = tarfile.open(fileobj=self.out, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
        for ext, data in sample.members.items():
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(bytes(data)))

    def _finish(self) -> None:
        if self._tar is None:
            self._tar = tarfile.open(fileobj=self.out, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[arg-type]
        self._tar.close()  # the end-of-archive blocks

    def _release(self) -> None:
        self._tar = None


__all__ = ["TarSample", "TarShardWriter", "check_member_key"]
