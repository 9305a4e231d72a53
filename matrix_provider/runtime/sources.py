"""Input: JSONL (plain, .gz, .zst) and Parquet through fsspec, streamed, cut into work units.

A unit is a file, or a byte range of a large plain JSONL file, or a range of row groups of a large
Parquet file; it is what the sink commits as a whole. Units depend only on the input files and
the split size fixed at an output's first run, never on the partition count, so a resume with
other settings sees the same units. Every record gets a position id (`<file>@<byte>`,
`<file>:<line>` or `<file>#<row>`, the file relative to the input root so a local copy and an S3
copy give the same ids); its id is the row's id field when present, else the position id.

Bad input never stops a run: a bad line becomes an error record with the reason, and a file that
is truncated, corrupt or vanishes yields the records read before the fault plus one error record
for the rest. Paths with a component starting with `_` or `.` (Spark's `_temporary/`, Delta's
`_delta_log/`, `.crc` files, our own `_commits/`) are not input, as in Hadoop and Arrow.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import posixpath
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from matrix_provider.runtime.spec import IOSpec

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
_MIN_SPLIT_BYTES = 64 << 10
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff); json.loads joins valid pairs, so any
# surrogate left after loading is a lone one, which no UTF-8 writer accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# What a truncated, corrupt or vanished file raises. Other I/O errors (timeouts, resets, expired
# credentials) are transient: they fail the unit's attempt, which the job hands out again.
FILE_FAULTS = (
    FileNotFoundError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    zstandard.ZstdError,
    pa.ArrowInvalid,
    UnicodeDecodeError,
)


class InputError(ValueError):
    """The input cannot be read (missing, unreadable, no supported files)."""


@dataclass(frozen=True)
class Split:
    """A unit of work: a whole file, or a byte / row-group range of one."""

    path: str
    name: str  # relative to the input root
    kind: str  # "jsonl", "jsonl.gz", "jsonl.zst", "parquet"
    start: int = 0  # byte offset (plain JSONL) or first row group (Parquet)
    end: int | None = None
    size: int = 0

    @property
    def key(self) -> str:
        """Readable identity of the unit: file, then range."""
        return self.name if self.end is None and self.start == 0 else f"{self.name}[{self.start}:{self.end}]"

    @property
    def uid(self) -> str:
        """Short stable id (commit record and part file names)."""
        return hashlib.sha1(self.key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class Record:
    pos_id: str
    id: str
    row: dict[str, Any] | None  # None for a bad line
    status: str | None = None  # "error" or "filtered" for a bad line
    reason: str | None = None


def open_fs(uri: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for suffix in JSONL_SUFFIXES:
        if lower.endswith(suffix):
            return "jsonl" + ("." + suffix.rsplit(".", 1)[1] if suffix.endswith((".gz", ".zst")) else "")
    return None


def is_hidden(relpath: str) -> bool:
    """Hadoop's and Arrow's rule: a path component starting with `_` or `.` is not data."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part not in ("", "."))


def list_inputs(uri: str, io_spec: IOSpec) -> tuple[fsspec.AbstractFileSystem, list[Split]]:
    """All input files as whole-file splits, sorted by name; raises InputError when there are none."""
    try:
        fs, root = open_fs(uri, io_spec.storage_options)
        if any(ch in root for ch in "*?["):
            base = root.split("*", 1)[0].rsplit("/", 1)[0]
            paths = sorted(p for p in fs.glob(root) if not is_hidden(posixpath.relpath(p, base)))
        elif fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if not is_hidden(posixpath.relpath(p, root)))
            base = root
        elif fs.exists(root):
            paths, base = [root], posixpath.dirname(root)
        else:
            raise InputError(f"input {uri!r} does not exist")
        splits = []
        for path in paths:
            kind = (
                _kind(path)
                if io_spec.format == "auto"
                else ("parquet" if io_spec.format == "parquet" else _kind(path) or "jsonl")
            )
            if kind is None:
                continue
            name = posixpath.relpath(path, base) if base else posixpath.basename(path)
            splits.append(Split(path=path, name=name, kind=kind, size=int(fs.size(path) or 0)))
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read input {uri!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # botocore credential/endpoint errors have no common base we can import cheaply
        raise InputError(f"cannot read input {uri!r}: {type(exc).__name__}: {exc}") from None
    if not splits:
        raise InputError(f"input {uri!r} has no JSONL (.jsonl[.gz|.zst]) or Parquet files")
    return fs, splits


def split_size(files: list[Split], io_spec: IOSpec, partitions: int) -> int:
    """The unit size for an output's first run: at most `io.split_bytes`, smaller when that is what it
    takes to give every partition work (a single 5 MB file over 4 partitions is cut in 4), down to
    64 KiB. The sink records it, so later runs cut the same units whatever their partition count."""
    splittable = sum(f.size for f in files if f.kind in ("jsonl", "parquet"))
    return min(io_spec.split_bytes, max(_MIN_SPLIT_BYTES, -(-splittable // partitions)))


def plan_units(fs: fsspec.AbstractFileSystem, files: list[Split], split_bytes: int) -> list[Split]:
    """Cut large plain JSONL files into byte ranges and large Parquet files into row-group ranges."""
    units: list[Split] = []
    for f in files:
        if f.kind == "jsonl" and f.size > split_bytes:
            for start in range(0, f.size, split_bytes):
                end = min(start + split_bytes, f.size)
                units.append(Split(f.path, f.name, f.kind, start, end, end - start))
        elif f.kind == "parquet" and f.size > split_bytes:
            units.extend(_row_group_ranges(fs, f, split_bytes))
        else:
            units.append(f)
    return units


def _row_group_ranges(fs: fsspec.AbstractFileSystem, f: Split, split_bytes: int) -> list[Split]:
    try:
        with fs.open(f.path, "rb") as handle:
            meta = pq.ParquetFile(handle).metadata
    except FILE_FAULTS:  # a corrupt footer: one unit, whose reading reports the fault as an error row
        return [f]
    except Exception as exc:  # transient: planning on a guess would change the units between runs
        raise InputError(f"cannot read the Parquet footer of {f.name!r}: {type(exc).__name__}: {exc}") from None
    ranges, start, acc = [], 0, 0
    for i in range(meta.num_row_groups):
        acc += meta.row_group(i).total_byte_size
        if acc >= split_bytes or i == meta.num_row_groups - 1:
            ranges.append(Split(f.path, f.name, f.kind, start, i + 1, acc))
            start, acc = i + 1, 0
    return ranges or [f]


def read_unit(fs: fsspec.AbstractFileSystem, unit: Split, io_spec: IOSpec) -> Iterator[Record]:
    """The unit's records; a fault while reading ends it with one error record naming where."""
    last: str | None = None
    try:
        for record in read_split(fs, unit, io_spec):
            last = record.pos_id
            yield record
    except FILE_FAULTS as exc:
        where = f"after {last}" if last else "before its first row"
        pos_id = f"{unit.key}!unread"
        reason = (
            f"file {unit.name!r} could not be read {where}: {type(exc).__name__}: {exc}; "
            "the rest of this unit was not processed"
        )
        yield Record(pos_id, pos_id, None, "error", reason)


def read_split(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    if split.kind == "parquet":
        yield from _read_parquet(fs, split, io_spec)
    elif split.kind == "jsonl":
        yield from _read_jsonl_range(fs, split, io_spec)
    else:
        yield from _read_jsonl_compressed(fs, split, io_spec)


def _read_jsonl_range(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    """Lines whose first byte lies in [start, end)."""
    with fs.open(split.path, "rb") as handle:
        offset = split.start
        if offset > 0:
            handle.seek(offset - 1)
            offset += len(handle.readline()) - 1  # finish the line that began before our range
        while split.end is None or offset < split.end:
            line = handle.readline()
            if not line:
                break
            yield parse_line(line, f"{split.name}@{offset}", io_spec)
            offset += len(line)


def _read_jsonl_compressed(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    with fs.open(split.path, "rb") as raw:
        lines: Any = gzip.GzipFile(fileobj=raw) if split.kind == "jsonl.gz" else _zstd_lines(raw)
        for lineno, line in enumerate(lines, start=1):
            yield parse_line(line, f"{split.name}:{lineno}", io_spec)


def _zstd_lines(raw: Any, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd stream; raises EOFError when the last frame has no end.

    zstandard's stream reader ends quietly at a truncated frame, which would pass a cut file as a
    short one; decompressobj's `eof` tells a finished frame from a cut one.
    """
    dctx = zstandard.ZstdDecompressor()
    frame, fed, pending = dctx.decompressobj(), False, b""
    while chunk := raw.read(chunk_bytes):
        while chunk:
            data = frame.decompress(chunk)
            fed, chunk = True, b""
            if frame.eof:
                frame, fed, chunk = dctx.decompressobj(), False, frame.unused_data
            *complete, pending = (pending + data).split(b"\n")
            for line in complete:
                yield line + b"\n"
    if fed:
        raise EOFError("zstd stream is truncated: its last frame has no end")
    if pending:
        yield pending


def parse_line(line: bytes, pos_id: str, io_spec: IOSpec) -> Record:
    """One JSONL line -> a record, or an error/filtered record with the reason."""
    if len(line) > io_spec.max_doc_bytes:
        size_mb = len(line) / 1e6
        return Record(
            pos_id,
            pos_id,
            None,
            "error",
            f"document is {size_mb:.1f} MB, over io.max_doc_bytes ({io_spec.max_doc_bytes} bytes)",
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(pos_id, pos_id, None, "error", f"invalid UTF-8 at byte {exc.start}")
    if not text.strip():
        return Record(pos_id, pos_id, None, "filtered", "empty line")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return Record(pos_id, pos_id, None, "error", f"malformed JSON: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return Record(pos_id, pos_id, None, "error", "malformed JSON: nested too deeply")
    if not isinstance(row, dict):
        return Record(pos_id, pos_id, None, "error", f"JSON line is a {type(row).__name__}, not an object")
    if _SURROGATE_ESCAPE.search(line):
        row = replace_lone_surrogates(row)
    return check_row(row, pos_id, io_spec)


def replace_lone_surrogates(value: Any) -> Any:
    """Lone UTF-16 surrogates (valid JSON escapes, not valid Unicode) become U+FFFD, everywhere in a row."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {replace_lone_surrogates(k): replace_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_lone_surrogates(v) for v in value]
    return value


def check_row(row: dict[str, Any], pos_id: str, io_spec: IOSpec) -> Record:
    raw_id = row.get(io_spec.id_field)
    row_id = str(raw_id) if raw_id not in (None, "") else pos_id
    text = row.get(io_spec.text_field)
    if text is None:
        return Record(pos_id, row_id, None, "error", f"missing field {io_spec.text_field!r}")
    if not isinstance(text, str):
        return Record(pos_id, row_id, None, "error", f"field {io_spec.text_field!r} is not a string")
    if len(text) > io_spec.max_doc_bytes:
        return Record(
            pos_id, row_id, None, "error", f"document is {len(text) / 1e6:.1f} M characters, over io.max_doc_bytes"
        )
    return Record(pos_id, row_id, row)


def _read_parquet(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    with fs.open(split.path, "rb") as handle:
        pf = pq.ParquetFile(handle)
        groups = list(range(split.start, split.end if split.end is not None else pf.num_row_groups))
        row_index = sum(pf.metadata.row_group(i).num_rows for i in range(split.start))
        for batch in pf.iter_batches(row_groups=groups, batch_size=1024):
            for row in batch.to_pylist():
                yield check_row(row, f"{split.name}#{row_index}", io_spec)
                row_index += 1
