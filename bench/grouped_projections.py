"""Training step with q/k/v and gate/up grouped into one matmul each (and LoRA's projection function), against
the same model's layers one by one, interleaved in one process.

    python bench/grouped_projections.py [--device cpu] [--shape mid] [--rounds 6] [--steps 3]

One model per mode (full fine-tuning, LoRA r=16 on every linear, QLoRA when torchao is there), eager, bf16
autocast where the device has it: each round times `--steps` steps with grouping off, then on (the order
alternating from round to round), so that a drifting machine moves both alike; the figure is the median of
the rounds' ratios. Without bf16 autocast the full mode compares two equal paths (plain linears group under
autocast only, kiln/model/llama.py's `project`). Eager, not compiled: switching the layers' path recompiles a compiled model, and what
Inductor then fuses differs by device (bench/sft_throughput.py's `*_ungrouped` variants measure the compiled
step on a GPU). Writes bench/results/grouped_projections.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import LoRAConfig, ModelConfig, TrainConfig  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402
from kiln.runtime.device import autocast, use_bf16  # noqa: E402
from kiln.train.optim import build_optimizer  # noqa: E402

SHAPES = {
    # wide enough that the matmuls, not the Python overhead, are the step on two CPU cores; 4,096 tokens a
    # step, so that the weight-sized products (stacked weights, the merged weight) are small beside the
    # activation-sized ones, as at a GPU's batch
    "mid": dict(model=dict(depth=4, d_model=512, head_dim=64, n_heads=8, n_kv_heads=2, ffn_hidden=1408,
                           vocab_size=4096), seq=256, batch=16),
    "smollm2-135m": dict(model=dict(depth=30, d_model=576, head_dim=64, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                                    vocab_size=49152), seq=1024, batch=16),
}


def build(shape: dict, mode: str, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    model = Transformer.from_config(ModelConfig(max_seq_len=shape["seq"], **shape["model"]), device="cpu")
    if mode == "full":
        return model.to(device).train()
    from kiln.train.lora import apply_lora
    base = "nf4" if mode == "qlora" else "auto"
    apply_lora(model, LoRAConfig(enabled=True, rank=16, alpha=32.0, base_dtype=base), device)
    return model.train()


def time_steps(model, opt, batch, steps: int, device: torch.device, bf16: bool) -> float:
    x, y = batch
    t0 = time.perf_counter()
    for _ in range(steps):
        with autocast(device, bf16):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="mid", choices=list(SHAPES))
    ap.add_argument("--modes", default="full,lora,qlora")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps a round and mode")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grouped_projections.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    bf16 = use_bf16("auto", device)
    shape = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["model"]["vocab_size"], (shape["batch"], shape["seq"] + 1), generator=g).to(device)
    batch = (ids[:, :-1], ids[:, 1:])
    rows = []
    for mode in args.modes.split(","):
        if mode == "qlora" and importlib.util.find_spec("torchao") is None:
            print("qlora: skipped (torchao is not installed)")
            continue
        model = build(shape, mode, device)
        opt = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device)
        for on in (False, True):   # warm-up of both paths
            model.group_projections(on)
            time_steps(model, opt, batch, 1, device, bf16)
        off_s, on_s, ratios = [], [], []
        for r in range(args.rounds):
            times = {}
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                model.group_projections(on)
                times[on] = time_steps(model, opt, batch, args.steps, device, bf16)
            off_s.append(times[False])
            on_s.append(times[True])
            ratios.append(times[False] / times[True])
        row = dict(mode=mode, one_by_one_ms=1e3 * statistics.median(off_s), grouped_ms=1e3 * statistics.median(on_s),
                   speedup_median=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios))
        rows.append(row)
        print(f"  {mode}: one by one {row['one_by_one_ms']:.1f} ms, grouped {row['grouped_ms']:.1f} ms a step; "
              f"x{row['speedup_median']:.3f} (rounds {row['speedup_min']:.3f}..{row['speedup_max']:.3f})", flush=True)
        del model, opt
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{dev}, torch {torch.__version__}, {args.shape} {shape['model']}, {shape['batch']} x {shape['seq']} "
          f"tokens, {'bf16 autocast' if bf16 else 'fp32'}, eager; {args.rounds} rounds of {args.steps} steps\n")
    print("| mode | one by one ms/step | grouped ms/step | speed-up (median of rounds) | rounds min..max |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['one_by_one_ms']:.1f} | {r['grouped_ms']:.1f} | {r['speedup_median']:.3f}x | "
              f"{r['speedup_min']:.3f}..{r['speedup_max']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "args": vars(args), "shape": shape, "bf16": bf16, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
