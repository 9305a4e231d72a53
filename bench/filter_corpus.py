"""DCLM-like documents for the `filter` section: real English pages at web-crawl lengths.

    python bench/filter_corpus.py pages      # once, after `apt-get install postgresql-doc-15 python3.11-doc`

Sources: the bundled corpus (240 pages) plus every page of Debian's `postgresql-doc-15` (PostgreSQL
License) and `python3.11-doc` (PSF License), extracted the way scripts/build_corpus.py built the
bundled corpus. `pages` writes them to bench/data/doc-pages.jsonl.zst (committed, so the benchmark
needs no package). `documents` cuts them to lognormal lengths (median ~4 KB, tail to 100 KB, as in
DCLM): a document is a run of consecutive lines of one source, from a random line on.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "bench" / "data" / "doc-pages.jsonl.zst"
BUNDLED = ROOT / "matrix_provider" / "data" / "corpus"
DEBIAN = [
    (Path("/usr/share/doc/postgresql-doc-15/html"), "https://www.postgresql.org/docs/15/"),
    (Path("/usr/share/doc/python3.11/html"), "https://docs.python.org/3.11/"),
]
MEDIAN_CHARS, SIGMA, MIN_CHARS, MAX_CHARS = 4000, 1.0, 200, 100_000


def _read_zst_jsonl(path: Path) -> list[dict]:
    data = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def build_pages() -> None:
    """Every source page's text, bundled corpus first, into PAGES."""
    sys.path.insert(0, str(ROOT))
    from scripts.build_corpus import page_text

    rows = [r for path in sorted(BUNDLED.glob("*.jsonl.zst")) for r in _read_zst_jsonl(path)]
    seen = {r["url"] for r in rows}
    for root, base_url in DEBIAN:
        if not root.is_dir():
            raise SystemExit(f"{root} is missing: apt-get install postgresql-doc-15 python3.11-doc")
        for page in sorted(p for p in root.rglob("*.html") if "_static" not in p.parts):
            url = base_url + str(page.relative_to(root))
            text = page_text(page)
            if len(text) >= MIN_CHARS and url not in seen:
                rows.append({"text": text, "url": url})
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    PAGES.parent.mkdir(exist_ok=True)
    PAGES.write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"{len(rows)} pages, {len(data) / 1e6:.1f} MB of JSONL -> {PAGES}")


def documents(n: int, seed: int = 0) -> list[dict]:
    """`n` documents with lognormal lengths, each a run of real lines (ids doc-0..)."""
    rng = random.Random(seed)
    lines = [page["text"].splitlines() for page in _read_zst_jsonl(PAGES)]
    flat = [(i, j) for i, page in enumerate(lines) for j in range(len(page))]
    docs = []
    for k in range(n):
        target = min(MAX_CHARS, max(MIN_CHARS, int(rng.lognormvariate(math.log(MEDIAN_CHARS), SIGMA))))
        page, line = rng.choice(flat)
        taken, size = [], 0
        while size < target:  # past a page's end, on into the next page
            taken.append(lines[page][line])
            size += len(taken[-1]) + 1
            page, line = (page, line + 1) if line + 1 < len(lines[page]) else ((page + 1) % len(lines), 0)
        docs.append({"id": f"doc-{k}", "text": "\n".join(taken), "url": f"https://dclm-like.test/{k}"})
    return docs


def write(directory: Path, n: int, files: int) -> Path:
    """`n` documents over `files` JSONL files (datatrove's executor gives each task whole files)."""
    directory.mkdir(parents=True, exist_ok=True)
    outs = [(directory / f"part-{i:02d}.jsonl").open("w") for i in range(files)]
    for k, doc in enumerate(documents(n)):
        outs[k % files].write(json.dumps(doc) + "\n")
    for out in outs:
        out.close()
    return directory


if __name__ == "__main__":
    if sys.argv[1:] != ["pages"]:
        raise SystemExit(__doc__)
    build_pages()
