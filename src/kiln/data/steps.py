"""The pipeline definition: which per-document steps run, in which order, built from `DataConfig`.

The same list runs in a local process pool or on Ray (`executors.py`): steps
are small picklable objects; models they need (language ID, fastText) load once
per process from a path, never travel with the step.
"""

from __future__ import annotations

from pathlib import Path

from kiln.config import DataConfig
from kiln.data import classifier, decontam
from kiln.data.langid import LanguageFilter
from kiln.data.normalize import FixUnicode, LengthFilter, Normalize
from kiln.data.pii import ScrubPII
from kiln.data.quality import C4Filter, CodeQuality, FineWebQuality, GopherQuality, GopherRepetition
from kiln.data.records import Step

CHANGE_FLAGS = {
    "fix_unicode": ("unicode_fixed",), "normalize": ("normalized",), "c4": ("c4_lines_removed",),
    "decontaminate": ("excised",), "pii": ("pii:",),
}
"""Flag prefixes by which a step that rewrites documents says it changed one (the report counts documents)."""


def enabled(d: DataConfig) -> dict[str, bool]:
    """Step name -> switched on, for every per-document step."""
    return {
        "fix_unicode": d.fix_unicode, "normalize": d.normalize, "length_filter": True,
        "language": d.language.enabled, "gopher_quality": d.gopher_quality.enabled,
        "gopher_repetition": d.gopher_repetition.enabled, "c4": d.c4.enabled, "fineweb": d.fineweb.enabled,
        "code_quality": d.code_quality.enabled, "quality_classifier": d.quality_classifier.enabled,
        "pii": d.pii.enabled, "decontaminate": d.decontaminate.enabled and bool(d.decontaminate.benchmarks),
    }


def prepare(d: DataConfig, work: Path, out: Path) -> dict[str, str]:
    """Build what steps load from disk (benchmark n-grams, the trained classifier); name -> path."""
    paths = {}
    on = enabled(d)
    if on["decontaminate"] and "decontaminate" in d.steps:
        paths["decontaminate"] = str(decontam.build_index(d.decontaminate, work / "decontam-ngrams.npy"))
    q = d.quality_classifier
    if on["quality_classifier"] and "quality_classifier" in d.steps:
        if q.model_path and Path(q.model_path).is_file():
            paths["quality_classifier"] = q.model_path
        else:
            target = Path(q.model_path) if q.model_path else out / "quality.bin"
            paths["quality_classifier"] = str(classifier.train(q, target, d.text_key))
    return paths


def build_steps(d: DataConfig, paths: dict[str, str]) -> list[Step]:
    """The enabled per-document steps in `d.steps` order."""
    makers = {
        "fix_unicode": lambda: FixUnicode(),
        "normalize": lambda: Normalize(),
        "length_filter": lambda: LengthFilter(d.min_chars, d.max_doc_chars),
        "language": lambda: LanguageFilter(d.language),
        "gopher_quality": lambda: GopherQuality(d.gopher_quality),
        "gopher_repetition": lambda: GopherRepetition(d.gopher_repetition),
        "c4": lambda: C4Filter(d.c4),
        "fineweb": lambda: FineWebQuality(d.fineweb),
        "code_quality": lambda: CodeQuality(d.code_quality),
        "quality_classifier": lambda: classifier.QualityClassifier(d.quality_classifier,
                                                                   paths["quality_classifier"]),
        "pii": lambda: ScrubPII(d.pii),
        "decontaminate": lambda: decontam.Decontaminate(d.decontaminate, paths["decontaminate"]),
    }
    on = enabled(d)
    return [makers[name]() for name in d.steps if on[name]]
