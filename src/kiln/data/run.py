"""The data stage driver: sources -> file tasks (per-document steps) -> dedup across files -> split -> Parquet.

1. Every input file is one task, run in a process pool (`data.workers`) or on Ray
   (`data.executor`, see `executors.py`): read,
   then the per-document steps (`steps.build_steps`); the outcome of every
   record is saved under `data/_work/<config hash>/` with a completion marker
   (`tasks.py`), so a killed run redoes only unfinished files.
2. The parent walks the task results in file order and accounts every record;
   kept documents go through exact dedup (128-bit text hash) and MinHash LSH
   near-dedup (union-find over all files; the first document of each cluster
   is kept), which need everything seen so far.
3. Survivors are split by document-id hash and streamed into shard writers.
Results are consumed in file order whatever the worker count, so the output
is byte-identical for any `workers` and for an interrupted-then-resumed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

import kiln
from kiln.config import Config, ConfigError, DataConfig
from kiln.data import decontam
from kiln.data.dedup import SPLITS, doc_id, split_of
from kiln.data.minhash import NearDedup
from kiln.data.readers import FORMATS, FileTask
from kiln.data.records import Doc, Drop, Quarantined, StepStats
from kiln.data.report import Tally, build_report, summary_lines
from kiln.data.sources import resolve_sources
from kiln.data.steps import build_steps, enabled, prepare
from kiln.data.executors import ray_module, task_results
from kiln.data.tasks import DROPPED, QUARANTINED, TaskSpec, task_paths
from kiln.data.writer import ShardWriter
from kiln.data import benchmarks as registry
from kiln.config.rundir import RunDir, clear_done, write_json_atomic

ACCOUNT_COLUMNS = ["status", "step", "reason", "snippet", "meta", "line", "file", "flags", "hash_hi", "hash_lo", "bands"]


def run_data(cfg: Config) -> dict:
    """Build `data/{train,val,test}/part-NNNNN.parquet` and `data/report.json`; return the report.

    Replaces any earlier output of the stage (finished file tasks of an interrupted run with the same
    config are reused). Raises ConfigError (a ValueError) only for unusable configuration; bad input
    is quarantined and counted instead.
    """
    d = cfg.data
    _check(d)
    resolved = resolve_sources(d.sources, d.code_sources, d.prose_sources)   # before deleting anything
    tasks = resolved.tasks
    out = RunDir(cfg.run_path).data
    work = _prepare_out(out, d)
    workers = _n_workers(d.workers, len(tasks))
    kinds = sorted({t.kind for t in tasks})
    where = f"{workers} worker(s)" if d.executor == "local" else "Ray (RAY_ADDRESS, or a local instance)"
    print(f"data: {len(tasks)} files ({'/'.join(kinds)}) from {', '.join(d.sources)}; {where} -> {out}", flush=True)
    if resolved.skipped:
        print(f"data: skipping {len(resolved.skipped)} files no reader takes (supported: {' '.join(FORMATS)}); "
              "data/report.json lists them under skipped_files", flush=True)

    start = time.perf_counter()
    steps = build_steps(d, prepare(d, work, out))
    spec = TaskSpec(steps, d.text_key, d.max_docs, d.near_dedup if d.near_dedup.enabled else None, str(work),
                    tuple(d.keep_fields))
    tally, stats = Tally(), StepStats()
    for skipped in resolved.skipped:
        tally.skip_file(skipped)
    taken = _account(task_results(tasks, spec, workers, d.executor), d, tally, stats)
    splits = _write(taken, d, tally, out)
    elapsed = time.perf_counter() - start

    on = {**enabled(d), "exact_dedup": d.dedup, "near_dedup": d.near_dedup.enabled}
    report = build_report(
        tally, splits, steps=["read", *d.steps, "exact_dedup", "near_dedup"], enabled=on, stats=stats,
        elapsed_s=elapsed, workers=workers,
        max_docs_reached=d.max_docs is not None and tally.records_in >= d.max_docs)
    report["decontaminated_against"] = [{"benchmark": label, "file": path}
                                        for label, path, _, _ in _benchmark_files(d)]
    write_json_atomic(out / "report.json", report)
    shutil.rmtree(out / "_work", ignore_errors=True)   # done: the splits and _SUCCESS take over
    _print_summary(report, out)
    return report


@dataclasses.dataclass
class Taken:
    """One task's records that count (up to max_docs) and what the parent decided for its kept rows."""

    index: int
    task: FileTask
    work_dir: str
    n: int
    verdict: dict[int, str]
    """Row -> `keep`, `duplicate` or `near_duplicate`, for rows the workers kept."""


def _account(results: Iterator[tuple[int, FileTask, dict]], d: DataConfig, tally: Tally,
             stats: StepStats) -> list[Taken]:
    """Count every record, run exact and near dedup over kept ones; returns what pass 2 writes."""
    cap = d.max_docs
    # One 128-bit text hash per kept document (~100 bytes each in a set: ~1 GB per 10M documents); 128 bits
    # make an accidental collision, which would drop a distinct document, practically impossible.
    seen: set[tuple[int, int]] = set()
    near = NearDedup(d.near_dedup.bands)
    pending: list[tuple[Taken, int, int]] = []   # (task, row, near index) of exact-unique docs
    taken: list[Taken] = []
    with contextlib.closing(results):
        for index, task, side in results:
            if cap is not None and tally.records_in >= cap:
                break   # closing the generator terminates the pool: no reading past the cap
            tally.file(task, side["input"]["size"])
            stats.merge(side["stats"])
            n = side["records"] if cap is None else min(side["records"], cap - tally.records_in)
            t = Taken(index, task, side["work_dir"], n, {})
            taken.append(t)
            table = pq.read_table(task_paths(t.work_dir, index)[0], columns=ACCOUNT_COLUMNS)
            for row, r in enumerate(table.slice(0, n).to_pylist()):
                tally.record_in(task)
                if r["status"] == QUARANTINED:
                    tally.quarantine_one(task, Quarantined(r["file"], r["line"], r["reason"]))
                elif r["status"] == DROPPED:
                    tally.drop(task, Drop(r["step"], r["reason"]), r["snippet"], r["meta"])
                else:
                    tally.flags_from(r["flags"], task, r["meta"])
                    key = (r["hash_hi"], r["hash_lo"])
                    if d.dedup and key in seen:
                        t.verdict[row] = "duplicate"
                        continue
                    seen.add(key)
                    i = near.add(_bands(r["bands"])) if d.near_dedup.enabled else -1
                    pending.append((t, row, i))
    for t, row, i in pending:
        t.verdict[row] = "keep" if i < 0 or near.keep(i) else "near_duplicate"
    return taken


def _bands(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint64)


def _write(taken: list[Taken], d: DataConfig, tally: Tally, out: Path) -> dict[str, dict[str, int]]:
    """Pass 2: stream kept texts into the split writers in input order; count dedup drops with examples."""
    writers = {split: ShardWriter(out / split, d.shard_docs) for split in SPLITS}
    for t in tqdm(taken, unit="file", desc="data: write", disable=None, leave=False):
        if not t.verdict:
            continue
        path = task_paths(t.work_dir, t.index)[0]
        table = pq.read_table(path, columns=["text", "meta"]).slice(0, t.n)
        texts, metas = table.column("text").to_pylist(), table.column("meta").to_pylist()
        for row, verdict in sorted(t.verdict.items()):
            text = texts[row]
            if verdict != "keep":
                step = "exact_dedup" if verdict == "duplicate" else "near_dedup"
                tally.drop(t.task, Drop(step, verdict), text[:300], metas[row])
                continue
            did = doc_id(text)
            doc = Doc(text, t.task.source, json.loads(metas[row]))
            writers[split_of(did, d.val_fraction, d.test_fraction)].add(doc, did, len(text.encode("utf-8")))
            tally.keep(t.task)
    for w in writers.values():
        w.close()
    return {s: {"docs": w.docs, "bytes": w.bytes, "shards": w.shards} for s, w in writers.items()}


def _n_workers(requested: int, n_tasks: int) -> int:
    return max(1, min(requested or os.cpu_count() or 1, n_tasks))


def _check(d: DataConfig) -> None:
    d.validate()
    if d.executor == "ray":
        ray_module()   # missing Ray stops the run before it deletes the previous output
    if d.max_docs is not None and d.max_docs < 0:
        raise ConfigError(f"data.max_docs={d.max_docs} must be >= 0 (or null to read everything)")
    if d.min_chars < 0 or d.max_doc_chars < max(d.min_chars, 1):
        raise ConfigError(f"data.min_chars={d.min_chars} and data.max_doc_chars={d.max_doc_chars}: "
                          "need 0 <= min_chars <= max_doc_chars and max_doc_chars >= 1")
    if not d.text_key:
        raise ConfigError("data.text_key is empty: name the field holding the text in .jsonl / .json / .parquet "
                          "inputs")


def fingerprint(d: DataConfig) -> str:
    """Hash of everything that changes a task's result (not `workers`, `resume` or `executor`), including
    which benchmark files decontamination resolves to: installing one between a crash and the resume must
    not let finished tasks, checked against the old set, count."""
    cfg = {k: v for k, v in dataclasses.asdict(d).items() if k not in ("workers", "resume", "executor")}
    blob = json.dumps({"kiln": kiln.__version__, "data": cfg, "benchmarks": _benchmark_files(d)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _benchmark_files(d: DataConfig) -> list[list]:
    """[label, path, size, mtime_ns] of every benchmark decontamination will read (empty when it is off)."""
    if not (d.decontaminate.enabled and "decontaminate" in d.steps and d.decontaminate.benchmarks):
        return []
    chosen, _ = decontam.resolve(d.decontaminate)
    files = []
    for label, what in chosen:
        path = registry.get(what).path() if what.lower() in registry.REGISTRY else Path(what)
        st = path.stat() if path is not None and path.exists() else None
        files.append([label, str(path), st and st.st_size, st and st.st_mtime_ns])
    return files


def _prepare_out(out: Path, d: DataConfig) -> Path:
    """Remove the previous output; keep finished tasks of an interrupted run with this config. Returns the work dir."""
    clear_done(out)   # the old _SUCCESS must not vouch for a half-written new output
    for split in SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
    (out / "report.json").unlink(missing_ok=True)
    work = out / "_work" / fingerprint(d)
    if (out / "_work").exists():
        for old in (out / "_work").iterdir():
            if old != work or not d.resume:
                shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _print_summary(r: dict, out: Path) -> None:
    for line in summary_lines(r):
        print(line)
    print(f"data: kept {r['kept']} of {r['records_in']} records, quarantined {r['quarantined']}; "
          f"{r['input_bytes'] / 1e6:.1f} MB in {r['elapsed_s']:.1f} s ({r['throughput_mb_s']:.1f} MB/s); "
          f"report: {out / 'report.json'}", flush=True)
