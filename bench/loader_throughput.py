"""PackedLoader throughput and peak memory from Parquet token shards on disk.

    python bench/loader_throughput.py [--tokens 20e6 80e6] [--seq_len 1024] [--batch_size 32]

Writes synthetic token shards (zstd Parquet, the tokenize stage's layout and metadata; document
lengths log-normal around ~600 tokens, 5M tokens per shard) for each corpus size, then for each
packing mode and prefetch setting runs one epoch in a fresh process and reports tokens/s (input
positions yielded per second, one process) and the process's peak RSS. Flat peak memory across
corpus sizes is what shows streaming. Writes bench/results/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_TOKENS = 5_000_000


def write_corpus(root: Path, n_tokens: int, vocab: int = 50_000, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files, written, k = [], 0, 0
    while written < n_tokens:
        lens = np.maximum(1, rng.lognormal(6.0, 1.0, size=SHARD_TOKENS // 400)).astype(np.int64)
        lens = lens[:np.searchsorted(np.cumsum(lens), min(SHARD_TOKENS, n_tokens - written)) + 1]
        offsets = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        values = rng.integers(3, vocab, size=int(offsets[-1]), dtype=np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        table = pa.table({"id": [f"d{k}-{i}" for i in range(len(lens))], "ids": ids})
        table = table.replace_schema_metadata({"kiln.docs": str(len(lens)), "kiln.tokens": str(int(offsets[-1]))})
        files.append(root / f"shard-{k:05d}.parquet")
        pq.write_table(table, files[-1], compression="zstd")
        written += int(offsets[-1])
        k += 1
    return files


def one_run(args: argparse.Namespace) -> None:
    """Child process: one epoch (or --max_batches) of one loader; prints a JSON line."""
    from kiln.tokenizer.loader import PackedLoader
    files = sorted(Path(args.dir).glob("shard-*.parquet"))
    t0 = time.perf_counter()
    loader = PackedLoader(files, args.seq_len, args.batch_size, eos_id=1, seed=0, packing=args.packing,
                          prefetch=args.prefetch)
    init = time.perf_counter() - t0
    n = min(loader.batches_per_epoch, args.max_batches or loader.batches_per_epoch)
    t0 = time.perf_counter()
    for _ in range(n):
        x, y = next(loader)
    sec = time.perf_counter() - t0
    print(json.dumps({"init_s": round(init, 3), "batches": n, "seconds": round(sec, 3),
                      "tokens_per_s": round(n * args.batch_size * args.seq_len / sec),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "padded_share": loader.packing_stats["padded_share"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="*", default=[20e6, 80e6])
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_batches", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--packing", default="concat", help=argparse.SUPPRESS)
    ap.add_argument("--prefetch", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_run(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_tokens in args.tokens:
            d = Path(tmp) / f"c{int(n_tokens)}"
            t0 = time.perf_counter()
            files = write_corpus(d, int(n_tokens))
            disk = sum(f.stat().st_size for f in files)
            print(f"corpus {n_tokens / 1e6:.0f}M tokens: {len(files)} shards, {disk / 1e6:.0f} MB "
                  f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
            for packing in ("concat", "bestfit"):
                for prefetch in (0, 2):
                    cmd = [sys.executable, __file__, "--child", "--dir", str(d), "--packing", packing,
                           "--prefetch", str(prefetch), "--seq_len", str(args.seq_len),
                           "--batch_size", str(args.batch_size), "--max_batches", str(args.max_batches)]
                    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                    row = {"corpus_tokens": int(n_tokens), "shards": len(files), "disk_mb": round(disk / 1e6),
                           "packing": packing, "prefetch": prefetch, **out}
                    results.append(row)
                    print(f"  {packing:8s} prefetch {prefetch}: {out['tokens_per_s'] / 1e6:6.1f}M tokens/s, "
                          f"init {out['init_s']:.2f} s, peak RSS {out['peak_rss_mb']} MB, "
                          f"padded {out['padded_share']:.2%}", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "seq_len": args.seq_len, "batch_size": args.batch_size,
            "command": "python " + " ".join(sys.argv)}
    out_path = Path(__file__).parent / "results" / "loader_throughput.json"
    out_path.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
