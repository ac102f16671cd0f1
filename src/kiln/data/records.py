"""What flows through the data stage: a record is a `Doc`, a `Drop` or a `Quarantined`.

Every input record ends as exactly one of: kept (a `Doc` written to a split),
a `Drop` (step and reason, counted), or `Quarantined` (malformed input, listed
with file and line). That is how `report.json` accounts for every record.

A step is a small object with a `name` and `__call__(doc) -> Doc | Drop`
(datatrove's `BaseFilter` shape): it keeps, rewrites or drops one document and
never counts anything itself; the caller counts every `Drop` by step and reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class Doc:
    text: str
    source: str
    """The source string as given in `data.sources` (e.g. `python-stdlib` or a path)."""
    meta: dict[str, Any]
    """Where the text came from: {"path": relative to the source root, "line" or "row": 1-based}."""
    flags: tuple[str, ...] = field(default=())
    """Things that happened on the way (`decode_replaced`, `normalized`): counted, never written."""


@dataclass(frozen=True, slots=True)
class Drop:
    step: str
    reason: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    file: str
    line: int | None
    """1-based line (row for Parquet) where the bad input starts; None when the whole file is bad."""
    reason: str


Record = Doc | Drop | Quarantined


class Step(Protocol):
    name: str

    def __call__(self, doc: Doc) -> Doc | Drop: ...


def run_steps(doc: Doc, steps: list[Step]) -> Doc | Drop:
    """Pass `doc` through `steps` in order; the first `Drop` ends it."""
    for step in steps:
        out = step(doc)
        if isinstance(out, Drop):
            return out
        doc = out
    return doc
