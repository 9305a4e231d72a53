"""Input: JSONL (plain, .gz, .zst) and Parquet through fsspec, streamed, cut into work units.

A unit is a file, or a byte range of a large plain JSONL file, or a range of row groups of a large
Parquet file; it is what the sink commits as a whole. Units depend only on the input files (name,
range, and the file's identity: size with its ETag or modification time, so an edited file is a
new unit) and the split size fixed at an output's first run, never on the partition count, so a
resume with other settings sees the same units. Every record gets a position id (`<file>@<byte>`,
`<file>:<line>` or `<file>#<row>`, the file relative to the input root so a local copy and an S3
copy give the same ids); its id is the row's id field when present, else the position id. A user
id of a position id's form (`a.jsonl:3`) is refused, so the two can never collide.

Bad input never stops a run: anything that goes wrong decoding one line or one Parquet value makes
that one record an error record with the reason, and a file that is truncated, corrupt or vanishes
yields the records read before the fault plus one error record for the rest. Paths with a
component starting with `_` or `.` (Spark's `_temporary/`, Delta's `_delta_log/`, `.crc` files,
our own `_commits/`) are not input, as in Hadoop and Arrow.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from matrix_provider.runtime.records import Record, Split, check_row
from matrix_provider.runtime.spec import IOSpec
from matrix_provider.runtime.warc import read_warc, warc_kind

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
SPLITTABLE = ("jsonl", "parquet", "warc.gz")  # kinds a large file of is cut into byte / row-group ranges
_MIN_SPLIT_BYTES = 64 << 10
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff); json.loads joins valid pairs, so any
# surrogate left after loading is a lone one, which no UTF-8 writer accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
FILE_FAULTS = (
    FileNotFoundError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    zstandard.ZstdError,
    pa.ArrowInvalid,
    UnicodeDecodeError,
)


# What decoding one Parquet value can raise (invalid UTF-8 in a string column, an out-of-range timestamp).
_VALUE_ERRORS = (UnicodeDecodeError, ValueError, OverflowError, pa.ArrowException)


class InputError(ValueError):
    """The input cannot be read (missing, unreadable, no supported files)."""


class InputChanged(RuntimeError):
    """An input file is not the version the run planned its units from (edited, appended, replaced)."""


def file_identity(info: dict[str, Any]) -> str:
    """A file's version from a listing entry: its size with the ETag where the store has one (S3,
    GCS), else with its modification time. Rewriting a file changes it; reading it does not."""
    size = info.get("size") or info.get("Size") or 0
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if tag:
        return f"{size}:{str(tag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{size}:{mtime!r}"


def current_identity(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The file's version now (not from a cached listing); None once it is gone."""
    fs.invalidate_cache(path)
    try:
        return file_identity(fs.info(path))
    except FileNotFoundError:
        return None


def open_fs(uri: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if kind := warc_kind(lower):
        return kind
    for suffix in JSONL_SUFFIXES:
        if lower.endswith(suffix):
            return "jsonl" + ("." + suffix.rsplit(".", 1)[1] if suffix.endswith((".gz", ".zst")) else "")
    return None


def _format_kind(path: str, fmt: str) -> str | None:
    """The reader a file gets: by its name with `io.format=auto`, else the one the format names."""
    if fmt == "auto":
        return _kind(path)
    if fmt == "parquet":
        return "parquet"
    if fmt in ("warc", "wet"):
        return warc_kind(path, forced=True)
    kind = _kind(path)
    return kind if kind is not None and kind.startswith("jsonl") else "jsonl"


def is_hidden(relpath: str) -> bool:
    """Hadoop's and Arrow's rule: a path component starting with `_` or `.` is not data."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part not in ("", "."))


def list_inputs(uri: str, io_spec: IOSpec) -> tuple[fsspec.AbstractFileSystem, list[Split]]:
    """All input files as whole-file splits, sorted by name; raises InputError when there are none."""
    try:
        fs, root = open_fs(uri, io_spec.storage_options)
        if any(ch in root for ch in "*?["):
            base = root.split("*", 1)[0].rsplit("/", 1)[0]
            listing = fs.glob(root, detail=True)
        elif fs.isdir(root):
            base, listing = root, fs.find(root, detail=True)
        elif fs.exists(root):
            base, listing = posixpath.dirname(root), {root: fs.info(root)}
        else:
            raise InputError(f"input {uri!r} does not exist")
        infos = {p: i for p, i in listing.items() if i.get("type") != "directory"}
        paths = sorted(p for p in infos if not is_hidden(posixpath.relpath(p, base)))
        splits = []
        for path in paths:
            kind = _format_kind(path, io_spec.format)
            if kind is None:
                continue
            name = posixpath.relpath(path, base) if base else posixpath.basename(path)
            info = infos[path]
            size = int(info.get("size") or 0)
            splits.append(Split(path=path, name=name, kind=kind, size=size, identity=file_identity(info)))
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read input {uri!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # botocore credential/endpoint errors have no common base we can import cheaply
        raise InputError(f"cannot read input {uri!r}: {type(exc).__name__}: {exc}") from None
    if not splits:
        raise InputError(f"input {uri!r} has no JSONL (.jsonl[.gz|.zst]), Parquet or WARC (.warc[.gz], .wet.gz) files")
    return fs, splits


def split_size(files: list[Split], io_spec: IOSpec, partitions: int) -> int:
    """The unit size for an output's first run: at most `io.split_bytes`, smaller when that is what it
    takes to give every partition work (a single 5 MB file over 4 partitions is cut in 4), down to
    64 KiB. The sink records it, so later runs cut the same units whatever their partition count."""
    splittable = sum(f.size for f in files if f.kind in SPLITTABLE)
    return min(io_spec.split_bytes, max(_MIN_SPLIT_BYTES, -(-splittable // partitions)))


def plan_units(fs: fsspec.AbstractFileSystem, files: list[Split], split_bytes: int) -> list[Split]:
    """Cut large plain JSONL files into byte ranges and large Parquet files into row-group ranges."""
    units: list[Split] = []
    for f in files:
        if f.kind in ("jsonl", "warc.gz") and f.size > split_bytes:
            for start in range(0, f.size, split_bytes):
                end = min(start + split_bytes, f.size)
                units.append(Split(f.path, f.name, f.kind, start, end, end - start, f.identity))
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
            ranges.append(Split(f.path, f.name, f.kind, start, i + 1, acc, f.identity))
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
    elif split.kind.startswith("warc"):
        yield from read_warc(fs, split, io_spec)
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
    """One JSONL line -> a record, or an error/filtered record with the reason; never raises, so one
    pathological line (a 5,000-digit number, nesting past the recursion limit) stays one error row."""
    try:
        return _parse_line(line, pos_id, io_spec)
    except Exception as exc:  # whatever one line's content makes a decoder or check raise
        return Record(pos_id, pos_id, None, "error", f"unreadable line: {type(exc).__name__}: {str(exc)[:200]}")


def _parse_line(line: bytes, pos_id: str, io_spec: IOSpec) -> Record:
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
    except ValueError as exc:  # e.g. an integer literal past Python's 4,300-digit limit
        return Record(pos_id, pos_id, None, "error", f"malformed JSON: {str(exc)[:120]}")
    if not isinstance(row, dict):
        return Record(pos_id, pos_id, None, "error", f"JSON line is a {type(row).__name__}, not an object")
    if _SURROGATE_ESCAPE.search(line):
        row = replace_lone_surrogates(row)
    return check_row(row, pos_id, io_spec)


def replace_lone_surrogates(value: Any) -> Any:
    """Lone UTF-16 surrogates (valid JSON escapes, not valid Unicode) become U+FFFD, everywhere in a row.

    Iterative (an explicit stack, containers repaired in place), so no depth of nesting that
    json.loads accepted can make it raise RecursionError.
    """
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if not isinstance(value, dict | list):
        return value
    stack: list[dict[Any, Any] | list[Any]] = [value]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            items = list(container.items())
            container.clear()
            for key, item in items:
                key = _LONE_SURROGATE.sub("\ufffd", key) if isinstance(key, str) else key
                container[key] = _LONE_SURROGATE.sub("\ufffd", item) if isinstance(item, str) else item
                if isinstance(item, dict | list):
                    stack.append(item)
        else:
            for i, item in enumerate(container):
                if isinstance(item, str):
                    container[i] = _LONE_SURROGATE.sub("\ufffd", item)
                elif isinstance(item, dict | list):
                    stack.append(item)
    return value


def _read_parquet(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    with fs.open(split.path, "rb") as handle:
        pf = pq.ParquetFile(handle)
        groups = list(range(split.start, split.end if split.end is not None else pf.num_row_groups))
        row_index = sum(pf.metadata.row_group(i).num_rows for i in range(split.start))
        for batch in pf.iter_batches(row_groups=groups, batch_size=1024):
            for row in _batch_rows(batch):
                pos_id = f"{split.name}#{row_index}"
                row_index += 1
                if isinstance(row, str):  # a value that does not decode: this row alone is an error
                    yield Record(pos_id, pos_id, None, "error", row)
                else:
                    yield check_row(row, pos_id, io_spec)


def _batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any] | str]:
    """The batch's rows as dicts; a row holding a value Python cannot decode (invalid UTF-8 in a
    string column) is the reason as a string instead, so the rest of the batch is kept."""
    try:
        return batch.to_pylist()
    except _VALUE_ERRORS:
        pass
    columns: dict[str, list[Any]] = {}
    bad: dict[int, str] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            columns[name] = column.to_pylist()
            continue
        except _VALUE_ERRORS:
            pass
        values: list[Any] = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except _VALUE_ERRORS as exc:
                values.append(None)
                bad.setdefault(i, f"column {name!r} holds a value that cannot be read: {type(exc).__name__}: {exc}")
        columns[name] = values
    names = list(columns)
    return [bad.get(i) or {n: columns[n][i] for n in names} for i in range(batch.num_rows)]
