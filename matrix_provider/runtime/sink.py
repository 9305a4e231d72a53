"""Output: Parquet parts that become visible only at commit, in the manner of Hadoop's S3A committers.

Layout of an output folder:

    part-<unit>-<attempt>-<n>.parquet        published parts: rows of committed units only
    _staging/<epoch>/part-….parquet          parts written but not committed (hidden from readers)
    _commits/<epoch>/<unit>.json             a unit's commit record: counts, tokens, reasons, its parts
    _commits/<epoch>/<unit>/<part>.json      a part's record while its unit is open (for resume)
    _epochs/<epoch>.json                     the config that owns the epoch's content, and its unit size
    _leases/<generation>.json                which run may write (see lease.py)
    _manifest.json, _SUCCESS                 the sum of the commit records, once every unit is committed

An epoch is one content of the output: a run resumes the epoch its predecessor wrote when the
config is the same, and opens a new one (its own generation number) on a fresh output or with
`--overwrite`. Nothing of another epoch is ever read, so a stale writer's late record in a
superseded epoch changes nothing.

A part is written in one piece to `_staging/` (one PUT on object stores, a renamed fsynced temporary
file on disk) and recorded with the rows it holds, so a resume redoes only the rows no part holds.
A unit is committed by its record, created with a conditional create (`If-None-Match: *` on S3, an
exclusive hard link on disk): the first attempt to commit a unit wins. Only then are its parts
published (renamed on disk, copied and the copy's source deleted on S3) and the part records folded
away, so a plain Parquet reader of the folder never sees a part no record names. Parts left in
`_staging/`, superseded epochs and units no longer in the input are swept when the run finishes:
the sweep lists first, then checks the fence, then deletes only what the listing found, so a
writer frozen anywhere in between cannot delete what a later run wrote. Nothing here grows with
the number of rows: only with the number of units and parts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from tenacity import Retrying, stop_after_attempt, wait_exponential

from matrix_provider.runtime.sources import open_fs

EPOCHS_DIR = "_epochs"
COMMITS_DIR = "_commits"
STAGING_DIR = "_staging"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
LEGACY_META = "_matrix.json"  # matrix-provider 0.1's single-epoch layout
T = TypeVar("T")
Fence = Callable[[], None]


class OutputError(ValueError):
    """The output cannot be used (unwritable, owned by a different config, held by a live run)."""


class PartMissing(RuntimeError):
    """A part a commit record names is neither published nor staged (deleted by hand or by power loss)."""


class OutputIncomplete(RuntimeError):
    """Committed parts are missing from a finished output: it must not be marked done."""


def _no_fence() -> None:
    return None


def _epoch_dir(epoch: int) -> str:
    return f"{epoch:08d}"


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
    def retrying(self, write: Callable[[], T], fence: Fence = _no_fence) -> T:
        """Run `write`, retrying transient failures with exponential backoff (0.5 s, 1 s, 2 s … 30 s).

        `fence` runs before every attempt, so a writer that lost its lease while it backed off
        never makes the write late.
        """
        retryer = Retrying(
            stop=stop_after_attempt(self.write_retries + 1), wait=wait_exponential(0.5, max=30), reraise=True
        )

        def attempt() -> T:
            fence()
            return write()

        return retryer(attempt)

    def check_writable(self) -> None:
        """Write, exclusively create twice, and delete a probe; raise OutputError naming what failed.

        Commits rely on an exclusive create: a store whose "create" lets a second writer through
        (some object stores and FUSE mounts) would let two attempts both commit a unit.
        """
        name = f".probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            first = self.create(name, b"ok")
            second = self.create(name, b"again")
            self.fs.rm_file(self.path(name))
        except Exception as exc:  # s3fs/botocore raise many unrelated types for the same cause
            raise OutputError(f"output {self.uri!r} is not writable: {type(exc).__name__}: {exc}") from None
        if not first or second:
            raise OutputError(
                f"output {self.uri!r} ({type(self.fs).__name__}) has no exclusive create: a second create of "
                "one file succeeded, so two writers could both commit a unit; use local disk, S3 or another "
                "store with conditional writes"
            )

    def _local_tmp(self, final: str) -> str:
        """A hidden temporary name beside `final` (same file system, so renames are atomic)."""
        folder = posixpath.dirname(final)
        self.fs.makedirs(folder, exist_ok=True)
        return posixpath.join(folder, f".{posixpath.basename(final)}.{uuid.uuid4().hex}.tmp")

    @staticmethod
    def _write_synced(path: str, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def _sync_dir(folder: str) -> None:
        """Make a rename or link in `folder` survive power loss (POSIX needs the directory fsynced)."""
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, name: str, data: bytes) -> None:
        """Write a whole file atomically (readers see all of it or nothing), durably on local disk."""
        final = self.path(name)
        if self.local:
            tmp = self._local_tmp(final)
            self._write_synced(tmp, data)
            os.replace(tmp, final)
            self._sync_dir(posixpath.dirname(final))
        else:
            self.fs.pipe_file(final, data)

    def create(self, name: str, data: bytes) -> bool:
        """Create a file only if it does not exist yet; False when it already did.

        Local files: hard link of a complete, fsynced temporary file (atomic, exclusive). S3: a
        conditional PUT (`If-None-Match: *`). Elsewhere: fsspec's `mode="create"`, which
        `check_writable` has shown to be exclusive.
        """
        final = self.path(name)
        if self.local:
            tmp = self._local_tmp(final)
            self._write_synced(tmp, data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            self._sync_dir(posixpath.dirname(final))
            return True
        try:
            self.fs.pipe_file(final, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if "precondition" in str(exc).lower().replace("-", ""):
                return False
            raise

    def remove(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if paths:
            self.fs.rm(paths, recursive=True)

    # -- reading -----------------------------------------------------------------------------------
    def listing(self, folder: str) -> dict[str, float]:
        """{file name: modification time by the store's clock} of the files directly in `folder`."""
        path = self.path(folder)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"]): _mtime(e) for e in entries if e.get("type") != "directory"}

    def subfolders(self, folder: str) -> list[str]:
        path = self.path(folder)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]

    def now(self) -> float:
        """The store's clock: the modification time of a probe written now (so no reader's clock counts)."""
        name = f"{STAGING_DIR}/.clock-{uuid.uuid4().hex}"

        def probe() -> float:
            self.put(name, b"")
            self.fs.invalidate_cache(self.path(STAGING_DIR))
            return _mtime(self.fs.info(self.path(name)))

        try:
            return self.retrying(probe)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))

    def _read_json_files(self, paths: list[str]) -> list[dict[str, Any]]:
        """The files' JSON; a file that does not parse (cut short by a power loss) counts as absent."""
        if not paths:
            return []
        return [record for data in self.fs.cat(paths).values() if (record := _parse(data)) is not None]

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return _parse(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None

    # -- epochs ------------------------------------------------------------------------------------
    def read_epoch(self, epoch: int) -> dict[str, Any] | None:
        return self._read_json(f"{EPOCHS_DIR}/{_epoch_dir(epoch)}.json")

    def create_epoch(self, epoch: int, meta: dict[str, Any], fence: Fence) -> None:
        """Record the config that owns epoch `epoch` (once; a rerun of an interrupted start finds it)."""
        data = json.dumps(meta, indent=2).encode()
        self.retrying(lambda: self.create(f"{EPOCHS_DIR}/{_epoch_dir(epoch)}.json", data), fence)

    def legacy_layout(self) -> bool:
        return self.fs.exists(self.path(LEGACY_META))

    # -- parts and commit records --------------------------------------------------------------------
    def stage_part(self, epoch: int, name: str, table: pa.Table, fence: Fence) -> None:
        """Write one Parquet part into staging, retried with backoff; raises only when every attempt failed."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        data = buffer.getvalue()
        self.retrying(lambda: self.put(f"{STAGING_DIR}/{_epoch_dir(epoch)}/{name}", data), fence)

    def put_part_record(self, epoch: int, uid: str, record: dict[str, Any], fence: Fence) -> None:
        name = f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{uid}/{record['name']}.json"
        data = json.dumps(record).encode()
        self.retrying(lambda: self.put(name, data), fence)

    def part_records(self, epoch: int, uid: str) -> list[dict[str, Any]]:
        """The part records of an open unit (parts committed by earlier attempts), by name."""
        folder = f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{uid}"
        names = sorted(n for n in self.listing(folder) if n.endswith(".json") and not n.startswith("."))
        return self._read_json_files([self.path(f"{folder}/{n}") for n in names])

    def unit_record(self, epoch: int, uid: str) -> dict[str, Any] | None:
        return self._read_json(f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{uid}.json")

    def unit_records(self, epoch: int) -> dict[str, dict[str, Any]]:
        """Every committed unit's record in an epoch, by unit id: one listing and one batched read (O(units))."""
        folder = f"{COMMITS_DIR}/{_epoch_dir(epoch)}"
        names = [n for n in self.listing(folder) if n.endswith(".json") and not n.startswith(".")]
        records = self._read_json_files([self.path(f"{folder}/{n}") for n in names])
        return {r["unit_id"]: r for r in records}

    def create_unit_record(self, epoch: int, record: dict[str, Any], fence: Fence) -> dict[str, Any]:
        """Write a unit's commit record unless one exists; returns the record that holds.

        A record that exists but does not parse (cut short by a power loss before fsync mattered,
        or by hand) commits nothing: it is replaced.
        """
        name = f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{record['unit_id']}.json"
        data = json.dumps(record).encode()
        for _ in range(2):
            if self.retrying(lambda: self.create(name, data), fence):
                return record
            held = self._read_json(name)
            if held is not None:
                return held
            fence()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))
        raise OutputError(f"output {self.uri!r}: the commit record {name} keeps being replaced by another writer")

    def publish(self, epoch: int, record: dict[str, Any], fence: Fence) -> None:
        """Make a committed unit's parts visible, then fold its part records away.

        Idempotent: any attempt (or the job) may publish a record again after a crash; a part
        already visible is left as it is. The fence runs before each part, so a writer that lost
        its lease publishes nothing more.
        """
        for part in record["parts"]:
            fence()
            self.retrying(lambda part=part: self._publish_part(epoch, part["name"]))
        folder = self.path(f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{record['unit_id']}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(folder, recursive=True)

    def _publish_part(self, epoch: int, name: str) -> None:
        staged, final = self.path(f"{STAGING_DIR}/{_epoch_dir(epoch)}/{name}"), self.path(name)
        if self.local:
            try:
                os.rename(staged, final)
            except FileNotFoundError:
                if not os.path.exists(final):
                    raise PartMissing(f"part {name} is neither published nor staged") from None
                return
            self._sync_dir(self.root)
            return
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(final):
            try:
                self.fs.copy(staged, final)
            except FileNotFoundError:
                raise PartMissing(f"part {name} is neither published nor staged") from None
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(staged)

    def unstage(self, epoch: int, uid: str, names: list[str]) -> None:
        """Forget an attempt that lost its unit's commit: its staged parts and part records."""
        folder = f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{uid}"
        paths = [self.path(f"{STAGING_DIR}/{_epoch_dir(epoch)}/{n}") for n in names]
        paths += [self.path(f"{folder}/{n}.json") for n in names]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def staged_parts(self, epoch: int, uid: str) -> set[str]:
        """Names of the staged parts of one unit (a prefix listing, not the whole staging area)."""
        folder = self.path(f"{STAGING_DIR}/{_epoch_dir(epoch)}")
        self.fs.invalidate_cache(folder)
        return {posixpath.basename(p) for p in self.fs.glob(f"{folder}/part-{uid}-*.parquet")}

    def published_parts(self) -> set[str]:
        return {n for n in self.listing("") if n.startswith("part-") and n.endswith(".parquet")}

    # -- the end of a run --------------------------------------------------------------------------
    def garbage(self, epoch: int, records: dict[str, dict[str, Any]]) -> list[str]:
        """Everything a finished output holds that `records` (the epoch's committed, planned units)
        does not use: unnamed published parts, staging, part records, records of units no longer in
        the input, other epochs, and 0.1's single-epoch files. A listing: nothing is deleted here."""
        named = {part["name"] for record in records.values() for part in record["parts"]}
        current = _epoch_dir(epoch)
        found = [self.path(n) for n in self.published_parts() - named]
        found += [self.path(n) for n in self.listing("") if n in (LEGACY_META, "_lease.json")]
        for folder in (STAGING_DIR, COMMITS_DIR):
            found += [self.path(f"{folder}/{n}") for n in self.listing(folder) if not n.startswith(".clock-")]
            found += [self.path(f"{folder}/{n}") for n in self.subfolders(folder) if n != current]
        found += [self.path(f"{STAGING_DIR}/{current}/{n}") for n in self.listing(f"{STAGING_DIR}/{current}")]
        commits = f"{COMMITS_DIR}/{current}"
        found += [self.path(f"{commits}/{n}") for n in self.listing(commits) if n.removesuffix(".json") not in records]
        found += [self.path(f"{commits}/{n}") for n in self.subfolders(commits)]
        found += [self.path(f"{EPOCHS_DIR}/{n}") for n in self.listing(EPOCHS_DIR) if n != f"{current}.json"]
        return found

    def complete(self, epoch: int, planned: dict[str, dict[str, Any]], fence: Fence) -> int:
        """Make a fully committed output whole: publish what a dead writer left staged, sweep what
        no planned unit's record uses, and check that every part a record names is there; returns
        how many paths the sweep removed.

        The sweep lists first and deletes after the fence, so it can only delete what existed while
        this run still held the output. Units no longer in the input (a file removed or edited) leave
        with their parts: the output then mirrors this run's input exactly. A record whose part is
        gone is dropped (PartMissing), so a rerun redoes its unit.
        """
        unpublished = set(self.missing_parts(planned))  # one listing; a resume with nothing to do finds none
        for record in planned.values():
            if not unpublished.intersection(p["name"] for p in record["parts"]):
                continue
            try:
                self.publish(epoch, record, fence)
            except PartMissing as exc:
                fence()
                self.remove([self.path(f"{COMMITS_DIR}/{_epoch_dir(epoch)}/{record['unit_id']}.json")])
                why = f"unit {record['unit']}: {exc}; its commit record was dropped: rerun to redo it"
                raise PartMissing(why) from None
        garbage = self.garbage(epoch, planned)
        fence()
        self.remove(garbage)
        missing = self.missing_parts(planned)
        if missing:
            raise OutputIncomplete(
                f"{len(missing)} committed parts are missing from output {self.uri!r} (e.g. {missing[:3]}); rerun"
            )
        return len(garbage)

    def missing_parts(self, records: dict[str, dict[str, Any]]) -> list[str]:
        """Parts the records name that are not published (checked before `_SUCCESS`)."""
        published = self.published_parts()
        return [p["name"] for r in records.values() for p in r["parts"] if p["name"] not in published]

    def unmark(self, fence: Fence) -> None:
        """Remove `_SUCCESS` and `_manifest.json` before a run changes the output."""
        for name in (SUCCESS_FILE, MANIFEST_FILE):
            fence()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))

    def finish(self, manifest: dict[str, Any], fence: Fence) -> None:
        """Write `_manifest.json`, then `_SUCCESS`, each right after the fence.

        The manifest is created exclusively: one left by a stale run that wrote it after this run
        began is replaced (this run holds the output), and a stale run can never replace ours.
        """
        data = json.dumps(manifest, indent=2).encode()
        fence()
        if not self.create(MANIFEST_FILE, data):
            fence()
            self.fs.rm_file(self.path(MANIFEST_FILE))
            if not self.create(MANIFEST_FILE, data):
                raise OutputError(f"output {self.uri!r}: another writer keeps writing {MANIFEST_FILE}")
        fence()
        self.create(SUCCESS_FILE, b"")

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(self.path(MANIFEST_FILE)))


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _mtime(info: dict[str, Any]) -> float:
    """A listing entry's modification time in seconds, whatever the fsspec backend calls it."""
    value = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or 0.0
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    if isinstance(value, str):
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)
