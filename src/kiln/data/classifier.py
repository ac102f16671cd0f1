"""fastText quality classifier: trained from user-given positive and negative files, then scores documents.

Uses `fasttext-numpy2-wheel` (the plain `fasttext` wheels crash under NumPy 2).
Word bigrams (`wordNgrams=2`, as DCLM's classifier): with the default unigrams
and hashed n-gram buckets, this wheel's training ends in "Encountered NaN" (seen
here with fasttext-numpy2-wheel 0.9.2), so unigram settings are not offered.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

from kiln.config import ClassifierConfig, ConfigError
from kiln.data.readers import FileTask, format_of, read_file
from kiln.data.records import Doc, Drop

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"


def _examples(paths: list[str], key: str, text_key: str) -> list[str]:
    out = []
    for i, path in enumerate(paths):
        if not Path(path).is_file() or format_of(path) is None:
            raise ConfigError(f"{key}[{i}]: `{path}` is not a readable .txt/.md/.jsonl/.json/.parquet file")
        out += [" ".join(r.text.split()) for r in read_file(FileTask(path, Path(path).name, path), text_key)
                if isinstance(r, Doc) and r.text.strip()]
    if not out:
        raise ConfigError(f"{key}: no documents in {paths}")
    return out


def train(cfg: ClassifierConfig, out: Path, text_key: str = "text") -> Path:
    """Train on cfg.positive / cfg.negative, save to `out`; returns the path."""
    import fasttext

    pos = _examples(cfg.positive, "data.quality_classifier.positive", text_key)
    neg = _examples(cfg.negative, "data.quality_classifier.negative", text_key)
    lines = [f"{POSITIVE} {t}" for t in pos] + [f"{NEGATIVE} {t}" for t in neg]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out.parent, delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        model = fasttext.train_supervised(f.name, epoch=cfg.epochs, wordNgrams=2, verbose=0, thread=1, seed=0)
    finally:
        os.unlink(f.name)
    model.save_model(str(out))
    return out


@functools.cache
def _model(path: str):
    import fasttext
    return fasttext.load_model(path)


def score(text: str, model_path: str) -> float:
    """Probability of the positive (high-quality) label."""
    labels, probs = _model(model_path).predict(" ".join(text.split()), k=2)
    return float(dict(zip(labels, probs)).get(POSITIVE, 0.0))


@dataclasses.dataclass
class QualityClassifier:
    """Drops prose scoring below `cfg.threshold` as `low_quality`."""

    cfg: ClassifierConfig
    model_path: str
    name: str = "quality_classifier"
    kinds: tuple[str, ...] = ("prose",)

    def __call__(self, doc: Doc) -> Doc | Drop:
        if score(doc.text, self.model_path) < self.cfg.threshold:
            return Drop(self.name, "low_quality")
        return doc
