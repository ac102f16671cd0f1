"""The memorisation index (kiln.eval.memorisation.TokenIndex): build time, peak memory, resident size
and query time on this CPU, against two alternatives measured the same way.

    python bench/memorisation_index.py [--tokens 1e6 10e6 30e6] [--queries 1000]
                                       [--out bench/results/memorisation_index.json]

Corpus: "random-ish" tokens, Zipf(1.1) over a 32k vocabulary with 5% of the tokens overwritten by
copies of earlier spans of 50-2000 tokens (duplicated text, which is what makes suffix sorting slow),
cut into documents of log-normal length (median ~400 tokens). Each (size, method) runs in a fresh
process that loads the corpus from a .npy file, so peak RSS minus the RSS after loading is the
build's own peak. Queries: half 64-token spans of the corpus, half 64 uniform random tokens.

Methods:
  suffix_array   kiln's TokenIndex: numpy prefix doubling, exact longest match (the one kiln uses)
  hashed_ngram   every within-document 50-gram hashed to uint64 (polynomial hash of splitmix64-mixed
                 tokens), sorted, with positions; answers only "is there a >= 50-token match"
  pydivsufsort   libdivsufsort through pydivsufsort (not a kiln dependency), if importable: the
                 suffix array alone, tokens as 2-byte big-endian symbols, no query side
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

N_GRAM = 50


def make_corpus(n: int, vocab: int = 32_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, document lengths int64)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    t = rng.choice(vocab, size=n, p=p / p.sum()).astype(np.int32)
    copied = 0
    while copied < n // 20:
        span = int(rng.integers(50, 2000))
        src, dst = rng.integers(0, n - span, size=2)
        t[dst:dst + span] = t[src:src + span]
        copied += span
    lens = np.maximum(1, rng.lognormal(6.0, 1.0, size=n // 200 + 10)).astype(np.int64)
    lens = lens[:np.searchsorted(np.cumsum(lens), n)]
    return t, np.append(lens, n - lens.sum())


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(corpus: str, method: str, n_queries: int) -> dict:
    tokens = np.load(corpus + ".tokens.npy")
    lens = np.load(corpus + ".lens.npy")
    docs = np.split(tokens, np.cumsum(lens)[:-1])
    if method == "suffix_array":
        from kiln.eval.memorisation import TokenIndex
    elif method == "pydivsufsort":
        from pydivsufsort import divsufsort
    base = rss_mb()                                               # after imports and loading
    t0 = time.perf_counter()
    if method == "suffix_array":
        idx = TokenIndex(docs)
        resident = idx.nbytes()
    elif method == "hashed_ngram":
        hashes, positions = hashed_index(docs, N_GRAM)
        resident = hashes.nbytes + positions.nbytes + tokens.nbytes
    else:
        sa = divsufsort(np.concatenate([np.append(d, -1) for d in docs]))
        resident = sa.nbytes + tokens.nbytes
    build = time.perf_counter() - t0
    peak = rss_mb() - base
    row = {"method": method, "tokens": int(len(tokens)), "documents": len(docs), "build_s": round(build, 2),
           "build_peak_mb": round(peak), "resident_mb": round(resident / 2**20),
           "bytes_per_token": round(resident / len(tokens), 1)}
    rng = np.random.default_rng(1)
    queries = [tokens[s:s + 64] for s in rng.integers(0, len(tokens) - 64, n_queries // 2)]
    queries += [rng.integers(0, 32_000, 64).astype(np.int32) for _ in range(n_queries - len(queries))]
    if method == "suffix_array":
        t0 = time.perf_counter()
        matches = idx.longest_matches(queries)
        row["query_s"] = round(time.perf_counter() - t0, 3)
        row["query_ms_each"] = round(1000 * row["query_s"] / n_queries, 2)
        lengths = np.array([m.length for m in matches])
        row["mean_longest_corpus_spans"] = round(float(lengths[:n_queries // 2].mean()), 2)
        row["mean_longest_random"] = round(float(lengths[n_queries // 2:].mean()), 2)
    elif method == "hashed_ngram":
        t0 = time.perf_counter()
        hits = [hashed_has_match(hashes, q, N_GRAM) for q in queries]
        row["query_s"] = round(time.perf_counter() - t0, 3)
        row["query_ms_each"] = round(1000 * row["query_s"] / n_queries, 2)
        row["share_with_50_match"] = round(float(np.mean(hits)), 3)
    return row


# ---------------------------------------------------------------- the hashed alternative

_B = np.uint64(0x9E3779B97F4A7C15 | 1)
_B_INV = np.uint64(pow(int(_B), -1, 2**64))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a token -> a well-spread 64-bit value."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _window_hashes(stream: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-window of stream (mod 2^64), from prefix sums: O(len) for any n."""
    L = len(stream)
    pw = np.full(L, _B, dtype=np.uint64)
    pw[0] = 1
    np.cumprod(pw, out=pw)                                        # B^i, wrapping
    pre = np.zeros(L + 1, dtype=np.uint64)
    np.cumsum(_mix(stream) * pw, out=pre[1:])
    del pw
    inv = np.full(L - n + 1, _B_INV, dtype=np.uint64)
    inv[0] = 1
    np.cumprod(inv, out=inv)                                      # B^-i
    return (pre[n:] - pre[:-n]) * inv


def hashed_index(docs: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    stream = np.concatenate([np.append(d, -1).astype(np.int64) for d in docs])
    h = _window_hashes(stream, n)
    sep = np.flatnonzero(stream < 0)
    start = np.arange(len(h))
    ok = sep[np.searchsorted(sep, start)] >= start + n            # the window holds no separator
    h, start = h[ok], start[ok].astype(np.int32)
    order = np.argsort(h)
    return h[order], start[order]


def hashed_has_match(hashes: np.ndarray, q: np.ndarray, n: int) -> bool:
    if len(q) < n:
        return False
    h = _window_hashes(q.astype(np.int64), n)
    i = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
    return bool((hashes[i] == h).any())


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, nargs="+", default=[1e6, 10e6, 30e6])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--methods", nargs="+", default=["suffix_array", "hashed_ngram", "pydivsufsort"])
    ap.add_argument("--out", default="bench/results/memorisation_index.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)        # internal: corpus prefix, method
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.queries)))
        return
    methods, versions = list(args.methods), {"numpy": np.__version__}
    if "pydivsufsort" in methods:
        try:
            versions["pydivsufsort"] = version("pydivsufsort")
        except PackageNotFoundError:
            print("pydivsufsort is not installed: its row is skipped", file=sys.stderr)
            methods.remove("pydivsufsort")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.tokens]:
            tokens, lens = make_corpus(n)
            prefix = os.path.join(tmp, f"c{n}")
            np.save(prefix + ".tokens.npy", tokens)
            np.save(prefix + ".lens.npy", lens)
            del tokens
            for m in methods:
                out = subprocess.run([sys.executable, __file__, "--one", prefix, m, "--queries", str(args.queries)],
                                     check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{r['tokens'] / 1e6:>6.1f}M  {m:<13} build {r['build_s']:>6.2f} s"
                      f"  peak +{r['build_peak_mb']:>5} MB  resident {r['resident_mb']:>5} MB"
                      f" ({r['bytes_per_token']} B/token)"
                      + (f"  {args.queries} queries {r['query_s']:.2f} s" if "query_s" in r else ""), flush=True)
    result = {"machine": platform.machine(), "processor": cpu_name(), "cores": os.cpu_count(),
              "python": platform.python_version(), **versions,
              "date": date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "queries": f"{args.queries} x 64 tokens (half corpus spans, half random)", "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
