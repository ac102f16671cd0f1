"""Throughput of multiple-choice scoring: the whole MMLU test set, letter and cloze formats, for a
135M model of SmolLM2's shape (random weights: the timing does not depend on them).

    python bench/eval_mmlu_throughput.py --tokenizer DIR [--batch_size 64] [--baseline_items 500]

DIR holds a tokenizer.json (SmolLM2's, so prompts have the real token counts). The baseline is the
same scorer at batch size 1 on the first --baseline_items questions of each format, run in the same
process. Prints a table and writes bench/results/eval_mmlu_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.data.benchmarks import get
from kiln.eval.choice import requests
from kiln.eval.scoring import Scorer, plan_rows
from kiln.model.llama import Transformer
from kiln.tokenizer import Tokenizer

SMOLLM2_135M = dict(depth=30, d_model=576, head_dim=64, n_heads=9, n_kv_heads=3, ffn_hidden=1536, vocab_size=49152,
                    max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True)


def timed(scorer: Scorer, pairs: list, device: torch.device) -> tuple[float, int]:
    enc = scorer.encode_pairs(pairs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scorer.loglikelihood_tokens(enc)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, model_tokens(scorer, enc)


def model_tokens(scorer: Scorer, enc: list) -> int:
    """Tokens through the model: a context runs once with the tails of all its continuations after it
    (a letter question's four answers share one row; a cloze question's four answers one context)."""
    return sum(len(r.tokens) for r in plan_rows(enc, scorer.max_len)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--baseline_items", type=int, default=500)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_mmlu_throughput.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_file(args.tokenizer)
    torch.manual_seed(0)
    model = Transformer.from_config(ModelConfig(**SMOLLM2_135M), device).eval()
    items = get("mmlu").records()
    if args.limit:
        items = items[:args.limit]
    bf16 = device.type == "cuda"
    fast, slow = Scorer(model, tok, args.batch_size, bf16), Scorer(model, tok, 1, bf16)
    timed(fast, requests(items[:64], "letter"), device)   # warm-up: kernels, allocator
    rows, total = [], 0.0
    t_encode = time.perf_counter()
    pairs = {fmt: requests(items, fmt) for fmt in ("letter", "cloze")}
    t_encode = time.perf_counter() - t_encode
    for fmt, p in pairs.items():
        sec, tokens = timed(fast, p, device)
        total += sec
        base_pairs = requests(items[:args.baseline_items], fmt)
        bsec, btokens = timed(slow, base_pairs, device)
        rows.append({"format": fmt, "items": len(items), "requests": len(p), "tokens": tokens, "seconds": sec,
                     "tokens_per_s": tokens / sec, "batch_size": args.batch_size,
                     "baseline_batch_1": {"items": args.baseline_items, "seconds": bsec, "tokens_per_s": btokens / bsec}})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{'format':8s} {'items':>6s} {'requests':>8s} {'tokens':>10s} {'seconds':>8s} {'tok/s':>10s} {'bs1 tok/s':>10s}")
    for r in rows:
        print(f"{r['format']:8s} {r['items']:6d} {r['requests']:8d} {r['tokens']:10d} {r['seconds']:8.1f} "
              f"{r['tokens_per_s']:10.0f} {r['baseline_batch_1']['tokens_per_s']:10.0f}")
    print(f"both formats: {total:.1f} s scoring (+ {t_encode:.1f} s building and encoding prompts on the CPU) on {name}")
    out = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": "SmolLM2-135M shape, random weights, bf16 autocast" if bf16 else "SmolLM2-135M shape, fp32",
           "rows": rows, "scoring_seconds_both": total, "prompt_seconds": t_encode}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
