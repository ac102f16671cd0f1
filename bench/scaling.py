"""Data-parallel scaling: `kiln pretrain` under torchrun at N = 1, 2, 4, 8 processes, one GPU each.

    python bench/scaling.py --prepared RUN_DIR [--nprocs 1 2 4 8] [--configs gpt2-small-ddp 1b-fsdp]
                            [--steps 100] [--skip 10] [--config-args "--train.compile false ..."] [--out PATH]

For every configuration and N this runs

    torchrun --standalone --nproc_per_node=N -m kiln pretrain RECIPE --run_dir COPY --train.parallel {ddp|fsdp} ...

on a fresh copy of the prepared run directory, keeping the GLOBAL batch (`--train.batch_tokens`) fixed:
each rank's micro-batch stays the same and gradient accumulation shrinks as N grows, so every N trains
on the same rows in the same order and should log the same losses (up to bf16 reduction order).
From each run's metrics.jsonl (rank 0) it reports, over the logged steps after the first `--skip`
(compile, warmup): median tokens/s in total and per rank, median MFU, peak memory (rank 0), scaling
efficiency = (tokens/s per rank at N) / (tokens/s per rank at the smallest N, normally 1), and the
largest relative loss difference against that smallest N over every logged step both runs share.
Prints a markdown table and writes bench/results/scaling.json (or `--out`).

Configurations (`--configs`):
  gpt2-small-ddp  recipe gpt2-small, DDP, micro-batch 32, 524,288 tokens per step
  1b-fsdp         recipe gpt2-small with --model.depth 28 (d_model 1792, ~1.2B params), FSDP2,
                  micro-batch 8, 262,144 tokens per step
  custom-ddp, custom-fsdp
                  `--recipe` (default tiny) with only `--config-args`; the global batch is
                  micro_batch_size * max_seq_len * lcm(nprocs) unless --train.batch_tokens is given
Both built-ins train with AdamW, what peers' FSDP figures use (Muon under FSDP2 gathers each matrix for
its Newton-Schulz step: tested on CPU, not measured on GPUs). `--config-args` is appended to every
configuration's arguments (last, so it overrides them), e.g. "--train.optimizer muon".

The run directory must hold the data, tokenizer and tokens stages of the recipe (the built-ins share
gpt2-small's tokenizer, vocabulary 50304), with a non-empty validation split:

    kiln data gpt2-small --run_dir /data/scal_prep
    kiln tokenizer gpt2-small --run_dir /data/scal_prep
    kiln tokenize gpt2-small --run_dir /data/scal_prep

Without CUDA the runs use gloo on CPU (default N = 1, 2; one thread per rank); the output says so, and the figures are not GPU figures: write them with `--out`
somewhere other than bench/results. NCCL settings (NVLink multicast included) are left as the
environment has them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {
    "gpt2-small-ddp": ("gpt2-small", "ddp",
                       "--train.micro_batch_size 32 --train.batch_tokens 524288 --train.optimizer adamw"),
    "1b-fsdp": ("gpt2-small", "fsdp",
                "--model.depth 28 --train.micro_batch_size 8 --train.batch_tokens 262144 --train.optimizer adamw"),
    "custom-ddp": (None, "ddp", ""),
    "custom-fsdp": (None, "fsdp", ""),
}


def default_nprocs() -> list[int]:
    cap = torch.cuda.device_count() if torch.cuda.is_available() else 2
    return [n for n in (1, 2, 4, 8) if n <= cap]


def _option(args: list[str], name: str) -> str | None:
    """The last value given for `--name` (the CLI takes the last one too)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def batch_args(recipe: str, args: list[str], nprocs: list[int]) -> list[str]:
    """`args` with an explicit --train.batch_tokens that every N divides into whole micro-batches."""
    from kiln.cli import parse
    cfg = parse("pretrain", [recipe, *args])
    mb, seq = cfg.train.micro_batch_size, cfg.model.max_seq_len
    given = _option(args, "--train.batch_tokens")
    batch = int(given) if given not in (None, "null") else mb * seq * math.lcm(*nprocs)
    bad = [n for n in nprocs if batch % (mb * seq * n)]
    if bad:
        raise ValueError(f"{recipe} {' '.join(args)}: batch_tokens {batch} is not a multiple of micro_batch_size "
                         f"* max_seq_len * N = {mb} * {seq} * N for N = {bad}; pick a batch_tokens that "
                         f"{mb * seq * math.lcm(*nprocs)} divides or a smaller micro-batch")
    return [*args, "--train.batch_tokens", str(batch)]


def check_prepared(prepared: Path) -> None:
    missing = [s for s in ("tokenizer", "tokens") if not (prepared / s / "_SUCCESS").is_file()]  # what pretrain reads
    if missing:
        raise ValueError(f"--prepared {prepared} lacks the {', '.join(missing)} stage(s); run "
                         f"`kiln data|tokenizer|tokenize RECIPE --run_dir {prepared}` first")
    if not any((prepared / "tokens" / "val").glob("*.parquet")):
        raise ValueError(f"--prepared {prepared} has no validation tokens (pretrain needs them); prepare it again "
                         "with a larger --data.max_docs or --data.val_fraction")


def run_one(name: str, recipe: str, parallel: str, args: list[str], n: int, opts, work: Path) -> dict:
    run_dir = work / f"{name}-n{n}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(opts.prepared, run_dir, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    bench_args = ["--train.parallel", parallel, "--train.max_steps", str(opts.steps), "--train.log_every", "1",
                  "--train.eval_every", "0", "--train.eval_batches", str(max(opts.nprocs)),
                  "--train.checkpoint_every", str(10 ** 9)]
    if not torch.cuda.is_available():
        # One thread per rank at every N (torchrun's own default for N > 1): at N = 1 torch's default of all
        # cores measured 100x slower on a tiny model here (thread spin-waits beside the prefetch thread).
        bench_args += ["--train.threads", "1"]
    cmd = [torchrun, "--standalone", f"--nproc_per_node={n}", "-m", "kiln", "pretrain", recipe,
           "--run_dir", str(run_dir), *bench_args, *args]
    log = work / f"{name}-n{n}.log"
    print(f"[{name} N={n}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=opts.timeout,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"nproc": n, "command": shlex.join(cmd), "wall_s": time.perf_counter() - t0, "log": str(log)}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "tok_per_s" in r]
    if rc != 0 or not rows:
        tail = log.read_text()[-3000:]
        print(f"[{name} N={n}] FAILED (exit {rc}); log {log}:\n{tail}", file=sys.stderr)
        result["error"] = f"exit {rc}: {tail[-500:]}"
    else:
        result.update(summarise(rows, n, opts.skip))
    if not opts.keep:   # a 1B run's final checkpoint is ~14 GB: do not leave one per N behind
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def summarise(rows: list[dict], n: int, skip: int) -> dict:
    timed = rows[skip:]
    if not timed:
        raise ValueError(f"--skip {skip} leaves none of the {len(rows)} logged steps; train more --steps")
    tok_s = statistics.median(r["tok_per_s"] for r in timed)
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    mem = [r["peak_mem_gb"] for r in timed if "peak_mem_gb" in r]
    return {"steps_logged": len(rows), "steps_timed": len(timed), "tokens_per_s": tok_s,
            "tokens_per_s_per_rank": tok_s / n, "mfu": statistics.median(mfu) if mfu else None,
            "peak_mem_gb_rank0": max(mem) if mem else None, "final_loss": rows[-1]["loss"],
            "losses": {r["step"]: r["loss"] for r in rows}}


def compare(runs: list[dict]) -> None:
    """Scaling efficiency and loss agreement of every run against the smallest N that succeeded."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return
    base = min(ok, key=lambda r: r["nproc"])
    for r in ok:
        r["baseline_nproc"] = base["nproc"]
        r["scaling_efficiency"] = r["tokens_per_s_per_rank"] / base["tokens_per_s_per_rank"]
        common = sorted(set(r["losses"]) & set(base["losses"]))
        diffs = [(abs(r["losses"][s] - base["losses"][s]) / abs(base["losses"][s]), s) for s in common]
        worst = max(diffs) if diffs else (None, None)
        r["loss_steps_compared"] = len(common)
        r["max_rel_loss_diff"], r["max_rel_loss_diff_step"] = worst


def table(results: dict, on_gpu: bool) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    num = lambda v, f: "-" if v is None else format(v, f)
    per = "GPU" if on_gpu else "rank"
    lines = [(f"| config | N | batch tokens | tok/s | tok/s per {per} | MFU | peak mem GB (rank 0) | scaling eff. "
              "| max rel. loss diff (steps) |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        for r in res["runs"]:
            if "error" in r:
                lines.append(f"| {name} | {r['nproc']} | {res['batch_tokens']} | failed: see {r['log']} "
                             "| | | | | |")
                continue
            loss = "-" if r["max_rel_loss_diff"] is None else \
                f"{r['max_rel_loss_diff']:.2e} ({r['loss_steps_compared']})"
            lines.append(f"| {name} | {r['nproc']} | {res['batch_tokens']:,} | {r['tokens_per_s']:,.0f} "
                         f"| {r['tokens_per_s_per_rank']:,.0f} | {pct(r['mfu'])} | {num(r['peak_mem_gb_rank0'], '.1f')} "
                         f"| {pct(r['scaling_efficiency'])} | {loss} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, required=True,
                    help="run directory with data, tokenizer and tokens done (copied for every run)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=None,
                    help="process counts (default: 1 2 4 8 up to the visible GPUs; 1 2 on CPU)")
    ap.add_argument("--configs", nargs="+", default=["gpt2-small-ddp", "1b-fsdp"], choices=list(CONFIGS))
    ap.add_argument("--recipe", default="tiny", help="recipe of the custom-* configurations")
    ap.add_argument("--config-args", default="", help="extra `kiln pretrain` options for every configuration")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (all logged)")
    ap.add_argument("--skip", type=int, default=10, help="logged steps left out of the timings (compile, warmup)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kiln_scaling",
                    help="where the run copies (deleted after each run unless --keep) and their logs go")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory (checkpoints included)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scaling.json")
    opts = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    opts.nprocs = sorted(set(opts.nprocs or default_nprocs()))
    if on_gpu and max(opts.nprocs) > torch.cuda.device_count():
        raise ValueError(f"--nprocs {opts.nprocs} needs {max(opts.nprocs)} GPUs; {torch.cuda.device_count()} visible")
    check_prepared(opts.prepared)
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    if not on_gpu:
        print(f"NOTE: no CUDA: every run uses the gloo backend on CPU ({os.cpu_count()} cores); these are not GPU "
              "figures, and MFU and peak memory are not measured.", flush=True)
    work = opts.work
    work.mkdir(parents=True, exist_ok=True)

    extra = shlex.split(opts.config_args)
    results: dict = {}
    for name in opts.configs:
        recipe, parallel, base = CONFIGS[name]
        recipe = recipe or opts.recipe
        args = batch_args(recipe, [*shlex.split(base), *extra], opts.nprocs)
        runs = [run_one(name, recipe, parallel, args, n, opts, work) for n in opts.nprocs]
        compare(runs)
        results[name] = {"recipe": recipe, "parallel": parallel, "args": shlex.join(args),
                         "batch_tokens": int(_option(args, "--train.batch_tokens")), "runs": runs}

    out = {"device": device, "gpus_visible": torch.cuda.device_count() if on_gpu else 0,
           "backend": "nccl" if on_gpu else "gloo (CPU)", "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": shlex.join([sys.executable, *sys.argv]),
           "steps": opts.steps, "skip": opts.skip, "configs": results}
    print(f"\n{device}, {out['backend']}, torch {torch.__version__}, {opts.steps} steps, "
          f"timings over the logged steps after {opts.skip}; scaling and loss against the smallest N\n")
    print(table(results, on_gpu))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {opts.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
