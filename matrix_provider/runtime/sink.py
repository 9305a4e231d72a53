"""Output: Parquet parts committed by work unit, in the manner of Hadoop's output committers.

Layout of an output folder:

    part-<unit>-<attempt>-<n>.parquet   rows of one attempt at one unit
    _commits/<unit>.json               the unit's commit record: counts, tokens, reasons, its parts
    _matrix.json                       the config that owns the output, and its unit size
    _lease.json, _leases/              which run may write (see lease.py)
    _manifest.json, _SUCCESS           the sum of the commit records, once every unit is committed

A part is written in one piece (one PUT on object stores, a renamed temporary file on file systems)
and retried with backoff. A unit's commit record is written last, with a conditional create, so
the first attempt to commit a unit wins and a reader, a resume and the manifest see only the parts
named by commit records. Parts that no record names (an attempt that died, a stale writer) are
removed when the run finishes, so after `_SUCCESS` any Parquet reader sees every row exactly once.
Nothing here grows with the number of rows: only with the number of units.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from tenacity import Retrying, stop_after_attempt, wait_exponential

from matrix_provider.runtime.sources import open_fs

META_FILE = "_matrix.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
COMMITS_DIR = "_commits"
T = TypeVar("T")


class OutputError(ValueError):
    """The output cannot be used (unwritable, owned by a different config, held by a live run)."""


class OutputStore:
    def __init__(self, uri: str, storage_options: dict[str, Any], write_retries: int = 6):
        self.uri = uri
        self.fs, self.root = open_fs(uri, storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.s3 = bool({"s3", "s3a"} & set(protocols))
        self.write_retries = write_retries

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    # -- writing -----------------------------------------------------------------------------------
    def retrying(self, write: Callable[[], T]) -> T:
        """Run `write`, retrying transient failures with exponential backoff (0.5 s, 1 s, 2 s … 30 s)."""
        retryer = Retrying(
            stop=stop_after_attempt(self.write_retries + 1), wait=wait_exponential(0.5, max=30), reraise=True
        )
        return retryer(write)

    def check_writable(self) -> None:
        """Write and delete a probe file; raise OutputError with the cause when that fails."""
        probe = self.path(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # s3fs/botocore raise many unrelated types for the same cause
            raise OutputError(f"output {self.uri!r} is not writable: {type(exc).__name__}: {exc}") from None

    def _local_tmp(self, final: str) -> str:
        """A hidden temporary name beside `final` (same file system, so renames are atomic)."""
        folder = posixpath.dirname(final)
        self.fs.makedirs(folder, exist_ok=True)
        return posixpath.join(folder, f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")

    def put(self, name: str, data: bytes) -> None:
        """Write a whole file atomically (readers see all of it or nothing)."""
        final = self.path(name)
        if self.local:
            tmp = self._local_tmp(final)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        else:
            self.fs.pipe_file(final, data)

    def create(self, name: str, data: bytes) -> bool:
        """Create a file only if it does not exist yet; False when it already did.

        Local files: hard link of a complete temporary file (atomic, exclusive). S3: a conditional
        PUT (`If-None-Match: *`). Elsewhere: check then write, which two racing writers can both pass.
        """
        final = self.path(name)
        if self.local:
            tmp = self._local_tmp(final)
            self.fs.pipe_file(tmp, data)
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.s3:
            try:
                self.fs.pipe_file(final, data, mode="create")
                return True
            except OSError as exc:
                if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                    return False
                raise
        if self.fs.exists(final):
            return False
        self.fs.pipe_file(final, data)
        return True

    def write_part(self, name: str, table: pa.Table) -> None:
        """Write one Parquet part, retried with backoff; raises only when every attempt failed."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        self.retrying(lambda: self.put(name, data))

    def commit_unit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write a unit's commit record unless one exists; returns the record that holds."""
        name = f"{COMMITS_DIR}/{record['unit_id']}.json"
        data = json.dumps(record).encode()
        if self.retrying(lambda: self.create(name, data)):
            return record
        return json.loads(self.fs.cat_file(self.path(name)))

    # -- reading -----------------------------------------------------------------------------------
    def commit_records(self) -> dict[str, dict[str, Any]]:
        """Every unit's commit record, by unit id: one listing and one batched read (O(units))."""
        folder = self.path(COMMITS_DIR)
        self.fs.invalidate_cache(folder)  # s3fs caches listings; other processes commit units
        try:
            paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        if not paths:
            return {}
        contents = self.fs.cat(paths)
        records = [json.loads(data) for data in contents.values()]
        return {r["unit_id"]: r for r in records}

    def read_committed(self, records: list[dict[str, Any]], columns: list[str]) -> pa.Table:
        """`columns` of the rows that `records` commit (what a reader sees after `_SUCCESS`).

        Parts are read concurrently by pyarrow's dataset scanner, and only `columns`: a summary
        over a big output costs its few short columns, not its texts.
        """
        paths = [self.path(part["name"]) for record in records for part in record["parts"]]
        if not paths:
            return pa.table({c: [] for c in columns})
        import pyarrow.dataset as ds  # here, not at the top: it imports pandas, 0.2 s in every actor's start

        return ds.dataset(paths, format="parquet", filesystem=self.fs).to_table(columns=columns)

    def drop_commits(self, unit_ids: list[str]) -> None:
        """Forget units (their parts go with `remove_orphans`)."""
        paths = [self.path(f"{COMMITS_DIR}/{uid}.json") for uid in unit_ids]
        if paths:
            self.fs.rm(paths)

    def part_names(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p) for p in self.fs.glob(self.path("part-*.parquet")))

    # -- ownership and the end of a run ------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        path = self.path(META_FILE)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def claim(self, meta: dict[str, Any], overwrite: bool) -> dict[str, Any]:
        """Take the output for this config; refuse one written by another config unless overwriting.

        Returns the meta in force: on a resume the stored unit size wins over this run's.
        """
        existing = self.read_meta()
        if existing and existing.get("config_hash") != meta["config_hash"] and not overwrite:
            raise OutputError(
                f"output {self.uri!r} holds a run of a different config "
                f"(pipeline {existing.get('pipeline')!r}, config_hash {existing.get('config_hash')}; "
                f"this run is {meta['config_hash']}): use a new output or pass --overwrite"
            )
        if overwrite:
            self.clear()
        elif existing and existing.get("split_bytes"):
            meta = {**meta, "split_bytes": existing["split_bytes"]}
        for name in (SUCCESS_FILE, MANIFEST_FILE):
            if self.fs.exists(self.path(name)):
                self.fs.rm_file(self.path(name))
        self.put(META_FILE, json.dumps(meta, indent=2).encode())
        return meta

    def clear(self) -> None:
        """Remove everything a run wrote except the lease."""
        for name in self.part_names():
            self.fs.rm_file(self.path(name))
        if self.fs.exists(self.path(COMMITS_DIR)):
            self.fs.rm(self.path(COMMITS_DIR), recursive=True)
        for name in (META_FILE, MANIFEST_FILE, SUCCESS_FILE):
            if self.fs.exists(self.path(name)):
                self.fs.rm_file(self.path(name))

    def remove_orphans(self, records: list[dict[str, Any]]) -> int:
        """Delete parts no commit record names (dead attempts, stale writers); returns how many."""
        named = {part["name"] for record in records for part in record["parts"]}
        orphans = [self.path(name) for name in self.part_names() if name not in named]
        if orphans:
            self.fs.rm(orphans)
        return len(orphans)

    def finish(self, manifest: dict[str, Any]) -> None:
        self.put(MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        self.fs.pipe_file(self.path(SUCCESS_FILE), b"")

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self.path(MANIFEST_FILE)))
