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
            found = _visit_counts(self, text)
            if found is None:   # no features: py3langid's own path (uniform / floor scores)
                return super()._raw_score(text)
            features, counts = found
            # py3langid's `_sparse_score` on the same features in the same order, minus its dict round trip;
            # the rows are gathered into a reused buffer (a fresh ~0.6 MB array per document costs ~30% more).
            table = self._ptc32()
            buf = self.__dict__.get("_kiln_rows")
            if buf is None or len(buf) < len(features) or buf.shape[1] != table.shape[1]:
                buf = self._kiln_rows = np.empty((max(len(features), 4096), table.shape[1]), dtype=np.float32)
            rows = np.take(table, features, axis=0, out=buf[:len(features)], mode="clip")   # features are valid rows
            return np.log1p(counts.astype(np.float32)) @ rows + self.nb_pc

        def _ptc32(self):
            # The model stores float16; numpy casts the gathered rows to float32 before the product
            # anyway, so a float32 copy made once gives the same numbers ~4x faster (57 MB per process).
            table = self.nb_ptc
            if self.__dict__.get("_kiln_ptc_of") is not table:   # `set_languages` swaps the table
                self._kiln_ptc32, self._kiln_ptc_of = table.astype(np.float32), table
            return self._kiln_ptc32

    return Identifier.from_model_file(MODEL_FILE, norm_probs=True)


def reference_identifier():
    """py3langid unchanged (the test oracle)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _tables(li) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(row offset of the next state, feature of the next state, both indexed by row offset + byte;
    the root's row offset; deepest node), cached on the identifier. One gather per byte and step, not two.
    Built in int32 throughout (~0.1 s; int64 temporaries of 9.8M entries took ~0.7 s per worker)."""
    cached = li.__dict__.get("_kiln_tables")
    if cached is None:
        nm = np.frombuffer(li.tk_nextmove, dtype=np.dtype(li.tk_nextmove.typecode))
        rowbase = np.asarray(li._rowbase, dtype=np.int64)
        assert rowbase.max() + 256 < 2**31 and len(rowbase) < 2**31 and len(nm) == rowbase.max() + 256
        rowbase = rowbase.astype(np.int32)
        out = np.asarray(li.tk_output, dtype=np.int32)
        cached = li._kiln_tables = (rowbase[nm], out[nm], int(rowbase[0]), _depth(nm, rowbase))
        assert cached[3] >= 2, "the window walk in _visit_counts takes one step from the root, then more"
    return cached


def _depth(nm: np.ndarray, rowbase: np.ndarray) -> int:
    """Deepest automaton state (BFS from the root): shortest string reaching a node = the node's own string.
    States sharing a row have the same successors, so each row is expanded once, at its shallowest state;
    boolean masks dedupe each level (np.unique's sorts cost ~3x)."""
    rows = nm.reshape(-1, 256)   # (R, 256): next state per row and byte
    row_of = rowbase >> 8
    seen_state = np.zeros(len(rowbase), dtype=bool)
    seen_row = np.zeros(len(rows), dtype=bool)
    seen_state[0] = True
    frontier, d = np.zeros(1, dtype=np.intp), 0
    while len(frontier):
        new_rows = np.zeros(len(rows), dtype=bool)
        new_rows[row_of[frontier]] = True
        new_rows &= ~seen_row
        seen_row |= new_rows
        new_states = np.zeros(len(rowbase), dtype=bool)
        new_states[rows[new_rows].ravel()] = True
        new_states &= ~seen_state
        seen_state |= new_states
        frontier = np.flatnonzero(new_states)
        d += len(frontier) > 0
    return d


def _visit_counts(li, data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(features, counts) in first-seen order, as py3langid's `visit_counts`; None if no feature."""
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
        # the state after window [j, j + w) is the state after byte j + w - 1; two reused buffers, and
        # take(mode="clip") on indices that are in range by construction, save ~20% over fresh arrays
        m = n - w + 1
        base = next_base[root + b[:m]]
        idx = np.empty(m, dtype=np.int32)
        for k in range(1, w - 1):
            np.add(base, b[k:k + m], out=idx)
            np.take(next_base, idx, out=base, mode="clip")
        np.add(base, b[w - 1:], out=idx)
        np.take(next_out, idx, out=feats[w - 1:], mode="clip")
    pos = np.flatnonzero(feats >= 0)
    if not len(pos):
        return None
    return _first_seen_counts(feats[pos], pos)


def _first_seen_counts(feats: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct `feats` in order of first position, with counts. One plain sort of (feature, position) packed
    in an int64 instead of np.unique's stable argsort: ~4x cheaper."""
    key = np.sort((feats.astype(np.int64) << 32) | pos)
    feat = key >> 32
    starts = np.flatnonzero(np.concatenate(([True], feat[1:] != feat[:-1])))
    counts = np.diff(np.append(starts, len(key)))
    order = np.argsort(key[starts] & 0xFFFFFFFF)   # first positions are distinct: any sort is stable here
    return feat[starts][order], counts[order]


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
