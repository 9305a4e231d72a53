"""What the readers make of the input: units of work (`Split`) and the records read from them.

A record's id is the id its row brings (a string or an integer) or, without one, its position id:
`<file>@<byte>`, `<file>:<line>`, `<file>#<row>` or `<unit>!unread`, the file relative to the input
root. That form is reserved: a row that brings an id of it is refused, so the two never collide.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from matrix_provider.runtime.spec import IOSpec

# The form of a position id (`<input file>@<byte>`, `:<line>`, `#<row>`, `<unit>!unread`): reserved,
# so that an id a row brings can never equal the position id of another row.
POSITION_ID = re.compile(
    r".*\.(jsonl|json|ndjson|parquet|pq|warc|wet)(\.gz|\.zst)?((@|:|#)\d+|(\[\d+:\d*\])?!unread)",
    re.IGNORECASE | re.DOTALL,
)


# What a truncated, corrupt or vanished file raises. Other I/O errors (timeouts, resets, expired
# credentials) are transient: they fail the unit's attempt, which the job hands out again.
@dataclass(frozen=True)
class Split:
    """A unit of work: a whole file, or a byte / row-group range of one."""

    path: str
    name: str  # relative to the input root
    kind: str  # "jsonl", "jsonl.gz", "jsonl.zst", "parquet"
    start: int = 0  # byte offset (plain JSONL) or first row group (Parquet)
    end: int | None = None
    size: int = 0
    identity: str = ""  # the file's version when it was listed (see `file_identity`)

    @property
    def key(self) -> str:
        """Readable name of the unit: file, then range."""
        return self.name if self.end is None and self.start == 0 else f"{self.name}[{self.start}:{self.end}]"

    @property
    def uid(self) -> str:
        """Short stable id (commit record and part file names): the unit and its file's version, so a
        file edited since its units were committed gives new units and is redone whole."""
        key = f"{self.key}|{self.identity}"
        return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass
class Record:
    pos_id: str
    id: str
    row: dict[str, Any] | None  # None for a bad line; what the reader kept of a record it decided
    status: str | None = None  # "error" or "filtered" when the reader decided the record itself
    reason: str | None = None


def row_id(raw_id: Any, pos_id: str) -> tuple[str, str | None]:
    """(the row's id, why it cannot keep the id it brought). Strings and integers are ids (`1` and
    `"1"` are the same); other JSON values and ids of a position id's form are refused."""
    if raw_id in (None, ""):
        return pos_id, None
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return pos_id, f"id is a {type(raw_id).__name__}, not a string or an integer"
    text = str(raw_id)
    if POSITION_ID.fullmatch(text):
        return pos_id, f"id {text[:80]!r} has the form of a position id, which names rows by their place in the input"
    return text, None


def check_row(row: dict[str, Any], pos_id: str, io_spec: IOSpec) -> Record:
    rid, refused = row_id(row.get(io_spec.id_field), pos_id)
    if refused:
        return Record(pos_id, rid, None, "error", refused)
    text = row.get(io_spec.text_field)
    if text is None:
        return Record(pos_id, rid, None, "error", f"missing field {io_spec.text_field!r}")
    if not isinstance(text, str):
        return Record(pos_id, rid, None, "error", f"field {io_spec.text_field!r} is not a string")
    if len(text) > io_spec.max_doc_bytes:
        return Record(
            pos_id, rid, None, "error", f"document is {len(text) / 1e6:.1f} M characters, over io.max_doc_bytes"
        )
    return Record(pos_id, rid, row)
