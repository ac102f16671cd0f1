"""Where a training step's GPU time goes: kiln's gpt2-small and the GPT-2 reference, kernel by kernel.

    python bench/profile_step.py [--steps 5] [--micro-batch 32] [--top 20] [--out PATH]

Compiles each model, warms up, then records `--steps` steps with torch.profiler and sums CUDA
kernel time per category (matmul, attention, fused elementwise/norm, cross-entropy, optimizer,
other) and per kernel, for the reference, kiln with the plain head and kiln with the fused head +
cross-entropy. Writes bench/results/profile_step.json (or --out). A tool for deciding what to
optimise next, not a throughput figure (the profiler itself costs a little).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from reference_gpt2 import GPT2, GPT2Config, optimizer as ref_optimizer  # noqa: E402

from kiln.config import TrainConfig, load_recipe  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402
from kiln.train.cross_entropy import apply_fused_cross_entropy  # noqa: E402
from kiln.train.optim import build_optimizer  # noqa: E402

VOCAB = 50304
CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel", "l2norm")),
    ("cross-entropy / log-softmax", ("softmax", "nll", "cross_entropy", "row_kernel")),
    ("fused elementwise / norms (triton)", ("triton",)),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_model(name: str, model, opt, x, y, steps: int) -> dict:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.self_device_time_total > 0:
            per_kernel[ev.key] += ev.self_device_time_total / 1e3 / steps  # ms per step
    per_cat: dict[str, float] = defaultdict(float)
    for k, ms in per_kernel.items():
        per_cat[category(k)] += ms
    return {"name": name, "wall_ms_per_step": wall_ms, "kernel_ms_per_step": sum(per_kernel.values()),
            "categories": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
            "kernels": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_step.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).cuda()
    y = torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).cuda()
    results = []
    torch.manual_seed(0)
    ref = GPT2(GPT2Config(vocab_size=VOCAB, block_size=args.seq)).cuda()
    results.append(profile_model("reference GPT-2", torch.compile(ref), ref_optimizer(ref), x, y, args.steps))
    del ref
    torch._dynamo.reset()
    cfg = load_recipe("gpt2-small").model
    for name, fused in (("kiln gpt2-small (AdamW)", False), ("kiln gpt2-small (AdamW), fused head", True)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, vocab_size=VOCAB, max_seq_len=args.seq)).cuda()
        model.group_projections(True)   # as training's setup does
        if fused:
            apply_fused_cross_entropy(model)
        opt = build_optimizer(model, dataclasses.replace(TrainConfig(), lr=6e-4), torch.device("cuda"))
        results.append(profile_model(name, torch.compile(model), opt, x, y, args.steps))
        del model, opt

    for r in results:
        print(f"\n## {r['name']}: {r['wall_ms_per_step']:.1f} ms/step wall, "
              f"{r['kernel_ms_per_step']:.1f} ms/step in kernels")
        print("| category | ms/step | share |\n|---|---:|---:|")
        for c, ms in r["categories"].items():
            print(f"| {c} | {ms:.2f} | {100 * ms / r['kernel_ms_per_step']:.1f}% |")
        print("| kernel | ms/step |\n|---|---:|")
        for k, ms in list(r["kernels"].items())[:args.top]:
            print(f"| {k[:110]} | {ms:.2f} |")
    out = args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results},
                              indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
