"""Text normalisation and the length filter: the per-document steps run inside the reader workers.

Normalisation is deliberately light because the default corpus is code: leading
indentation and tabs inside lines are never touched, only things that carry no
meaning (line-ending style, trailing whitespace, long runs of blank lines,
Unicode composition form) are made uniform, so equal texts hash equal for dedup.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from kiln.data.records import Doc, Drop

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
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUN.sub("\n" * (MAX_BLANK_LINES + 1), text)
    return text.strip("\n")


@dataclasses.dataclass
class Normalize:
    """Rewrites the text (see `normalize_text`); never drops. Flags the documents it changed."""

    name: str = "normalize"

    def __call__(self, doc: Doc) -> Doc:
        text = normalize_text(doc.text)
        if text == doc.text:
            return doc
        return dataclasses.replace(doc, text=text, flags=doc.flags + ("normalized",))


@dataclasses.dataclass
class LengthFilter:
    """Drops `empty` (no characters), `too_short` (< min_chars) and `too_long` (> max_chars) documents."""

    min_chars: int
    max_chars: int
    name: str = "length_filter"

    def __call__(self, doc: Doc) -> Doc | Drop:
        n = len(doc.text)
        if n == 0:
            return Drop(self.name, "empty")
        if n < self.min_chars:
            return Drop(self.name, "too_short")
        if n > self.max_chars:
            return Drop(self.name, "too_long")
        return doc
