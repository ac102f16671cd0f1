"""Benchmark the data stage on real English text from Debian packages; writes bench/results/data_pipeline.json.

Needs: apt-get install dict-gcide python3.11-doc perl-doc linux-doc
Run:   .venv/bin/python bench/data_pipeline.py [--mb 60] [--workers 2]

Corpus: GCIDE dictionary entries (chunks of ~4 KB), Python's reStructuredText
doc sources, Perl's POD pages and the Linux kernel's .rst docs, as JSONL shards
of ~2 MB. Measures the full default pipeline (docs/s, MB/s, MB/s per core, per
step CPU throughput from report.json) and near-dedup recall / precision on
near-duplicates injected into real documents (known truth: Jaccard of 5-grams).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import time
from pathlib import Path

from kiln.config import Config, DataConfig, NearDedupConfig
from kiln.data import run_data
from kiln.data.minhash import NearDedup, band_keys, shingles

SHARD_BYTES = 2 << 20


def texts(limit_bytes: int):
    """Real documents, round-robin over the four sources, until `limit_bytes`."""
    gens = [_gcide(), _files("/usr/share/doc/python3.11/html/_sources", ".txt"),
            _files("/usr/share/perl", ".pod"), _files("/usr/share/doc/linux-doc-6.1", ".rst.gz")]
    total = 0
    while gens and total < limit_bytes:
        for g in list(gens):
            t = next(g, None)
            if t is None:
                gens.remove(g)
                continue
            total += len(t.encode())
            yield t


def _gcide():
    path = Path("/usr/share/dictd/gcide.dict.dz")
    if not path.exists():
        return
    raw = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    for i in range(0, len(raw), 4000):
        yield raw[i:i + 4000]


def _files(root: str, ext: str):
    for p in sorted(Path(root).rglob(f"*{ext}")):
        data = p.read_bytes()
        yield (gzip.decompress(data) if ext.endswith(".gz") else data).decode("utf-8", "replace")


def build_corpus(out: Path, mb: int) -> tuple[int, int]:
    out.mkdir(parents=True, exist_ok=True)
    shard, size, n_docs, n_bytes, k = [], 0, 0, 0, 0
    for t in texts(mb << 20):
        line = json.dumps({"text": t}) + "\n"
        shard.append(line)
        size += len(line)
        n_docs += 1
        n_bytes += len(t.encode())
        if size >= SHARD_BYTES:
            (out / f"shard-{k:04d}.jsonl").write_text("".join(shard))
            shard, size, k = [], 0, k + 1
    if shard:
        (out / f"shard-{k:04d}.jsonl").write_text("".join(shard))
    return n_docs, n_bytes


def run_header(script: str, args, n_docs: int, n_bytes: int) -> dict:
    """Machine, date, command, corpus and workers: the head of every data benchmark's JSON."""
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python bench/{script} --mb {args.mb} --workers {args.workers}",
        "corpus": {"docs": n_docs, "mb": round(n_bytes / 1e6, 1),
                   "sources": "dict-gcide, python3.11-doc, perl-doc, linux-doc-6.1"},
        "workers": args.workers,
    }


def near_dedup_quality(docs: list[str], seed: int = 0) -> dict:
    """Inject edited copies of real documents; recall / precision against Jaccard >= 0.8 truth."""
    rng = random.Random(seed)
    base = [d for d in docs if len(d.split()) >= 200][:500]
    variants = []
    for d in base:
        words = d.split()
        for i in rng.sample(range(len(words)), int(rng.choice([0.005, 0.01, 0.02, 0.15, 0.3]) * len(words))):
            words[i] = f"edit{rng.randrange(10**6)}"
        variants.append(" ".join(words))
    cfg = NearDedupConfig()
    keys = band_keys(base + variants, cfg)
    nd = NearDedup(cfg.bands)
    for k in keys:
        nd.add(k)
    truth, found = [], []
    for i, v in enumerate(variants):
        a, b = set(shingles(base[i], 5).tolist()), set(shingles(v, 5).tolist())
        j = len(a & b) / max(len(a | b), 1)
        if 0.5 < j < 0.8:
            continue   # the soft zone of any LSH threshold: neither a miss nor a false hit
        truth.append(j >= 0.8)
        found.append(not nd.keep(len(base) + i))
    tp = sum(t and f for t, f in zip(truth, found))
    return {"pairs": len(truth), "true_near_dups": sum(truth), "recall": round(tp / max(sum(truth), 1), 4),
            "precision": round(tp / max(sum(found), 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=60)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", default="/tmp/kiln-bench-data")
    args = ap.parse_args()
    root = Path(args.dir)
    n_docs, n_bytes = build_corpus(root / "corpus", args.mb)
    print(f"corpus: {n_docs} docs, {n_bytes / 1e6:.1f} MB", flush=True)
    cfg = Config(run_dir=str(root / "run"), data=DataConfig(sources=[str(root / "corpus")], workers=args.workers))
    start = time.perf_counter()
    r = run_data(cfg)
    wall = time.perf_counter() - start
    per_step = {s["step"]: {k: s["measured"][k] for k in ("docs_per_s", "mb_per_s", "cpu_s")}
                for s in r["steps"] if "measured" in s}
    docs = [json.loads(line)["text"] for line in (root / "corpus" / "shard-0000.jsonl").open()]
    result = {
        **run_header("data_pipeline.py", args, n_docs, n_bytes),
        "wall_s": round(wall, 1),
        "docs_per_s": round(r["records_in"] / wall, 1),
        "mb_per_s": round(r["input_bytes"] / 1e6 / wall, 2),
        "mb_per_s_per_core": round(r["input_bytes"] / 1e6 / wall / args.workers, 2),
        "kept": r["kept"], "records_in": r["records_in"], "dropped": {k: v for k, v in r["dropped"].items() if v},
        "pii": r["pii"],
        "per_step_per_core": per_step,
        "near_dedup_injected": near_dedup_quality(docs),
    }
    out = Path(__file__).parent / "results" / "data_pipeline.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
