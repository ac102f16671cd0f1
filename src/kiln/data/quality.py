"""Heuristic quality filters with their published defaults: Gopher quality and repetition, C4, FineWeb, code.

The prose rules follow datatrove's implementations (`GopherQualityFilter`,
`GopherRepetitionFilter`, `C4QualityFilter`, `FineWebQualityFilter`); reasons
keep datatrove's names so a report reads like theirs. Differences, on purpose:
- words are `\\w+` runs and single punctuation marks (one regex's definition,
  split in numpy: `words.py`), not NLTK's tokenizer: ~10x faster, and the
  thresholds were tuned on word counts that differ from it by a few percent at most;
- duplicated 5-10-gram characters are counted on hashed n-grams, vectorised:
  an n-gram counts as duplicated when an equal one starts earlier and does not
  overlap the last counted one (datatrove walks the text in Python);
- C4 keeps blank lines between kept lines (datatrove drops them and with
  them every paragraph break).
Code gets StarCoder's rules instead: prose rules would drop every source file.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Iterator

import numpy as np

from kiln.config import C4Config, CodeQualityConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from kiln.data.records import Doc, Drop, TextRule
from kiln.data.words import split_words

_BULLET_START = operator.methodcaller("startswith", ("\u2022", "-"))
_ELLIPSIS_END = operator.methodcaller("endswith", ("...", "\u2026"))
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019", ")", ":", ";", "\u3002", "\uff01", "\uff1f",
                        "\u2026")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of elements seen before, their characters): datatrove's `find_duplicates`. Every element but
    the first of each value is one, so both are totals minus those of the distinct values (no Python loop)."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


def _paragraphs(text: str) -> list[str]:
    """`_PARAGRAPHS.split(text.strip())` with str.split (~5x faster): splitting at every "\\n\\n" leaves
    the odd newline of a longer run at the start of the next piece, and empty pieces for runs of 4 or more;
    no paragraph of the regex split starts with a newline or is empty (the text is stripped)."""
    stripped = text.strip()
    if "\n\n\n" not in stripped:
        return stripped.split("\n\n")
    return [p.lstrip("\n") for p in stripped.split("\n\n") if p.strip("\n")] or [""]


def _lines(text: str) -> list[str]:
    """`_LINES.split(text)` with str.split: pieces between runs of newlines; only the first and the last can
    be empty (the text starts or ends with a newline)."""
    parts = text.split("\n")
    if len(parts) < 3 or "\n\n" not in text:
        return parts
    return [parts[0], *filter(None, parts[1:-1]), parts[-1]]


@dataclasses.dataclass
class GopherQuality(TextRule):
    cfg: GopherQualityConfig
    name: str = "gopher_quality"
    kinds: tuple[str, ...] = ("prose",)

    def reason(self, text: str) -> str | None:
        c = self.cfg
        words = split_words(text)
        n = words.real
        if n < c.min_words:
            return "gopher_short_doc"
        if n > c.max_words:
            return "gopher_long_doc"
        avg = words.real_chars / n
        if avg < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if avg > c.max_avg_word_length:
            return "gopher_above_avg_threshold"
        if text.count("#") / n > c.max_symbol_word_ratio:
            return "gopher_too_many_hashes"
        ellipses = text.count("...") + text.count("\u2026")
        if ellipses / n > c.max_symbol_word_ratio:
            return "gopher_too_many_ellipsis"
        lines = text.splitlines() or [""]
        # Each bullet line holds a bullet mark and each line ending in an ellipsis an ellipsis (none spans
        # lines), so when the marks in the whole text are too few the per-line walk cannot reach the ratio.
        if (text.count("\u2022") + text.count("-")) / len(lines) > c.max_bullet_lines_ratio and \
                sum(map(_BULLET_START, map(str.lstrip, lines))) / len(lines) > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if ellipses / len(lines) > c.max_ellipsis_lines_ratio and \
                sum(map(_ELLIPSIS_END, map(str.rstrip, lines))) / len(lines) > c.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if words.letter_words / n < c.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if words.stop_words < c.min_stop_words:
            return "gopher_enough_stop_words"
        return None


@dataclasses.dataclass
class GopherRepetition(TextRule):
    cfg: GopherRepetitionConfig
    name: str = "gopher_repetition"
    kinds: tuple[str, ...] = ("prose",)

    def reason(self, text: str) -> str | None:
        c = self.cfg
        size = max(len(text), 1)
        paragraphs = _paragraphs(text)
        n, chars = _duplicates(paragraphs)
        if n / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / size > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _lines(text)
        n, chars = _duplicates(lines)
        if n / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if chars / size > c.dup_line_char_frac:
            return "dup_line_char_frac"
        words = split_words(text)
        if len(words.ids) < 2:
            return None
        for n_, chars in _ngram_shares(words.ids, words.lens):
            if n_ <= 4 and chars / size > c.top_n_grams[n_ - 2]:
                return f"top_{n_}_gram"
            if n_ >= 5 and chars / size > c.dup_n_grams[n_ - 5]:
                return f"duplicated_{n_}_n_grams"
        return None


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


# The plain definitions of the n-gram shares: `_ngram_shares` computes the same faster, and the tests hold it
# to these.


def _top_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int) -> int:
    """Characters of the most frequent n-gram times its count; ties go to the smallest key (as np.unique's
    order did), and the length is that of its first occurrence. A plain sort, no argsort: ~3x cheaper."""
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n)
    sk = np.sort(keys)
    starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
    counts = np.diff(np.append(starts, len(sk)))
    top = int(np.argmax(counts))
    first = int(np.argmax(keys == sk[starts[top]]))
    return int(_ngram_chars(lens, n)[first]) * int(counts[top])


def _dup_ngram_chars(ids: np.ndarray, lens: np.ndarray, n: int) -> int:
    if len(ids) < n:
        return 0
    keys = _ngram_keys(ids, n)
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


def _ngram_shares(ids: np.ndarray, lens: np.ndarray) -> Iterator[tuple[int, int]]:
    """(n, characters) for n = 2..10, lazily: `_top_ngram_chars` for n <= 4, `_dup_ngram_chars` for n >= 5.

    Equal to those, but each n sorts only the n-grams that can occur twice: an n-gram that repeats has a
    repeating (n-1)-gram at its start and at its start + 1, so the candidates for n are the positions where
    both (n-1)-grams repeat (for n = 2: both words). In prose they shrink fast (most 5-grams occur once), and
    after an n with none there is no repeat for any larger n. (Two distinct n-grams with equal 64-bit keys,
    which the plain definitions count as a repeat, are not looked for outside the candidates.)
    """
    chars = np.concatenate(([0], np.cumsum(lens)))   # an n-gram at i: chars[i + n] - chars[i] + n - 1
    word = ids.astype(np.intp)
    repeats = np.bincount(word)[word] > 1   # per position: does the (n-1)-gram starting here repeat
    keys = _ngram_keys(ids, 1)
    for n in range(2, 11):
        m = len(ids) - n + 1
        if m <= 0 or (n >= 5 and not repeats.any()):
            yield n, 0   # no n-gram at all, or none that repeats: no duplicated characters
            continue
        keys = _next_keys(keys, ids, n)
        cand = np.flatnonzero(repeats[:m] & repeats[1:m + 1])
        ckeys = keys[cand]
        # stable for n >= 5: equal keys stay in text order, so the first of a run is the first occurrence
        perm = np.argsort(ckeys, kind="stable" if n >= 5 else None)
        ordered = ckeys[perm]
        starts_run = np.empty(len(cand) + 1, dtype=bool)   # element i starts a run of equal keys (and a sentinel)
        starts_run[0] = starts_run[-1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=starts_run[1:-1])
        in_repeat = ~(starts_run[:-1] & starts_run[1:])   # not a run of one
        pos = cand[perm]
        repeats = np.zeros(m, dtype=bool)
        repeats[pos[in_repeat]] = True
        if n <= 4:
            yield n, _top_chars(keys, chars, n, pos, np.flatnonzero(starts_run))
        else:
            yield n, _dup_chars(chars, n, pos[in_repeat & ~starts_run[:-1]])


def _top_chars(keys: np.ndarray, chars: np.ndarray, n: int, pos: np.ndarray, bounds: np.ndarray) -> int:
    """`_top_ngram_chars` from the candidates sorted by key (`bounds`: where runs of equal keys start, and
    the end): the longest run, ties to the smallest key (the first such run), characters of its first
    occurrence. With no run longer than 1, the smallest key of all."""
    run_lens = np.diff(bounds)
    if not len(run_lens) or run_lens.max() < 2:
        first, count = int(np.argmin(keys)), 1
    else:
        top = int(np.argmax(run_lens))
        first, count = int(pos[bounds[top]:bounds[top + 1]].min()), int(run_lens[top])
    return int(chars[first + n] - chars[first] + n - 1) * count


def _dup_chars(chars: np.ndarray, n: int, later: np.ndarray) -> int:
    """`_dup_ngram_chars` from the occurrences of repeated n-grams that are not their first: walked in text
    order, each counted when it does not overlap the last counted one. The walk jumps from a counted one to
    the first at or after its end (a binary search per repeat, done at once), so Python steps only through
    the counted ones, and not at all when no two repeats overlap."""
    if not len(later):
        return 0
    later = np.sort(later)
    if len(later) > 1 and (later[1:] - later[:-1]).min() < n:
        jump = np.searchsorted(later, later + n).tolist()
        walk, j = [], 0
        while j < len(jump):
            walk.append(j)
            j = jump[j]
        later = later[walk]
    return int((chars[later + n] - chars[later]).sum()) + (n - 1) * len(later)


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
            if len(line) > c.max_word_length and max(map(len, words)) > c.max_word_length:
                continue   # (a line no longer than the limit holds no word longer than it)
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
        return doc.rewritten("\n".join(kept).strip(), "c4_lines_removed")


@dataclasses.dataclass
class FineWebQuality(TextRule):
    cfg: FineWebConfig
    name: str = "fineweb"
    kinds: tuple[str, ...] = ("prose",)

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
        if text.count("\n") / max(len(split_words(text).ids), 1) > c.new_line_ratio:
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
