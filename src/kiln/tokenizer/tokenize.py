"""Tokenize stage: data/{train,val,test}/*.parquet -> tokens/{split}/shard-NNNNN.parquet + tokens/meta.json.

One output shard per input shard (the i-th input file in sorted order gives
shard-i), one row per document: `id` (string) and `ids` (list<int32>, no
BOS/EOS; the loader adds separators). Each shard is streamed in batches of
`tokenize.batch_docs` documents and written to a temp file that is renamed
into place when complete, so a killed run leaves only whole shards. The
shard's Parquet key-value metadata records its counts, its source file
(name, size, mtime) and the tokenizer's SHA-256; a rerun keeps shards whose
record matches and redoes the rest. Output does not depend on worker count.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.config import Config
from kiln.config.rundir import RunDir, fsync_dir, write_json_atomic
from kiln.tokenizer.core import Tokenizer

SPLITS = ("train", "val", "test")
SHARD_NAME = "shard-{:05d}.parquet"
SCHEMA = pa.schema([("id", pa.string()), ("ids", pa.list_(pa.int32()))])
_COUNTS = ("docs", "tokens", "bytes")
# Text per encode_batch call. Bounds memory: tokenizers tracks alignments per byte while encoding
# and returns heavy Encoding objects. Peak RSS tokenizing the 31 MB stdlib corpus: 415 MB at 1 MB
# per call, 535 MB at 4 MB, 990 MB at 16 MB (= batch_docs 1000 of these files in one call).
ENCODE_BYTES = 2 << 20


@dataclass
class ShardJob:
    split: str
    src: str
    dst: str
    tokenizer: str
    tokenizer_sha256: str
    batch_docs: int


def run_tokenize(cfg: Config) -> dict[str, Any]:
    """Encode every data split with the run's tokenizer; returns (and writes) tokens/meta.json."""
    rd = RunDir(cfg.run_path)
    tok_file = rd.tokenizer_file()
    tok = Tokenizer.from_file(tok_file)   # fails early, naming `kiln tokenizer`, when missing
    sha = file_sha256(tok_file)
    if not any(rd.split_files(s) for s in SPLITS):
        raise FileNotFoundError(f"no Parquet shards under {rd.data}/{{train,val,test}}; run `kiln data` first")

    records: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    jobs: list[ShardJob] = []
    for split in SPLITS:
        srcs = rd.split_files(split)
        out_dir = rd.tokens / split
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_dir, len(srcs))
        for i, src in enumerate(srcs):
            dst = out_dir / SHARD_NAME.format(i)
            expected = {**source_record(src), "tokenizer_sha256": sha}
            record = shard_record(dst)
            if record is not None and all(record.get(k) == v for k, v in expected.items()):
                records[split].append(record)
            else:
                jobs.append(ShardJob(split, str(src), str(dst), str(tok_file), sha, cfg.tokenize.batch_docs))

    t0 = time.perf_counter()
    new = _run_jobs(jobs, cfg.tokenize.workers)
    seconds = time.perf_counter() - t0
    for job, record in zip(jobs, new):
        records[job.split].append(record)
    new_tokens = sum(r["tokens"] for r in new)

    meta: dict[str, Any] = {
        "tokenizer": str(tok_file),
        "tokenizer_sha256": sha,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "dtype": "int32",
        **{s: {**{k: sum(r[k] for r in records[s]) for k in _COUNTS}, "shards": len(records[s])} for s in SPLITS},
        "shards_encoded": len(jobs),
        "shards_kept": sum(map(len, records.values())) - len(jobs),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / seconds) if jobs and seconds > 0 else None,
    }
    write_json_atomic(rd.tokens / "meta.json", meta)
    parts = ", ".join(f"{s} {meta[s]['tokens']:,} tokens / {meta[s]['docs']:,} docs" for s in SPLITS)
    rate = f"{meta['tokens_per_s']:,} tokens/s" if meta["tokens_per_s"] else "nothing to encode"
    print(f"tokenize: {parts}; {len(jobs)} shard(s) encoded, {meta['shards_kept']} kept; "
          f"{seconds:.1f} s ({rate}) -> {rd.tokens}")
    return meta


# ---------------------------------------------------------------- workers

def _run_jobs(jobs: list[ShardJob], workers: int) -> list[dict[str, Any]]:
    """Encode shards in `processes(...)` processes; results in the order of `jobs`."""
    if not jobs:
        return []
    cores = os.cpu_count() or 1
    sizes = [Path(j.src).stat().st_size for j in jobs]
    procs = processes(workers, cores, sizes)
    if procs == 1:
        return [encode_shard(j) for j in jobs]      # tokenizers' own thread pool uses every core
    threads = max(1, cores // procs)
    # spawn, not fork: a forked child of a process that already used tokenizers' thread pool
    # gets parallelism disabled (or deadlocks), and fork is unsafe with threads in general.
    # (Scripts that call run_tokenize need the `if __name__ == "__main__":` guard.)
    ctx = mp.get_context("spawn")
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])      # biggest first: better balance
    with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        done = dict(zip(order, pool.map(encode_shard, [jobs[i] for i in order])))
    return [done[i] for i in range(len(jobs))]


def processes(workers: int, cores: int, shard_sizes: list[int]) -> int:
    """Worker processes: `workers` when set (at most one per shard), else automatic.

    Encoding runs on tokenizers' Rust thread pool; the Python work around it (reading, lists ->
    Arrow, writing) is ~5-10% of a shard's time, so one process should scale to several cores
    (an estimate, not measured beyond 2). Extra processes cost a spawn and split the cores
    between shards. Measured on 2 cores, 31 MB of stdlib: one process 3.7-4.0 s; two one-thread
    processes 4.0-4.1 s over 6 balanced shards but 6.6-6.9 s when one shard holds 97% of the
    text. So `auto` starts one process per 4 cores, no more than there are shards, and no more
    than the shards balance over (total size / largest shard).
    """
    if workers:
        return max(1, min(workers, len(shard_sizes)))
    balance = sum(shard_sizes) // max(1, max(shard_sizes, default=1))
    return max(1, min(cores // 4, len(shard_sizes), balance))


def _init_worker(threads: int) -> None:
    # Read by rayon when tokenizers first starts its pool, i.e. at the first encode_batch in this process.
    os.environ["RAYON_NUM_THREADS"] = str(threads)


_worker_tok: dict[tuple[str, str], Tokenizer] = {}


def _tokenizer(path: str, sha256: str) -> Tokenizer:
    """Loaded once per process; keyed by content too, as a retrained tokenizer reuses the path."""
    if (path, sha256) not in _worker_tok:
        _worker_tok.clear()
        _worker_tok[path, sha256] = Tokenizer.from_file(path)
    return _worker_tok[path, sha256]


def encode_shard(job: ShardJob) -> dict[str, Any]:
    """Encode one data shard into one token shard (temp file, fsync, rename); returns its record."""
    tok = _tokenizer(job.tokenizer, job.tokenizer_sha256)
    src, dst = Path(job.src), Path(job.dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    counts = dict.fromkeys(_COUNTS, 0)
    try:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for batch in pq.ParquetFile(src).iter_batches(batch_size=job.batch_docs, columns=["id", "text"]):
                texts = batch.column("text")
                if texts.null_count:
                    raise ValueError(f"{src}: {texts.null_count} document(s) with a null `text`; "
                                     "re-run `kiln data`")
                sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False)
                parts = []
                for lo, hi in _byte_chunks(sizes, ENCODE_BYTES):
                    ids = tok.encode_batch(texts.slice(lo, hi - lo).to_pylist())
                    parts.append(_list_array(ids))
                ids_array = pa.concat_arrays(parts) if parts else pa.array([], SCHEMA.field("ids").type)
                writer.write_table(pa.table({"id": batch.column("id").cast(pa.string()), "ids": ids_array},
                                            schema=SCHEMA))
                counts["docs"] += len(ids_array)
                counts["tokens"] += len(ids_array.values)
                counts["bytes"] += int(sizes.sum())
            record = {**counts, **source_record(src), "tokenizer_sha256": job.tokenizer_sha256}
            writer.add_key_value_metadata({f"kiln.{k}": str(v) for k, v in record.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return record


def _byte_chunks(sizes: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive documents of at most `limit` bytes each (at least one document)."""
    out, lo, acc = [], 0, 0
    for i, n in enumerate(sizes.tolist()):
        if i > lo and acc + n > limit:
            out.append((lo, i))
            lo, acc = i, 0
        acc += n
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _list_array(ids: list[list[int]]) -> pa.ListArray:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])   # int32 offsets: < 2^31 tokens per batch of documents
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# ---------------------------------------------------------------- shard records

def source_record(src: Path) -> dict[str, Any]:
    st = src.stat()
    return {"source": src.name, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def shard_record(path: Path) -> dict[str, Any] | None:
    """The record a finished token shard carries in its metadata; None if absent or unreadable."""
    try:
        kv = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    record = {k.decode()[5:]: v.decode() for k, v in kv.items() if k.startswith(b"kiln.")}
    try:
        for k in (*_COUNTS, "source_size", "source_mtime_ns"):
            record[k] = int(record[k])
    except (KeyError, ValueError):
        return None
    return record


def _remove_leftovers(out_dir: Path, n_sources: int) -> None:
    """Temp files of a killed run, and shards beyond the current number of input shards."""
    for p in out_dir.glob(".shard-*.tmp"):
        p.unlink(missing_ok=True)
    for p in out_dir.glob("shard-*.parquet"):
        stem = p.stem.removeprefix("shard-")
        if not stem.isdigit() or int(stem) >= n_sources:
            p.unlink()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
