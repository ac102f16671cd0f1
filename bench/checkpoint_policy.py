"""What selective activation checkpointing keeps: the bytes of matmul outputs its policy saves for backward.

    python bench/checkpoint_policy.py [--tokens 512] [--scale-to 16384] [--rank 16]

A SmolLM2-135M-shaped model (30 x 576, 9 heads, 3 key/value heads, SwiGLU 1,536, vocabulary 49,152), with LoRA
on every linear layer (--rank 0: full fine-tuning), one forward and backward of 2 rows under bf16 autocast on
the CPU with `train.activation_checkpointing=selective`. Every matmul the policy marks MUST_SAVE in the
forward is counted (output elements x 2 bytes, bf16), once with kiln's policy (kiln/train/memory.py) and once
with the earlier rule that kept every matmul's output. The count is linear in tokens, so it is also given
scaled to --scale-to tokens (16 x 1,024: bench/sft_throughput.py's step). Memory the policy decides, not a
device's peak: the compiled step's partitioner and the allocator come on top (bench/sft_throughput.py on a GPU
measures that). Writes bench/results/checkpoint_policy.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import CheckpointPolicy

from kiln.config import ModelConfig
from kiln.config.post import LoRAConfig
from kiln.model.llama import Transformer
from kiln.train import memory
from kiln.train.lora import apply_lora

SHAPE = dict(depth=30, d_model=576, head_dim=64, n_heads=9, n_kv_heads=3, ffn_hidden=1536, vocab_size=49152)
aten = torch.ops.aten


def earlier_rule(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in memory._SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def kept_bytes(rule, tokens: int, rank: int) -> int:
    """Bytes of matmul outputs `rule` keeps over one forward of `tokens` tokens (2 rows)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE, max_seq_len=tokens // 2))
    if rank:
        apply_lora(model, LoRAConfig(enabled=True, rank=rank, alpha=2.0 * rank), "cpu")
    model.group_projections(True)   # as training's setup does
    memory.apply_activation_checkpointing(model, "selective")
    kept = [0]

    def counting(ctx, op, *args, **kwargs):
        decision = rule(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute and op in (aten.mm.default,
                                                                                    aten.addmm.default):
            x, w = (args[1], args[2]) if op is aten.addmm.default else (args[0], args[1])
            kept[0] += x.shape[0] * w.shape[-1] * 2
        return decision

    policy = memory._policy
    memory._policy = counting
    try:
        x = torch.randint(0, SHAPE["vocab_size"], (2, tokens // 2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x, reduction="sum")
        loss.backward()
    finally:
        memory._policy = policy
    return kept[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--scale-to", type=int, default=16 * 1024)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank on every linear layer; 0 = full fine-tuning")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_policy.json"))
    args = ap.parse_args()
    rows = []
    for name, rule in (("earlier rule (every matmul kept)", earlier_rule), ("kiln's policy", memory._policy)):
        b = kept_bytes(rule, args.tokens, args.rank)
        rows.append({"policy": name, "kept_bytes": b, "kept_gb_scaled": b * args.scale_to / args.tokens / 1e9})
    print(f"selective checkpointing, SmolLM2 shape, {'LoRA r=%d' % args.rank if args.rank else 'full'}, "
          f"{args.tokens} tokens (scaled to {args.scale_to:,})")
    print(f"{'policy':<36} {'kept MiB':>10} {'scaled GB':>10}")
    for r in rows:
        print(f"{r['policy']:<36} {r['kept_bytes'] / 2**20:>10.1f} {r['kept_gb_scaled']:>10.2f}")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                          "args": vars(args), "shape": SHAPE, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
