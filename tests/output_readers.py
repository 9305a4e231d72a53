"""An output read three independent ways, as the users of a finished output read it.

- plain: `pyarrow.parquet.read_table` of the folder (it skips `_`- and `.`-prefixed paths, as Spark,
  Hive and Arrow readers do);
- duckdb: DuckDB's `read_parquet('<output>/*.parquet')` (through fsspec for S3: DuckDB's own S3
  extension is a download);
- records: the parts named by the commit records of the manifest's epoch.

None of them uses the runtime's own reading code, so a checker built on them is independent of it.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import fsspec
import pyarrow.parquet as pq


def _fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.invalidate_cache()
    return fs, root


def plain_ids(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    fs, root = _fs(uri, storage_options)
    return pq.read_table(root, filesystem=fs, columns=["id"])["id"].to_pylist()


def duckdb_ids(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    fs, root = _fs(uri, storage_options)
    with duckdb.connect() as con:
        if uri.startswith("s3://"):
            con.register_filesystem(fs)
            pattern = f"s3://{root}/*.parquet"
        else:
            pattern = f"{root}/*.parquet"
        return [r[0] for r in con.execute(f"SELECT id FROM read_parquet('{pattern}')").fetchall()]


def record_ids(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Ids of the rows the manifest's epoch's commit records name (only after `_SUCCESS`)."""
    fs, root = _fs(uri, storage_options)
    epoch = json.loads(fs.cat_file(f"{root}/_manifest.json"))["epoch"]
    ids: list[str] = []
    for path in sorted(fs.glob(f"{root}/_commits/{epoch:08d}/*.json")):
        for part in json.loads(fs.cat_file(path))["parts"]:
            with fs.open(f"{root}/{part['name']}", "rb") as handle:
                ids.extend(pq.read_table(handle, columns=["id"])["id"].to_pylist())
    return ids


def read_three_ways(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """{reader: rows it sees}, after checking that each reader sees every id at most once."""
    counts = {}
    for name, reader in (("plain", plain_ids), ("duckdb", duckdb_ids), ("records", record_ids)):
        ids = reader(uri, storage_options)
        doubled = len(ids) - len(set(ids))
        assert doubled == 0, f"{name} reader sees {doubled} rows twice"
        counts[name] = len(ids)
    return counts
