"""What flows through the data stage: a record is a `Doc`, a `Drop` or a `Quarantined`.

Every input record ends as exactly one of: kept (a `Doc` written to a split),
a `Drop` (step and reason, counted), or `Quarantined` (malformed input, listed
with file and line). That is how `report.json` accounts for every record.

A step is a small object with a `name`, the document `kinds` it applies to and
`__call__(doc) -> Doc | Drop` (datatrove's `BaseFilter` shape): it keeps,
rewrites or drops one document and never counts anything itself; the caller
counts every `Drop` by step and reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol


@dataclass(slots=True)
class Doc:
    text: str
    source: str
    """The source string as given in `data.sources` (e.g. `python-stdlib` or a path)."""
    meta: dict[str, Any]
    """Where the text came from: {"path": relative to the source root, "line", "record" (of a JSON array) or
    "row": 1-based}, and the record's own `id` and `data.keep_fields` when it has them."""
    flags: tuple[str, ...] = field(default=())
    """Things that happened on the way (`decode_replaced`, `normalized`, `pii:email`): counted, never written."""
    kind: str = "prose"
    """`prose` or `code`, from the source (see `sources.content_type`): picks which rules apply."""

    def rewritten(self, text: str, flag: str) -> Doc:
        """This document with `text`, flagged by the step that changed it; itself when nothing changed."""
        if text == self.text:
            return self
        return replace(self, text=text, flags=self.flags + (flag,))


class TextRule:
    """A filter decided by the text alone: subclasses give `name` and `reason(text)` (None = keep)."""

    name: str

    def reason(self, text: str) -> str | None:
        raise NotImplementedError

    def __call__(self, doc: Doc) -> Doc | Drop:
        reason = self.reason(doc.text)
        return Drop(self.name, reason) if reason else doc


@dataclass(frozen=True, slots=True)
class Drop:
    step: str
    reason: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    file: str
    line: int | None
    """1-based line (row for Parquet) where the bad input starts (a JSON array's record: the line it starts
    on, its index in `reason`); None when the whole file is bad."""
    reason: str


Record = Doc | Drop | Quarantined


ALL_KINDS = ("prose", "code")


class Step(Protocol):
    name: str
    kinds: tuple[str, ...]
    """Document kinds the step applies to; others pass through untouched (and uncounted by it)."""

    def __call__(self, doc: Doc) -> Doc | Drop: ...


def run_steps(doc: Doc, steps: list[Step], stats: StepStats | None = None) -> Doc | Drop:
    """Pass `doc` through `steps` in order; the first `Drop` ends it. `stats` gathers time and bytes per step."""
    for step in steps:
        if doc.kind not in step.kinds:
            continue
        if stats is None:
            out = step(doc)
        else:
            out = stats.timed(step, doc)
        if isinstance(out, Drop):
            return out
        doc = out
    return doc


class StepStats:
    """Per step: documents and UTF-8 bytes in and out, and seconds spent (in this process)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}   # name -> [docs_in, bytes_in, docs_out, bytes_out, seconds]

    def timed(self, step: Step, doc: Doc) -> Doc | Drop:
        size = len(doc.text.encode("utf-8"))
        start = time.perf_counter()
        out = step(doc)
        row = self.rows.setdefault(step.name, [0, 0, 0, 0, 0.0])
        row[4] += time.perf_counter() - start
        row[0] += 1
        row[1] += size
        if isinstance(out, Doc):
            row[2] += 1
            row[3] += size if out.text is doc.text else len(out.text.encode("utf-8"))
        return out

    def add(self, name: str, docs_in: int, bytes_in: int, docs_out: int, bytes_out: int, seconds: float) -> None:
        row = self.rows.setdefault(name, [0, 0, 0, 0, 0.0])
        for i, v in enumerate((docs_in, bytes_in, docs_out, bytes_out, seconds)):
            row[i] += v

    def merge(self, rows: dict[str, list[float]]) -> None:
        for name, row in rows.items():
            self.add(name, *row)
