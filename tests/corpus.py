"""Small synthetic corpora for runtime tests (the real bundled corpus is used by demo and e2e tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import zstandard

_REASONING = (
    "because the index is sorted the planner can stop early therefore the query is fast and if the "
    "table grows then the cost rises so we must reason about why the plan changes since each step "
    "implies a cost and hence the example shows how a reason leads to a result thus we see it"
)


def doc_text(i: int, words: int = 200) -> str:
    """A document that passes natural_reasoning's admission checks: English, dense reasoning cues,
    and datatrove's quality blocks (sentences with terminal punctuation, paragraphs, no repeats)."""
    rng = random.Random(i)
    base = _REASONING.split()
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 16))
        sentences.append(" ".join(rng.choice(base) for _ in range(n)).capitalize() + ".")
        left -= n
    paragraphs = [" ".join(sentences[k : k + 4]) for k in range(0, len(sentences), 4)]
    return f"Document {i}. " + "\n".join(paragraphs)


def write_jsonl(path: Path, n: int, start: int = 0, with_ids: bool = True, compress: bool = False) -> Path:
    rows = []
    for i in range(start, start + n):
        row = {"text": doc_text(i), "url": f"https://example.test/{i}"}
        if with_ids:
            row["id"] = f"doc-{i}"
        rows.append(json.dumps(row))
    data = ("\n".join(rows) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path
