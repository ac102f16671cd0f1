"""Decontamination: drop (or excise from) documents that share a word n-gram (default 13) with a benchmark.

`data.decontaminate.benchmarks` names registered benchmarks (`humaneval`,
`mmlu`: `kiln.data.benchmarks`, read from installed packages, offline),
`installed` (every registered one that is installed; the default) or files:
each object of a `.jsonl` file or `.json` array contributes every string value
(question, choices, answer ...), other formats their text; n-grams of numbers
and single characters alone (`1 2 3 ... 13`) are left out. All are read once in
the parent and their n-gram hashes saved as a sorted uint64 array
(`decontam-ngrams.npy` in the stage's work folder) that each worker maps once;
the run prints which benchmarks went in and which registered ones are not
installed. N-gram hashes are those of `ngrams.py` (MinHash's shingles too).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
from pathlib import Path

import numpy as np
import zstandard

from kiln.config import ConfigError, DecontaminateConfig
from kiln.config.data import BENCHMARKS_INSTALLED
from kiln.data import benchmarks as registry
from kiln.data.ngrams import WORD, ngram_hashes, word_hashes
from kiln.data.readers import format_of
from kiln.data.records import ALL_KINDS, Doc, Drop


def benchmark_ngrams(text: str, n: int) -> np.ndarray:
    """N-gram hashes of a benchmark text, less those made only of numbers and single characters.

    `0 0 0 ...`, `1 2 3 ... 13` or a run of primes in HumanEval's tests are no evidence that a document
    copied the benchmark; kept, they flagged 118 of 13,353 files of a Python install (doctest.py,
    heapq.py, numpy's tests) as HumanEval-contaminated.
    """
    words = WORD.findall(text)
    grams = ngram_hashes(word_hashes(words), n)
    if not len(grams):
        return grams
    content = np.fromiter((not (w.isdigit() or len(w) == 1) for w in words), dtype=np.int64, count=len(words))
    c = np.concatenate(([0], np.cumsum(content)))
    return grams[(c[n:] - c[:-n]) > 0]   # windows holding at least one real word


def benchmark_texts(path: str, key: str) -> list[str]:
    """Texts of one benchmark file; ConfigError naming `key` and the line when it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: benchmark file `{path}` does not exist (known benchmark names: "
                          f"{', '.join(registry.REGISTRY)}, or `{BENCHMARKS_INSTALLED}`)")
    if format_of(p.name) not in ("jsonl", "json"):
        return [_read_text(p)]
    text = _read_text(p)
    if format_of(p.name) == "json" and text.lstrip("\ufeff \t\r\n").startswith("["):
        return [" ".join(_strings(item)) for item in _json_array(text, path, key)]
    texts = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{key}: {path}:{i}: invalid JSON ({e})") from e
        texts.append(" ".join(_strings(obj)))
    return texts


def _json_array(text: str, path: str, key: str) -> list:
    try:   # benchmark files are small: read whole, unlike the data stage's inputs
        return json.loads(text.lstrip("\ufeff"))
    except ValueError as e:
        raise ConfigError(f"{key}: {path}: invalid JSON ({e})") from e


def _read_text(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".gz"):
        data = gzip.decompress(p.read_bytes())
    elif name.endswith(".zst"):
        with zstandard.ZstdDecompressor().stream_reader(p.open("rb")) as r:
            data = r.read()
    else:
        data = p.read_bytes()
    return data.decode("utf-8", errors="replace")


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def resolve(cfg: DecontaminateConfig) -> tuple[list[tuple[str, str]], list[registry.Benchmark]]:
    """(label, what) per benchmark to use, what being a registered name or a file path; and the registered
    benchmarks `installed` skipped. ConfigError naming the key for an unknown name, and (with the install
    command) for a benchmark named explicitly that is not installed. The data stage calls this before it
    reads anything: names are checked here, not at config load, because the registry is data-stage code."""
    chosen: list[tuple[str, str]] = []
    skipped: list[registry.Benchmark] = []
    for i, entry in enumerate(cfg.benchmarks):
        key = f"data.decontaminate.benchmarks[{i}]"
        if entry == BENCHMARKS_INSTALLED:
            chosen += [(b.name, b.name) for b in registry.installed()]
            skipped += registry.missing()
        elif entry.lower() in registry.REGISTRY:
            b = registry.get(entry)
            if b.path() is None:
                raise ConfigError(f"{key}={entry!r}: benchmark not installed; {b.install} "
                                  f"(or use `{BENCHMARKS_INSTALLED}` to take only what is installed)")
            chosen.append((b.name, b.name))
        elif any(c in entry for c in "/\\.") or Path(entry).is_file():   # a path: read (and checked) later
            chosen.append((key, entry))
        else:
            raise ConfigError(f"{key}={entry!r} is neither a known benchmark nor a file; known: "
                              f"{', '.join(registry.REGISTRY)} (or `{BENCHMARKS_INSTALLED}`: every one that is installed)")
    unique = list(dict.fromkeys(chosen))   # `installed` and a name may list one benchmark twice
    return unique, [b for b in dict.fromkeys(skipped) if b.name not in {w for _, w in unique}]


def build_index(cfg: DecontaminateConfig, out: Path) -> Path | None:
    """Write the sorted n-gram hashes of every benchmark to `out` (maybe empty: none installed); None when
    `benchmarks` is empty. Says which registered benchmarks were used and which are not installed."""
    if not cfg.benchmarks:
        return None
    chosen, skipped = resolve(cfg)
    parts, used = [np.zeros(0, dtype=np.uint64)], []
    for label, what in chosen:
        if what in registry.REGISTRY:
            parts.append(_registered_ngrams(what, str(registry.REGISTRY[what].path()), cfg.n))
            used.append(f"{what} ({len(registry.REGISTRY[what].texts())} items)")
        else:
            parts += [benchmark_ngrams(t, cfg.n) for t in benchmark_texts(what, label)]
            used.append(what)
    table = sorted_unique(np.concatenate(parts))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, table)
    print(_summary(used, {b.name: b.install for b in skipped}), flush=True)
    return out


def _summary(used: list[str], not_installed: dict[str, str]) -> str:
    line = "data: decontaminate against " + (", ".join(used) or "nothing")
    if not_installed:
        line += "; not installed: " + ", ".join(f"{k} ({cmd})" for k, cmd in not_installed.items())
    return line


@functools.lru_cache(maxsize=16)
def _registered_ngrams(name: str, path: str, n: int) -> np.ndarray:
    """Sorted unique n-gram hashes of a registered benchmark (cached per process: MMLU's take ~0.5 s)."""
    texts = registry.REGISTRY[name].texts()
    return sorted_unique(np.concatenate([np.zeros(0, dtype=np.uint64)] + [
        benchmark_ngrams(t, n) for t in texts]))


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique for a flat array, by sorting (numpy 2's hash-based np.unique is ~10x slower here)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    return a[np.concatenate(([True], a[1:] != a[:-1]))]


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
        if not len(table):
            return doc   # no benchmark installed
        if self.cfg.action == "drop":   # word strings only: 4x cheaper than match objects
            hit = self._hits(table, WORD.findall(doc.text))
            return Drop(self.name, "contaminated") if len(hit) else doc
        words = list(WORD.finditer(doc.text))   # positions in the text itself: lower() can change lengths
        hit = self._hits(table, [m.group() for m in words])
        return self._excise(doc, words, hit) if len(hit) else doc

    def _hits(self, table: np.ndarray, words: list[str]) -> np.ndarray:
        """Indices of the n-grams of `words` that are in the benchmark table."""
        if len(words) < self.cfg.n:
            return np.zeros(0, dtype=np.int64)
        grams = ngram_hashes(word_hashes(words), self.cfg.n)
        pos = np.searchsorted(table, grams)
        return np.flatnonzero(table[np.minimum(pos, len(table) - 1)] == grams)

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
        return doc.rewritten(text, "excised")
