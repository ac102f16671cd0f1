"""Counting every record, and the `report.json` + summary lines made from the counts.

The invariant the report proves: records_in = kept + sum(dropped) + quarantined.
Each record is counted once, where its fate is decided; per-step in/out document
figures are derived from those counts, so they cannot disagree with the totals.
Bytes and seconds per step are measured in the workers (over every record they
processed) and summed over processes: MB/s per step is per core.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

from kiln.data.dedup import SPLITS
from kiln.data.readers import FileTask
from kiln.data.records import Drop, Quarantined, StepStats
from kiln.data.sources import Skipped
from kiln.data.steps import CHANGE_FLAGS

KNOWN_REASONS = ("empty", "too_short", "too_long", "duplicate")
LIST_MAX = 100
"""Quarantined records (and files with decode warnings) listed by name; the counts are always exact."""
EXAMPLES_PER_REASON = 3
SKIPPED_EXAMPLES = 10
"""Skipped files named per reason; past LIST_MAX reasons, the rest are counted under one."""


@dataclasses.dataclass
class SourceCounts:
    files: int = 0
    input_bytes: int = 0
    records_in: int = 0
    kept: int = 0
    dropped: int = 0
    quarantined: int = 0


class Tally:
    def __init__(self) -> None:
        self.records_in = 0
        self.kept = 0
        self.quarantined = 0
        self.drops: Counter[tuple[str, str]] = Counter()     # (step, reason) -> records
        self.flags: Counter[str] = Counter()                  # decode_replaced, normalized, pii:email, ...
        self.changed: Counter[str] = Counter()                # step -> documents it rewrote
        self.quarantine: list[dict[str, Any]] = []            # first LIST_MAX entries
        self.decode_replaced_files: list[str] = []            # first LIST_MAX entries
        self.examples: dict[str, list[dict[str, Any]]] = {}   # "step/reason" -> first few dropped docs
        self.sources: dict[str, SourceCounts] = {}
        self.skipped: dict[str, dict[str, Any]] = {}          # reason -> {"count", "examples"}
        self.files = 0
        self.input_bytes = 0

    def _source(self, task: FileTask) -> SourceCounts:
        return self.sources.setdefault(task.source, SourceCounts())

    def file(self, task: FileTask, size: int) -> None:
        self.files += 1
        self.input_bytes += size
        self._source(task).files += 1
        self._source(task).input_bytes += size

    def skip_file(self, skipped: Skipped) -> None:
        """A file of a source that is not read (it holds no records, so the record counts do not change)."""
        reason = skipped.reason
        if reason not in self.skipped and len(self.skipped) >= LIST_MAX:
            reason = "other reasons"
        entry = self.skipped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < SKIPPED_EXAMPLES:
            entry["examples"].append(f"{skipped.source}:{skipped.rel}")

    def record_in(self, task: FileTask) -> None:
        self.records_in += 1
        self._source(task).records_in += 1

    def drop(self, task: FileTask, drop: Drop, snippet: str | None = None, meta: str | None = None) -> None:
        self.drops[drop.step, drop.reason] += 1
        self._source(task).dropped += 1
        shown = self.examples.setdefault(f"{drop.step}/{drop.reason}", [])
        if snippet is not None and len(shown) < EXAMPLES_PER_REASON:
            where = json.loads(meta) if meta else {}
            shown.append({**where, "source": task.source, "text": snippet})   # kept fields may use these names

    def quarantine_one(self, task: FileTask, bad: Quarantined) -> None:
        self.quarantined += 1
        self._source(task).quarantined += 1
        if len(self.quarantine) < LIST_MAX:
            self.quarantine.append({"file": bad.file, "line": bad.line, "reason": bad.reason, "source": task.source})

    def flags_from(self, flags: str | None, task: FileTask, meta: str | None) -> None:
        """Count the flags (comma-joined) of a document the workers kept."""
        if not flags:
            return
        names = flags.split(",")
        self.flags.update(names)
        for step, prefixes in CHANGE_FLAGS.items():
            if any(n.startswith(prefixes) for n in names):
                self.changed[step] += 1
        if "decode_replaced" in names and len(self.decode_replaced_files) < LIST_MAX:
            self.decode_replaced_files.append(f"{task.source}:{json.loads(meta)['path']}")

    def keep(self, task: FileTask) -> None:
        self.kept += 1
        self._source(task).kept += 1

    def dropped_by_reason(self) -> dict[str, int]:
        out = dict.fromkeys(KNOWN_REASONS, 0)
        for (_, reason), n in sorted(self.drops.items()):
            out[reason] = out.get(reason, 0) + n
        return out

    def check(self) -> None:
        total = self.kept + sum(self.drops.values()) + self.quarantined
        assert self.records_in == total, f"accounting broken: in {self.records_in} != {total}"


def build_report(t: Tally, splits: dict[str, dict[str, int]], *, steps: list[str], enabled: dict[str, bool],
                 stats: StepStats, elapsed_s: float, workers: int, max_docs_reached: bool) -> dict[str, Any]:
    """The report.json dict. `splits`: split -> {docs, bytes, shards}; `steps`: names in pipeline order."""
    t.check()
    return {
        "records_in": t.records_in,
        "kept": t.kept,
        "dropped": t.dropped_by_reason(),
        "quarantined": t.quarantined,
        "accounting": "records_in = kept + sum(dropped) + quarantined",
        "steps": _steps(t, splits, steps, enabled, stats),
        "splits": splits,
        "sources": {name: dataclasses.asdict(c) for name, c in t.sources.items()},
        "quarantine": t.quarantine,
        "quarantine_listed": len(t.quarantine),
        "examples": {k: v for k, v in sorted(t.examples.items()) if v},
        "pii": {f.split(":", 1)[1]: n for f, n in sorted(t.flags.items()) if f.startswith("pii:")},
        "warnings": {"decode_replaced": {"count": t.flags["decode_replaced"], "files": t.decode_replaced_files}},
        "files": t.files,
        "skipped_files": {"count": sum(e["count"] for e in t.skipped.values()),
                          "by_reason": dict(sorted(t.skipped.items(), key=lambda kv: -kv[1]["count"]))},
        "input_bytes": t.input_bytes,
        "max_docs_reached": max_docs_reached,
        "workers": workers,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_mb_s": round(t.input_bytes / 1e6 / max(elapsed_s, 1e-9), 2),
        "docs_per_s": round(t.records_in / max(elapsed_s, 1e-9), 1),
    }


def _steps(t: Tally, splits: dict[str, dict[str, int]], steps: list[str], enabled: dict[str, bool],
           stats: StepStats) -> list[dict[str, Any]]:
    """Per-step in / out / dropped-by-reason, chained: each step's `in` is the previous step's `out`."""
    rows, n = [], t.records_in
    for step in steps:
        dropped = {reason: c for (s, reason), c in sorted(t.drops.items()) if s == step}
        row: dict[str, Any] = {"step": step, "enabled": enabled.get(step, True), "in": n}
        n -= sum(dropped.values())
        if step == "read":
            row["quarantined"] = t.quarantined
            n -= t.quarantined
        if step in CHANGE_FLAGS:
            row["changed"] = t.changed[step]   # documents, not replacements (pii counts those per type)
        rows.append({**row, "out": n, "dropped": dropped, **_measured(stats.rows.get(step))})
    assert n == t.kept, (n, t.kept)
    rows.append({"step": "split", "enabled": True, "in": n, "out": {s: splits[s]["docs"] for s in SPLITS}})
    return rows


def _measured(row: list[float] | None) -> dict[str, Any]:
    if not row:
        return {}
    docs_in, bytes_in, docs_out, bytes_out, seconds = row
    return {"measured": {"docs_in": int(docs_in), "bytes_in": int(bytes_in), "docs_out": int(docs_out),
                         "bytes_out": int(bytes_out), "cpu_s": round(seconds, 3),
                         "docs_per_s": round(docs_in / max(seconds, 1e-9), 1),
                         "mb_per_s": round(bytes_in / 1e6 / max(seconds, 1e-9), 2)}}


def summary_lines(r: dict[str, Any]) -> list[str]:
    """One short line per step for the terminal."""
    lines = []
    for row in r["steps"]:
        name = f"  {row['step']:<19}"
        if row["step"] == "split":
            parts = [f"{s} {v['docs']} docs {v['bytes'] / 1e6:.1f} MB in {v['shards']} shards"
                     for s, v in r["splits"].items()]
            lines.append(name + ", ".join(parts))
            continue
        if not row["enabled"]:
            lines.append(name + "off")
            continue
        extra = [f"{k} {v}" for k, v in row["dropped"].items()]
        if "quarantined" in row:
            extra.append(f"quarantined {row['quarantined']}")
        if row.get("changed"):
            extra.append(f"changed {row['changed']}")
        if "measured" in row:
            extra.append(f"{row['measured']['mb_per_s']} MB/s/core")
        lines.append(f"{name}{row['in']} -> {row['out']}" + (f"  ({', '.join(extra)})" if extra else ""))
    return lines
