"""GRPO's step and log-prob pass with the head on the completion tokens only (`build_rows`' rows) against the
head at every position (the same loss): what skipping prompts and padding in the vocabulary matmul saves.

    python bench/grpo_step.py [--device auto|cpu|cuda] [--shape tiny|smollm2-135m] [--prompts 4] [--group 8]
                              [--prompt-len 96] [--completion-len 128] [--steps 10] [--warmup 3]
                              [--threads N] [--out PATH]

P prompts x G completions of random tokens as one micro-batch, built by kiln's own `build_rows`: prompts within
+-25% of --prompt-len, completions between a quarter of --completion-len and all of it (samples stop at
different points, so rows are padded to the longest), one sample in eight dropped (a reward that failed). One
optimizer step per micro-batch (GRPOLoss with the KL term, AdamW, clipping), bf16 autocast on CUDA, fp32 on
CPU. The log-prob pass (old_logp: no gradient, the sampling policy) is timed apart. Variants run interleaved;
median of --steps after --warmup. Prints a table and writes bench/results/grpo_step_<shape>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dpo_step import SHAPES, Variant, interleaved, sync
from kiln.model.llama import Transformer
from kiln.post.grpo import GRPOLoss, count_tokens
from kiln.post.rollouts import build_rows, token_logp
from kiln.runtime.device import autocast, pick_device


def make_batch(P: int, G: int, prompt_len: int, completion_len: int, vocab: int, max_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompts, completions, trained = [], [], []
    for _ in range(P):
        prompt = rng.integers(10, vocab, int(rng.integers(prompt_len * 3 // 4, prompt_len * 5 // 4 + 1))).tolist()
        for _ in range(G):
            prompts.append(prompt)
            completions.append(rng.integers(10, vocab, int(rng.integers(completion_len // 4,
                                                                        completion_len + 1))).tolist())
            trained.append(bool(rng.random() >= 1 / 8))
    batch = build_rows(prompts, completions, trained, pad_id=0, max_len=max_len)
    batch["advantages"] = torch.from_numpy(rng.standard_normal(P * G).astype(np.float32)) * torch.tensor(trained)
    return batch


def with_logps(model, batch: dict, device, bf16: bool, rows: bool) -> dict:
    """The batch as the loss takes it: (N,) log-probs beside `rows`, or (B, T) ones without `rows`."""
    x, y = batch["input_ids"].to(device), batch["targets"].to(device)
    r = batch["rows"].to(device) if rows else None
    with autocast(device, bf16):
        old = token_logp(model, x, y, r).cpu()
    out = {**batch, "old_logp": old, "ref_logp": old - 0.01}
    if not rows:
        del out["rows"]
    return out


def time_logp_pass(model, batches: list[dict], device, bf16: bool, rows: bool, steps: int, warmup: int) -> float:
    times = []
    model.eval()
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        x, y = b["input_ids"].to(device), b["targets"].to(device)
        r = b["rows"].to(device) if rows else None
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, bf16):
            token_logp(model, x, y, r)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    model.train()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per micro-batch (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    cfg = SHAPES[args.shape]
    model = Transformer.from_config(cfg, device)
    model.group_projections(True)   # as training's setup does
    model.eval()
    raw = [make_batch(args.prompts, args.group, args.prompt_len, args.completion_len, cfg.vocab_size,
                      cfg.max_seq_len, seed) for seed in range(3)]
    sparse = [with_logps(model, b, device, bf16, rows=True) for b in raw]
    dense = [with_logps(model, b, device, bf16, rows=False) for b in raw]
    model.train()
    share = statistics.mean(b["rows"].numel() / b["targets"].numel() for b in raw)

    variants = [Variant("all positions", model, GRPOLoss(0.2, 0.04), count_tokens, dense, device),
                Variant("completion rows", model, GRPOLoss(0.2, 0.04), count_tokens, sparse, device)]
    rows = interleaved(variants, bf16, args.steps, args.warmup)
    rows[0]["logp_pass_ms"] = time_logp_pass(model, raw, device, bf16, False, args.steps, args.warmup)
    rows[1]["logp_pass_ms"] = time_logp_pass(model, raw, device, bf16, True, args.steps, args.warmup)
    base = rows[0]
    for r in rows:
        r["speedup_step"] = base["ms"] / r["ms"]
        r["speedup_logp_pass"] = base["logp_pass_ms"] / r["logp_pass_ms"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\n{args.shape} on {device} ({name}), {'bf16' if bf16 else 'fp32'}, {args.prompts} prompts x {args.group} "
          f"completions, prompt ~{args.prompt_len}, completions <= {args.completion_len}: trained positions "
          f"{share:.0%} of the padded rows")
    print(f"{'head':<18}{'rows x T':>10}{'step ms':>10}{'min ms':>10}{'x':>7}{'logp pass ms':>14}{'x':>7}"
          + (f"{'peak GB':>10}" if device.type == "cuda" else ""))
    for r in rows:
        print(f"{r['name']:<18}{str(r['rows']) + ' x ' + str(r['T']):>10}{r['ms']:>10.1f}{r['ms_min']:>10.1f}"
              f"{r['speedup_step']:>7.2f}{r['logp_pass_ms']:>14.1f}{r['speedup_logp_pass']:>7.2f}"
              + (f"{r['peak_gb']:>10.2f}" if "peak_gb" in r else ""))

    default = Path(__file__).parent / "results" / f"grpo_step_{args.shape}_{device.type}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "device": name if device.type == "cuda" else f"{name} ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "bf16": bf16, "prompts": args.prompts, "group": args.group,
              "prompt_len": args.prompt_len, "completion_len": args.completion_len, "trained_share": share,
              "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
