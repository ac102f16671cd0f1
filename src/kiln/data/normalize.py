"""Unicode repair, text normalisation and the length filter: the first per-document steps.

Normalisation is deliberately light because the default corpus is code: leading
indentation and tabs inside lines are never touched, only things that carry no
meaning (line-ending style, trailing whitespace, long runs of blank lines,
Unicode composition form) are made uniform, so equal texts hash equal for dedup.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

import ftfy
from ftfy.badness import is_bad
from ftfy.fixes import SURROGATE_RE

from kiln.data.records import ALL_KINDS, Doc, Drop

MAX_BLANK_LINES = 2
"""Longer runs of blank lines shrink to this many. Two, not one: PEP 8 puts two blank lines between
top-level definitions, and the default corpus is Python, so one would rewrite nearly every file."""
_BLANK_RUN = re.compile("\n" * (MAX_BLANK_LINES + 2) + "+")   # more than MAX_BLANK_LINES blank lines


def normalize_text(text: str) -> str:
    """NFC; CRLF/CR -> LF; strip trailing whitespace per line; cap blank-line runs; strip blank edges."""
    if not text.isascii():   # ASCII is already NFC: skip the (slower) Unicode pass for most code
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(map(str.rstrip, text.split("\n")))
    text = _BLANK_RUN.sub("\n" * (MAX_BLANK_LINES + 1), text)
    return text.strip("\n")


@dataclasses.dataclass
class Normalize:
    """Rewrites the text (see `normalize_text`); never drops. Flags the documents it changed."""

    name: str = "normalize"
    kinds: tuple[str, ...] = ALL_KINDS

    def __call__(self, doc: Doc) -> Doc:
        return doc.rewritten(normalize_text(doc.text), "normalized")


@dataclasses.dataclass
class LengthFilter:
    """Drops `empty` (no characters), `too_short` (< min_chars) and `too_long` (> max_chars) documents."""

    min_chars: int
    max_chars: int
    name: str = "length_filter"
    kinds: tuple[str, ...] = ALL_KINDS

    def __call__(self, doc: Doc) -> Doc | Drop:
        n = len(doc.text)
        if n == 0:
            return Drop(self.name, "empty")
        if n < self.min_chars:
            return Drop(self.name, "too_short")
        if n > self.max_chars:
            return Drop(self.name, "too_long")
        return doc


FTFY_CONSERVATIVE = dict(
    fix_encoding=True, restore_byte_a0=True, replace_lossy_sequences=True, decode_inconsistent_utf8=True,
    fix_c1_controls=True, unescape_html=False, remove_terminal_escapes=False, fix_latin_ligatures=False,
    fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False, fix_surrogates=True,
    remove_control_chars=False, normalization=None, explain=False)
"""Repair mojibake (`cafÃ©` -> `café`) and nothing else: quotes, full-width forms, ligatures, HTML
entities, terminal escapes and control characters are content here (code and docs use them on purpose).
NFC is left to `normalize`."""
_SEGMENT = ftfy.TextFixerConfig().max_decode_length
"""ftfy cuts longer lines into pieces, which the per-line test below does not see."""


@dataclasses.dataclass
class FixUnicode:
    """ftfy's mojibake repair with conservative settings; never drops. Flags the documents it changed."""

    name: str = "fix_unicode"
    kinds: tuple[str, ...] = ALL_KINDS

    def __call__(self, doc: Doc) -> Doc:
        return doc.rewritten(fix_mojibake(doc.text), "unicode_fixed")


def fix_mojibake(text: str) -> str:
    """`ftfy.fix_text(text, **FTFY_CONSERVATIVE)`, calling ftfy only on the lines it could change.

    ftfy fixes each line, with its "\\n", on its own (a segment), and with these settings it leaves a segment
    alone when it is ASCII, or when `ftfy.badness.is_bad` finds no mojibake pattern (C1 controls included) and
    it holds no surrogate: its encoding fix starts with exactly that test, and the only other fixers on (C1
    controls, surrogates) have nothing to do. Testing each non-ASCII segment, and running ftfy on the few that
    fail, gives the same text ~10x faster than ftfy on the whole document (its per-line overhead dominates).
    """
    if text.isascii():   # the common case (code, English prose)
        return text
    lines = text.split("\n")
    changed = False
    for i, line in enumerate(lines):
        if line.isascii():
            continue
        end = "\n" if i < len(lines) - 1 else ""   # the last line has none
        segment = line + end   # the newline matters: is_bad matches "\u0153\n", for one
        if len(segment) <= _SEGMENT and not (is_bad(segment) or SURROGATE_RE.search(segment)):
            continue
        fixed = ftfy.fix_text(segment, **FTFY_CONSERVATIVE)
        assert fixed.endswith(end), "ftfy moved a line break"
        lines[i] = fixed[:len(fixed) - len(end)]
        changed = True
    return "\n".join(lines) if changed else text
