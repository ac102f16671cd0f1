"""Training throughput: kiln's gpt2-small against the plain GPT-2 reference, same GPU, same run.

    python bench/train_throughput.py [--steps 30] [--warmup 8] [--micro-batch 32] [--variants base,flash,cudnn,mb2x]

Every configuration trains on the same random token batches (32 x 1024 by default), one
optimizer step per micro-batch, bf16 autocast, torch.compile, fused AdamW. Reports tokens/s,
MFU against the datasheet peak and against a bf16 8192^3 matmul measured in this run, peak
memory, and the ratio to the reference; the first losses of each kiln variant are compared with
the base variant so that no speed is bought with a numerics change. Writes
bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference_gpt2 import GPT2, GPT2Config, optimizer as ref_optimizer  # noqa: E402

from kiln.config import TrainConfig, load_recipe  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402
from kiln.train.optim import build_optimizer  # noqa: E402
from kiln.train.runtime import peak_flops  # noqa: E402

VOCAB = 50304


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def attention_context(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend])


def run(name: str, model, opt, loss_fn, batches, warmup: int, steps: int, attention: str) -> dict:
    torch.cuda.reset_peak_memory_stats()
    losses = []
    with attention_context(attention):
        for i, (x, y) in enumerate(batches[:warmup + steps]):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = steps * batches[0][0].numel()
    return {"name": name, "tokens_per_s": tokens / dt, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "losses": [float(v) for v in torch.stack(losses[:warmup]).cpu()]}


def kiln_model(seq: int) -> Transformer:
    cfg = load_recipe("gpt2-small").model
    return Transformer(dataclasses.replace(cfg, vocab_size=VOCAB, max_seq_len=seq)).cuda()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--variants", default="base,flash,cudnn,mb2x,cudnn_mb2x")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).to(device),
                torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).to(device))
               for _ in range(args.warmup + args.steps)]
    measured_peak = matmul_peak()
    sheet_peak = peak_flops(device)
    results = []

    torch.manual_seed(0)
    ref = GPT2(GPT2Config(vocab_size=VOCAB, block_size=args.seq)).cuda()
    r = run("reference GPT-2", torch.compile(ref), ref_optimizer(ref), lambda m, x, y: m(x, y), batches,
            args.warmup, args.steps, "default")
    r["flops_per_token"] = ref.flops_per_token(args.seq)
    results.append(r)
    del ref
    full = lambda m, x, y: m(x, y)  # noqa: E731
    variants = {  # name: (attention backend, loss, micro-batch multiplier)
        "base": ("default", full, 1),
        "flash": ("flash", full, 1),
        "cudnn": ("cudnn", full, 1),
        "mb2x": ("default", full, 2),
        "cudnn_mb2x": ("cudnn", full, 2),
    }
    for v in args.variants.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = kiln_model(args.seq)
        attention, loss_fn, mult = variants[v]
        data = batches if mult == 1 else [
            (torch.cat([a[0] for a in batches[i:i + mult]]), torch.cat([a[1] for a in batches[i:i + mult]]))
            for i in range(0, len(batches) - mult + 1, mult)]
        steps = args.steps // mult
        opt = build_optimizer(model, dataclasses.replace(TrainConfig(), lr=6e-4), device)
        r = run(f"kiln {v}", torch.compile(model), opt, loss_fn, data, args.warmup // mult or 1, steps, attention)
        r["flops_per_token"] = model.flops_per_token(args.seq)
        results.append(r)
        del model, opt

    base_tps = results[0]["tokens_per_s"]
    kiln_base = next((r for r in results if r["name"] == "kiln base"), None)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, measured bf16 matmul peak "
          f"{measured_peak / 1e12:.0f} TFLOP/s, datasheet {sheet_peak / 1e12 if sheet_peak else float('nan'):.0f}")
    print("| config | tokens/s | x reference | MFU (datasheet) | MFU (measured peak) | peak mem GB | max |dloss| vs kiln base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        flops = r["flops_per_token"] * r["tokens_per_s"]
        r["mfu_datasheet"] = flops / sheet_peak if sheet_peak else None
        r["mfu_measured"] = flops / measured_peak
        r["ratio_to_reference"] = r["tokens_per_s"] / base_tps
        same_batches = len(r["losses"]) == len(kiln_base["losses"]) if kiln_base else False
        dloss = (max(abs(a - b) for a, b in zip(r["losses"], kiln_base["losses"]))
                 if same_batches and r["name"].startswith("kiln") else None)
        r["max_loss_diff_vs_kiln_base"] = dloss
        mfu_d = "-" if r["mfu_datasheet"] is None else f"{100 * r['mfu_datasheet']:.1f}%"
        dl = "-" if dloss is None else f"{dloss:.4f}"
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['ratio_to_reference']:.2f} | {mfu_d} | "
              f"{100 * r['mfu_measured']:.1f}% | {r['peak_mem_gb']:.1f} | {dl} |")
    out = Path(__file__).parent / "results" / "train_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                               "measured_peak_flops": measured_peak, "datasheet_peak_flops": sheet_peak,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
