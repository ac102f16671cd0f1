"""`kiln estimate`: one configuration in, a table and JSON out (parameters, training memory per GPU by part,
inference memory by format, tokens, FLOPs, time, cost); and the short estimate `kiln pretrain` prints at start.

Rules of thumb, and where this differs (the help text's two worked examples, `kiln estimate --help`):
- "~16 bytes per parameter to train with AdamW" is ZeRO's accounting (bf16 weights 2 + bf16 gradients 2 +
  fp32 master, m, v 12). kiln's single-GPU path keeps fp32 weights and fp32 gradients under autocast
  (4 + 4 + 8 = 16) plus the bf16 copies autocast makes of every matmul weight and keeps for backward
  (+2 = 18 without checkpointing); and none of that counts activations or the logits, which dominate at
  small sizes.
- "~0.5-0.7 GB per billion parameters at 4 bits" is 4.5-5.6 bits per weight: Q4_0 is 4.5 bits
  (18 bytes / 32), Q4_K_M ~4.9 (Q6_K for the head and some attn_v/ffn_down). "+10-20% for the KV cache"
  only holds at one context and batch: the cache is linear in both (GQA divides it by H/K).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from kiln.config import Config, ModelConfig
from kiln.plan.gguf import QUANTS, bits_per_weight, gguf_file_bytes, gguf_weight_bytes
from kiln.plan.hardware import GIB, Accelerator, accelerator
from kiln.plan.memory import (TrainSetup, dtype_weight_bytes, infer_memory, kv_cache_bytes, largest_micro_batch,
                              lora_params, param_counts, train_memory)
from kiln.plan.presets import resolve_model

HELP_EXAMPLES = """\
examples (figures in GiB = 2^30 bytes; check them by hand):

  kiln estimate 70b --estimate.context 8192
    Llama 3.1 70B, 70.55B parameters, at 4 bits. Rule of thumb: 0.5-0.7 GB per billion parameters, so
    35-49 GB, plus 10-20% for the KV cache. kiln: Q4_0 is 18 bytes per 32 weights = 4.5 bits, so
    70.55e9 x 4.5 / 8 = 39.7e9 bytes = 37.0 GiB; Q4_K_M (Q6_K = 6.56 bits for the output head and for
    attn_v / ffn_down in the first and last eighth of the layers and every third between, Q4_K = 4.5
    bits elsewhere) averages 4.82 bits = 39.6 GiB. The KV cache is 2 x 80 layers x 8 KV heads x 128 x
    8192 tokens x 2 bytes = 2.5 GiB: 6% of the weights, below the rule's 10-20% because grouped-query
    attention keeps 8 KV heads for 64 query heads; it is linear in context and batch (10 GiB at 32k,
    a quarter of the weights). Total with llama.cpp's prefill buffers and the CUDA context: ~45 GiB, so
    one 48 GB L40S, not one 24 GB RTX 4090.

  kiln estimate --model.depth 96 --model.d_model 12288 --model.head_dim 128 --model.n_kv_heads 96 \\
      --model.vocab_size 50304 --model.max_seq_len 2048 --estimate.optimizer adamw \\
      --estimate.parallel zero3 --estimate.gpus 64 --estimate.activation_checkpointing block \\
      --estimate.micro_batch 1
    A GPT-3-sized model (96 x 12288, SwiGLU 32768): 174.6B parameters. Rule of thumb: 16 bytes per
    parameter with AdamW = 2.79e12 bytes = 2,601 GiB. kiln on one process: fp32 weights 4 + fp32
    gradients 4 + AdamW m and v 8 = the same 16 bytes (650 + 650 + 1,301 GiB), plus what the rule leaves
    out: autocast's bf16 copies of the matmul weights, kept for backward (2 bytes, 325 GiB), and the
    activations (1,705 GiB for 16 x 2048 tokens without checkpointing, 144 GiB with block checkpointing).
    ZeRO-3 over 64 GPUs shards ZeRO's 2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master, m, v) =
    16 bytes: 174.6e9 x 16 / 64 = 40.6 GiB per GPU, plus the gathered layers (2 x 3.6 GB in bf16),
    one sequence's activations with block checkpointing (4.5 GiB) and one layer's unsharded gradient:
    a 60 GiB peak, so it fits an 80 GB H100. Training on Chinchilla's 20 tokens per parameter (3.5T
    tokens): 6ND = 3.66e24 FLOPs (3.76e24 with attention), 2.4M H100-hours at kiln's 44.5% MFU.
"""

CHINCHILLA_TOKENS_PER_PARAM = 20.0   # Hoffmann et al. 2022, compute-optimal
LLAMA_CPP_UBATCH = 512               # llama.cpp's default n_ubatch: prompt tokens per forward

# kiln's own measured MFU (against the datasheet peak), bf16, torch.compile, one H100: BENCHMARKS.md,
# "One GPU under torchrun: plain vs FSDP2 with one rank" (2026-11-24).
KILN_MFU = ((124e6, 0.418, "gpt2-small, 124M, AdamW, one H100: 41.8% (BENCHMARKS.md, 'One GPU under torchrun')"),
            (1.17e9, 0.445, "depth 28, 1.17B, FSDP2 one rank, one H100: 44.5% (BENCHMARKS.md, 'One GPU under "
                            "torchrun')"))


def default_mfu(n_params: int) -> tuple[float, str]:
    """The measured MFU nearest in size (log scale), with where it was measured."""
    size, mfu, source = min(KILN_MFU, key=lambda e: abs(math.log(e[0] / n_params)))
    return mfu, "kiln's measured MFU at " + source


def flops_per_token(cfg: ModelConfig, seq_len: int, loss_share: float = 1.0) -> dict:
    """Training FLOPs per token: 6 x matmul weights (head included when tied) + 12 L H E T, as
    Transformer.flops_per_token (a test checks they agree); the head's 6 V D counted on `loss_share` of the tokens."""
    c = cfg.resolved()
    dense = 6.0 * (param_counts(c).matmul - (1 - loss_share) * c.vocab_size * c.d_model)
    attention = 12.0 * c.depth * c.n_heads * c.head_dim * seq_len
    return {"dense": dense, "attention": attention, "total": dense + attention}


def train_setup(cfg: Config, m: ModelConfig) -> TrainSetup:
    """The TrainSetup `cfg` describes: the estimate section where set, else the train section."""
    e, t = cfg.estimate, cfg.train
    parallel = e.parallel
    if parallel == "auto":
        parallel = {"none": "none", "ddp": "ddp", "fsdp": "fsdp"}.get(t.parallel, f"zero{t.zero_stage}")
    optimizer = t.optimizer if e.optimizer == "auto" else e.optimizer
    if e.optimizer == "auto" and e.finetune != "full" and optimizer == "muon":
        optimizer = "adamw"   # adapters train with AdamW (kiln refuses Muon for LoRA: they are thin factors)
    ckpt = t.activation_checkpointing if e.activation_checkpointing == "auto" else e.activation_checkpointing
    seq = e.seq_len or m.max_seq_len
    mb = e.micro_batch or t.micro_batch_size
    batch_tokens = e.batch_tokens or t.batch_tokens or mb * seq * e.gpus
    accum = max(1, math.ceil(batch_tokens / (mb * seq * e.gpus)))
    return TrainSetup(seq_len=seq, micro_batch=mb, precision=e.precision, optimizer=optimizer, parallel=parallel,
                      gpus=e.gpus, cpu_offload=t.cpu_offload if e.cpu_offload is None else e.cpu_offload,
                      checkpointing=ckpt, finetune=e.finetune, lora_rank=e.lora_rank,
                      lora_targets=tuple(e.lora_targets), fused_head=t.fused_cross_entropy != "off" and parallel != "zero3",
                      accumulation=accum, loss_share=e.loss_share)


def estimate(cfg: Config, hw: Accelerator | None = None) -> dict:
    """Everything `kiln estimate` reports, as plain JSON-ready values (bytes, FLOPs, hours)."""
    e = cfg.estimate
    m, source = resolve_model(e.model, cfg.model)
    if m.vocab_size is None:
        m = dataclasses.replace(m, vocab_size=_vocab_guess(cfg))
        source += f" (vocab_size from tokenizer.vocab_size rounded up: {m.vocab_size})"
    m = m.resolved()
    hw = hw or accelerator(e.gpu, e.gpu_memory_gb, e.gpu_tflops)
    s = train_setup(cfg, m)
    pc = param_counts(m)
    budget = hw.memory_gib * GIB
    tm = train_memory(m, s)
    best = largest_micro_batch(m, s, budget)
    batch_tokens = s.accumulation * s.micro_batch * s.seq_len * s.gpus
    accum_best = math.ceil(batch_tokens / (best * s.seq_len * s.gpus)) if best else None

    trainable = pc.total if s.finetune == "full" else lora_params(m, s.lora_rank, s.lora_targets)
    tpp = e.tokens_per_param or cfg.train.tokens_per_param
    tokens = e.tokens or tpp * pc.total
    fpt = flops_per_token(m, s.seq_len, s.loss_share)
    if s.finetune != "full":   # frozen base: no weight gradients, ~2/3 of the backward's matmul work remains
        fpt = {**fpt, "total": fpt["total"] * (2 + 2 * trainable / pc.total + 2) / 6}
    total_flops = fpt["total"] * tokens
    mfu, mfu_source = (e.mfu, "given") if e.mfu else default_mfu(pc.total)
    hours = None
    if hw.bf16_tflops:
        gpu_seconds = total_flops / (hw.bf16_tflops * 1e12 * mfu)
        hours = {"gpu_hours": gpu_seconds / 3600, "wall_hours": gpu_seconds / 3600 / s.gpus,
                 "cost": gpu_seconds / 3600 * e.price_per_gpu_hour, "price_per_gpu_hour": e.price_per_gpu_hour}

    context = e.context or s.seq_len
    infer = {}
    for fmt in ("bf16", "int8"):
        infer[fmt] = {"weights_per_param_bits": None,
                      **infer_memory(m, dtype_weight_bytes(m, fmt), context, e.infer_batch).as_dict()}
        infer[fmt]["weights_per_param_bits"] = 8 * infer[fmt]["weights"] / pc.total
    for q in QUANTS:   # llama.cpp: prompts in micro-batches of 512 tokens, logits of the last position only
        w = gguf_weight_bytes(m, q)
        infer[f"gguf {q}"] = {"weights_per_param_bits": 8 * w / pc.total, "file_bytes": gguf_file_bytes(m, q),
                              **infer_memory(m, w, context, e.infer_batch, prefill=min(context, LLAMA_CPP_UBATCH),
                                             all_logits=False).as_dict()}
    return {
        "model": {"source": source, "config": dataclasses.asdict(m)},
        "params": {"total": pc.total, "embedding": pc.embedding, "head": pc.head, "non_embedding": pc.non_embedding,
                   "active": pc.total, "trainable": trainable},
        "hardware": dataclasses.asdict(hw),
        "setup": dataclasses.asdict(s),
        "training": {**tm.as_dict(), "fits": tm.total <= budget, "gpu_bytes": budget,
                     "largest_micro_batch": best, "accumulation_at_largest": accum_best,
                     "batch_tokens": batch_tokens},
        "inference": {"context": context, "batch": e.infer_batch,
                      "kv_cache_bytes_bf16": kv_cache_bytes(m, context, e.infer_batch), "formats": infer,
                      "gguf_bits_per_weight": {q: bits_per_weight(q) for q in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")}},
        "data": {"chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * pc.total, "tokens": tokens,
                 "tokens_per_param": tokens / pc.total},
        "compute": {"flops_per_token": fpt, "six_nd": 6.0 * pc.total * tokens, "total_flops": total_flops,
                    "mfu": mfu, "mfu_source": mfu_source, **(hours or {})},
    }


def _vocab_guess(cfg: Config) -> int:
    v, k = cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_multiple
    return k * math.ceil(v / k)


# ---------------------------------------------------------------- output

def _gb(x: float) -> str:
    return f"{x / GIB:,.2f}"


def render(est: dict) -> str:
    """The estimate as a plain-text table (GiB = 2^30 bytes)."""
    p, t, s, c, d = est["params"], est["training"], est["setup"], est["compute"], est["data"]
    hw = est["hardware"]
    lines = [f"model: {est['model']['source']}",
             f"parameters: {p['total'] / 1e6:,.1f}M total, {p['embedding'] / 1e6:,.1f}M embedding, "
             f"{p['non_embedding'] / 1e6:,.1f}M non-embedding" + (f", {p['trainable'] / 1e6:,.2f}M trainable"
                                                                  if p["trainable"] != p["total"] else ""),
             "",
             f"training memory per GPU (GiB) on {hw['name']} ({hw['memory_gib']:g} GiB): {s['finetune']}, "
             f"{s['optimizer']}, {s['parallel']} x {s['gpus']}, micro-batch {s['micro_batch']} x {s['seq_len']}, "
             f"checkpointing {s['checkpointing']}, {s['precision']}"
             + (f", loss on {s['loss_share']:.0%} of the positions" if s["loss_share"] < 1 else "")]
    rows = [("weights", t["weights"]), ("gradients", t["gradients"]), ("optimizer states", t["optimizer"]),
            ("activations (saved for backward)", t["activations"]), ("output head / logits", t["head"]),
            ("autocast bf16 weight copies", t["autocast_copies"])]
    lines += [f"  {name:<38}{_gb(v):>10}" for name, v in rows]
    lines += ["  (not all live at once: gradients grow as activations are freed)",
              f"  {'peak allocated, at ' + t['phase']:<38}{_gb(t['peak']):>10}",
              f"  {'framework (CUDA context, allocator)':<38}{_gb(t['framework']):>10}",
              f"  {'total needed':<38}{_gb(t['total']):>10}"]
    if t["cpu"]:
        lines.append(f"  {'CPU memory for offloaded state':<38}{_gb(t['cpu']):>10}")
    lines.append("  activations by checkpointing mode: " + ", ".join(
        f"{k} {_gb(v)}" for k, v in t["activations_by_mode"].items()))
    verdict = "fits" if t["fits"] else "DOES NOT FIT"
    best = t["largest_micro_batch"]
    lines.append(f"  {verdict}; largest micro-batch that fits: {best}" +
                 (f" (accumulation {t['accumulation_at_largest']} for {t['batch_tokens']:,} tokens per step)"
                  if best else ""))
    inf = est["inference"]
    lines += ["", f"inference memory (GiB), context {inf['context']} x batch {inf['batch']}: "
                  f"KV cache {_gb(inf['kv_cache_bytes_bf16'])} in bf16",
              f"  {'format':<14}{'bits/weight':>12}{'weights':>10}{'KV cache':>10}{'prefill':>10}{'total':>10}"
              f"{'file':>10}"]
    for fmt, r in inf["formats"].items():
        file = _gb(r["file_bytes"]) if "file_bytes" in r else "-"
        lines.append(f"  {fmt:<14}{r['weights_per_param_bits']:>12.2f}{_gb(r['weights']):>10}{_gb(r['kv_cache']):>10}"
                     f"{_gb(r['activations']):>10}{_gb(r['total']):>10}{file:>10}")
    lines += ["", f"data: {d['tokens'] / 1e9:,.2f}B tokens ({d['tokens_per_param']:g} per parameter); "
                  f"Chinchilla's 20 per parameter: {d['chinchilla_tokens'] / 1e9:,.2f}B",
              f"compute: {c['total_flops']:.3g} FLOPs ({c['flops_per_token']['total']:.3g} per token: "
              f"6N {c['flops_per_token']['dense']:.3g} + attention {c['flops_per_token']['attention']:.3g}); "
              f"6ND = {c['six_nd']:.3g}"]
    if "gpu_hours" in c:
        lines.append(f"time: {c['gpu_hours']:,.1f} GPU-hours, {c['wall_hours']:,.1f} h on {s['gpus']} GPU(s) at "
                     f"{c['mfu']:.1%} MFU ({c['mfu_source']}); cost {c['cost']:,.0f} at "
                     f"{c['price_per_gpu_hour']:g} per GPU-hour")
    else:
        lines.append(f"time: no bf16 FLOP/s known for {hw['name']}: give --estimate.gpu_tflops")
    return "\n".join(lines)


def run_estimate(cfg: Config) -> dict:
    """`kiln estimate`: print the table (or JSON with --json); with --run_dir also write plan/estimate.json."""
    est = estimate(cfg)
    print(json.dumps(est, indent=2) if cfg.estimate.json else render(est))
    if cfg.run_dir is not None:
        out = Path(cfg.run_dir) / "plan" / "estimate.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(est, indent=2) + "\n", encoding="utf-8")
        if not cfg.estimate.json:
            print(f"wrote {out}")
    return est


def startup_estimate(cfg: Config, free_bytes: int, device_name: str, world_size: int = 1, lora=None,
                     loss_share: float = 1.0, keys: str = "train") -> list[str]:
    """What a training stage prints at start for its own (resolved) configuration: the predicted peak per GPU by
    part, and a warning when it exceeds the free memory of this GPU. `lora` (a LoRAConfig, enabled) estimates
    adapters on a frozen base (NF4 for QLoRA), `loss_share` the head on that share of the positions (SFT: the
    assistant tokens'), `keys` is where the stage's train settings sit on the command line (`sft.train`)."""
    finetune = "full" if lora is None or not lora.enabled else "qlora" if lora.base_dtype == "nf4" else "lora"
    e = dataclasses.replace(cfg.estimate, model=None, gpus=world_size, seq_len=cfg.train.seq_len, micro_batch=None,
                            precision="fp32" if cfg.train.precision == "fp32" else "bf16",
                            batch_tokens=None, optimizer="auto", parallel="auto", activation_checkpointing="auto",
                            cpu_offload=None, finetune=finetune, loss_share=loss_share)
    if finetune != "full":
        e = dataclasses.replace(e, lora_rank=lora.rank, lora_targets=[t.removesuffix("_proj") for t in lora.targets])
    run = dataclasses.replace(cfg, estimate=e)
    m = cfg.model.resolved()
    tm = train_memory(m, train_setup(run, m))
    lines = [f"estimate: peak {_gb(tm.peak)} GiB per GPU allocated (weights {_gb(tm.weights)}, gradients "
             f"{_gb(tm.gradients)}, optimizer {_gb(tm.optimizer)}, activations {_gb(tm.activations)}, head "
             f"{_gb(tm.head)}) + {_gb(tm.framework)} framework; {_gb(free_bytes)} GiB free on {device_name} "
             "(eager figure; torch.compile usually needs less)"]
    if tm.total > free_bytes:
        best = largest_micro_batch(m, train_setup(run, m), free_bytes)
        lines.append(f"warning: this run is predicted to need {_gb(tm.total)} GiB per GPU but {device_name} has "
                     f"{_gb(free_bytes)} GiB free: it will probably run out of memory. Largest micro-batch predicted "
                     f"to fit: {best}; or --{keys}.activation_checkpointing block, or shard with --{keys}.parallel "
                     "fsdp (`kiln estimate` shows each option's figures)")
    return lines
