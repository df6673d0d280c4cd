"""Input shard lists: expand brace patterns, globs and folders into shard URLs, through fsspec.

A listing that fails raises; a pattern that matches nothing raises. A job never silently starts
with fewer shards than its patterns name.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterable, Mapping, Sequence

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

TAR_SUFFIX = ".tar"
_GLOB_CHARS = "*?["
_MAX_NAMED = 5  # how many missing shards an error message names before it counts the rest


class ShardListingError(Exception):
    """Listing an input pattern failed, or it matched no shards. The cause is chained."""

    def __init__(self, pattern: str, message: str) -> None:
        super().__init__(f"input {pattern!r}: {message}")
        self.pattern = pattern
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions; the default reduce would call __init__ with the formatted text only.
        return (type(self), (self.pattern, self.message))


class DuplicateShardNameError(ValueError):
    """Two input shards would write the same output name."""


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _url_prefix(pattern: str) -> str:
    """What to put before an fsspec path to give back a URL as the user wrote it ('' for local)."""
    return pattern[: pattern.index("://") + 3] if "://" in pattern else ""


class _Expander:
    """Expands one pattern; holds its filesystem and how to spell URLs for it."""

    def __init__(self, pattern: str, storage_options: Mapping[str, Any], suffixes: tuple[str, ...]) -> None:
        self.pattern = pattern
        self.suffixes = suffixes
        self.kind = " or ".join(suffixes)
        try:
            self.fs, _ = fsspec.core.url_to_fs(pattern, **storage_options)
        except Exception as exc:  # unknown protocol, missing driver package, bad options
            raise ShardListingError(pattern, f"cannot open its filesystem: {type(exc).__name__}: {exc}") from exc
        self.storage_options = storage_options
        self.prefix = _url_prefix(pattern)
        self.infos: dict[str, Mapping[str, Any]] = {}  # path -> the listing's entry (size, ETag, mtime)
        # A long-lived process caches listings per filesystem instance; a job must see storage as it is now.
        self.fs.invalidate_cache()

    def url(self, path: str) -> str:
        if not self.prefix and isinstance(self.fs, LocalFileSystem):
            return path  # a plain local path stays a plain (absolute) path
        return self.prefix + path if self.prefix else self.fs.unstrip_protocol(path)

    def strip(self, url: str) -> str:
        return fsspec.core.url_to_fs(url, **self.storage_options)[1]

    def failed(self, what: str, exc: BaseException) -> ShardListingError:
        return ShardListingError(self.pattern, f"{what} failed: {type(exc).__name__}: {exc}")

    def glob(self, path: str) -> list[str]:
        try:
            found = self.fs.glob(path, detail=True)
        except FileNotFoundError:
            found = {}  # a missing root: some filesystems raise, others match nothing; both are reported below
        except Exception as exc:
            raise self.failed(f"listing glob {self.url(path)!r}", exc) from exc
        tars = sorted(p for p, info in found.items() if info.get("type") == "file" and p.endswith(self.suffixes))
        self.infos.update((p, found[p]) for p in tars)
        if not tars:
            # s3fs answers a glob in a missing bucket with no matches; say when that is why.
            root = posixpath.dirname(path[: min(path.index(c) for c in _GLOB_CHARS if c in path)])
            try:
                if root:
                    self.fs.info(root)
            except Exception as exc:
                why = "does not exist" if isinstance(exc, FileNotFoundError) else "cannot be read"
                raise ShardListingError(self.pattern, f"glob {self.url(path)!r} matched no {self.kind} shards: "
                                                      f"{self.url(root)!r} {why} ({type(exc).__name__}: "
                                                      f"{exc})") from exc
            raise ShardListingError(self.pattern, f"glob {self.url(path)!r} matched no {self.kind} shards")
        return tars

    def folder(self, path: str) -> list[str]:
        try:
            found = self.fs.find(path, detail=True)
        except Exception as exc:
            raise self.failed(f"listing folder {self.url(path)!r}", exc) from exc
        tars = sorted(p for p, info in found.items() if info.get("type") == "file" and p.endswith(self.suffixes))
        self.infos.update((p, found[p]) for p in tars)
        if not tars:
            raise ShardListingError(self.pattern, f"folder {self.url(path)!r} matched no {self.kind} shards "
                                                  "(searched recursively)")
        return tars

    def info(self, path: str) -> dict[str, Any] | None:
        try:
            return self.fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self.failed(f"checking {self.url(path)!r}", exc) from exc

    def listing(self, parent: str) -> dict[str, dict[str, Any]]:
        """Entries of one folder by normalised path; empty when the folder does not exist."""
        try:
            entries = self.fs.ls(parent, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self.failed(f"listing {self.url(parent)!r}", exc) from exc
        return {e["name"].rstrip("/"): e for e in entries}

    def literals(self, paths: list[str]) -> list[str]:
        """Named shards (or folders) that must exist, in the order given.

        Several brace-expanded names are checked against one listing of each parent folder, not with
        one request each: a mistyped range of 100000 names costs a listing, not 100000 requests.
        """
        listings: dict[str, dict[str, dict[str, Any]]] | None = None
        if len(paths) > 1:
            parents = dict.fromkeys(posixpath.dirname(p.rstrip("/")) for p in paths)
            if all(parents):  # an empty parent would mean listing every bucket
                listings = {parent: self.listing(parent) for parent in parents}
        out: list[str] = []
        missing: list[str] = []
        missing_paths: list[str] = []
        for p in paths:
            if listings is None:
                entry = self.info(p)
            else:
                entry = listings[posixpath.dirname(p.rstrip("/"))].get(p.rstrip("/"))
            if entry is None:
                missing.append(self.url(p))
                missing_paths.append(p)
            elif entry.get("type") == "directory":
                out.extend(self.folder(p))
            else:
                out.append(p)
                self.infos[p] = entry
        if missing:
            named = ", ".join(missing[:_MAX_NAMED])
            more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
            raise ShardListingError(self.pattern, f"{len(missing)} of {len(paths)} named shard(s) do not exist: "
                                                  f"{named}{more}{self.missing_parent_hint(missing_paths[0])}")
        return out

    def missing_parent_hint(self, path: str) -> str:
        """A note for the error message when the folder (or bucket) of a missing shard is missing too."""
        parent = posixpath.dirname(path.rstrip("/"))
        try:
            exists = not parent or self.fs.exists(parent)
        except Exception as exc:
            raise self.failed(f"checking {self.url(parent)!r}", exc) from exc
        return "" if exists else f" (and {self.url(parent)!r} does not exist)"

    def expand(self) -> list[str]:
        out: list[str] = []
        literal: list[str] = []  # a run of plain names, checked together
        for sub in braceexpand.braceexpand(self.pattern):
            path = self.strip(sub)
            if not _has_glob(path):
                literal.append(path)
                continue
            if literal:
                out.extend(self.literals(literal))
                literal = []
            out.extend(self.glob(path))
        if literal:
            out.extend(self.literals(literal))
        return [self.url(p) for p in out]

    def expand_versions(self) -> dict[str, dict[str, Any]]:
        """`expand`, each URL with its `input_version` from the same listing (no request more)."""
        urls = self.expand()  # fills self.infos
        paths = {self.url(p): p for p in self.infos}
        return {url: input_version(self.infos.get(paths.get(url, ""))) for url in urls}


def input_version(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """What identifies one version of an input object, from its listing entry: its size, and the
    ETag (S3, Azure), generation (GCS) or modification time (local disks, others) the store gives.
    Empty when the listing gave nothing (then a change cannot be told)."""
    if not info:
        return {}
    out: dict[str, Any] = {}
    if isinstance(info.get("size"), int):
        out["size"] = info["size"]
    for key in ("generation", "ETag", "etag"):
        if info.get(key) not in (None, ""):
            out["etag"] = str(info[key]).strip('"')
            return out
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) not in (None, ""):
            value = info[key]
            out["mtime"] = value.isoformat() if hasattr(value, "isoformat") else repr(value)
            break
    return out


def version_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """How an input changed between two versions (`size 31,744 -> 52,224 bytes`), None when the
    fields both have agree (a record made before versions were kept has none: no change is told)."""
    changes = [f"{k} {old[k]:,} -> {new[k]:,} bytes" if k == "size" else f"{k} {old[k]} -> {new[k]}"
               for k in ("size", "etag", "mtime") if k in old and k in new and old[k] != new[k]]
    return "; ".join(changes) or None


class InputShards(dict):
    """Output name -> input URL (what `check_unique_names` gives), with `versions`: output name ->
    `input_version` from the listing, so that planning can tell an input that changed since its
    shard was committed without a request per shard."""

    def __init__(self, names: Mapping[str, str], versions: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(names)
        self.versions: dict[str, dict[str, Any]] = {n: dict(versions.get(u, {})) for n, u in names.items()}


def list_inputs(patterns: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> InputShards:
    """The input tar shards by output name, with their versions (see `expand_inputs`)."""
    versions = _expand(patterns, storage_options, (TAR_SUFFIX,))
    return InputShards(check_unique_names(versions), versions)


def expand_inputs(patterns: Sequence[str], storage_options: Mapping[str, Any] | None = None, *,
                  suffixes: tuple[str, ...] = (TAR_SUFFIX,)) -> list[str]:
    """Every input shard URL, de-duplicated, in the order the patterns give them.

    A pattern is an fsspec URL or local path, and may be a brace pattern
    (`s3://b/train-{000000..000009}.tar`, each name must exist), a glob (`s3://b/**/*.tar`) or a
    folder (all `*.tar` beneath it). Globs and folders are sorted. URLs keep their protocol; local
    paths come back absolute. Raises ShardListingError when a listing fails, a named shard is
    missing, or a pattern matches no `.tar` shard. `suffixes` names other shard files (latent shards).
    """
    return list(_expand(patterns, storage_options, suffixes))


def _expand(patterns: Sequence[str], storage_options: Mapping[str, Any] | None,
            suffixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each input URL (de-duplicated, in pattern order) -> its `input_version`, from the listing."""
    if isinstance(patterns, str):
        patterns = [patterns]  # a lone string is a Sequence of characters; take it as one pattern
    if not patterns:
        raise ShardListingError("", "no input patterns given; expected at least one URL, glob or folder")
    options = dict(storage_options or {})
    urls: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        if not pattern or not pattern.strip():
            raise ShardListingError(pattern, "empty pattern; expected a URL, glob or folder")
        for url, version in _Expander(pattern, options, suffixes).expand_versions().items():
            urls.setdefault(url, version)
    return urls


def shard_name(url: str) -> str:
    """The output stem of an input shard: its basename without `.tar` (`.../train-000001.tar` -> `train-000001`)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    name = base[: -len(TAR_SUFFIX)] if base.endswith(TAR_SUFFIX) else base
    if not name:
        raise ValueError(f"shard URL {url!r} has no file name to derive an output name from")
    return name


def check_unique_names(urls: Iterable[str]) -> dict[str, str]:
    """Map output name -> input URL; raise DuplicateShardNameError if two inputs share a name."""
    names: dict[str, str] = {}
    clashes: list[str] = []
    for url in urls:
        name = shard_name(url)
        if name in names and names[name] != url:
            clashes.append(f"{name!r} from {names[name]} and {url}")
        else:
            names[name] = url
    if clashes:
        raise DuplicateShardNameError(
            f"{len(clashes)} output name clash(es): {'; '.join(clashes[:_MAX_NAMED])}; output shards are named "
            "after input basenames, so inputs in different folders must not share a basename")
    return names
