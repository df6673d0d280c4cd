"""Names inside an output folder. Everything latentcache keeps for itself lives under one hidden
folder, so that a folder of data files is what Parquet and WebDataset tools find there: pandas,
pyarrow.dataset, Hugging Face `datasets` (which skips hidden folders), polars and DuckDB on
`out/*.parquet`.

    <name>.<ext>                      the data files, one per input shard
    .latentcache/manifest.json        the job: kind, identity, input shards, provenance
    .latentcache/records/<name>.json  per-shard records, each written after its data file
    .latentcache/compacted/*.parquet  records compacted into tables as a large job goes (see Ledger)
    .latentcache/errors.parquet       the job's sample errors (key, shard, stage, reason)
    .latentcache/SUCCESS              JSON summary, written once every shard is committed
    .latentcache/tmp/                 temp files of in-flight writes

Outputs of latentcache 0.1 kept these at the top level (`_latentcache.json`, `_records/`,
`_errors.parquet`, `_SUCCESS`, `_tmp/`); they are still read (see `LEGACY`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Where the bookkeeping of one layout lives, relative to the output folder."""

    manifest: str
    records: str
    compacted: str
    errors: str
    success: str
    tmp: str

    def under(self, root: str) -> dict[str, str]:
        return {k: posixpath.join(root, v) for k, v in vars(self).items()}


META_DIR = ".latentcache"
# The key under which data files (Parquet schema metadata, safetensors header) and the errors table
# hold latentcache's metadata.
METADATA_KEY = "latentcache"
CURRENT = Layout(manifest=f"{META_DIR}/manifest.json", records=f"{META_DIR}/records",
                 compacted=f"{META_DIR}/compacted", errors=f"{META_DIR}/errors.parquet",
                 success=f"{META_DIR}/SUCCESS", tmp=f"{META_DIR}/tmp")
# 0.1 never compacted; its folders are read, never resumed into, so nothing is written at `compacted`.
LEGACY = Layout(manifest="_latentcache.json", records="_records", compacted="_records_compacted",
                errors="_errors.parquet", success="_SUCCESS", tmp="_tmp")


def is_reserved(name: str) -> bool:
    """Whether a top-level name is latentcache's (bookkeeping of either layout), never a data file."""
    return name.startswith(("_", "."))


__all__ = ["Layout", "CURRENT", "LEGACY", "META_DIR", "METADATA_KEY", "is_reserved"]
