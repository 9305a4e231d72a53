"""Output: Parquet part files through fsspec, committed atomically, then a manifest and `_SUCCESS`.

A part is written in one piece: on object stores one PUT (an object appears whole or not at all),
on file systems a temporary file renamed into place. Which rows are committed is read back from
the parts themselves, so a rerun on the same output resumes exactly where the last one stopped.
`_matrix.json` records the config hash of the run that owns the output.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from matrix_provider.runtime.sources import open_fs

META_FILE = "_matrix.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
TMP_DIR = "_tmp"


class OutputError(ValueError):
    """The output cannot be used (unwritable, owned by a different config)."""


class OutputStore:
    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self.uri = uri
        self.fs, self.root = open_fs(uri, storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def check_writable(self) -> None:
        """Write and delete a probe file; raise OutputError with the cause when that fails."""
        probe = self._path(f"{TMP_DIR}/.probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self._path(TMP_DIR), exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as exc:  # s3fs/botocore raise many unrelated types for the same cause
            raise OutputError(f"output {self.uri!r} is not writable: {type(exc).__name__}: {exc}") from None

    def read_meta(self) -> dict[str, Any] | None:
        path = self._path(META_FILE)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def claim(self, meta: dict[str, Any], overwrite: bool) -> None:
        """Take the output for this config; refuse one written by another config unless overwriting."""
        existing = self.read_meta()
        if existing and existing.get("config_hash") != meta["config_hash"] and not overwrite:
            raise OutputError(
                f"output {self.uri!r} holds a run of a different config "
                f"(pipeline {existing.get('pipeline')!r}, config_hash {existing.get('config_hash')}; "
                f"this run is {meta['config_hash']}): use a new output or pass --overwrite"
            )
        if overwrite:
            self.clear()
        for name in (SUCCESS_FILE, MANIFEST_FILE):
            if self.fs.exists(self._path(name)):
                self.fs.rm_file(self._path(name))
        self.fs.pipe_file(self._path(META_FILE), json.dumps(meta, indent=2).encode())

    def clear(self) -> None:
        for path in self.part_paths():
            self.fs.rm_file(path)
        for name in (META_FILE, MANIFEST_FILE, SUCCESS_FILE):
            if self.fs.exists(self._path(name)):
                self.fs.rm_file(self._path(name))

    def part_paths(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(self.fs.glob(self._path("part-*.parquet")))

    def read_columns(self, columns: list[str]) -> pa.Table:
        tables = []
        for path in self.part_paths():
            with self.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        return pa.concat_tables(tables, promote_options="permissive")

    def committed_ids(self) -> list[str]:
        return self.read_columns(["id"]).column("id").to_pylist()

    def write_part(self, name: str, table: pa.Table) -> str:
        """Commit one part atomically; returns its path."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        final = self._path(name)
        if self.local:
            tmp = self._path(f"{TMP_DIR}/{name}.{uuid.uuid4().hex}")
            self.fs.makedirs(self._path(TMP_DIR), exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        else:
            self.fs.pipe_file(final, data)
        return final

    def finish(self, manifest: dict[str, Any]) -> None:
        self.fs.pipe_file(self._path(MANIFEST_FILE), json.dumps(manifest, indent=2).encode())
        self.fs.pipe_file(self._path(SUCCESS_FILE), b"")
        if self.fs.exists(self._path(TMP_DIR)):
            self.fs.rm(self._path(TMP_DIR), recursive=True)

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self._path(MANIFEST_FILE)))
