"""Language identification with py3langid, whose model ships inside the wheel (works offline).

Why not fastText's `lid.176.ftz` (FineWeb's choice): it is a separate download
from a hub these machines cannot reach, and no PyPI package ships it; see
docs/decisions.md for the measurement. The model loads once per process (~0.5 s).

Speed: py3langid counts its byte n-gram features by walking an Aho-Corasick
automaton one byte at a time in a Python loop (~7 MB/s). The automaton's state
after byte i is the longest suffix of the text so far that is a trie node, and
no node is deeper than `_depth` bytes, so the state depends only on the last
`_depth` bytes: walking every window of that many bytes from the root, all
windows at once in numpy, gives the same states and the same feature counts.
The counts go to py3langid's own scoring in the same (first-seen) order, so
scores are bit-identical (checked against py3langid in tests/data).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kiln.config import LanguageConfig
from kiln.data.records import Doc, Drop

MAX_CHARS = 20_000
"""Classify at most this many characters: the language is settled long before, and time grows with length."""


@functools.cache
def identifier():
    """py3langid's identifier with the vectorised feature count (see the module docstring)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    class Identifier(LanguageIdentifier):
        def _raw_score(self, text):
            visits = _visit_counts(self, text)
            if visits is None:   # no features: py3langid's own path (uniform / floor scores)
                return super()._raw_score(text)
            return self._sparse_score(visits, self.nb_ptc)

        def _sparse_score(self, visits, table):
            # The model stores float16; numpy casts the gathered rows to float32 before the product
            # anyway, so a float32 copy made once gives the same numbers ~4x faster (57 MB per process).
            if table is self.nb_ptc:
                if self.__dict__.get("_kiln_ptc_of") is not table:
                    self._kiln_ptc32, self._kiln_ptc_of = table.astype(np.float32), table
                table = self._kiln_ptc32
            return super()._sparse_score(visits, table)

    return Identifier.from_model_file(MODEL_FILE, norm_probs=True)


def reference_identifier():
    """py3langid unchanged (the test oracle)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _tables(li) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(row offset of the next state, feature of the next state, both indexed by row offset + byte;
    the root's row offset; deepest node), cached on the identifier. One gather per byte and step, not two."""
    cached = li.__dict__.get("_kiln_tables")
    if cached is None:
        nm = np.frombuffer(li.tk_nextmove, dtype=np.dtype(li.tk_nextmove.typecode)).astype(np.int64)
        rowbase = np.asarray(li._rowbase, dtype=np.int64)
        out = np.asarray(li.tk_output, dtype=np.int64)
        assert rowbase.max() + 256 < 2**31 and len(rowbase) < 2**31
        cached = li._kiln_tables = (rowbase[nm].astype(np.int32), out[nm].astype(np.int32), int(rowbase[0]),
                                   _depth(nm, rowbase))
    return cached


def _depth(nm: np.ndarray, rowbase: np.ndarray) -> int:
    """Deepest automaton state (BFS from the root): shortest string reaching a node = the node's own string."""
    n = len(rowbase)
    depth = np.full(n, -1, dtype=np.int64)
    depth[0] = 0
    frontier, d = np.array([0]), 0
    while len(frontier):
        nxt = nm[(rowbase[frontier][:, None] + np.arange(256)[None, :]).ravel()]
        nxt = np.unique(nxt[depth[nxt] < 0])
        d += 1
        depth[nxt] = d
        frontier = nxt
    return int(depth.max())


def _visit_counts(li, data: bytes) -> dict[int, int] | None:
    """{feature: count} in first-seen order, as py3langid's `visit_counts`; None if no feature."""
    next_base, next_out, root, w = _tables(li)
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    n = len(b)
    if n == 0:
        return None
    feats = np.empty(n, dtype=np.int32)
    base = root
    for i in range(min(w - 1, n)):   # the first bytes: too few for a full window, walk them
        feats[i] = next_out[base + b[i]]
        base = int(next_base[base + b[i]])
    if n >= w:
        m = n - w + 1
        base = np.full(m, root, dtype=np.int32)
        for k in range(w - 1):   # the state after window [j, j + w) is the state after byte j + w - 1
            base = next_base[base + b[k:k + m]]
        feats[w - 1:] = next_out[base + b[w - 1:]]
    feats = feats[feats >= 0]
    if not len(feats):
        return None
    uniq, first, counts = np.unique(feats, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return dict(zip(uniq[order].tolist(), counts[order].tolist()))


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language."""
    lang, score = identifier().classify(text[:MAX_CHARS].replace("\n", " "))
    return lang, float(score)


@dataclasses.dataclass
class LanguageFilter:
    """Keeps documents in `cfg.languages` scoring >= `cfg.min_score`; drops `language_<code>` or `low_score`."""

    cfg: LanguageConfig
    name: str = "language"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        lang, score = detect(doc.text)
        if lang not in self.cfg.languages:
            return Drop(self.name, f"language_{lang}")
        if score < self.cfg.min_score:
            return Drop(self.name, "low_score")
        return doc
