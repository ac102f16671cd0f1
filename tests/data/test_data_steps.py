"""Normalisation, the length filter, ids and the split (exact dedup runs in the parent: test_data_run)."""

import random

import xxhash

from kiln.data.dedup import doc_id, split_of
from kiln.data.normalize import MAX_BLANK_LINES, LengthFilter, Normalize, normalize_text
from kiln.data.records import Doc, Drop, run_steps


def doc(text):
    return Doc(text, "src", {"path": "x"})


# ---------------------------------------------------------------- normalisation


def test_line_endings_become_lf():
    assert normalize_text("a\r\nb\rc\nd") == "a\nb\nc\nd"


def test_nfc_composes_combining_accents():
    assert normalize_text("e\u0301t\u00e9") == "\u00e9t\u00e9"


def test_trailing_whitespace_stripped_per_line():
    assert normalize_text("a  \nb\t\t\nc \u00a0\n d") == "a\nb\nc\n d"


def test_indentation_and_inner_tabs_kept():
    code = "def f(x):\n\tif x:\n\t\treturn 'a\\tb'\t# tab\n        return None"
    assert normalize_text(code) == code


def test_blank_line_runs_capped():
    keep = "\n" * (MAX_BLANK_LINES + 1)   # MAX_BLANK_LINES blank lines between two lines
    assert normalize_text("a" + keep + "b") == "a" + keep + "b"
    assert normalize_text("a\n\n\n\n\n\n\nb") == "a" + keep + "b"
    assert normalize_text("a\n  \n\t\n \n\n \nb") == "a" + keep + "b"   # whitespace-only lines are blank


def test_pep8_two_blank_lines_survive():
    code = "import os\n\n\ndef f():\n    pass\n\n\nclass A:\n    pass"
    assert normalize_text(code) == code


def test_leading_and_trailing_blank_lines_stripped_but_not_indentation():
    assert normalize_text("\n\n  \n    indented\n\n\n") == "    indented"


def test_normalize_is_idempotent():
    rng = random.Random(0)
    pieces = ["a", " ", "\t", "\n", "\r\n", "\r", "e\u0301", "  \n", "x"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(30))
        once = normalize_text(text)
        assert normalize_text(once) == once


def test_normalize_step_flags_changes():
    assert Normalize()(doc("same")).flags == ()
    assert Normalize()(doc("changed  ")).flags == ("normalized",)


def test_length_filter_reasons():
    f = LengthFilter(min_chars=3, max_chars=5)
    assert f(doc("")) == Drop("length_filter", "empty")
    assert f(doc("ab")) == Drop("length_filter", "too_short")
    assert f(doc("abcdef")) == Drop("length_filter", "too_long")
    assert f(doc("abc")).text == "abc"


def test_run_steps_stops_at_first_drop():
    out = run_steps(doc("  \n"), [Normalize(), LengthFilter(1, 10)])
    assert out == Drop("length_filter", "empty")


# ---------------------------------------------------------------- ids, split


def test_doc_id_is_xxh3_64_of_utf8():
    assert doc_id("héllo") == xxhash.xxh3_64(b"h\xc3\xa9llo").hexdigest()
    assert doc_id("hello world") == "d447b1ea40e6988b"   # pinned: changing it reshuffles every split


def test_split_is_deterministic_and_roughly_proportional():
    ids = [doc_id(f"document number {i}") for i in range(2000)]
    splits = [split_of(i, 0.1, 0.2) for i in ids]
    assert splits == [split_of(i, 0.1, 0.2) for i in ids]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert abs(counts["val"] - 200) < 60 and abs(counts["test"] - 400) < 80   # ~4 standard deviations


def test_split_boundaries():
    assert split_of("0" * 16, 0.1, 0.1) == "val"
    assert split_of("f" * 16, 0.1, 0.1) == "train"
    assert split_of(f"{int(0.15 * 2**64):016x}", 0.1, 0.1) == "test"
    assert split_of(f"{int(0.15 * 2**64):016x}", 0.0, 0.0) == "train"
