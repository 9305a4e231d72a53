"""A document's keys for dedup: one exact key of its normalized text, one key per MinHash LSH band.

Text handling and parameters follow datatrove's MinHash dedup: `simplify_text` with its default
`TextNormConfig` (lower case, numbers to 0, punctuation and diacritics removed, whitespace
collapsed), word n-grams of the result, each n-gram hashed with 64-bit xxhash of its words joined
by spaces, `num_buckets` bands of `hashes_per_bucket` consecutive minimum hashes. After
`simplify_text` no punctuation is left, so we split words at whitespace where datatrove's
English default runs spaCy. The signature itself is datasketch's MinHash, scheme
`affine64` (64-bit, datatrove's default precision): a hash family of its own, so two documents
collide in a band with the same probability as in datatrove, not in the same bands.

Keys are 128-bit (xxh3, as two uint64): two different bands or texts never share a key in practice.
The exact key hashes the text after NFC normalization with whitespace runs collapsed, so copies
that differ only in line breaks or spacing are exact duplicates; case and punctuation count.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator

import numpy as np
import xxhash
from datasketch import MinHash
from datatrove.utils.text import TextNormConfig, simplify_text

from matrix_provider.dedup.params import DedupParams

_MASK = (1 << 64) - 1
_NORM = TextNormConfig()
EXACT_DOMAIN = b"exact\x00"  # keeps exact keys apart from band keys


def _key(data: bytes) -> tuple[int, int]:
    digest = xxhash.xxh3_128_intdigest(data)
    return digest >> 64, digest & _MASK


def exact_key(text: str) -> tuple[int, int]:
    normalized = " ".join(unicodedata.normalize("NFC", text).split())
    return _key(EXACT_DOMAIN + normalized.encode("utf-8", "surrogatepass"))


def shingles(text: str, n: int) -> set[bytes]:
    """The document's word n-grams after datatrove's normalization (none for fewer than n words)."""
    words = simplify_text(text, _NORM).split()
    return {" ".join(words[i : i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}


def _hash64(shingle: bytes) -> int:
    return xxhash.xxh64_intdigest(shingle)


class Fingerprinter:
    """Keys of documents under one set of parameters (the MinHash permutations are made once)."""

    def __init__(self, params: DedupParams):
        self.params = params
        self._template = MinHash(num_perm=params.num_perm, seed=params.seed, scheme="affine64", hashfunc=_hash64)

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature (num_perm uint64), or None when the text has fewer words than an n-gram."""
        grams = shingles(text, self.params.n_grams) if text else set()
        if not grams:
            return None
        minhash = MinHash(
            num_perm=self.params.num_perm,
            seed=self.params.seed,
            scheme="affine64",
            hashfunc=_hash64,
            permutations=self._template.permutations,
        )
        minhash.update_batch(grams)
        return minhash.hashvalues

    def band_keys(self, signature: np.ndarray) -> Iterator[tuple[int, int]]:
        r = self.params.hashes_per_bucket
        for band in range(self.params.num_buckets):
            yield _key(band.to_bytes(4, "little") + signature[band * r : (band + 1) * r].tobytes())

    def keys(self, text: str) -> Iterator[tuple[int, int, bool]]:
        """(hi, lo, is_exact) of every key the document is filed under."""
        if self.params.exact:
            yield (*exact_key(text), True)
        if self.params.near and (signature := self.signature(text)) is not None:
            for hi, lo in self.band_keys(signature):
                yield hi, lo, False
