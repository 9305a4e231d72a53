"""Build the bundled demo corpus (DCLM layout: .jsonl.zst with `text` and `url`) from real pages.

Sources are Debian's documentation packages: postgresql-doc-15 (PostgreSQL License) and
python3.11-doc (PSF License). Run once by a developer after
`apt-get install postgresql-doc-15 python3.11-doc`; the output is committed under
matrix_provider/data/corpus/ so nothing is fetched at run time.
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import zstandard

SOURCES = [
    ("pg-docs", Path("/usr/share/doc/postgresql-doc-15/html"), "https://www.postgresql.org/docs/15/", 180),
    ("py-docs", Path("/usr/share/doc/python3.11/html"), "https://docs.python.org/3.11/", 60),
]
SKIP_TAGS = {"script", "style", "nav", "head"}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in SKIP_TAGS:
            self.skip += 1
        elif tag in ("p", "div", "br", "li", "h1", "h2", "h3", "pre", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIP_TAGS and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def page_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    return "\n".join(line for line in lines if line)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, root, base_url, count in SOURCES:
        pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts)
        step = max(1, len(pages) // count)
        rows = []
        for page in pages[::step][:count]:
            text = page_text(page)
            if len(text) >= 200:
                rows.append({"text": text, "url": base_url + str(page.relative_to(root))})
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (out / f"{name}-0000.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
        print(f"{name}: {len(rows)} documents, {len(data) / 1e6:.1f} MB of JSONL")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "matrix_provider/data/corpus")
