"""Predicted (kiln/plan) against measured peak GPU memory: training steps and KV-cache inference.

    python bench/estimate_memory.py [--only NAME,...] [--steps 3] [--out bench/results/estimate_memory.json]
    python bench/estimate_memory.py --tiny            # CPU: tiny sizes, runs every path, no memory figures
    python bench/estimate_memory.py --from-json FILE  # recompute the predictions for recorded measurements

Training: for each configuration, kiln's Transformer on CUDA, kiln's optimizers (train/optim.py), its
activation checkpointing (train/memory.py) and fused head (train/cross_entropy.py), bf16 autocast, a few
full steps (forward, backward, clip, step, zero_grad); `torch.cuda.max_memory_allocated` over all steps
and per phase, against `kiln.plan.memory.train_memory`. LoRA is emulated here (kiln has no LoRA yet): the
base model in bf16 and frozen, rank-r fp32 adapters on the chosen linears.
Inference: the model in bf16, kiln's KVCache for the context and batch, one prefill of the prompt and a
few decode steps under inference_mode, against `infer_memory` (weights + KV cache + prefill transient).
Writes JSON after every configuration (a later failure keeps the rows so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from kiln.config import ModelConfig, TrainConfig
from kiln.plan.memory import TrainSetup, dtype_weight_bytes, infer_memory, kv_cache_bytes, train_memory

GPT2 = dict(depth=12, d_model=768, head_dim=128, vocab_size=50304, max_seq_len=1024, tie_embeddings=True)
M350 = dict(depth=24, d_model=1024, head_dim=64, n_kv_heads=4, qk_norm=True, vocab_size=50304, max_seq_len=1024)
B12 = dict(depth=28, d_model=1792, head_dim=128, vocab_size=50304, max_seq_len=1024, tie_embeddings=True)
LLAMA1B = dict(depth=16, d_model=2048, head_dim=64, n_heads=32, n_kv_heads=8, ffn_hidden=8192, vocab_size=128256,
               max_seq_len=2048, rope_theta=500000.0, tie_embeddings=True)
TINY = dict(depth=2, d_model=128, head_dim=32, n_kv_heads=2, vocab_size=512, max_seq_len=64)

# name -> (model fields, setup fields)
TRAIN = {
    "124M adamw off": (GPT2, dict(micro_batch=8, optimizer="adamw", checkpointing="off")),
    "124M adamw block": (GPT2, dict(micro_batch=32, optimizer="adamw", checkpointing="block")),
    "124M muon off plain-head": (GPT2, dict(micro_batch=8, optimizer="muon", checkpointing="off", fused_head=False)),
    "124M lora16 off": (GPT2, dict(micro_batch=8, checkpointing="off", finetune="lora", lora_rank=16)),
    "350M gqa+qknorm adamw selective": (M350, dict(micro_batch=8, optimizer="adamw", checkpointing="selective")),
    "1.2B adamw block": (B12, dict(micro_batch=8, optimizer="adamw", checkpointing="block")),
    "1.2B muon off": (B12, dict(micro_batch=4, optimizer="muon", checkpointing="off")),
    "1.2B lora16 block": (B12, dict(micro_batch=8, checkpointing="block", finetune="lora", lora_rank=16)),
    "1.2B adamw off accum2": (B12, dict(micro_batch=2, optimizer="adamw", checkpointing="off", accumulation=2)),
    "llama-1B adamw off plain-head": (LLAMA1B, dict(micro_batch=2, optimizer="adamw", checkpointing="off",
                                                    fused_head=False)),
}
INFER = {  # name -> (model fields, context, batch, prompt tokens)
    "124M ctx1024 x8": (GPT2, 1024, 8, 512),
    "1.2B ctx1024 x16": (B12, 1024, 16, 256),
    "llama-1B ctx2048 x4": (LLAMA1B, 2048, 4, 1024),
}


class LoRALinear(nn.Module):
    """base(x) + B(A(x)) * alpha / r, base frozen: what PEFT's LoRA layer computes (no dropout)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / rank)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x):   # under bf16 autocast, as training runs: the fp32 adapters are cast per use
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scale


LORA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def add_lora(model, rank: int, targets) -> None:
    model.to(torch.bfloat16).requires_grad_(False)
    for block in model.model.layers:
        for t in targets:
            parent_name, attr = LORA_MODULES[t].split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank))


def build(model_fields: dict, s: TrainSetup, device: torch.device):
    from kiln.model.llama import Transformer
    from kiln.train.cross_entropy import apply_fused_cross_entropy
    from kiln.train.memory import apply_activation_checkpointing
    from kiln.train.optim import build_optimizer
    torch.manual_seed(0)
    model = Transformer.from_config(ModelConfig(**model_fields), device=device)
    model.group_projections(True)   # as training's setup does
    if s.finetune == "lora":
        add_lora(model, s.lora_rank, s.lora_targets)
    if s.fused_head:
        apply_fused_cross_entropy(model)
    apply_activation_checkpointing(model, s.checkpointing)
    train = dataclasses.replace(TrainConfig(), optimizer="adamw" if s.finetune != "full" else s.optimizer, lr=3e-4)
    return model, build_optimizer(model, train, device)


def measure_train(model_fields: dict, s: TrainSetup, device: torch.device, steps: int) -> dict:
    cuda = device.type == "cuda"
    model = opt = None
    try:
        model, opt = build(model_fields, s, device)
        V, T = model.cfg.vocab_size, s.seq_len
        after_build = torch.cuda.memory_allocated() if cuda else None
        after_step = None
        phases = {"forward": 0, "backward": 0, "optimizer step": 0}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            for _ in range(s.accumulation):
                x = torch.randint(0, V, (s.micro_batch, T), device=device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(x, x, reduction="sum") / x.numel()
                phases["forward"] = max(phases["forward"], _peak_and_reset(cuda))
                loss.backward()
                phases["backward"] = max(phases["backward"], _peak_and_reset(cuda))
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            after_step = torch.cuda.memory_allocated() if cuda else None
            phases["optimizer step"] = max(phases["optimizer step"], _peak_and_reset(cuda))
        if cuda:
            torch.cuda.synchronize()
        return {"measured": max(phases.values()) if cuda else None, "measured_phases": phases if cuda else None,
                "reserved": torch.cuda.max_memory_reserved() if cuda else None,
                "seconds": time.perf_counter() - t0, "loss": float(loss.detach()), "after_build": after_build, "after_step": after_step}
    except torch.OutOfMemoryError as e:
        return {"measured": None, "error": f"OOM: {str(e)[:200]}"}
    finally:
        del model, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def _peak_and_reset(cuda: bool) -> int:
    if not cuda:
        return 0
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


@torch.inference_mode()
def measure_infer(model_fields: dict, context: int, batch: int, prompt: int, device: torch.device) -> dict:
    from kiln.infer.kv_cache import KVCache
    from kiln.model.llama import Transformer
    cuda = device.type == "cuda"
    model = cache = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = Transformer.from_config(ModelConfig(**model_fields), device=device).to(torch.bfloat16)
        cache = KVCache.for_model(model, batch_size=batch, max_len=context)
        cache_bytes = cache.k_LBKME.nbytes + cache.v_LBKME.nbytes
        weights_kv = torch.cuda.memory_allocated() if cuda else None   # weights + cache, before any forward
        x = torch.randint(0, model.cfg.vocab_size, (batch, prompt), device=device)
        logits = model(x, cache=cache)
        for _ in range(8):
            logits = model(logits[:, -1:].argmax(-1), cache=cache)
        if cuda:
            torch.cuda.synchronize()
        return {"measured": torch.cuda.max_memory_allocated() if cuda else None, "cache_bytes": cache_bytes,
                "measured_weights_kv": weights_kv}
    finally:
        del model, cache
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def predict_train(model_fields: dict, setup: dict) -> tuple[TrainSetup, dict]:
    cfg = ModelConfig(**model_fields)
    s = TrainSetup(seq_len=cfg.max_seq_len, **setup)
    tm = train_memory(cfg, s)
    return s, {"predicted": tm.peak, "predicted_phase": tm.phase, "predicted_phases": tm.phases}


def predict_infer(model_fields: dict, context: int, batch: int, prompt: int) -> dict:
    cfg = ModelConfig(**model_fields)
    im = infer_memory(cfg, dtype_weight_bytes(cfg, "bf16"), context, batch, prefill=prompt)
    return {"predicted": im.peak, "predicted_weights_kv": im.weights + im.kv_cache,
            "predicted_cache_bytes": kv_cache_bytes(cfg, context, batch)}


def _row(kind: str, name: str, r: dict) -> str:
    gb = 1024 ** 3
    if r.get("measured") is None:
        return f"| {kind} | {name} | {r['predicted'] / gb:.2f} | {r.get('error', 'not measured (no CUDA)')} | |"
    err = r["predicted"] / r["measured"] - 1
    return f"| {kind} | {name} | {r['predicted'] / gb:.2f} | {r['measured'] / gb:.2f} | {err:+.1%} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU check of every code path)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "estimate_memory.json")
    ap.add_argument("--from-json", type=Path, default=None, help="recompute predictions for recorded measurements")
    args = ap.parse_args()
    train, infer = dict(TRAIN), dict(INFER)
    if args.tiny:
        train = {k: ({**TINY, "depth": 2, "qk_norm": v[0].get("qk_norm", False)},
                     {**v[1], "micro_batch": 2}) for k, v in TRAIN.items()}
        infer = {k: (TINY, 64, 2, 32) for k in INFER}
    only = set(filter(None, args.only.split(",")))
    old = json.loads(args.from_json.read_text()) if args.from_json else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "rows": []}
    if old:
        out.update({k: old[k] for k in ("device", "torch", "python", "date", "steps")})
    if device.type == "cuda" and not old:
        free, total = torch.cuda.mem_get_info()
        torch.zeros(1, device=device)
        free_after, _ = torch.cuda.mem_get_info()
        out["cuda_total_bytes"], out["cuda_free_at_start"] = total, free_after
    args.out.parent.mkdir(exist_ok=True)
    recorded = {(r["kind"], r["name"]): r for r in old["rows"]} if old else {}
    print("| kind | configuration | predicted GiB | measured GiB | error |\n|---|---|---:|---:|---:|", flush=True)
    for name, (fields, setup) in train.items():
        if only and name not in only:
            continue
        s, pred = predict_train(fields, setup)
        r = {"kind": "train", "name": name, "model": fields, "setup": dataclasses.asdict(s), **pred}
        meas = recorded.get(("train", name)) if old else measure_train(fields, s, device, args.steps)
        r.update({k: v for k, v in (meas or {}).items() if not k.startswith("predicted") and k not in r})
        out["rows"].append(r)
        print(_row("train", name, r), flush=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, (fields, context, batch, prompt) in infer.items():
        if only and name not in only:
            continue
        r = {"kind": "infer", "name": name, "model": fields, "context": context, "batch": batch, "prompt": prompt,
             **predict_infer(fields, context, batch, prompt)}
        meas = recorded.get(("infer", name)) if old else measure_infer(fields, context, batch, prompt, device)
        r.update({k: v for k, v in (meas or {}).items() if not k.startswith("predicted") and k not in r})
        assert r.get("cache_bytes") in (None, r["predicted_cache_bytes"]), (r["cache_bytes"], r["predicted_cache_bytes"])
        out["rows"].append(r)
        print(_row("infer", name, r), flush=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    errs = [abs(r["predicted"] / r["measured"] - 1) for r in out["rows"] if r.get("measured")]
    if errs:
        print(f"largest error {max(errs):.1%} over {len(errs)} configurations; wrote {args.out}")
    else:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
