"""Streaming detokenization: the text a growing list of output ids adds, sent in pieces that never end inside a
character or inside what could become a stop string.

Each step decodes only a short window of recent tokens (the whole output decoded every step costs O(length) per
token per sequence). The window starts at the token before the last whole-character boundary, so a tokenizer
whose decoding depends on the neighbouring token (SentencePiece's leading space) decodes the new piece as the
whole would; a window ending inside a character (U+FFFD at its end) waits for the token that completes it.
Special tokens are not text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextStream:
    text: str = ""           # the ids decoded, up to the last whole character
    text_from: int = 0       # ids[text_from:] is the window decoded each step ...
    text_upto: int = 0       # ... of which ids[text_from:text_upto] is already in `text`
    sent: int = 0            # characters of `text` already handed out

    def advance(self, tok, ids: list[int]) -> str:
        """The whole text after the newest of `ids` (a cut character held back); "" without a tokenizer."""
        if tok is None:
            return ""
        new = self._window(tok, ids)
        if new and not new.endswith("\ufffd"):
            self.text += new
            self.text_from, self.text_upto = self.text_upto, len(ids)
        return self.text

    def final(self, tok, ids: list[int]) -> str:
        """The whole text at the end: a character cut off by the last token stays U+FFFD, as a decode of all
        of `ids` gives it."""
        if tok is not None and self.text_upto < len(ids):
            self.text += self._window(tok, ids)
            self.text_from = self.text_upto = len(ids)
        return self.text

    def flush(self, upto: int) -> str:
        """The text from what was sent up to character `upto`, now counted as sent."""
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return piece

    def _window(self, tok, ids: list[int]) -> str:
        """The text the ids after `text_upto` add, decoded with the window's earlier ids as context."""
        before = tok.decode(ids[self.text_from:self.text_upto], skip_special=True)
        return tok.decode(ids[self.text_from:], skip_special=True)[len(before):]


def first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string begins in `text` (searching from just before what was sent)."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` may be sent: not a tail that could begin a stop string, nor a cut character."""
    end = len(text)
    if text.endswith("\ufffd"):
        end = len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:n], 0, end):   # no slice: a copy of the whole text per step
                end -= n
                break
    return end
