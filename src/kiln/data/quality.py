"""Heuristic quality filters with their published defaults: Gopher quality and repetition, C4, FineWeb, code.

The prose rules follow datatrove's implementations (`GopherQualityFilter`,
`GopherRepetitionFilter`, `C4QualityFilter`, `FineWebQualityFilter`); reasons
keep datatrove's names so a report reads like theirs. Differences, on purpose:
- words come from one regex (`\\w+` runs and single punctuation marks), not
  NLTK's tokenizer: ~10x faster, and the thresholds were tuned on word counts
  that differ from it by a few percent at most;
- duplicated 5-10-gram characters are counted on hashed n-grams, vectorised:
  an n-gram counts as duplicated when an equal one starts earlier and does not
  overlap the last counted one (datatrove walks the text in Python);
- C4 keeps blank lines between kept lines (datatrove drops them and with
  them every paragraph break).
Code gets StarCoder's rules instead: prose rules would drop every source file.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np

from kiln.config import C4Config, CodeQualityConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from kiln.data.records import Doc, Drop

_WORD = re.compile(r"\w+|[^\w\s]")
_PUNCT_ONLY = re.compile(r"^[^\w\s]+$")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
"""Gopher's stop words: a real English document holds at least two of them."""
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", ")", ":", ";", "\u3002", "\uff01", "\uff1f",
                        "\u2026")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def words_of(text: str) -> list[str]:
    """Words and punctuation marks, as the Gopher rules count them (one-entry cache: steps share it)."""
    if _cache[0] is not text:
        _cache[0], _cache[1] = text, _WORD.findall(text)
    return _cache[1]


_cache: list = [None, []]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of elements seen before, their characters): datatrove's `find_duplicates`."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


@dataclasses.dataclass
class GopherQuality:
    cfg: GopherQualityConfig
    name: str = "gopher_quality"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        reason = self.reason(doc.text)
        return Drop(self.name, reason) if reason else doc

    def reason(self, text: str) -> str | None:
        c = self.cfg
        words = words_of(text)
        real = [w for w in words if not _PUNCT_ONLY.match(w)]
        n = len(real)
        if n < c.min_words:
            return "gopher_short_doc"
        if n > c.max_words:
            return "gopher_long_doc"
        avg = sum(map(len, real)) / n
        if avg < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > c.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n > c.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        if (text.count("...") + text.count("\u2026")) / n > c.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        if sum(s.lstrip().startswith(("\u2022", "-")) for s in lines) / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if sum(s.rstrip().endswith(("...", "\u2026")) for s in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if sum(any(ch.isalpha() for ch in w) for w in words) / n < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if sum(w.lower() in STOP_WORDS for w in real) < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


@dataclasses.dataclass
class GopherRepetition:
    cfg: GopherRepetitionConfig
    name: str = "gopher_repetition"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        reason = self.reason(doc.text)
        return Drop(self.name, reason) if reason else doc

    def reason(self, text: str) -> str | None:
        c = self.cfg
        size = max(len(text), 1)
        paragraphs = _PARAGRAPHS.split(text.strip())
        n, chars = _duplicates(paragraphs)
        if n / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / size > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        n, chars = _duplicates(lines)
        if n / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if chars / size > c.dup_line_char_frac:
            return "dup_line_char_frac"
        words = words_of(text)
        if len(words) < 2:
            return None
        ids, lens = _word_ids(words)
        for n_, frac in zip((2, 3, 4), c.top_n_grams):
            if _top_ngram_chars(ids, lens, n_) / size > frac:
                return f"top_{n_}_gram"
        for n_, frac in zip(range(5, 11), c.dup_n_grams):
            if _dup_ngram_chars(ids, lens, n_) / size > frac:
                return f"duplicated_{n_}_n_grams"
        return None


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
    return ids, np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per n-gram start (exact for < 2^16 distinct words per 4-gram, else a hash)."""
    m = len(ids) - n + 1
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            key = key * np.uint64(0x100000001B3) + ids[i:i + m] + np.uint64(1)
    return key


def _ngram_chars(lens: np.ndarray, n: int) -> np.ndarray:
    csum = np.concatenate(([0], np.cumsum(lens)))
    return csum[n:] - csum[:-n] + (n - 1)   # joined with spaces, as datatrove's get_n_grams


def _top_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int) -> int:
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    return int(_ngram_chars(lens, n)[first[top]]) * int(counts[top])


def _dup_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int) -> int:
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    repeats = np.flatnonzero(first[inverse] < np.arange(len(keys)))
    if not len(repeats):
        return 0
    chars = _ngram_chars(lens, n)
    total, next_free = 0, -1
    for i in repeats.tolist():   # only repeats are walked: few in normal text
        if i >= next_free:
            total += int(chars[i])
            next_free = i + n
    return total


@dataclasses.dataclass
class C4Filter:
    """Removes lines (no terminal punctuation, < 3 words, javascript, policy text); drops documents."""

    cfg: C4Config
    name: str = "c4"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        c = self.cfg
        kept, sentences = [], 0
        for line in doc.text.splitlines():
            line = line.strip()
            if not line:   # unlike datatrove, keep paragraph breaks: blank lines are layout, not content
                if kept and kept[-1]:
                    kept.append("")
                continue
            words = line.split()
            if any(len(w) > c.max_word_length for w in words):
                continue
            line = _CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < c.min_words_per_line:
                continue
            lower = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in lower:
                return Drop(self.name, "lorem_ipsum")
            if c.filter_javascript and "javascript" in lower:
                continue
            if c.filter_curly_brace and "{" in line:
                return Drop(self.name, "curly_bracket")
            if c.filter_policy and any(p in lower for p in C4_POLICY):
                continue
            sentences += len(_SENTENCE_END.findall(line)) or 1
            kept.append(line)
        if sentences < c.min_sentences:
            return Drop(self.name, "too_few_sentences")
        text = "\n".join(kept).strip()
        if text == doc.text:
            return doc
        return dataclasses.replace(doc, text=text, flags=doc.flags + ("c4_lines_removed",))


@dataclasses.dataclass
class FineWebQuality:
    cfg: FineWebConfig
    name: str = "fineweb"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        reason = self.reason(doc.text)
        return Drop(self.name, reason) if reason else doc

    def reason(self, text: str) -> str | None:
        c = self.cfg
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(line) <= c.short_line_length for line in lines) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(len(text) - text.count("\n"), 1) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(len(words_of(text)), 1) > c.new_line_ratio:
            return "list_ratio"
        return None


@dataclasses.dataclass
class CodeQuality:
    """StarCoder's filters for source files: minified/generated (long lines) and data-only (few alnum)."""

    cfg: CodeQualityConfig
    name: str = "code_quality"
    kinds: tuple[str, ...] = ("code",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        c = self.cfg
        text = doc.text
        lengths = [len(line) for line in text.split("\n")]
        if max(lengths) > c.max_line_length:
            return Drop(self.name, "max_line_length")
        if sum(lengths) / len(lengths) > c.max_avg_line_length:
            return Drop(self.name, "avg_line_length")
        if _alnum_fraction(text) < c.min_alnum_fraction:
            return Drop(self.name, "alnum_fraction")
        return doc


def _alnum_fraction(text: str) -> float:
    if text.isascii():   # bytes.translate counts ASCII classes at memory speed
        raw = text.encode("ascii")
        return (len(raw) - len(raw.translate(None, _ASCII_ALNUM))) / max(len(raw), 1)
    return sum(ch.isalnum() for ch in text) / max(len(text), 1)


_ASCII_ALNUM = bytes(b for b in range(128) if chr(b).isalnum())


def reason_counts(texts: list[str], step) -> Counter:
    """Drop reasons of `step` over `texts` (for the benchmark and tests)."""
    return Counter(out.reason if isinstance(out, Drop) else "kept"
                   for out in (step(Doc(t, "x", {})) for t in texts))
