"""Output head + cross-entropy, forward and backward: the plain path against kiln's fused head.

    python bench/cross_entropy.py [--tokens 32768] [--dims 768] [--vocabs 32768,50304,128256] [--sweep]

For each (d_model, vocabulary): bf16 autocast over fp32 weights, `tokens` rows, one forward and
backward of the loss of `h @ W.T`, timed with CUDA events (median of 20 after 5 warm-up), and the
peak memory the step adds above its inputs. Rows:

    plain          F.cross_entropy(F.linear(h, W).float(), y), eager
    plain compiled the same under torch.compile (Inductor fuses upcast, log-softmax and loss)
    fused          kiln.train.cross_entropy.linear_cross_entropy, eager
    fused compiled the same under torch.compile

`--sweep` also times the row kernel alone for a grid of block widths and warp counts (the
constants in kiln/train/cross_entropy.py come from it). Writes bench/results/cross_entropy.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.train import cross_entropy as ce


def plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def time_step(fn, h, w, y, reps=20, warmup=5) -> tuple[float, float, float]:
    """(median ms, peak GB above the inputs, loss) of loss + backward."""
    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, y)
        loss.backward()
        h.grad = w.grad = None
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 1e9, loss.item()


def sweep(n: int, v: int) -> list[dict]:
    """The row kernel alone at (n, v) in bf16, per block width and warp count."""
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    scale = torch.tensor(1.0 / n, device="cuda")
    saved = ce.BLOCK, ce.NUM_WARPS
    rows = []
    for block in (2048, 4096, 8192, 16384):
        for warps in (8, 16, 32):
            ce.BLOCK, ce.NUM_WARPS = block, warps
            fresh = logits.clone()
            ce.cross_entropy_loss_grad_(fresh, y, scale, -100)   # compile this shape
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                ce.cross_entropy_loss_grad_(fresh, y, scale, -100)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 10 * 1e3
            gbps = 2 * n * v * 2 / (ms / 1e3) / 1e9   # one read and one write of the logits
            rows.append({"vocab": v, "block": block, "warps": warps, "ms": ms, "gb_per_s_read_write": gbps})
            print(f"| {v} | {block} | {warps} | {ms:.3f} | {gbps:,.0f} |", flush=True)
    ce.BLOCK, ce.NUM_WARPS = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dims", default="768")
    ap.add_argument("--vocabs", default="32768,50304,128256")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    out = Path(__file__).parent / "results" / "cross_entropy.json"
    out.parent.mkdir(exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "rows": [], "sweep": []}
    if args.sweep:
        print("| vocab | block | warps | ms | GB/s (read + write of the logits) |\n|---:|---:|---:|---:|---:|")
        result["sweep"] = sweep(args.tokens, 50304) + sweep(args.tokens // 4, 128256)
    print("| d_model | vocab | path | ms (fwd+bwd) | × plain compiled | extra peak GB | loss |\n"
          "|---:|---:|---|---:|---:|---:|---:|")
    paths = {"plain": plain, "plain compiled": torch.compile(plain), "fused": ce.linear_cross_entropy,
             "fused compiled": torch.compile(ce.linear_cross_entropy)}
    for d in map(int, args.dims.split(",")):
        for v in map(int, args.vocabs.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            h = torch.randn(args.tokens, d, device="cuda", generator=g).requires_grad_()
            w = (0.02 * torch.randn(v, d, device="cuda", generator=g)).requires_grad_()
            y = torch.randint(0, v, (args.tokens,), device="cuda", generator=g)
            rows = []
            for name, fn in paths.items():
                try:
                    ms, gb, loss = time_step(fn, h, w, y)
                    rows.append({"d_model": d, "vocab": v, "path": name, "ms": ms, "extra_peak_gb": gb, "loss": loss})
                except torch.OutOfMemoryError:
                    rows.append({"d_model": d, "vocab": v, "path": name, "error": "OOM"})
                    torch.cuda.empty_cache()
            ref = next((r["ms"] for r in rows if r["path"] == "plain compiled" and "ms" in r), None)
            for r in rows:
                if "error" in r:
                    print(f"| {d} | {v} | {r['path']} | OOM | | | |")
                    continue
                ratio = f"{ref / r['ms']:.2f}" if ref else "-"
                print(f"| {d} | {v} | {r['path']} | {r['ms']:.2f} | {ratio} | {r['extra_peak_gb']:.2f} | {r['loss']:.4f} |",
                      flush=True)
            result["rows"] += rows
            out.write_text(json.dumps(result, indent=2) + "\n")
            del h, w, y
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
