"""A corpus with planted duplicates, and how a dedup's kept set scores on it against the truth.

Base documents are real pages (bench/data/doc-pages.jsonl.zst) of 150-1000 words with no natural
near-duplicate among them (no pair of 5-gram shingle sets with Jaccard >= 0.2). Each family is a
base and its copies:

- `near` pairs: a copy edited (words substituted, deleted, inserted at random places, with words of
  other pages) until the Jaccard similarity of its shingle set with the base's is at a target:
  0.8, 0.85, 0.9, 0.95 (to be removed), 0.7 (the band where MinHash LSH with 14 x 8 catches about
  half: reported, not scored), 0.3 and 0.5 (to be kept). The measured similarity is recorded.
- `exact` families: one or two copies that differ from the base only in whitespace.
- singletons.

Shingles are `matrix_provider.dedup.fingerprint.shingles`: datatrove's normalization and 5-grams.
Rows are shuffled and dealt over a few JSONL files, so a copy comes before its base about half the time.
"""

from __future__ import annotations

import collections
import functools
import gzip
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import zstandard
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from matrix_provider.dedup.fingerprint import shingles

PAGES = Path(__file__).resolve().parent / "data" / "doc-pages.jsonl.zst"
SCORED_LEVELS = (0.8, 0.85, 0.9, 0.95)
KEPT_LEVELS = (0.3, 0.5)
GRAY_LEVELS = (0.7,)
DUPLICATE_J, DISTINCT_J = 0.8, 0.6  # measured: a pair at or above is to be removed, one below to be kept
N_GRAMS = 5
_WORD = re.compile(r"\S+")
_NORM = TextNormConfig()


@dataclass
class Family:
    ids: list[str]  # base first
    kind: str  # "near", "exact", "single"
    jaccard: float = 1.0  # measured, base vs copy (near families)
    target: float = 1.0


@dataclass
class Corpus:
    files: list[Path]
    families: list[Family]
    rows: int = 0
    texts: dict[str, str] = field(default_factory=dict)


def jaccard(a: set[bytes], b: set[bytes]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _pages() -> list[str]:
    data = zstandard.ZstdDecompressor().stream_reader(PAGES.open("rb")).read()
    texts = [json.loads(line)["text"] for line in data.decode().splitlines() if line.strip()]
    return [t for t in texts if 150 <= len(t.split()) <= 1000]


def distinct_pages(max_jaccard: float = 0.2) -> list[str]:
    """Pages of which no two have shingle sets with Jaccard >= max_jaccard (an inverted index finds
    every pair that shares a shingle held by at most 100 pages; commoner shingles are boilerplate)."""
    texts = _pages()
    sets = [shingles(t, N_GRAMS) for t in texts]
    postings: dict[bytes, list[int]] = collections.defaultdict(list)
    for i, grams in enumerate(sets):
        for gram in grams:
            postings[gram].append(i)
    pairs = {pair for docs in postings.values() if 1 < len(docs) <= 100 for pair in itertools.combinations(docs, 2)}
    close = {i for a, b in pairs if jaccard(sets[a], sets[b]) >= max_jaccard for i in (a, b)}
    return [t for i, t in enumerate(texts) if i not in close and sets[i]]


def edit_to(text: str, target: float, vocabulary: list[str], rng: random.Random) -> tuple[str, float]:
    """A copy of `text` edited at random places until its shingle Jaccard with `text` is ~target."""
    spans = [m.span() for m in _WORD.finditer(text)]
    ops = [(rng.randrange(len(spans)), rng.choice("sdi"), rng.choice(vocabulary)) for _ in range(len(spans))]
    base = shingles(text, N_GRAMS)
    # simplify_text works word by word, so the words of an edited copy are those of its tokens
    words_of = functools.cache(lambda token: simplify_text(token, _NORM).split())
    tokens = [text[a:b] for a, b in spans]

    def edited(k: int) -> list[str]:
        edits = {pos: (op, word) for pos, op, word in ops[:k]}
        out = []
        for pos, token in enumerate(tokens):
            op, word = edits.get(pos, ("", ""))
            out.append({"s": word, "d": "", "i": f"{word} {token}"}.get(op, token))
        return out

    @functools.cache
    def similarity(k: int) -> float:
        words = [w for token in edited(k) for part in token.split(" ") for w in words_of(part)]
        grams = {" ".join(words[i : i + N_GRAMS]).encode() for i in range(len(words) - N_GRAMS + 1)}
        return jaccard(base, grams)

    # An edit changes about N_GRAMS shingles, so J(k) ~ (n - 5k) / (n + 5k): start there, then bisect
    # the bracket around it (similarity falls as edits add up) down to the last count above the target.
    guess = round(len(base) * (1 - target) / (N_GRAMS * (1 + target)))
    low, high = max(guess // 2, 0), min(guess * 2 + 2, len(ops))
    while similarity(low) < target and low > 0:
        low //= 2
    while similarity(high) > target and high < len(ops):
        high = min(high * 2, len(ops))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if similarity(mid) > target else (low, mid)
    # the most edits that keep J at or above the target, and at least one (a copy is never exact)
    k = max(low if similarity(low) >= target else high, 1)
    out, last = [], 0
    for (start, end), token in zip(spans, edited(k), strict=True):
        out.append(text[last:start] + token)
        last = end
    copy = "".join(out) + text[last:]
    return copy, jaccard(base, shingles(copy, N_GRAMS))


def _rewrap(text: str, rng: random.Random) -> str:
    """The same words with other whitespace: lines joined, extra spaces, a trailing newline."""
    words = text.split()
    return "".join(w + rng.choice([" ", "  ", "\n", " \n "]) for w in words)


def build(
    folder: Path,
    *,
    near_per_level: int = 50,
    far_per_level: int = 40,
    gray_per_level: int = 30,
    exact_families: int = 40,
    singles: int = 150,
    files: int = 4,
    seed: int = 7,
) -> Corpus:
    rng = random.Random(seed)
    pages = distinct_pages()
    rng.shuffle(pages)
    vocabulary = sorted({w for page in pages[:50] for w in page.split() if w.isalpha()})
    levels = [(t, near_per_level) for t in SCORED_LEVELS]
    levels += [(t, far_per_level) for t in KEPT_LEVELS] + [(t, gray_per_level) for t in GRAY_LEVELS]
    needed = sum(n for _, n in levels) + exact_families + singles
    if needed > len(pages):
        raise ValueError(f"{needed} base pages wanted, {len(pages)} distinct ones exist")
    bases = iter(pages)
    rows: list[dict[str, str]] = []
    families: list[Family] = []
    texts: dict[str, str] = {}

    def add(text: str) -> str:
        doc_id = f"doc-{rng.getrandbits(40):010x}"
        rows.append({"id": doc_id, "text": text})
        texts[doc_id] = text
        return doc_id

    for target, count in levels:
        for _ in range(count):
            base = next(bases)
            copy, measured = edit_to(base, target, vocabulary, rng)
            families.append(Family([add(base), add(copy)], "near", measured, target))
    for i in range(exact_families):
        base = next(bases)
        copies = [_rewrap(base, rng) for _ in range(1 + i % 2)]
        families.append(Family([add(base), *(add(c) for c in copies)], "exact"))
    for _ in range(singles):
        families.append(Family([add(next(bases))], "single"))
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"docs-{i:02d}.jsonl" for i in range(files)]
    for i, path in enumerate(paths):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[i::files]))
    return Corpus(paths, families, len(rows), texts)


@dataclass
class Score:
    """How a kept set does against the planted truth."""

    recall: float  # near pairs measured at J >= 0.8 with exactly one member kept
    precision: float  # removals of a member of such a pair, of all removals except exact copies and gray pairs
    exact_removed: int  # exact copies removed (of `exact_copies`)
    exact_copies: int
    caught_by_level: dict[float, float]  # share of near families with one member removed, per target


def score(corpus: Corpus, kept: set[str]) -> Score:
    right = wrong = 0
    positives: list[bool] = []
    caught: dict[float, list[bool]] = collections.defaultdict(list)
    exact_removed = exact_copies = 0
    for family in corpus.families:
        removed = sum(doc_id not in kept for doc_id in family.ids)
        if family.kind == "exact":
            exact_copies += len(family.ids) - 1
            exact_removed += removed if removed < len(family.ids) else removed - 1
            wrong += removed == len(family.ids)
        elif family.kind == "near":
            caught[family.target].append(removed == 1)
            if family.jaccard >= DUPLICATE_J:
                positives.append(removed == 1)
                right += removed == 1
                wrong += removed == 2
            elif family.jaccard < DISTINCT_J:
                wrong += removed
        else:
            wrong += removed
    return Score(
        recall=sum(positives) / len(positives),
        precision=right / (right + wrong) if right + wrong else 1.0,
        exact_removed=exact_removed,
        exact_copies=exact_copies,
        caught_by_level={t: sum(v) / len(v) for t, v in sorted(caught.items())},
    )


def agreement(corpus: Corpus, kept_a: set[str], kept_b: set[str]) -> float:
    """Of the families where either kept set removes something, the share where both remove as many."""
    touched = same = 0
    for family in corpus.families:
        removed_a = sum(i not in kept_a for i in family.ids)
        removed_b = sum(i not in kept_b for i in family.ids)
        if removed_a or removed_b:
            touched += 1
            same += removed_a == removed_b
    return same / touched if touched else 1.0


class _Words(WordTokenizer):
    """Words split at whitespace: the splitter `matrix dedup` uses after `simplify_text`."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def datatrove_kept(corpus: Corpus, workdir: Path) -> set[str]:
    """Ids that datatrove's own MinHash dedup keeps: its four stages with `LocalPipelineExecutor`,
    its `MinhashConfig` defaults (5-grams, 14 x 8, seed 1, 64-bit xxhash), our word splitter."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()
    folder = str(corpus.files[0].parent)
    sigs, buckets, remove, kept_folder = (str(workdir / name) for name in ("sigs", "buckets", "remove", "kept"))
    tasks = len(corpus.files)

    def stage(name: str, pipeline: list, n: int) -> None:
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=1, logging_dir=str(workdir / "logs" / name)).run()

    stage("signatures", [JsonlReader(folder), MinhashDedupSignature(sigs, config, _Words())], tasks)
    stage("buckets", [MinhashDedupBuckets(sigs, buckets, config=config)], config.num_buckets)
    stage("clusters", [MinhashDedupCluster(buckets, remove, config=config)], 1)
    stage("filter", [JsonlReader(folder), MinhashDedupFilter(remove), JsonlWriter(kept_folder)], tasks)
    kept: set[str] = set()
    for path in (workdir / "kept").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as handle:
            kept.update(json.loads(line)["id"] for line in handle)
    return kept
