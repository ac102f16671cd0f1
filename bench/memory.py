"""Peak memory and the largest micro-batch that fits, with and without activation checkpointing.

    python bench/memory.py [--compile] [--max-mb 1024]

For gpt2-small (124M) and a ~1.2B configuration (depth 28: d_model 1792), for each activation
checkpointing mode: doubling micro-batches of 1024-token sequences, 3 AdamW steps each in bf16
autocast, until one runs out of GPU memory. Reports peak allocated memory and tokens/s per size,
and the largest size that fit. Writes bench/results/memory.json.
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
from kiln.train.memory import apply_activation_checkpointing
from kiln.train.optim import build_optimizer

VOCAB, SEQ = 50304, 1024
MODELS = {"gpt2-small": {}, "1.2B (depth 28)": {"depth": 28}}


def probe(model_over: dict, mode: str, mb: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_recipe("gpt2-small").model, vocab_size=VOCAB, **model_over)
    model = opt = None
    try:
        model = Transformer.from_config(cfg, device="cuda")
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
    ap.add_argument("--max-mb", type=int, default=1024)
    args = ap.parse_args()
    rows = []
    print("| model | activation checkpointing | micro-batch | peak GB | tokens/s |\n|---|---|---:|---:|---:|")
    for name, over in MODELS.items():
        for mode in ("off", "selective", "block"):
            mb, largest = 4 if over else 16, None
            while mb <= args.max_mb:
                r = {"model": name, "mode": mode, "micro_batch": mb, **probe(over, mode, mb, args.compile)}
                rows.append(r)
                if not r["fits"]:
                    print(f"| {name} | {mode} | {mb} | OOM | - |", flush=True)
                    break
                largest = mb
                print(f"| {name} | {mode} | {mb} | {r['peak_gb']:.1f} | {r['tokens_per_s']:,.0f} |", flush=True)
                mb *= 2
            rows.append({"model": name, "mode": mode, "largest_micro_batch": largest})
            print(f"| {name} | {mode} | **largest: {largest}** | | |", flush=True)
    out = Path(__file__).parent / "results" / "memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "compile": args.compile, "seq": SEQ,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
