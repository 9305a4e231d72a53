"""WARC files written from real HTML pages (Debian's postgresql-doc-15), with faulty records among them.

Records are written with warcio, one gzip member each, as Common Crawl writes them. The faults are
the ones a crawl holds: a non-HTML response, a binary payload declared as HTML, an HTTP 404, a
record cut short inside its gzip member, bytes between members that are not gzip at all, and a
member whose WARC headers are broken; plus `warcinfo` and `request` records, which are not documents.
"""

from __future__ import annotations

import gzip
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

PAGES = Path("/usr/share/doc/postgresql-doc-15/html")
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000010") + bytes(range(256)) * 8


@dataclass
class Written:
    """What a WARC file holds: the URL of every document record, by what must become of it."""

    ok: list[str] = field(default_factory=list)  # real pages: rows with text
    titles: dict[str, str] = field(default_factory=dict)  # url -> the page's <title>, whitespace collapsed
    filtered: dict[str, str] = field(default_factory=dict)  # url -> the reason's start
    errors: int = 0  # records that cannot be read: error rows


def collapse(text: str) -> str:
    return " ".join(text.split())


def title(html_text: str) -> str:
    found = re.search(r"<title>(.*?)</title>", html_text, re.DOTALL)
    return collapse(html.unescape(found.group(1))) if found else ""


def pages(count: int, start: int = 0) -> list[Path]:
    found = sorted(PAGES.glob("*.html"))
    assert len(found) >= start + count, f"{PAGES} holds {len(found)} pages; install postgresql-doc-15"
    return found[start : start + count]


def _response(writer: WARCWriter, url: str, payload: bytes, ctype: str = "text/html", status: str = "200 OK"):
    http = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
    return writer.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=http)


def write_warc(path: Path, count: int, start: int = 0, faults: bool = True) -> Written:
    """A `.warc.gz` of `count` real pages (from page `start` on), the faults spread among them."""
    written = Written()
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=True)
    writer.write_record(writer.create_warcinfo_record(path.name, {"software": "matrix-provider tests"}))
    for i, page in enumerate(pages(count, start)):
        url = f"https://www.postgresql.org/docs/15/{page.name}"
        writer.write_record(writer.create_warc_record(url, "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")))
        writer.write_record(_response(writer, url, page.read_bytes()))
        written.ok.append(url)
        written.titles[url] = title(page.read_text(errors="replace"))
        if faults and i == count // 4:
            writer.write_record(_response(writer, "https://x.test/logo.png", PNG, "image/png"))
            writer.write_record(_response(writer, "https://x.test/fake.html", PNG))
            writer.write_record(_response(writer, "https://x.test/gone", b"<html>no</html>", status="404 Not Found"))
            written.filtered.update(
                {
                    "https://x.test/logo.png": "not HTML",
                    "https://x.test/fake.html": "binary payload",
                    "https://x.test/gone": "HTTP status 404",
                }
            )
        if faults and i == count // 2:
            out.write(_truncated_member(page.read_bytes()))
            out.write(b"these bytes are not a gzip member " * 4)
            out.write(gzip.compress(b"WARC/1.0\r\nWARC-Type: response\r\nthis is no header line\r\n\r\n"))
            written.errors += 3
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return written


def _truncated_member(html: bytes) -> bytes:
    """A whole gzip member holding a response record whose block ends 200 bytes before its Content-Length."""
    one = io.BytesIO()
    writer = WARCWriter(one, gzip=False)
    writer.write_record(_response(writer, "https://x.test/cut", html))
    raw = one.getvalue()
    return gzip.compress(raw[: len(raw) - 200])


def write_wet(path: Path, texts: dict[str, str]) -> None:
    """A `.warc.wet.gz` of `conversion` records (Common Crawl's extracted-text files)."""
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=True)
    for url, text in texts.items():
        record = writer.create_warc_record(
            url, "conversion", payload=io.BytesIO(text.encode()), warc_content_type="text/plain"
        )
        writer.write_record(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
