"""Language identification with py3langid, whose model ships inside the wheel (works offline).

Why not fastText's `lid.176.ftz` (FineWeb's choice): it is a separate download
from a hub these machines cannot reach, and no PyPI package ships it; see
docs/decisions.md for the measurement. The model loads once per process (~0.5 s).
"""

from __future__ import annotations

import dataclasses
import functools

from kiln.config import LanguageConfig
from kiln.data.records import Doc, Drop

MAX_CHARS = 20_000
"""Classify at most this many characters: the language is settled long before, and time grows with length."""


@functools.cache
def identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language."""
    lang, score = identifier().classify(text[:MAX_CHARS].replace("\n", " "))
    return lang, float(score)


@dataclasses.dataclass
class LanguageFilter:
    """Keeps documents in `cfg.languages` scoring >= `cfg.min_score`; drops `language_<code>` or `low_score`."""

    cfg: LanguageConfig
    name: str = "language"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        lang, score = detect(doc.text)
        if lang not in self.cfg.languages:
            return Drop(self.name, f"language_{lang}")
        if score < self.cfg.min_score:
            return Drop(self.name, "low_score")
        return doc
