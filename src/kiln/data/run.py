"""The data stage: sources -> read -> normalize -> length filter -> exact dedup -> split -> Parquet + report.

Reading, normalising and length-filtering are per file and run in a process
pool (`data.workers`); `imap` over the sorted file list hands results back in
file order, so the output is byte-identical whatever the worker count. Dedup
(which needs everything seen so far) and the split run in the parent, which
streams kept documents into shard writers.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kiln.config import Config, ConfigError, DataConfig
from kiln.data.dedup import SPLITS, ExactDedup, doc_id, split_of
from kiln.data.normalize import LengthFilter, Normalize
from kiln.data.readers import FileTask, read_file
from kiln.data.records import Doc, Drop, Quarantined, Record, Step, run_steps
from kiln.data.report import Tally, build_report, summary_lines
from kiln.data.sources import resolve_sources
from kiln.data.writer import ShardWriter
from kiln.rundir import RunDir, clear_done, write_json_atomic


@dataclass
class FileResult:
    size: int
    """Bytes on disk (compressed size for .gz / .zst): the throughput figure's numerator."""
    records: list[Record]


def run_data(cfg: Config) -> dict:
    """Build `data/{train,val,test}/part-NNNNN.parquet` and `data/report.json`; return the report.

    Replaces any earlier output of the stage. Raises ConfigError (a ValueError) only for unusable
    configuration, e.g. a source that matches nothing; bad input is quarantined and counted instead.
    """
    d = cfg.data
    _check(d)
    tasks = resolve_sources(d.sources)   # before deleting anything: a typo must not cost the old output
    out = RunDir(cfg.run_path).data
    _clean(out)
    workers = _n_workers(d.workers, len(tasks))
    print(f"data: {len(tasks)} files from {', '.join(d.sources)}; {workers} worker(s) -> {out}", flush=True)

    start = time.perf_counter()
    tally = Tally()
    parent_steps: list[Step] = [ExactDedup()] if d.dedup else []
    writers = {split: ShardWriter(out / split, d.shard_docs) for split in SPLITS}
    for task, record in _records(tasks, d, workers, tally):
        _route(task, record, tally, parent_steps, writers, d)
    for w in writers.values():
        w.close()
    elapsed = time.perf_counter() - start

    splits = {s: {"docs": w.docs, "bytes": w.bytes, "shards": w.shards} for s, w in writers.items()}
    report = build_report(
        tally, splits, elapsed_s=elapsed, workers=workers,
        enabled={"normalize": d.normalize, "exact_dedup": d.dedup},
        max_docs_reached=d.max_docs is not None and tally.records_in >= d.max_docs)
    write_json_atomic(out / "report.json", report)
    _print_summary(report, out)
    return report


def process_file(task: FileTask, steps: list[Step], text_key: str, limit: int | None) -> FileResult:
    """Read one file and pass each document through `steps` (runs in a worker process)."""
    try:
        size = os.stat(task.path).st_size
    except OSError:
        size = 0   # read_file quarantines it and says why
    records = [run_steps(r, steps) if isinstance(r, Doc) else r for r in read_file(task, text_key, limit)]
    return FileResult(size, records)


def _route(task: FileTask, record: Record, tally: Tally, parent_steps: list[Step],
           writers: dict[str, ShardWriter], d: DataConfig) -> None:
    """Count one record where its fate is decided; write it to its split if kept."""
    if isinstance(record, Quarantined):
        tally.quarantine_one(task, record)
        return
    if isinstance(record, Drop):
        tally.drop(task, record)
        return
    tally.flags_of(record)
    kept = run_steps(record, parent_steps)
    if isinstance(kept, Drop):
        tally.drop(task, kept)
        return
    did = doc_id(kept.text)
    writers[split_of(did, d.val_fraction, d.test_fraction)].add(kept, did, len(kept.text.encode("utf-8")))
    tally.keep(task)


def _records(tasks: list[FileTask], d: DataConfig, workers: int, tally: Tally) -> Iterator[tuple[FileTask, Record]]:
    """Every input record in order, stopping after `max_docs`; counts files and records into `tally`."""
    cap = d.max_docs
    with contextlib.closing(_file_results(tasks, d, workers)) as results:
        for task, result in results:
            if cap is not None and tally.records_in >= cap:
                return   # closing the generator terminates the pool: no reading past the cap
            tally.file(task, result.size)
            for record in result.records[: None if cap is None else cap - tally.records_in]:
                tally.record_in(task)
                yield task, record


def _file_results(tasks: list[FileTask], d: DataConfig, workers: int) -> Iterator[tuple[FileTask, FileResult]]:
    steps: list[Step] = ([Normalize()] if d.normalize else []) + [LengthFilter(d.min_chars, d.max_doc_chars)]
    # Each file is capped at max_docs records too, so a quick run never reads a huge file whole.
    work = functools.partial(process_file, steps=steps, text_key=d.text_key, limit=d.max_docs)
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(work, tasks)   # in-process: same function, same order, easier to debug
        else:
            # spawn, not fork: forking a process that has threads (tqdm's monitor, a caller's) can deadlock.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap(work, tasks, chunksize=_chunksize(len(tasks), workers))
        bar = stack.enter_context(tqdm(total=len(tasks), unit="file", desc="data", disable=None, leave=False))
        for task, result in zip(tasks, results):
            bar.update()
            yield task, result


def _chunksize(n_tasks: int, workers: int) -> int:
    # Small enough to keep both the workers and the progress bar busy, big enough to amortise IPC.
    return max(1, min(16, n_tasks // (workers * 16)))


def _n_workers(requested: int, n_tasks: int) -> int:
    return max(1, min(requested or os.cpu_count() or 1, n_tasks))


def _check(d: DataConfig) -> None:
    d.validate()
    if d.max_docs is not None and d.max_docs < 0:
        raise ConfigError(f"data.max_docs={d.max_docs} must be >= 0 (or null to read everything)")
    if d.min_chars < 0 or d.max_doc_chars < max(d.min_chars, 1):
        raise ConfigError(f"data.min_chars={d.min_chars} and data.max_doc_chars={d.max_doc_chars}: "
                          "need 0 <= min_chars <= max_doc_chars and max_doc_chars >= 1")
    if not d.text_key:
        raise ConfigError("data.text_key is empty: name the field holding the text in .jsonl / .parquet inputs")


def _clean(out: Path) -> None:
    """Remove the previous output of this stage so a rerun leaves nothing stale behind."""
    clear_done(out)   # the old _SUCCESS must not vouch for a half-written new output
    for split in SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
    (out / "report.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _print_summary(r: dict, out: Path) -> None:
    for line in summary_lines(r):
        print(line)
    print(f"data: kept {r['kept']} of {r['records_in']} records, quarantined {r['quarantined']}; "
          f"{r['input_bytes'] / 1e6:.1f} MB in {r['elapsed_s']:.1f} s ({r['throughput_mb_s']:.1f} MB/s); "
          f"report: {out / 'report.json'}", flush=True)
