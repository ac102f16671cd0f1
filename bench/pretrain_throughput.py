"""Training throughput of a recipe: tokens/s, MFU and peak memory of `kiln pretrain`.

    python bench/pretrain_throughput.py gpt2-small --steps 300 [--set train.compile=false ...]

Runs the data, tokenizer and tokenize stages if the run directory lacks them, trains `--steps`
steps, and summarises metrics.jsonl over the steps after the first `--skip` (compile and warmup).
Prints a table and writes bench/results/pretrain_<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from kiln.config import load_recipe
from kiln.pipeline import STAGES, fingerprint, run_stage
from kiln.config.rundir import RunDir, is_done


def _overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=30, help="steps left out of the summary (compile, warmup)")
    ap.add_argument("--run_dir", default=None)
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides, key=value")
    args = ap.parse_args()

    over = _overrides(args.set)
    over.setdefault("train", {}).update({"max_steps": args.steps, "log_every": 10, "eval_every": 0,
                                         "checkpoint_every": 10 ** 9})
    if args.run_dir:
        over["run_dir"] = args.run_dir
    over["overwrite"] = True   # each measurement retrains from scratch in the bench's run directory
    cfg = load_recipe(args.recipe, over)
    rd = RunDir(cfg.run_path)
    for stage in STAGES[:3]:
        if not is_done(stage.output(rd), fingerprint(cfg, stage)):
            run_stage(cfg, stage.name)
    t0 = time.perf_counter()
    run_stage(cfg, "pretrain")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in rd.metrics.read_text().splitlines()]
    rows = [r for r in rows if "tok_per_s" in r and r["step"] > args.skip]
    tok_s = statistics.median(r["tok_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows) if rows and "mfu" in rows[0] else None
    result = {
        "recipe": args.recipe, "overrides": over, "steps": args.steps, "summary_steps": len(rows) * 10,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "tokens_per_s": tok_s, "mfu": mfu,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "final_loss": rows[-1]["loss"] if rows else None, "wall_s": wall,
    }
    mfu_s = "-" if mfu is None else f"{100 * mfu:.1f}%"
    mem = result["peak_mem_gb"]
    mem_s = "-" if mem is None else f"{mem:.1f}"
    print("| recipe | device | tokens/s | MFU | peak mem GB | final loss |\n|---|---|---:|---:|---:|---:|")
    print(f"| {args.recipe} | {result['device']} | {tok_s:,.0f} | {mfu_s} | {mem_s} | {result['final_loss']:.3f} |")
    out = Path(__file__).parent / "results" / f"pretrain_{args.recipe}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
