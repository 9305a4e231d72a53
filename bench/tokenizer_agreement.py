"""How often datatrove's blocks decide a document the same way with our regex word splitter as with
spaCy (datatrove's English default), and how much faster the splitter is.

    VENV/bin/python bench/tokenizer_agreement.py [N]   # a venv with datatrove, regex, zstandard and spacy

spaCy is not a dependency of the project (~200 MB); install it in a scratch venv to run this. The
documents are the filter section's (bench/filter_corpus.py), N of them (default 2000).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datatrove.data import Document  # noqa: E402
from datatrove.utils.text import split_into_parts  # noqa: E402

from bench import filter_corpus  # noqa: E402
from matrix_provider.pipelines.filter_blocks import BLOCKS, regex_words  # noqa: E402


def _verdict(step, text: str) -> str:
    result = step.filter(Document(text=text, id=""))
    return "keep" if result is True or (isinstance(result, tuple) and result[0]) else str(result[1])


def main(n: int) -> None:
    texts = [d["text"] for d in filter_corpus.documents(n)]
    print(f"{n} documents; block: same verdict with our splitter as with spaCy, microseconds a document")
    for name, cls in BLOCKS.items():
        ours, spacy = cls(language=regex_words()), cls(language="en")
        seconds = {}
        verdicts = {}
        for label, step in (("ours", ours), ("spacy", spacy)):
            split_into_parts.cache_clear()
            started = time.perf_counter()
            verdicts[label] = [_verdict(step, t) for t in texts]
            seconds[label] = time.perf_counter() - started
        same = sum(a == b for a, b in zip(verdicts["ours"], verdicts["spacy"], strict=True))
        keep = sum(v == "keep" for v in verdicts["ours"]), sum(v == "keep" for v in verdicts["spacy"])
        print(
            f"  {name:18s} {same}/{n} ({same / n:.1%}) same; kept {keep[0]} vs {keep[1]}; "
            f"{1e6 * seconds['ours'] / n:,.0f} vs {1e6 * seconds['spacy'] / n:,.0f} us"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
