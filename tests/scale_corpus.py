"""Large corpora of tiny rows, for tests that measure how state grows with the number of rows.

Rows are tiny so that the rows themselves cost little: what grows with the row count is then the
runtime's own bookkeeping. Files are written streaming, a batch at a time, so a million rows never
sit in memory at once.
"""

from __future__ import annotations

from pathlib import Path

import zstandard

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo")
_WORDS += ("lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform")
_BATCH = 10_000


def tiny_line(i: int) -> str:
    """Row `i` as one JSON line; built by hand (no escaping needed) because json.dumps is the slow part."""
    n = len(_WORDS)
    text = f"{_WORDS[i % n]} {_WORDS[(i // n) % n]} {_WORDS[(i * 7) % n]} row {i}"
    return f'{{"id": "r{i}", "text": "{text}", "url": "https://s.test/{i}"}}\n'


def _write_file(path: Path, start: int, count: int) -> None:
    """One `.jsonl.zst` file of rows start..start+count, compressed batch by batch."""
    compressor = zstandard.ZstdCompressor(level=1)
    with path.open("wb") as raw, compressor.stream_writer(raw) as out:
        for lo in range(start, start + count, _BATCH):
            hi = min(lo + _BATCH, start + count)
            out.write("".join(tiny_line(i) for i in range(lo, hi)).encode())


def write_tiny_corpus(dest: Path, rows: int, files: int) -> Path:
    """`files` files under `dest` holding `rows` rows in all (ids r0..r<rows-1>); returns `dest`."""
    if files < 1 or rows < 0:
        raise ValueError(f"need files >= 1 and rows >= 0, got files={files} rows={rows}")
    dest.mkdir(parents=True, exist_ok=True)
    per_file, extra = divmod(rows, files)
    start = 0
    for f in range(files):
        count = per_file + (1 if f < extra else 0)
        _write_file(dest / f"shard-{f:05d}.jsonl.zst", start, count)
        start += count
    return dest
