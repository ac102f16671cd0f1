"""Fast paths of the per-document steps against their plain definitions (same results, decided by the plain
code written out here or kept in the module for this purpose)."""

import itertools
import os
import random
import re

import ftfy
import numpy as np
import pytest

from kiln.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig
from kiln.data import quality as Q
from kiln.data import words as W
from kiln.data.normalize import FTFY_CONSERVATIVE, FixUnicode, fix_mojibake, normalize_text
from kiln.data.records import Doc, Drop

from test_data_filters import GOOD, PARAGRAPHS

MOJIBAKE = "caf\u00c3\u00a9 cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e"
EDGE_TEXTS = [
    "", "\n", "\n\n", "\n\n\n\n", "a", " a ", "a\n\n\nb", "a\n\n\n\nb\n\n\n\n\nc\n", " \n\n x \n\n\n\n", "a\n \n\nb",
    "\n\na\n\n\n", "a\r\nb\rc\x0bd\x0ce\x1cf\x1dg\x1eh\x1fi\x85j\u2028k\u2029l",
    "x1 2_3 __ 42 \u0663\u0664 x\u00b2 \u00b2 \u2167 caf\u00e9 _a 9b ... -- !! \u2026 \u2022 item",
    "The THE tHe be_ to-of AND \u0130 that's \u212a \u0131 \u017f stra\u00dfe HAVE With",
    "e\u0301t\u00e9 na\u00efve \U0001F600 \U00010400\U00010428 \ud800 lone \udfff surrogates",
    "\u4f60\u597d\uff0c\u4e16\u754c\u3002 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947",
    MOJIBAKE, "\u00c3 line start\n\u00c2 another", "c1 \x80\x9f controls \x85", "\x00 nul \x01 and \x7f",
    "- one\n- two\n\u2022 three\n  - four\nfive...\nsix\u2026\n...", GOOD, "\n\n".join(PARAGRAPHS[::-1]),
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Prose-like texts with repeats, bullets, ellipses, blank-line runs and odd characters."""
    rng = random.Random(seed)
    vocab = ("the of and to be that have with a in house river town \u00e9t\u00e9 caf\u00e9 \u00c3\u00a9 x2 42 _ "
             "Hello HELLO \u0130 \u212a ... \u2026 - \u2022 # ! ? , . ; ( ) \" ' \u201c \u201d").split()
    out = []
    for _ in range(n):
        words = [rng.choice(vocab[:rng.randint(3, len(vocab))]) for _ in range(rng.randint(0, 400))]
        seps = [rng.choice([" ", " ", " ", "\n", "\n\n", "\n\n\n", "\t", "  ", "\r\n"]) for _ in words]
        out.append("".join(itertools.chain.from_iterable(zip(words, seps))))
    return out


TEXTS = EDGE_TEXTS + _random_texts(150)


# ---------------------------------------------------------------- fix_unicode


@pytest.mark.parametrize("text", EDGE_TEXTS + [
    f"clean line\n{MOJIBAKE}\nclean caf\u00e9 line\n\n\u00c3 x\n",
    "\n".join([MOJIBAKE] * 3 + ["\u00e9t\u00e9"] * 3), MOJIBAKE + "\r\n" + MOJIBAKE + "\r",
    "\u00e2\u0080\u0099 quote \u00e2\u0080\u009c and \u00c3\u00a0 a0", "sur\ud83d\ude00rogate pair \ud83d\ude00",
    "x\u00c5\u0153\nz", "ab \u00c5\u0153\n\u00c4\u0153\n",   # mojibake that only the line's own "\\n" reveals
])
def test_fix_mojibake_equals_ftfy(text):
    assert fix_mojibake(text) == ftfy.fix_text(text, **FTFY_CONSERVATIVE)


def test_fix_mojibake_equals_ftfy_on_random_texts():
    for text in _random_texts(200, seed=1):
        assert fix_mojibake(text) == ftfy.fix_text(text, **FTFY_CONSERVATIVE)


def test_fix_unicode_flags_only_changed_documents():
    assert FixUnicode()(Doc("caf\u00e9 clean", "s", {})).flags == ()
    assert FixUnicode()(Doc(MOJIBAKE, "s", {})).flags == ("unicode_fixed",)


def test_normalize_strips_trailing_whitespace_per_line():
    assert normalize_text("a \t\nb  \r\n\n\n\n\nc\t") == "a\nb\n\n\nc"


# ---------------------------------------------------------------- words


def test_char_classes_equal_python_regex_for_every_code_point():
    chars = "".join(map(chr, range(0x110000)))
    word = {m.start() for m in re.finditer(r"\w", chars)}
    space = {m.start() for m in re.finditer(r"\s", chars)}
    for cp in range(0x110000):
        want = W._WORD_CHAR if cp in word else W._SPACE if cp in space else W._MARK
        assert W._char_class(chars[cp]) == want, hex(cp)


@pytest.mark.parametrize("text", TEXTS)
def test_split_words_equals_plain_words(text):
    fast, plain = W._split(text), W.plain_words(text)
    assert (fast.real, fast.real_chars, fast.letter_words, fast.stop_words) == \
        (plain.real, plain.real_chars, plain.letter_words, plain.stop_words)
    assert fast.ids.dtype == plain.ids.dtype and np.array_equal(fast.ids, plain.ids)
    assert np.array_equal(fast.lens, plain.lens)
    assert W.real_words_of(text) == [w for w in W.words_of(text) if not re.fullmatch(r"[^\w\s]", w)]


def test_split_words_is_cached_per_text_object():
    a = "".join(["some text here"])
    assert W.split_words(a) is W.split_words(a)
    b = "".join(["other text"])
    assert W.split_words(b) is not W.split_words(a)


def test_only_ascii_spellings_lower_case_to_a_stop_word():
    letters = set("".join(W.STOP_WORDS))
    to_ascii = [chr(cp) for cp in range(128, 0x110000) if chr(cp).lower().isascii()]
    assert all(not set(ch.lower()) & letters for ch in to_ascii), to_ascii   # only KELVIN SIGN -> k


def test_first_appearance_ids_equal_dict_numbering():
    rng = np.random.default_rng(0)
    for size in (0, 1, 2, 50, 3000):
        values = rng.integers(0, max(size // 3, 1), size=size).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        ids, first = W._first_appearance_ids(values)
        vocab = dict(zip(dict.fromkeys(values.tolist()), itertools.count()))
        assert ids.tolist() == [vocab[v] for v in values.tolist()]
        assert first.tolist() == [values.tolist().index(v) for v in vocab]


# ---------------------------------------------------------------- repetition


def test_paragraph_and_line_splits_equal_the_regexes():
    for text in TEXTS:
        assert Q._paragraphs(text) == Q._PARAGRAPHS.split(text.strip())
        assert Q._lines(text) == Q._LINES.split(text)


def test_duplicates_equal_the_set_walk():
    def walk(items):
        seen, n, chars = set(), 0, 0
        for x in items:
            if x in seen:
                n, chars = n + 1, chars + len(x)
            seen.add(x)
        return n, chars

    for text in TEXTS:
        for items in (Q._LINES.split(text), text.split(), list(text)):
            assert Q._duplicates(items) == walk(items)


def _shares_plain(ids, lens):
    return [(n, Q._top_ngram_chars(ids, lens, n) if n <= 4 else Q._dup_ngram_chars(ids, lens, n)) for n in range(2, 11)]


def test_ngram_shares_equal_the_plain_definitions():
    rng = np.random.default_rng(1)
    for trial in range(60):
        size = int(rng.integers(1, 400))
        words = [str(w) * int(rng.integers(1, 3)) for w in rng.integers(0, 2 + trial, size=size)]
        if trial % 5 == 0:   # long verbatim repeats: duplicated n-grams for every n
            words = words[: size // 3] * 3
        ids, lens = W._word_ids(words)
        assert list(Q._ngram_shares(ids, lens)) == _shares_plain(ids, lens), trial
    for text in TEXTS:
        w = W.split_words(text)
        assert list(Q._ngram_shares(w.ids, w.lens)) == _shares_plain(w.ids, w.lens)


# ---------------------------------------------------------------- whole steps against plain re-implementations


def _gopher_quality_plain(c, text):
    real = W.real_words_of(text)
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
    if sum(line.lstrip().startswith(("\u2022", "-")) for line in lines) / len(lines) > c.max_bullet_lines_ratio:
        return "gopher_too_many_bullets"
    if sum(line.rstrip().endswith(("...", "\u2026")) for line in lines) / len(lines) > c.max_ellipsis_lines_ratio:
        return "gopher_too_many_end_ellipsis"
    if sum(any(ch.isalpha() for ch in w) for w in real) / n < c.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    if sum(w.lower() in W.STOP_WORDS for w in real) < c.min_stop_words:
        return "gopher_enough_stop_words"
    return None


def _gopher_repetition_plain(c, text):
    def dups(items):
        return len(items) - len(set(items)), sum(map(len, items)) - sum(map(len, set(items)))

    size = max(len(text), 1)
    paragraphs = re.split(r"\n{2,}", text.strip())
    n, chars = dups(paragraphs)
    if n / len(paragraphs) > c.dup_para_frac:
        return "dup_para_frac"
    if chars / size > c.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = re.split(r"\n+", text)
    n, chars = dups(lines)
    if n / len(lines) > c.dup_line_frac:
        return "dup_line_frac"
    if chars / size > c.dup_line_char_frac:
        return "dup_line_char_frac"
    words = W.words_of(text)
    if len(words) < 2:
        return None
    ids, lens = W._word_ids(words)
    for n, chars in _shares_plain(ids, lens):
        if n <= 4 and chars / size > c.top_n_grams[n - 2]:
            return f"top_{n}_gram"
        if n >= 5 and chars / size > c.dup_n_grams[n - 5]:
            return f"duplicated_{n}_n_grams"
    return None


@pytest.mark.parametrize("cfg", [GopherQualityConfig(), GopherQualityConfig(min_words=5, max_bullet_lines_ratio=0.2,
                                                                             max_ellipsis_lines_ratio=0.05)])
def test_gopher_quality_equals_plain_rules(cfg):
    step = Q.GopherQuality(cfg)
    for text in TEXTS:
        assert step.reason(text) == _gopher_quality_plain(cfg, text), text[:60]


@pytest.mark.parametrize("cfg", [GopherRepetitionConfig(), GopherRepetitionConfig(
    dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1, top_n_grams=[0.5, 0.4, 0.3],
    dup_n_grams=[0.3, 0.25, 0.2, 0.15, 0.1, 0.05])])
def test_gopher_repetition_equals_plain_rules(cfg):
    step = Q.GopherRepetition(cfg)
    for text in TEXTS:
        assert step.reason(text) == _gopher_repetition_plain(cfg, text), text[:60]


def test_c4_and_fineweb_keep_their_decisions_on_long_words():
    long_word = "x" * 1001
    c4 = Q.C4Filter(C4Config())
    text = GOOD + f"\nA line with {long_word} in it.\nShort words only on this line here."
    out = c4(Doc(text, "s", {}))
    assert isinstance(out, Doc) and long_word not in out.text and "Short words only" in out.text
    fw = Q.FineWebQuality(FineWebConfig())
    assert fw.reason(GOOD) is None


# ---------------------------------------------------------------- language ID


def test_first_seen_counts_equal_np_unique():
    from kiln.data.langid import _first_seen_counts
    rng = np.random.default_rng(2)
    for size in (1, 2, 100, 5000):
        feats = rng.integers(0, 300, size=size).astype(np.int32)
        pos = np.sort(rng.choice(10 * size, size=size, replace=False))
        got_f, got_c = _first_seen_counts(feats, pos)
        uniq, first, counts = np.unique(feats, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        assert got_f.tolist() == uniq[order].tolist() and got_c.tolist() == counts[order].tolist()


def test_automaton_depth_equals_bfs_over_states():
    from kiln.data.langid import _tables, identifier
    li = identifier()
    nm = np.frombuffer(li.tk_nextmove, dtype=np.dtype(li.tk_nextmove.typecode)).astype(np.int64)
    rowbase = np.asarray(li._rowbase, dtype=np.int64)
    depth = np.full(len(rowbase), -1)
    depth[0], frontier, d = 0, np.array([0]), 0
    while len(frontier):   # every state's 256 successors, level by level
        nxt = nm[(rowbase[frontier][:, None] + np.arange(256)[None, :]).ravel()]
        nxt = np.unique(nxt[depth[nxt] < 0])
        d += 1
        depth[nxt] = d
        frontier = nxt
    assert _tables(li)[3] == depth.max()


def test_language_filter_decisions_equal_py3langid():
    from kiln.config import LanguageConfig
    from kiln.data.langid import MAX_CHARS, LanguageFilter, reference_identifier
    ref, step = reference_identifier(), LanguageFilter(LanguageConfig())
    for text in TEXTS:
        lang, score = ref.classify(text[:MAX_CHARS].replace("\n", " "))
        want = f"language_{lang}" if lang != "en" else "low_score" if score < 0.65 else None
        out = step(Doc(text, "s", {}))
        assert (out.reason if isinstance(out, Drop) else None) == want


# ---------------------------------------------------------------- executor


def test_pool_workers_get_one_blas_thread_and_the_parent_env_is_restored(monkeypatch):
    from kiln.data.executors import BLAS_THREAD_VARS, _single_threaded_blas
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # a caller's choice is kept
    before = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    with _single_threaded_blas():
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1" and os.environ["OMP_NUM_THREADS"] == "3"
    assert {k: os.environ.get(k) for k in BLAS_THREAD_VARS} == before
