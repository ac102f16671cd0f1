"""File-level tasks: read one file, run the per-document steps, save the outcome of every record.

A task's result is a Parquet file `task-NNNNNN.parquet` (one row per input
record, in order: kept / dropped / quarantined) plus a sidecar
`task-NNNNNN.json` written *after* it, which is the completion marker. A run
that is killed and restarted finds the markers and redoes only the other tasks;
a marker whose input file changed (size or mtime) does not count. Kept rows
carry what the parent needs to dedup across all files without reading the text
again: a 128-bit hash of the text and the MinHash band keys.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from kiln.config import NearDedupConfig
from kiln.data.minhash import band_keys
from kiln.data.readers import FileTask, read_file
from kiln.data.records import Doc, Drop, Quarantined, StepStats, run_steps

KEPT, DROPPED, QUARANTINED = 0, 1, 2
SNIPPET_CHARS = 300
"""Dropped records keep this much text, for the report's examples per drop reason."""
SCHEMA = pa.schema([
    ("status", pa.int8()), ("step", pa.string()), ("reason", pa.string()), ("text", pa.string()),
    ("snippet", pa.string()), ("meta", pa.string()), ("line", pa.int64()), ("file", pa.string()),
    ("flags", pa.string()), ("hash_hi", pa.uint64()), ("hash_lo", pa.uint64()), ("bands", pa.binary()),
])


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs besides the file: picklable (spawned workers get a copy)."""

    steps: list
    text_key: str
    limit: int | None
    near_dedup: NearDedupConfig | None
    work_dir: str
    keep_fields: tuple[str, ...] = ()
    """Record fields copied into each document's meta besides its `id` (`data.keep_fields`)."""


def task_paths(work_dir: str | Path, index: int) -> tuple[Path, Path]:
    base = Path(work_dir) / f"task-{index:06d}"
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def _identity(task: FileTask) -> dict:
    try:
        st = os.stat(task.path)
        return {"path": task.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": task.path, "size": 0, "mtime_ns": None}


def finished(index: int, task: FileTask, work_dir: str) -> dict | None:
    """The sidecar of a completed task whose input is unchanged, else None."""
    _, marker = task_paths(work_dir, index)
    try:
        side = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return side if side.get("input") == _identity(task) else None


def run_task(item: tuple[int, FileTask], spec: TaskSpec) -> dict:
    """Process one file (in a worker) unless already done; returns its sidecar dict."""
    index, task = item
    done = finished(index, task, spec.work_dir)
    if done is not None:
        return done
    ident = _identity(task)
    stats = StepStats()
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    kept_texts: list[str] = []
    for record in read_file(task, spec.text_key, spec.limit, spec.keep_fields):
        origin = record
        if isinstance(record, Doc):
            record.kind = task.kind
            record = run_steps(record, spec.steps, stats)
        _add_row(rows, record, origin, kept_texts)
    near = spec.near_dedup if spec.near_dedup is not None and (task.kind == "prose" or spec.near_dedup.code) else None
    _dedup_keys(rows, kept_texts, near, stats)
    table_path, marker = task_paths(spec.work_dir, index)
    tmp = table_path.with_name("." + table_path.name + ".tmp")
    pq.write_table(pa.table(rows, schema=SCHEMA), tmp, compression="zstd")
    os.replace(tmp, table_path)
    side = {"input": ident, "records": len(rows["status"]), "stats": stats.rows}
    tmp = marker.with_name("." + marker.name + ".tmp")
    tmp.write_text(json.dumps(side))
    os.replace(tmp, marker)   # written last: the task counts as done only once its table is complete
    return side


def _add_row(rows: dict[str, list], record, origin, kept_texts: list[str]) -> None:
    """One row for `record` (what the steps made of `origin`, the record as read)."""
    status, step, reason, text, snippet, meta, line, file, flags = KEPT, None, None, None, None, None, None, None, None
    if isinstance(record, Quarantined):
        status, step, reason, line, file = QUARANTINED, "read", record.reason, record.line, record.file
    elif isinstance(record, Drop):
        status, step, reason = DROPPED, record.step, record.reason
        if isinstance(origin, Doc):
            snippet, meta = origin.text[:SNIPPET_CHARS], json.dumps(origin.meta, separators=(",", ":"))
    else:
        text, meta, flags = record.text, json.dumps(record.meta, ensure_ascii=False, separators=(",", ":")), \
            ",".join(record.flags)
        kept_texts.append(text)
    for name, value in zip(("status", "step", "reason", "text", "snippet", "meta", "line", "file", "flags"),
                           (status, step, reason, text, snippet, meta, line, file, flags)):
        rows[name].append(value)


def _dedup_keys(rows: dict[str, list], texts: list[str], near: NearDedupConfig | None, stats: StepStats) -> None:
    """Fill hash_hi / hash_lo / bands for kept rows (None elsewhere); timed as the dedup steps' worker share."""
    start = time.perf_counter()
    hashes = [xxhash.xxh3_128_intdigest(t.encode("utf-8")) for t in texts]
    size = sum(len(t.encode("utf-8")) for t in texts)
    stats.add("exact_dedup", len(texts), size, len(texts), size, time.perf_counter() - start)
    start = time.perf_counter()
    keys = band_keys(texts, near) if near is not None else np.zeros((len(texts), 1), dtype=np.uint64)
    if near is not None:
        stats.add("near_dedup", len(texts), size, len(texts), size, time.perf_counter() - start)
    it = iter(range(len(texts)))
    for status in rows["status"]:
        if status == KEPT:
            i = next(it)
            rows["hash_hi"].append(hashes[i] >> 64)
            rows["hash_lo"].append(hashes[i] & (2**64 - 1))
            rows["bands"].append(keys[i].tobytes())
        else:
            rows["hash_hi"].append(None)
            rows["hash_lo"].append(None)
            rows["bands"].append(None)
