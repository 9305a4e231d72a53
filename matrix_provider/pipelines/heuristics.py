"""natural_reasoning's own checks (one regex pass over the words): too short, not English prose,
few reasoning cues. Apart from doc_filters.py, so datatrove's blocks (filter_blocks.py) can use them
without an import circle."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

HEURISTIC_DEFAULTS = {"min_words": 150, "min_stopword_share": 0.15, "min_cues_per_1000_words": 24.0}

_WORD = re.compile(r"[A-Za-z']+")
_STOPWORDS = frozenset(
    [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "it",
        "for",
        "as",
        "with",
        "be",
        "on",
        "this",
        "are",
        "by",
        "not",
        "or",
        "can",
        "an",
        "if",
    ]
)
_CUES = frozenset(
    [
        "because",
        "therefore",
        "thus",
        "hence",
        "since",
        "so",
        "why",
        "how",
        "if",
        "then",
        "must",
        "implies",
        "means",
        "example",
        "reason",
        "consequently",
        "however",
        "although",
        "whereas",
        "suppose",
        "assume",
    ]
)


def heuristic_verdict(text: str, params: dict[str, Any]) -> str | None:
    """None when the document may hold reasoning, else why it is filtered (our own checks)."""
    counts = Counter(map(str.lower, _WORD.findall(text)))  # one pass; counting beats a word list
    words = counts.total()
    if words < params["min_words"] or not words:
        return f"too short ({words} words)"
    stop_share = sum(counts[w] for w in _STOPWORDS) / words
    if stop_share < params["min_stopword_share"]:
        return f"not English prose (stopword share {stop_share:.2f})"
    cue_density = 1000 * sum(counts[w] for w in _CUES) / words
    if cue_density < params["min_cues_per_1000_words"]:
        return f"few reasoning cues ({cue_density:.1f} per 1000 words)"
    return None
