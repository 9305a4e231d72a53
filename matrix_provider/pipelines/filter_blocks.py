"""The datatrove side of natural_reasoning's admission filters (imported on first use: ~0.7 s).

`RegexWords` is the word splitter every block shares; `ReasoningHeuristics` wraps our own checks as
a datatrove filter, so datatrove's executor can run exactly the chain the partition drivers run.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import regex
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.c4_filters import C4QualityFilter
from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
from datatrove.utils.text import PUNCTUATION_SET, TERMINAL_PUNCTUATION, split_into_words
from datatrove.utils.word_tokenizers import WordTokenizer

from matrix_provider.pipelines.heuristics import heuristic_verdict

BLOCKS: dict[str, type[BaseFilter]] = {
    "fineweb_quality": FineWebQualityFilter,
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
    "c4_quality": C4QualityFilter,
}

_ENDS = "".join(sorted(TERMINAL_PUNCTUATION))


class RegexWords(WordTokenizer):
    """English words, numbers and single punctuation marks by one regex, in place of spaCy's
    `blank("en")` (datatrove's default needs spaCy, ~200 MB, and is 6-20x slower)."""

    _words = regex.compile("\\w+(?:['\u2019.-]\\w+)*|[^\\w\\s]")
    # A sentence ends at terminal punctuation or a line end (one linear scan, even on a huge line).
    _ends = regex.compile(rf"[{re.escape(_ENDS)}\n]+[\"'\u201d\u2019]?")

    def __init__(self) -> None:
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return self._words.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        sentences, start = [], 0
        for end in self._ends.finditer(text):
            if _initial(text, end.start()):
                continue  # "U.S." style initials do not end a sentence
            sentences.append(text[start : end.end()].strip())
            start = end.end()
        sentences.append(text[start:].strip())
        return [s for s in sentences if s]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for sentence in self.sent_tokenize(text):
            begin = text.index(sentence, start)
            start = begin + len(sentence)
            spans.append((begin, start))
        return spans

    def __reduce__(self) -> tuple[Any, ...]:  # datatrove's executor pickles the steps
        return (regex_words, ())


def _initial(text: str, at: int) -> bool:
    """A "." right after a lone capital letter."""
    return text[at] == "." and at >= 1 and text[at - 1].isupper() and (at < 2 or not text[at - 2].isalnum())


@functools.cache
def regex_words() -> RegexWords:
    """One splitter for all blocks: datatrove caches a text's split per (text, splitter)."""
    return RegexWords()


class ReasoningHeuristics(BaseFilter):
    """Our checks (length, English prose, reasoning-cue density) as a datatrove filter block."""

    name = "🧠 Reasoning heuristics"

    def __init__(self, thresholds: dict[str, float]) -> None:
        super().__init__()
        self.thresholds = thresholds

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = heuristic_verdict(doc.text, self.thresholds)
        return True if reason is None else (False, reason)


def _gopher_words(text: str) -> list[str]:
    """The words datatrove's Gopher rules count (any character that is not punctuation)."""
    return [w for w in split_into_words(text, regex_words()) if any(c not in PUNCTUATION_SET for c in w)]


def _mean_length(text: str) -> str:
    words = _gopher_words(text)
    return f"mean word length {sum(map(len, words)) / max(len(words), 1):.1f}"


def _alpha_share(text: str) -> str:
    words = split_into_words(text, regex_words())
    return f"{sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1):.2f} of words alphabetic"


# datatrove's reasons carry no numbers: the value a rule measured, recomputed for a dropped
# document where it is cheap (its word split is still in datatrove's cache).
_MEASURES = {
    "gopher_short_doc": lambda t: f"{len(_gopher_words(t))} words",
    "gopher_long_doc": lambda t: f"{len(_gopher_words(t))} words",
    "gopher_below_avg_threshold": _mean_length,
    "gopher_above_avg_threshold": _mean_length,
    "gopher_below_alpha_threshold": _alpha_share,
}


def measured(reason: str, text: str) -> str | None:
    """The measured value behind a datatrove reason, when it is cheap to say."""
    measure = _MEASURES.get(reason)
    return measure(text) if measure else None
