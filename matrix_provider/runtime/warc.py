"""WARC and WET input: records read with warcio, main text extracted from HTML with resiliparse.

One row per document record: an HTTP `response` or a `resource` (its HTML's main text, extracted
as DCLM does with resiliparse) or a WET `conversion` (its text as it is); `request`, `metadata`,
`warcinfo` and `revisit` records are not documents. A row carries `url`, `warc_record_id`, `date`
and `language` (resiliparse's detector) and is identified by its WARC-Record-ID. A record that is
not HTML, is binary, has an HTTP status other than 2xx or holds no text after extraction is a
`filtered` row saying so; one that is truncated, cannot be parsed or makes the extractor raise is
an `error` row; reading then resumes at the next record, so the unit and the run go on.

A `.warc.gz` file is a sequence of gzip members, one per record as Common Crawl writes them, so a
large one is cut into byte ranges like plain JSONL: a unit reads the records whose member starts
in its range, found by looking for a gzip header that decompresses to `WARC/`. An uncompressed
WARC is one unit (a payload line could look like a record start).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
from warcio.archiveiterator import ArchiveIterator

from matrix_provider.runtime.records import Record, Split, check_row, row_id
from matrix_provider.runtime.spec import IOSpec

WARC_SUFFIXES = (".warc.gz", ".wet.gz", ".warc", ".wet")
DOCUMENT_TYPES = frozenset({"response", "resource", "conversion"})
_HTML = ("text/html", "application/xhtml+xml")
# What resiliparse's content sniffing calls a payload no HTML parser should see.
_BINARY = ("image/", "audio/", "video/", "font/")
_BINARY_TYPES = frozenset({"application/octet-stream", "application/pdf", "application/zip", "application/gzip"})
_GZIP_MAGIC = b"\x1f\x8b\x08"
_SCAN_BYTES = 1 << 20


def warc_kind(path: str, forced: bool = False) -> str | None:
    """`warc.gz` or `warc` for a WARC/WET file by its name (any name when `io.format` says so)."""
    lower = path.lower()
    if lower.endswith(WARC_SUFFIXES) or forced:
        return "warc.gz" if lower.endswith(".gz") else "warc"
    return None


def read_warc(fs: fsspec.AbstractFileSystem, split: Split, io_spec: IOSpec) -> Iterator[Record]:
    compressed = split.kind == "warc.gz"
    with fs.open(split.path, "rb") as handle:
        at: int | None = _member_at(handle, split.start) if compressed else 0
        if split.start == 0 and at != 0:  # not a WARC file, or its first record is corrupt
            pos_id = f"{split.name}@0"
            found = "no WARC record in the file" if at is None else f"the first WARC record found is at byte {at}"
            yield Record(pos_id, pos_id, None, "error", f"no WARC record at the start of the file ({found})")
        while at is not None and (split.end is None or at < split.end):
            handle.seek(at)
            records = ArchiveIterator(handle)
            try:
                for record in records:
                    body, truncated = _payload(record)
                    offset = records.get_record_offset()
                    if split.end is not None and offset >= split.end:
                        return
                    at = offset + records.get_record_length()
                    if record.rec_type in DOCUMENT_TYPES:
                        yield _document(record, body, truncated, f"{split.name}@{offset}", io_spec)
                return
            except Exception as exc:  # warcio's ArchiveLoadFailed, zlib.error, EOFError on a cut member ...
                pos_id, why = f"{split.name}@{at}", f"WARC record cannot be read: {type(exc).__name__}: {exc}"
                yield Record(pos_id, pos_id, None, "error", why[:300])
            at = _member_at(handle, at + 1) if compressed else None


def _payload(record: Any) -> tuple[bytes, bool]:
    """The record's content (HTTP body for a response) and whether the block is shorter than its
    Content-Length says (a record cut short inside an intact gzip member)."""
    body = record.content_stream().read()
    remaining = getattr(record.raw_stream, "limit", 0) or 0
    return body, remaining > 0


def _document(record: Any, body: bytes, truncated: bool, pos_id: str, io_spec: IOSpec) -> Record:
    headers = record.rec_headers
    record_id = headers.get_header("WARC-Record-ID")
    row: dict[str, Any] = {
        io_spec.id_field: record_id,
        "url": headers.get_header("WARC-Target-URI"),
        "warc_record_id": record_id,
        "date": headers.get_header("WARC-Date"),
    }
    rid, refused = row_id(record_id, pos_id)
    kept = {**row, io_spec.text_field: ""}  # what a row the reader decides keeps of the record
    if refused or truncated:
        why = refused or f"WARC record is truncated ({len(body)} bytes of its payload read)"
        return Record(pos_id, rid, kept, "error", why)
    try:
        text, why = _text(record, body)
    except Exception as exc:  # the extractor on hostile HTML
        return Record(pos_id, rid, kept, "error", f"text extraction failed: {type(exc).__name__}: {exc}"[:300])
    if why is not None:
        return Record(pos_id, rid, kept, "filtered", why)
    from resiliparse.parse.lang import detect_fast

    row[io_spec.text_field] = text
    row["language"] = detect_fast(text)[0]
    return check_row(row, pos_id, io_spec)


def _text(record: Any, body: bytes) -> tuple[str, str | None]:
    """(the document's text, why it has none): HTML's main content, or a WET record's text."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding, detect_mime

    if record.rec_type == "conversion":
        text = bytes_to_str(body, detect_encoding(body)).strip()
        return text, None if text else "empty conversion record"
    if record.http_headers is not None:
        status = record.http_headers.get_statuscode() or ""
        if not status.startswith("2"):
            return "", f"HTTP status {status}"
        declared = record.http_headers.get_header("Content-Type") or ""
    else:
        declared = record.rec_headers.get_header("Content-Type") or ""
    mime = declared.split(";", 1)[0].strip().lower()
    if mime not in _HTML:
        return "", f"not HTML ({mime or 'no content type'})"
    sniffed = detect_mime(body)
    if sniffed.startswith(_BINARY) or sniffed in _BINARY_TYPES:
        return "", f"binary payload declared as {mime} ({sniffed})"
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse_from_bytes(body, detect_encoding(body))
    text = extract_plain_text(tree, main_content=True).strip()
    return text, None if text else "no text after extraction"


def _member_at(handle: Any, start: int) -> int | None:
    """The offset of the first gzip member at or after `start` that holds a WARC record; None if none."""
    handle.seek(start)
    base, tail = start, b""
    while chunk := handle.read(_SCAN_BYTES):
        data = tail + chunk
        found = data.find(_GZIP_MAGIC)
        while found != -1:
            if _starts_a_record(handle, base + found):
                return base + found
            found = data.find(_GZIP_MAGIC, found + 1)
        tail = data[-2:]
        base += len(data) - len(tail)
        handle.seek(base + len(tail))
    return None


def _starts_a_record(handle: Any, offset: int) -> bool:
    """A gzip member starts at `offset` and decompresses to the start of a WARC record."""
    here = handle.tell()
    try:
        handle.seek(offset)
        head = zlib.decompressobj(31).decompress(handle.read(4096), 16)
        return head.startswith(b"WARC/")
    except zlib.error:
        return False
    finally:
        handle.seek(here)
