"""Peak memory and the largest micro-batch that fits, with and without activation checkpointing.

    python bench/memory.py [--compile] [--fused-ce] [--max-mb 1024] [--models gpt2-small,1.2B] [--start 1.2B=16 ...]

For gpt2-small (124M) and a ~1.2B configuration (depth 28: d_model 1792), for each activation
checkpointing mode: doubling micro-batches of 1024-token sequences, 3 AdamW steps each in bf16
autocast, until one runs out of GPU memory. Reports peak allocated memory and tokens/s per size,
and the largest size that fit. `--fused-ce` trains through the fused head + cross-entropy
(kiln/train/cross_entropy.py). `--start MODEL=N` skips the sizes below N (compiled probes take a
minute each). Writes bench/results/memory.json (memory_compiled.json with --compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

from kiln.config import TrainConfig, load_recipe
from kiln.model.llama import Transformer
from kiln.train.cross_entropy import apply_fused_cross_entropy
from kiln.train.memory import apply_activation_checkpointing
from kiln.train.optim import build_optimizer

VOCAB, SEQ = 50304, 1024
MODELS = {"gpt2-small": {}, "1.2B": {"depth": 28}}  # 1.2B: d_model 1792, 28 heads, SwiGLU 4800
FIRST_MB = {"gpt2-small": 16, "1.2B": 4}


def probe(model_over: dict, mode: str, mb: int, compile_: bool, fused_ce: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_recipe("gpt2-small").model, vocab_size=VOCAB, **model_over)
    model = opt = None
    try:
        model = Transformer.from_config(cfg, device="cuda")
        model.group_projections(True)   # as training's setup does
        if fused_ce:
            apply_fused_cross_entropy(model)
        apply_activation_checkpointing(model, mode)
        opt = build_optimizer(model, dataclasses.replace(TrainConfig(), lr=3e-4), torch.device("cuda"))
        fwd = torch.compile(model) if compile_ else model
        x = torch.randint(0, VOCAB, (mb, SEQ), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"fits": True, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                "tokens_per_s": mb * SEQ / min(times[1:]), "params": model.num_params()}
    except torch.OutOfMemoryError:
        return {"fits": False}
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fused-ce", action="store_true", help="train through the fused head + cross-entropy")
    ap.add_argument("--max-mb", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/memory[_compiled].json)")
    ap.add_argument("--modes", default="off,selective,block", help="activation checkpointing modes to probe")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--start", action="append", default=[], metavar="MODEL=N", help="first micro-batch for MODEL")
    args = ap.parse_args()
    first = dict(FIRST_MB)
    for item in args.start:
        name, _, n = item.partition("=")
        if name not in MODELS or not n.isdigit():
            ap.error(f"--start {item!r}: use MODEL=N with MODEL one of {', '.join(MODELS)}")
        first[name] = int(n)
    rows: list[dict] = []
    out = args.out or Path(__file__).parent / "results" / ("memory_compiled.json" if args.compile else "memory.json")
    out.parent.mkdir(exist_ok=True)

    def write() -> None:  # after every probe: a later crash or timeout keeps the rows so far
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "date": time.strftime("%Y-%m-%d"), "compile": args.compile,
                                   "fused_ce": args.fused_ce, "seq": SEQ,
                                   "rows": rows}, indent=2) + "\n")

    print("| model | activation checkpointing | micro-batch | peak GB | tokens/s |\n|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        if name not in MODELS:
            ap.error(f"--models: unknown {name!r}; use {', '.join(MODELS)}")
        over = MODELS[name]
        for mode in args.modes.split(","):
            mb, largest = first[name], None
            while mb <= args.max_mb:
                r = {"model": name, "mode": mode, "micro_batch": mb, **probe(over, mode, mb, args.compile, args.fused_ce)}
                rows.append(r)
                write()
                if not r["fits"]:
                    print(f"| {name} | {mode} | {mb} | OOM | - |", flush=True)
                    break
                largest = mb
                print(f"| {name} | {mode} | {mb} | {r['peak_gb']:.1f} | {r['tokens_per_s']:,.0f} |", flush=True)
                mb *= 2
            rows.append({"model": name, "mode": mode, "largest_micro_batch": largest})
            write()
            print(f"| {name} | {mode} | **largest: {largest}** | | |", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
