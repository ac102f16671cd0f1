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
import itertools
import operator
import re
from collections import Counter

import numpy as np

from kiln.config import C4Config, CodeQualityConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from kiln.data.records import Doc, Drop

_WORD = re.compile(r"\w+|[^\w\s]")
_REAL_WORD = re.compile(r"\w+")
"""The tokens of `_WORD` that are not punctuation marks: its `\\w+` runs, the same runs in the same order."""
_ASCII_NO_LETTER = "0123456789_"
"""An ASCII word without a letter is made of these (stripping them leaves nothing)."""
_BULLET_START = operator.methodcaller("startswith", ("\u2022", "-"))
_ELLIPSIS_END = operator.methodcaller("endswith", ("...", "\u2026"))
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
    """Words and punctuation marks, as the Gopher rules count them (cached per text: steps share it)."""
    return _cached(text, "words", _WORD.findall)


def real_words_of(text: str) -> list[str]:
    """`words_of` without the punctuation marks (cached per text)."""
    return _cached(text, "real", _REAL_WORD.findall)


def _cached(text: str, key: str, make):
    """One-document cache shared by the steps: Gopher quality, repetition and FineWeb split the same text.
    Keyed by identity (a step that rewrites the text makes a new string); holding the text keeps its id unique."""
    if _cache[0] is not text:
        _cache[0], _cache[1] = text, {}
    got = _cache[1].get(key)
    if got is None:
        got = _cache[1][key] = make(text)
    return got


_cache: list = [None, {}]


def _letter_words(text: str, real: list[str]) -> int:
    """Words holding a letter (punctuation marks hold none): all words but ASCII digit/underscore runs and
    non-ASCII words without a letter, which are rare enough to check one by one."""
    no_letter = sum(map(operator.not_, map(str.strip, real, itertools.repeat(_ASCII_NO_LETTER))))
    if not text.isascii():
        no_letter += sum(not any(map(str.isalpha, w)) for w in itertools.filterfalse(str.isascii, real))
    return len(real) - no_letter


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
        real = real_words_of(text)
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
        if sum(map(_BULLET_START, map(str.lstrip, lines))) / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if sum(map(_ELLIPSIS_END, map(str.rstrip, lines))) / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if _letter_words(text, real) / n < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if sum(map(STOP_WORDS.__contains__, map(str.lower, real))) < c.min_stop_words:
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
        keys = _ngram_keys(ids, 1)
        for n_ in range(2, 11):
            keys = _next_keys(keys, ids, n_)   # the n-gram keys from the (n-1)-gram keys: one step, not n
            if n_ <= 4 and _top_ngram_chars(ids, lens, n_, keys) / size > c.top_n_grams[n_ - 2]:
                return f"top_{n_}_gram"
            if n_ >= 5 and _dup_ngram_chars(ids, lens, n_, keys) / size > c.dup_n_grams[n_ - 5]:
                return f"duplicated_{n_}_n_grams"
        return None


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids in order of first appearance (the n-gram keys, hence ties between top n-grams, depend on it)."""
    vocab = dict(zip(dict.fromkeys(words), itertools.count()))
    ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
    return ids, np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per n-gram start (exact for < 2^16 distinct words per 4-gram, else a hash)."""
    m = len(ids) - n + 1
    key = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            key = key * np.uint64(0x100000001B3) + ids[i:i + m] + np.uint64(1)
    return key


def _next_keys(keys: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """`_ngram_keys(ids, n)` from `_ngram_keys(ids, n - 1)`: the same recurrence, one more word."""
    m = max(len(ids) - n + 1, 0)
    with np.errstate(over="ignore"):
        return keys[:m] * np.uint64(0x100000001B3) + ids[n - 1:] + np.uint64(1)


def _ngram_chars(lens: np.ndarray, n: int) -> np.ndarray:
    csum = np.concatenate(([0], np.cumsum(lens)))
    return csum[n:] - csum[:-n] + (n - 1)   # joined with spaces, as datatrove's get_n_grams


def _top_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int, keys: np.ndarray | None = None) -> int:
    """Characters of the most frequent n-gram times its count; ties go to the smallest key (as np.unique's
    order did), and the length is that of its first occurrence. A plain sort, no argsort: ~3x cheaper."""
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n) if keys is None else keys
    sk = np.sort(keys)
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    counts = np.diff(np.append(starts, len(sk)))
    top = int(np.argmax(counts))
    first = int(np.argmax(keys == sk[starts[top]]))
    return int(_ngram_chars(lens, n)[first]) * int(counts[top])


def _dup_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int, keys: np.ndarray | None = None) -> int:
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n) if keys is None else keys
    sk = np.sort(keys)
    if not (sk[1:] == sk[:-1]).any():
        return 0   # no n-gram twice (the common case for n >= 6): skip the argsort
    perm = np.argsort(keys, kind="stable")   # stable: the first of equal keys is the earliest occurrence
    sk = keys[perm]
    repeat = np.zeros(len(keys), dtype=bool)
    repeat[perm[1:][sk[1:] == sk[:-1]]] = True
    repeats = np.flatnonzero(repeat)
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
