"""Word n-gram hashes: the one definition MinHash shingles (`minhash.py`) and decontamination (`decontam.py`) share.

Words are `\\w+` runs, compared in lower case; each is hashed to uint64 by rensa (Rust: the same on every
machine and process, unlike Python's salted `hash`), and the hash of n consecutive words is folded from
theirs with numpy (FNV-style xor-multiply), so a document costs a few vector operations, not a Python loop
per word.
"""

from __future__ import annotations

import re

import numpy as np
import rensa

WORD = re.compile(r"\w+")
_FNV_PRIME = np.uint64(0x100000001B3)


def word_hashes(words: list[str]) -> np.ndarray:
    """(N,) uint64: the hash of each word's lower-case form."""
    # Per word, not text.lower() before splitting: lower() can change a text's word boundaries ("İ" becomes
    # "i" + a combining dot, which is not \w), and decontamination's excise needs the words of the text itself.
    return np.array(rensa.RMinHash.hash_token_sets([[w.lower() for w in words]])[0], dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """(max(N - n + 1, 0),) uint64: the hash of every run of `n` consecutive word hashes, in text order."""
    assert n >= 1, n
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):   # wrapping modulo 2^64 is the hash
        for i in range(n):
            key = (key ^ hashes[i:i + m]) * _FNV_PRIME
    return key
