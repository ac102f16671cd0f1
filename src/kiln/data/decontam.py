"""Decontamination: drop (or excise from) documents that share a word n-gram (default 13) with a benchmark.

Benchmark files are read once in the parent: `.jsonl` lines contribute every
string value of each object (question, choices, answer ...), other formats
their text. Their n-gram hashes are saved as a sorted uint64 array
(`ngrams.npy` in the stage's work folder) that each worker maps once. Words are
lower-cased `\\w+` runs, hashed by rensa (Rust, the same on every machine and
process, unlike Python's salted `hash`), and combined into n-gram hashes with
numpy, so a document costs a few vector operations, not a Python loop per word.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import rensa

from kiln.config import ConfigError, DecontaminateConfig
from kiln.data.readers import format_of
from kiln.data.records import ALL_KINDS, Doc, Drop

_WORD = re.compile(r"\w+")


def word_hashes(words: list[str]) -> np.ndarray:
    """One uint64 per (lower-cased) word."""
    return np.array(rensa.RMinHash.hash_token_sets([[w.lower() for w in words]])[0], dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of `n` consecutive word hashes (empty when fewer than n words)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            key = (key ^ hashes[i:i + m]) * np.uint64(0x100000001B3)
    return key


def benchmark_texts(path: str, key: str) -> list[str]:
    """Texts of one benchmark file; ConfigError naming `key` and the line when it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: benchmark file `{path}` does not exist")
    if format_of(p.name) != "jsonl":
        return [p.read_text(encoding="utf-8", errors="replace")]
    texts = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{key}: {path}:{i}: invalid JSON ({e})") from e
        texts.append(" ".join(_strings(obj)))
    return texts


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def build_index(cfg: DecontaminateConfig, out: Path) -> Path | None:
    """Write the sorted n-gram hashes of every benchmark file to `out`; None when there are none."""
    if not cfg.benchmarks:
        return None
    parts = [np.zeros(0, dtype=np.uint64)]
    for i, path in enumerate(cfg.benchmarks):
        for text in benchmark_texts(path, f"data.decontaminate.benchmarks[{i}]"):
            parts.append(ngram_hashes(word_hashes(_WORD.findall(text)), cfg.n))
    table = np.unique(np.concatenate(parts))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, table)
    return out


@functools.cache
def _load(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


@dataclasses.dataclass
class Decontaminate:
    """Drops documents with a benchmark n-gram (`contaminated`), or with `excise`, cuts the matching words."""

    cfg: DecontaminateConfig
    index_path: str
    name: str = "decontaminate"
    kinds: tuple[str, ...] = ALL_KINDS

    def __call__(self, doc: Doc) -> Doc | Drop:
        table = _load(self.index_path)
        words = list(_WORD.finditer(doc.text))   # on the text itself: lower() can change lengths
        if len(words) < self.cfg.n or not len(table):
            return doc
        grams = ngram_hashes(word_hashes([m.group() for m in words]), self.cfg.n)
        pos = np.searchsorted(table, grams)
        hit = np.flatnonzero(table[np.minimum(pos, len(table) - 1)] == grams)
        if not len(hit):
            return doc
        if self.cfg.action == "drop":
            return Drop(self.name, "contaminated")
        return self._excise(doc, words, hit)

    def _excise(self, doc: Doc, words: list[re.Match], hit: np.ndarray) -> Doc | Drop:
        covered = np.zeros(len(words) + 1, dtype=np.int64)   # word i is inside a matching n-gram
        np.add.at(covered, hit, 1)
        np.add.at(covered, hit + self.cfg.n, -1)
        inside = np.cumsum(covered[:-1]) > 0
        pieces, last = [], 0
        for i in np.flatnonzero(inside & ~np.concatenate(([False], inside[:-1]))).tolist():   # run starts
            j = i
            while j + 1 < len(words) and inside[j + 1]:
                j += 1
            pieces.append(doc.text[last:words[i].start()])
            last = words[j].end()
        pieces.append(doc.text[last:])
        text = "".join(pieces).strip()
        if not text:
            return Drop(self.name, "contaminated")
        return dataclasses.replace(doc, text=text, flags=doc.flags + ("excised",))
