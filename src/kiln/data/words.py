"""A document's words, split once and shared by the Gopher rules and FineWeb: counts and word ids.

Words are what one regex finds (`\\w+` runs and single punctuation marks, `words_of`), the plain
definition and the tests' reference. The steps use `split_words`, which gives the same counts and ids
in numpy without making a Python string per word (~5x cheaper): characters are classed by table,
tokens are runs of word characters and single marks, and each token is known by a 64-bit hash of
its characters.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")
_REAL_WORD = re.compile(r"\w+")
"""The tokens of `_WORD` that are not punctuation marks: its `\\w+` runs, the same runs in the same order."""
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
"""Gopher's stop words: a real English document holds at least two of them."""


def words_of(text: str) -> list[str]:
    """Words and punctuation marks, as the Gopher rules count them (the plain definition; the steps use
    `split_words`, which gives the same counts and word ids without making a string per word)."""
    return _WORD.findall(text)


def real_words_of(text: str) -> list[str]:
    """`words_of` without the punctuation marks."""
    return _REAL_WORD.findall(text)


@dataclasses.dataclass(frozen=True)
class Words:
    """What the Gopher rules and FineWeb need from a document's words, computed once per text."""

    real: int
    """Words (`\\w+` runs), punctuation marks left out."""
    real_chars: int
    """Characters in those words."""
    letter_words: int
    """Words holding a letter."""
    stop_words: int
    """Words whose lower-case form is in STOP_WORDS."""
    ids: np.ndarray
    """(N,) uint64 id of each word and punctuation mark (`words_of`), numbered in order of first appearance."""
    lens: np.ndarray
    """(N,) int64 characters of each."""


def split_words(text: str) -> Words:
    """`Words` of `text`, cached for the last text seen (by identity: a step that rewrites the text makes a
    new string; holding the text keeps its id unique), so Gopher quality, repetition and FineWeb split once."""
    if _cache[0] is not text:
        _cache[0], _cache[1] = text, _split(text)
    return _cache[1]


_cache: list = [None, None]


def plain_words(text: str) -> Words:
    """`Words` from the plain definitions (regex words, a dict of ids): the reference for `split_words`."""
    real = real_words_of(text)
    ids, lens = _word_ids(words_of(text))
    return Words(len(real), sum(map(len, real)), sum(any(map(str.isalpha, w)) for w in real),
                 sum(w.lower() in STOP_WORDS for w in real), ids, lens)


def _split(text: str) -> Words:
    """`Words` in numpy: characters are classed (word / space / mark) by table, words are the runs of word
    characters and marks stand alone (the `_WORD` regex); each token gets a 64-bit polynomial hash of its
    characters from one prefix sum, and ids follow the first appearance of each hash. Equal to `plain_words`
    unless two distinct tokens of one document share a 64-bit hash (the n-gram keys for n >= 5 already rely
    on that); ~5x cheaper than the regex and the dict, which make a Python string per word."""
    codes = _codes(text)
    cls, letter = _classes(codes)
    word, mark = cls == _WORD_CHAR, cls == _MARK
    inner = np.zeros(len(codes) + 1, dtype=bool)   # inner[i]: characters i - 1 and i are both word characters
    inner[1:-1] = word[1:] & word[:-1]
    starts = np.flatnonzero((word & ~inner[:-1]) | mark)   # tokens in text order: words and marks
    ends = np.flatnonzero((word & ~inner[1:]) | mark) + 1
    hashes = _token_hashes(codes, starts, ends)
    ids, first_seen = _first_appearance_ids(hashes)
    is_word = word[starts]
    letters = np.concatenate(([0], np.cumsum(letter)))
    return Words(int(np.count_nonzero(is_word)), int(np.count_nonzero(word)),
                 int(np.count_nonzero(letters[ends[is_word]] > letters[starts[is_word]])),
                 _stop_words(text, ids, hashes, first_seen, starts, ends), ids, (ends - starts).astype(np.int64))


_SPACE, _WORD_CHAR, _MARK = 0, 1, 2


def _char_class(ch: str) -> int:
    """`\\w` is `str.isalnum()` or `_`, `\\s` is `str.isspace()` (Python's re on str patterns)."""
    return _WORD_CHAR if ch.isalnum() or ch == "_" else _SPACE if ch.isspace() else _MARK


_ASCII_CLASS = np.array([_char_class(chr(c)) for c in range(128)], dtype=np.int8)
_ASCII_LETTER = np.array([chr(c).isalpha() for c in range(128)], dtype=bool)


def _codes(text: str) -> np.ndarray:
    """Code points: uint8 for ASCII text (the common case, 4x less to move), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _classes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class, is letter) per character; a non-ASCII character is asked once per distinct code point."""
    if codes.dtype == np.uint8:
        return _ASCII_CLASS[codes], _ASCII_LETTER[codes]
    high = codes >= 128
    low = np.where(high, 0, codes)
    cls, letter = _ASCII_CLASS[low], _ASCII_LETTER[low]
    uniq, inverse = np.unique(codes[high], return_inverse=True)
    chars = list(map(chr, uniq.tolist()))
    cls[high] = np.array([_char_class(ch) for ch in chars], dtype=np.int8)[inverse]
    letter[high] = np.array([ch.isalpha() for ch in chars], dtype=bool)[inverse]
    return cls, letter


_P = 0x100000001B3   # odd, so invertible modulo 2^64
_powers: list = [np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64)]   # P^i and P^-i modulo 2^64


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i modulo 2^64 for i < n (grown by doubling, kept for the process)."""
    if len(_powers[0]) < n:
        size = max(n, 2 * len(_powers[0]))
        for k, base in enumerate((_P, pow(_P, -1, 2**64))):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _powers[k] = np.cumprod(table, dtype=np.uint64)   # wraps modulo 2^64, as meant
    return _powers[0][:n], _powers[1][:n]


def _token_hashes(codes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per token: sum of (code + 1) * P^(offset in the token) modulo 2^64, from one prefix sum."""
    up, down = _power_tables(len(codes))
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum((codes.astype(np.uint64) + np.uint64(1)) * up, out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * down[starts]


def _first_appearance_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id of each value, numbering the distinct values in order of first appearance as `_word_ids` does for
    strings; index of each id's first appearance). A plain argsort and the smallest index per run of equal
    values: np.unique's stable argsort costs ~2x."""
    perm = np.argsort(values)
    ordered = values[perm]
    new_run = np.empty(len(values), dtype=bool)
    new_run[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_run[1:])
    first = np.minimum.reduceat(perm, np.flatnonzero(new_run)) if len(values) else perm
    order = np.argsort(first)   # first appearances are distinct: any sort is stable here
    rank = np.empty(len(first), dtype=np.uint64)
    rank[order] = np.arange(len(first), dtype=np.uint64)
    ids = np.empty(len(values), dtype=np.uint64)
    ids[perm] = rank[np.cumsum(new_run) - 1]
    return ids, first[order]


def _hash_of(token: str) -> int:
    """`_token_hashes` of one token, in Python integers."""
    return sum((ord(ch) + 1) * pow(_P, i, 2**64) for i, ch in enumerate(token)) % 2**64


_STOP_HASHES = np.array(sorted({_hash_of("".join(v)) for w in STOP_WORDS
                                for v in itertools.product(*((ch, ch.upper()) for ch in w))}), dtype=np.uint64)
"""Hashes of every upper/lower-case spelling of the stop words: the only strings that lower-case to one (no
non-ASCII character lower-cases to ASCII letters of a stop word; checked in tests/data)."""


def _stop_words(text: str, ids: np.ndarray, hashes: np.ndarray, first: np.ndarray, starts: np.ndarray,
                ends: np.ndarray) -> int:
    """Tokens whose lower-case form is in STOP_WORDS. Distinct tokens whose hash is that of a spelling of a
    stop word are checked as strings (so `str.lower` decides, as in the plain definition), then their
    occurrences counted."""
    distinct = hashes[first]
    at = np.minimum(np.searchsorted(_STOP_HASHES, distinct), len(_STOP_HASHES) - 1)
    maybe = np.flatnonzero(_STOP_HASHES[at] == distinct)
    stop = [i for i, a, b in zip(maybe.tolist(), starts[first[maybe]].tolist(), ends[first[maybe]].tolist())
            if text[a:b].lower() in STOP_WORDS]
    if not stop:
        return 0
    is_stop = np.zeros(len(first), dtype=bool)
    is_stop[stop] = True
    return int(np.count_nonzero(is_stop[ids]))


def _word_ids(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids in order of first appearance (the n-gram keys, hence ties between top n-grams, depend on it)."""
    vocab = dict(zip(dict.fromkeys(words), itertools.count()))
    ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
    return ids, np.fromiter(map(len, words), dtype=np.int64, count=len(words))
