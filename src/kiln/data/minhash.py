"""Near-duplicate removal: MinHash over word 5-grams, LSH banding, connected components by union-find.

Workers compute one band key per band for each kept document (`band_keys`,
batched per file); the parent (`NearDedup`) links every document to the first
one sharing any band key, and after all documents keeps one per connected
component: the first in input order (so the result does not depend on worker
count or timing). Defaults are FineWeb's: 112 hashes as 14 bands x 8 rows,
which finds pairs at Jaccard 0.8 with probability 1 - (1 - 0.8^8)^14 = 0.92
and at 0.75 with 0.70 (one pass; FineWeb's curve).

Shingling is the cost in Python, so it is vectorised: shingles are the word
n-gram hashes of `ngrams.py` (the ones decontamination matches, too), and rensa
turns all documents of a file into signatures in one call
(`digest_matrix_from_flat_token_hashes`).
"""

from __future__ import annotations

import numpy as np
import rensa

from kiln.config import NearDedupConfig
from kiln.data.ngrams import WORD, ngram_hashes, word_hashes

_MIX = np.uint64(0x9E3779B97F4A7C15)


def shingles(text: str, n: int) -> np.ndarray:
    """Distinct uint64 hashes of the word n-grams of `text` (all its words as one shingle if fewer than n)."""
    h = word_hashes(WORD.findall(text))
    return np.unique(ngram_hashes(h, min(n, len(h)))) if len(h) else h


def band_keys(texts: list[str], cfg: NearDedupConfig) -> np.ndarray:
    """(len(texts), bands) uint64: one key per LSH band; a row of zeros for a text without words."""
    out = np.zeros((len(texts), cfg.bands), dtype=np.uint64)
    sets = [shingles(t, cfg.ngram) for t in texts]
    has = [i for i, s in enumerate(sets) if len(s)]
    if not has:
        return out
    flat = np.concatenate([sets[i] for i in has])
    offsets = np.concatenate(([0], np.cumsum([len(sets[i]) for i in has]))).astype(np.uint64)
    num_perm = cfg.bands * cfg.rows
    sig = np.array(rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, cfg.seed).to_rows(),
                   dtype=np.uint64).reshape(len(has), cfg.bands, cfg.rows)
    key = np.zeros((len(has), cfg.bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(cfg.rows):   # 64-bit hash of the band's 8 values: equal bands give equal keys
            key = (key ^ sig[:, :, r]) * _MIX
            key ^= key >> np.uint64(29)
    key |= np.uint64(1)   # never 0: zero marks "no signature"
    out[has] = key
    return out


class NearDedup:
    """Union-find over documents that share a band key; `keep(i)` once every document was added."""

    name = "near_dedup"

    def __init__(self, bands: int) -> None:
        self.first: list[dict[int, int]] = [{} for _ in range(bands)]   # band -> key -> first doc index
        self.parent: list[int] = []

    def add(self, keys: np.ndarray) -> int:
        """Add the next document (its band keys, or zeros for none); returns its index."""
        i = len(self.parent)
        self.parent.append(i)
        if keys[0] == 0:
            return i
        for table, key in zip(self.first, keys.tolist()):
            j = table.setdefault(key, i)
            if j != i:
                self._union(i, j)
        return i

    def _find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:   # path compression
            parent[i], i = root, parent[i]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:   # the smaller index (earlier document) is the root: it is the one kept
            self.parent[max(ra, rb)] = min(ra, rb)

    def keep(self, i: int) -> bool:
        return self._find(i) == i

    def clusters(self) -> int:
        """Components with more than one document."""
        roots = [self._find(i) for i in range(len(self.parent))]
        counts = np.bincount(np.array(roots, dtype=np.int64), minlength=1) if roots else np.zeros(0)
        return int((counts > 1).sum())
