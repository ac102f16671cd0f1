"""kiln's data steps vs datatrove's equivalent pipeline on the same corpus, in one run; writes bench/results/data_datatrove.json.

Needs: the Debian packages of bench/data_pipeline.py, and datatrove in a throwaway venv (never in kiln's):
    python3 -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install "datatrove[processing]" spacy orjson requests aiohttp
    (spacy: datatrove's English word tokenizer, a blank pipeline, no model download; requests/aiohttp only let
    the language-ID probe reach its download attempt)
Run:   .venv/bin/python bench/data_datatrove.py [--mb 60] [--workers 2] [--dt-python /tmp/dtvenv/bin/python]

The datatrove half runs as a subprocess under the throwaway venv's python (this same file, `--datatrove-half`),
so this file imports neither kiln nor datatrove at module level: datatrove's forkserver workers re-import it.

Steps compared (same order on both sides):
  ftfy -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> PII (emails, public IPs)   ["filters"]
  the same, then MinHash near-dedup (word 5-grams, 14 bands x 8 rows)                         ["filters+minhash"]
Left out of both: language ID (datatrove's LanguageFilter downloads fastText lid.176.bin or GlotLID at run
time; the probe below records that it cannot run offline), kiln's normalize / length_filter / exact dedup
(datatrove's pipeline has no equivalent here), and PII phone numbers / credit cards (datatrove's PIIFormatter
does emails and IPs only). kiln additionally splits train/val/test and writes Parquet; datatrove writes JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KILN_STEPS = ["fix_unicode", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]
MINHASH = {"ngram": 5, "bands": 14, "rows": 8, "seed": 1}


# ----------------------------------------------------------------------------- datatrove half (throwaway venv)

def _count_docs(folder: Path) -> int:
    import gzip
    n = 0
    for p in sorted(folder.glob("*.jsonl*")):
        with (gzip.open(p, "rt") if p.name.endswith(".gz") else p.open()) as f:
            n += sum(1 for _ in f)
    return n


def _probe_language_filter(timeout_s: int = 60) -> str:
    """Does datatrove's LanguageFilter run here? It fetches its fastText model on first use."""
    code = ("from datatrove.pipeline.filters import LanguageFilter\nfrom datatrove.data import Document\n"
            "f = LanguageFilter(languages=['en'])\n"
            "print(f.filter(Document(text='This is a plain English sentence about the weather.', id='0')))\n")
    try:
        p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout_s}s (model download hangs without internet)"
    if p.returncode == 0:
        return "ran (model available)"
    last = [line for line in p.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
    return f"failed: {last[0][:300]}"


def datatrove_half(corpus: str, work: str, tasks: int, workers: int) -> dict:
    from importlib.metadata import version

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    w = Path(work)
    shutil.rmtree(w, ignore_errors=True)
    filtered, final = w / "filtered", w / "final"

    def run(name: str, pipeline: list, n_tasks: int) -> float:
        # skip_completed=False and a fresh folder: nothing is reused from an earlier run
        ex = LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                                   logging_dir=str(w / "logs" / name), skip_completed=False)
        start = time.perf_counter()
        ex.run()
        return time.perf_counter() - start

    # Uncompressed JSONL out: gzip would charge datatrove for compression kiln's side does not do the same way.
    t_filters = run("filters", [
        JsonlReader(corpus, glob_pattern="*.jsonl"),
        FTFYFormatter(),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
        FineWebQualityFilter(),
        PIIFormatter(),
        JsonlWriter(str(filtered), compression=None),
    ], tasks)
    kept_filters = _count_docs(filtered)

    mh = MinhashConfig(n_grams=MINHASH["ngram"], num_buckets=MINHASH["bands"],
                       hashes_per_bucket=MINHASH["rows"], seed=MINHASH["seed"])
    stages = {}
    # Signatures and the final filter must use the same task count: both index documents per rank.
    stages["signatures"] = run("mh_sig", [JsonlReader(str(filtered)),
                                          MinhashDedupSignature(output_folder=str(w / "sigs"), config=mh)], tasks)
    stages["buckets"] = run("mh_buckets", [MinhashDedupBuckets(input_folder=str(w / "sigs"),
                                                               output_folder=str(w / "buckets"), config=mh)],
                            mh.num_buckets)   # datatrove requires tasks to be a multiple of num_buckets
    stages["cluster"] = run("mh_cluster", [MinhashDedupCluster(input_folder=str(w / "buckets"),
                                                               output_folder=str(w / "remove_ids"), config=mh)], 1)
    stages["filter"] = run("mh_filter", [JsonlReader(str(filtered)),
                                         MinhashDedupFilter(input_folder=str(w / "remove_ids")),
                                         JsonlWriter(str(final), compression=None)], tasks)
    return {
        "version": version("datatrove"),
        "language_filter_probe": _probe_language_filter(),
        "filters": {"wall_s": t_filters, "kept": kept_filters},
        "filters+minhash": {"wall_s": t_filters + sum(stages.values()), "kept": _count_docs(final),
                            "minhash_stage_s": {k: round(v, 2) for k, v in stages.items()}},
    }


# ----------------------------------------------------------------------------- kiln half (kiln's venv)

def kiln_half(corpus: str, run_dir: str, workers: int, near_dedup: bool) -> dict:
    from kiln.config import load_recipe
    from kiln.data import run_data

    cfg = load_recipe("tiny", {"run_dir": run_dir, "data": {
        "sources": [corpus], "workers": workers, "steps": KILN_STEPS, "dedup": False,
        "pii": {"phone_numbers": False, "credit_cards": False},
        "near_dedup": {"enabled": near_dedup, "ngram": MINHASH["ngram"], "bands": MINHASH["bands"],
                       "rows": MINHASH["rows"], "seed": MINHASH["seed"]},
    }})
    start = time.perf_counter()
    r = run_data(cfg)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "kept": r["kept"], "records_in": r["records_in"],
            "dropped": {k: v for k, v in r["dropped"].items() if v}, "pii": r["pii"]}


def _rates(wall: float, n_docs: int, n_bytes: int, cores: int) -> dict:
    return {"wall_s": round(wall, 2), "docs_per_s": round(n_docs / wall, 1), "mb_per_s": round(n_bytes / 1e6 / wall, 2),
            "mb_per_s_per_core": round(n_bytes / 1e6 / wall / cores, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=60)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", default="/tmp/kiln-bench-datatrove")
    ap.add_argument("--dt-python", default="/tmp/dtvenv/bin/python", help="python of the venv holding datatrove")
    ap.add_argument("--datatrove-half", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.datatrove_half:   # child process under the throwaway venv: JSON on the last stdout line
        res = datatrove_half(str(root / "corpus"), str(root / "dt"), tasks=args.workers, workers=args.workers)
        print(json.dumps(res))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from data_pipeline import build_corpus, run_header
    if not Path(args.dt_python).exists():
        raise SystemExit(f"{args.dt_python} not found: python3 -m venv /tmp/dtvenv && "
                         '/tmp/dtvenv/bin/pip install "datatrove[processing]" spacy orjson requests aiohttp')
    shutil.rmtree(root / "corpus", ignore_errors=True)
    n_docs, n_bytes = build_corpus(root / "corpus", args.mb)
    print(f"corpus: {n_docs} docs, {n_bytes / 1e6:.1f} MB", flush=True)

    print("datatrove ...", flush=True)
    log = root / "datatrove.log"
    with log.open("w") as err:
        p = subprocess.run([args.dt_python, __file__, "--datatrove-half", "--dir", str(root),
                            "--workers", str(args.workers)], stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"datatrove half failed (exit {p.returncode}); see {log}")
    dt = json.loads(p.stdout.strip().splitlines()[-1])

    print("kiln ...", flush=True)
    kl = {"filters": kiln_half(str(root / "corpus"), str(root / "kiln-filters"), args.workers, False),
          "filters+minhash": kiln_half(str(root / "corpus"), str(root / "kiln-minhash"), args.workers, True)}

    rows, comparisons = [], {}
    for name in ("filters", "filters+minhash"):
        k = _rates(kl[name]["wall_s"], n_docs, n_bytes, args.workers)
        d = _rates(dt[name]["wall_s"], n_docs, n_bytes, args.workers)
        ratio = round(dt[name]["wall_s"] / kl[name]["wall_s"], 2)
        comparisons[name] = {"kiln": {**k, "kept": kl[name]["kept"]}, "datatrove": {**d, "kept": dt[name]["kept"]},
                             "ratio_kiln_over_datatrove": ratio}
        rows += [(name, "kiln", k, kl[name]["kept"], ratio), (name, f"datatrove {dt['version']}", d, dt[name]["kept"], None)]

    print(f"\n{'steps':<16} {'tool':<17} {'wall s':>7} {'docs/s':>8} {'MB/s':>6} {'MB/s/core':>9} {'kept':>6} {'kiln/dt':>8}")
    for name, tool, r, kept, ratio in rows:
        print(f"{name:<16} {tool:<17} {r['wall_s']:>7.1f} {r['docs_per_s']:>8.1f} {r['mb_per_s']:>6.2f} "
              f"{r['mb_per_s_per_core']:>9.3f} {kept:>6} {f'{ratio:.2f}x' if ratio else '':>8}")
    print(f"datatrove LanguageFilter probe: {dt['language_filter_probe']}")

    result = {
        **run_header("data_datatrove.py", args, n_docs, n_bytes),
        "steps": KILN_STEPS, "minhash": MINHASH,
        "left_out_of_both": {
            "language_id": f"datatrove's LanguageFilter needs lid.176.bin / GlotLID downloaded; probe: "
                           f"{dt['language_filter_probe']}",
            "normalize, length_filter, exact_dedup": "no equivalent step in the datatrove pipeline compared",
            "pii phone numbers, credit cards": "datatrove's PIIFormatter does emails and IPs only",
        },
        "comparisons": comparisons,
        "datatrove_minhash_stage_s": dt["filters+minhash"]["minhash_stage_s"],
        "kiln_dropped": {n: kl[n]["dropped"] for n in kl}, "kiln_pii": kl["filters"]["pii"],
    }
    out = Path(__file__).parent / "results" / "data_datatrove.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
