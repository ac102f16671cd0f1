"""SFT step throughput and memory: kiln against `transformers` (+ `peft`) on a SmolLM2-135M-shaped model.

    python bench/sft_throughput.py [--variants hf_full,kiln_full,...] [--steps 20] [--warmup 5]
                                   [--device cuda] [--shape smollm2-135m] [--no-compile]
                                   [--out bench/results/sft_throughput.json] [--append]
    python bench/sft_throughput.py --device cpu --shape tiny --steps 2 --warmup 1 [--no-compile]   # smoke run

--append keeps the rows of other variants already in --out (same device, shape and step counts), so that a run
too long for one sitting can be split over several calls and still be compared in one table.

Model: 30 layers x 576, 9 heads of 64, 3 key/value heads, SwiGLU 1,536, vocabulary 49,152, tied embeddings,
RoPE theta 100,000 (134.5M parameters), random weights. Every variant starts from the same weights (kiln's
init, seed 0; the transformers model loads kiln's state_dict, the names are the same), and every step is
one optimizer step over one micro-batch of 16 rows, bf16 autocast, gradient clipping 1.0, fused AdamW.

Data: synthetic conversations of random lengths (seq/16 .. 3 seq/4: 64..768 tokens at seq 1,024), the first
~half of each one's targets masked (-100) as the user's turn. kiln packs them into 16 rows of 1,024 with
`ChatBatches(packing="pack")`, each row with its document mask (`segments`); the `*_pad` variants put one
conversation per row (`packing="pad"`, padded to the longest of the micro-batch, rounded up to 16).
The baselines train on the very rows of the packed variant as plain 1,024-token sequences with the same
labels and NO document mask (what TRL's packing gives without flash-attn's varlen path): attention
crosses conversations, so the baselines do LESS work (a plain causal flash kernel instead of a masked one).

Variants (each in a fresh subprocess, so its peak memory is its own):
  hf_full / hf_full_eager     LlamaForCausalLM (sdpa), fp32 weights + bf16 autocast (Trainer's bf16=True),
                              compiled / eager
  hf_lora / hf_lora_eager     the same + peft LoRA r=16, alpha=32 on q,k,v,o,gate,up,down (fp32 base)
  hf_lora_bf16                peft LoRA over a bf16 base (fp32 adapters, autocast): like kiln's LoRA storage
  kiln_full, kiln_full_pad    fp32 master weights, autocast, fused head + cross-entropy, torch.compile,
                              fused AdamW, the loop's own train_step (chat_loss); the head on every position
                              and the dense document mask (kiln's setup before kiln_*_both became it)
  kiln_lora, kiln_lora_pad    the same with kiln.train.lora.apply_lora (r=16, alpha=32, bf16 base)
  kiln_qlora(_eager)          the same over an NF4 base (QLoRA; torchao)
  kiln_*_eager, kiln_*_pad_eager     not compiled: pack against pad without compilation's part in it
  kiln_full_rows                     the head (and its logits) on the trained positions only
  kiln_full_varlen                   packed documents through variable-length flash attention, not the mask
  kiln_*_both                        both: what `kiln sft` runs (ChatBatches' defaults)
  kiln_*_selective, kiln_full_block  activation checkpointing (train.activation_checkpointing)
  kiln_*_both_selective              rows, varlen and selective checkpointing
  kiln_*_both_blocks                 rows, varlen, each block compiled on its own (train.compile_scope=blocks):
                                     compare wall_s_incl_warmup (compilation) and the step
  kiln_*_pad_static                  (not in the default list) padded rows under torch.compile(dynamic=False):
                                     one graph per row length, each compiled in the warm-up (slow to start)

Padded rows change length from step to step: compiled pad variants get one more warm-up step per length that
the timed steps use, so that no compilation is timed; "compiled_graphs" in the JSON counts what dynamo built
(more than one: recompiles or graph breaks). On torch 2.13 (CPU) kiln's attention breaks the graph once the
length is dynamic (`is_causal` becomes a SymBool), so kiln_*_pad runs attention outside the compiled graph.

tokens/s counts every token of a row for packed rows (the baselines' rows are the packed ones) and the
non-pad tokens for padded rows; "real tokens/s" counts non-pad tokens everywhere, the figure to choose pack
vs pad by; "x best baseline" is real tokens/s over the best baseline of the same kind (full or LoRA). Peak
memory is torch.cuda.max_memory_allocated from after setup (weights, optimizer state, activations;
peak RSS of the process on CPU). Writes bench/results/sft_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import LoRAConfig, ModelConfig  # noqa: E402
from kiln.config.post import finetune_train  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402
from kiln.post.sft import ChatBatches, chat_loss, count_targets, example_of  # noqa: E402
from kiln.runtime.device import autocast, configure_torch  # noqa: E402
from kiln.tokenizer.loader import IGNORE  # noqa: E402

PAD = 0   # conversations draw tokens from 1..V-1, so non-pad tokens are input_ids != PAD
SHAPES = {
    # rope_theta: SmolLM2's own (the issue leaves it out; it changes no cost)
    "smollm2-135m": dict(model=dict(depth=30, d_model=576, head_dim=64, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                                    vocab_size=49152, rope_theta=100000.0), seq=1024, batch=16),
    "tiny": dict(model=dict(depth=2, d_model=128, head_dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                            vocab_size=512), seq=128, batch=4),
    # SmolLM2's depth at a width a CPU steps through quickly: compilation time (wall_s_incl_warmup) on the CPU
    "deep-tiny": dict(model=dict(depth=30, d_model=64, head_dim=16, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                 vocab_size=512), seq=64, batch=2),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = {False: 2e-5, True: 2e-4}   # full / LoRA; no effect on speed


@dataclasses.dataclass
class Variant:
    impl: str                    # "hf" or "kiln"
    lora: str | None = None      # None: full fine-tuning; "fp32" / "bf16": LoRA over a base stored in that dtype
    compile: bool = True
    packing: str = "pack"        # kiln only; the baselines always get the packed rows, unmasked
    dynamic: bool | None = None  # torch.compile's `dynamic`: None = automatic (kiln's setup), False = a graph per T
    checkpointing: str = "off"   # kiln only: train.activation_checkpointing (off, selective, block)
    rows: bool = False           # kiln only: the head on the trained positions only (ChatBatches' trained_rows)
    varlen: bool = False         # kiln only: packed documents through variable-length flash attention
    #                              (ChatBatches' document_bounds) instead of the dense masked SDPA
    scope: str = "model"         # kiln only: train.compile_scope (the whole model, or each block in place)
    grouped: bool = True         # kiln only: q/k/v and gate/up as one matmul each (training's setup does it)

    @property
    def group(self) -> str:
        return "lora" if self.lora else "full"


VARIANTS = {
    "hf_full": Variant("hf"),
    "hf_full_eager": Variant("hf", compile=False),
    "hf_lora": Variant("hf", lora="fp32"),
    "hf_lora_eager": Variant("hf", lora="fp32", compile=False),
    "hf_lora_bf16": Variant("hf", lora="bf16"),
    "kiln_full": Variant("kiln"),
    "kiln_full_pad": Variant("kiln", packing="pad"),
    "kiln_full_eager": Variant("kiln", compile=False),
    "kiln_full_pad_eager": Variant("kiln", packing="pad", compile=False),
    "kiln_full_pad_static": Variant("kiln", packing="pad", dynamic=False),
    "kiln_lora": Variant("kiln", lora="bf16"),
    "kiln_lora_pad": Variant("kiln", lora="bf16", packing="pad"),
    "kiln_lora_eager": Variant("kiln", lora="bf16", compile=False),
    "kiln_lora_pad_eager": Variant("kiln", lora="bf16", packing="pad", compile=False),
    "kiln_lora_pad_static": Variant("kiln", lora="bf16", packing="pad", dynamic=False),
    "kiln_full_selective": Variant("kiln", checkpointing="selective"),
    "kiln_lora_selective": Variant("kiln", lora="bf16", checkpointing="selective"),
    "kiln_full_block": Variant("kiln", checkpointing="block"),
    "kiln_full_rows": Variant("kiln", rows=True),
    "kiln_full_varlen": Variant("kiln", varlen=True),
    "kiln_full_both": Variant("kiln", rows=True, varlen=True),
    "kiln_lora_both": Variant("kiln", lora="bf16", rows=True, varlen=True),
    "kiln_full_both_selective": Variant("kiln", rows=True, varlen=True, checkpointing="selective"),
    "kiln_full_both_blocks": Variant("kiln", rows=True, varlen=True, scope="blocks"),
    "kiln_lora_both_blocks": Variant("kiln", lora="bf16", rows=True, varlen=True, scope="blocks"),
    "kiln_lora_both_selective": Variant("kiln", lora="bf16", rows=True, varlen=True, checkpointing="selective"),
    "kiln_full_both_ungrouped": Variant("kiln", rows=True, varlen=True, grouped=False),
    "kiln_lora_both_ungrouped": Variant("kiln", lora="bf16", rows=True, varlen=True, grouped=False),
    "kiln_qlora": Variant("kiln", lora="nf4"),
    "kiln_qlora_eager": Variant("kiln", lora="nf4", compile=False),
    "kiln_qlora_ungrouped": Variant("kiln", lora="nf4", grouped=False),
}
DEFAULT = ("hf_full,hf_full_eager,kiln_full,kiln_full_both,kiln_full_eager,kiln_full_pad,kiln_full_pad_eager,"
           "hf_lora,hf_lora_eager,hf_lora_bf16,kiln_lora,kiln_lora_both,kiln_lora_eager,kiln_lora_pad,"
           "kiln_lora_pad_eager")
# Memory is compared with the compiled baseline that stores the base as the row does: kiln's LoRA keeps a
# bf16 base, so hf_lora_bf16 (hf_lora when that was not measured).
MEMORY_REF = {"full": ["hf_full"], "lora": ["hf_lora_bf16", "hf_lora"]}


# ---------------------------------------------------------------- data

def conversations(n: int, seq: int, vocab: int, seed: int) -> list:
    """(inputs, targets) pairs of random conversations, lengths seq/16 .. 3 seq/4, the first 30-70% (the user's
    turn) not trained on."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(seq // 16, 3 * seq // 4 + 1))
        ids = rng.integers(1, vocab, length + 1)
        user = int(length * rng.uniform(0.3, 0.7))
        out.append(example_of(ids, np.arange(length + 1) > user))
    return out


def batches(args, packing: str, var: Variant) -> list[dict[str, torch.Tensor]]:
    """warmup + steps micro-batches; the same ones in every subprocess (fixed seed)."""
    shape = SHAPES[args.shape]
    n_steps = args.warmup + args.steps + args.profile + args.sync_debug   # the extra steps' batches too
    examples = conversations(max(256, n_steps * shape["batch"] * 4), shape["seq"], shape["model"]["vocab_size"], 0)
    source = ChatBatches(examples, shape["seq"], shape["batch"], packing, PAD, seed=0, trained_rows=var.rows,
                         document_bounds=var.varlen)
    return [next(source) for _ in range(n_steps)]


def pad_warmup(data: list[dict], warmup: int) -> list[dict]:
    """Padded rows change length from step to step, and each new length may compile again: one more warm-up
    step per length that the timed steps use and the warm-up did not, so that no compilation is timed."""
    seen = {b["input_ids"].shape[1] for b in data[:warmup]}
    extra = []
    for b in data[warmup:]:
        if b["input_ids"].shape[1] not in seen:
            seen.add(b["input_ids"].shape[1])
            extra.append(b)
    return extra


def hf_labels(targets_BT: torch.Tensor) -> torch.Tensor:
    """transformers shifts labels inside the loss (logits at t score labels at t + 1); kiln's targets are
    already shifted. labels[t + 1] = targets[t] gives the same pairs (a row's last target, padding here, drops)."""
    labels = torch.full_like(targets_BT, IGNORE)
    labels[:, 1:] = targets_BT[:, :-1]
    return labels


# ---------------------------------------------------------------- models

def base_model(shape: str) -> Transformer:
    """The shared starting weights: kiln's init under seed 0, built on the CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=SHAPES[shape]["seq"], tie_embeddings=True, **SHAPES[shape]["model"])
    return Transformer.from_config(cfg, device="cpu")


def build_hf(var: Variant, shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    kiln = base_model(shape)
    c = kiln.cfg
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
                      num_hidden_layers=c.depth, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                      rms_norm_eps=c.norm_eps, tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(kiln.state_dict())   # the same names: strict
    del kiln
    model.to(device)
    if var.lora == "bf16":
        model.to(torch.bfloat16)
    info = {"attn_implementation": model.config._attn_implementation}
    if var.lora:
        from peft import LoraConfig, get_peft_model
        # peft keeps the adapters in fp32 over a bf16 base (autocast_adapter_dtype, its default)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 bias="none", task_type="CAUSAL_LM"))
    return model, info


def build_kiln(var: Variant, shape: str, device: torch.device):
    from kiln.runtime.device import triton_available
    from kiln.train.cross_entropy import apply_fused_cross_entropy
    model = base_model(shape)
    info = {}
    if var.lora:
        from kiln.train.lora import apply_lora
        info["trainable_params"] = apply_lora(model, LoRAConfig(
            enabled=True, rank=16, alpha=32.0, base_dtype="nf4" if var.lora == "nf4" else "bfloat16"), device)
    else:
        model.to(device)
    model.group_projections(var.grouped)
    # Always on (train.fused_cross_entropy=auto turns it on only on CUDA with Triton): elsewhere the same
    # arithmetic in PyTorch, so the smoke run goes through the same code.
    apply_fused_cross_entropy(model)
    info["fused_ce"] = "triton" if device.type == "cuda" and triton_available() else "pytorch"
    if var.checkpointing != "off":   # after the head, before compile: kiln's own order (kiln/train/setup.py)
        from kiln.train.memory import apply_activation_checkpointing
        info["checkpointed_blocks"] = apply_activation_checkpointing(model, var.checkpointing)
    return model, info


def optimizer(model, lora: bool, device: torch.device) -> torch.optim.Optimizer:
    """kiln: build_optimizer (its param groups); baselines: fused AdamW over the trainable parameters, no weight
    decay (Trainer's defaults: adamw_torch_fused, weight_decay 0)."""
    from kiln.train.optim import build_optimizer
    if isinstance(model, Transformer):
        return build_optimizer(model, finetune_train(lr=LR[lora]), device)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR[lora], weight_decay=0.0, fused=device.type == "cuda")


# ---------------------------------------------------------------- one variant, in its own process

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def document_mask_backends(cfg: ModelConfig, T: int, device: torch.device) -> list[str]:
    """Which SDPA kernels run the packed rows' attention (a boolean (B, 1, T, T) mask, grouped-query heads),
    forward and backward: without a flash-capable one the mask costs a slower kernel."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, cfg.n_heads, T, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, cfg.n_kv_heads, T, cfg.head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    ok = []
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with warnings.catch_warnings(), sdpa_kernel(b):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()
            ok.append(b.name)
        except Exception:   # noqa: BLE001  (no kernel for these inputs: each backend says so its own way)
            pass
    return ok


def run_one(name: str, args) -> dict:
    from kiln.train import loop
    from kiln.train.distributed import Dist
    var = VARIANTS[name]
    device = torch.device(args.device)
    configure_torch(device, 0)   # TF32 on CUDA, for every variant alike
    compiled = var.compile and not args.no_compile
    packing = var.packing if var.impl == "kiln" else "pack"
    data = batches(args, packing, var)
    extra = pad_warmup(data, args.warmup) if packing == "pad" and compiled else []
    data = data[:args.warmup] + extra + data[args.warmup:]
    warmup = args.warmup + len(extra)
    real = [int((b["input_ids"] != PAD).sum()) for b in data]
    rows = [b["input_ids"].numel() for b in data]
    trained = [int(count_targets(b)) for b in data]
    info = {}
    if var.impl == "kiln" and packing == "pack" and device.type == "cuda":
        m = SHAPES[args.shape]["model"]
        info["document_mask_sdpa_backends"] = document_mask_backends(
            ModelConfig(**m, max_seq_len=SHAPES[args.shape]["seq"]).resolved(), SHAPES[args.shape]["seq"], device)

    build = build_hf if var.impl == "hf" else build_kiln
    model, more = build(var, args.shape, device)
    info.update(more)
    info.setdefault("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad))
    opt = optimizer(model, var.lora is not None, device)
    if compiled and var.scope == "blocks":   # train.compile_scope=blocks: each block in place, the rest eager
        from kiln.train.setup import compile_blocks
        compile_blocks(model, dynamic=var.dynamic)
        step_model = model
    else:
        step_model = torch.compile(model, dynamic=var.dynamic) if compiled else model

    if var.impl == "kiln":   # the loop's own step (kiln/train/loop.py), one micro-batch, one process
        tr = types.SimpleNamespace(step_model=step_model, d=Dist(), device=device, accum=1, amp=True, optimizer=opt)
        task = types.SimpleNamespace(batches=iter(data), loss=chat_loss, count=count_targets)

        def step() -> torch.Tensor:
            return loop.train_step(tr, task, grad_clip=1.0)[0]
    else:                    # Trainer's training step: autocast forward, backward, clip, step
        params = [p for p in model.parameters() if p.requires_grad]
        hf_data = iter([(b["input_ids"], hf_labels(b["targets"])) for b in data])

        def step() -> torch.Tensor:
            x, y = (t.to(device, non_blocking=True) for t in next(hf_data))
            with autocast(device, True):
                loss = step_model(input_ids=x, labels=y, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    if device.type == "cuda":   # weights (and their setup's transients) are in; from here, training's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from torch._dynamo.utils import counters
    losses = []
    t_start = time.perf_counter()
    for i in range(warmup + args.steps):
        if i == warmup:
            sync(device)
            warm_graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
        losses.append(step())
    sync(device)
    dt = time.perf_counter() - t0
    timed = slice(warmup, warmup + args.steps)
    if args.profile:
        info["profile"] = profile_steps(step, args.profile, device)
    if args.sync_debug and device.type == "cuda":
        info["host_syncs"] = host_syncs(step)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
        info["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:   # the whole process's high-water mark (ru_maxrss is in KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if compiled:   # more than one per row length: graph breaks (TORCH_LOGS=recompiles,graph_breaks says where)
        info["compiled_graphs"] = counters["stats"]["unique_graphs"]
        info["graphs_compiled_while_timed"] = counters["stats"]["unique_graphs"] - warm_graphs
    if packing == "pad":
        info.update(row_lengths=sorted({b["input_ids"].shape[1] for b in data}), extra_warmup=len(extra))
    row_tokens = sum((real if packing == "pad" else rows)[timed])
    return dict(name=name, impl=var.impl, group=var.group, lora=var.lora, compiled=compiled, packing=packing,
                document_mask=var.impl == "kiln" and packing == "pack",
                tokens_per_s=row_tokens / dt, real_tokens_per_s=sum(real[timed]) / dt,
                trained_tokens_per_s=sum(trained[timed]) / dt, step_ms=1e3 * dt / args.steps,
                wall_s_incl_warmup=time.perf_counter() - t_start, peak_mem_gb=peak,
                losses=[float(v) for v in torch.stack(losses).float().cpu()], **info)


def host_syncs(step) -> dict[str, int]:
    """Where one more step makes the host wait for the device (torch.cuda's sync debug mode): each such place
    stops the host from queueing the next kernels ahead, so the device idles while they are launched. Keyed by
    the innermost frames of the Python stack at the wait."""
    import traceback
    import warnings
    where: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = traceback.extract_stack()[:-2][-4:]
            key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            where[key] = where.get(key, 0) + 1

    shown = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    return where


def profile_steps(step, n: int, device: torch.device) -> dict:
    """Device time per step by kernel category (bench/profile_step.py's) and the top kernels, over n more steps
    under torch.profiler (after the timed ones: the figures above do not include the profiler). On CUDA also
    where the device idles: the gaps between consecutive kernels, summed by the kernel that ends each gap (what
    the device waited for the host to launch), and the host's costliest operators."""
    from collections import defaultdict

    from profile_step import category
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync(device)
    cuda = torch.autograd.DeviceType.CUDA
    per_kernel: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0 and ev.device_type == cuda:
            per_kernel[ev.key] += ev.self_device_time_total / 1e3 / n
    per_cat: dict[str, float] = defaultdict(float)
    for k, ms in per_kernel.items():
        per_cat[category(k)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    out = {"kernel_ms_per_step": sum(per_kernel.values()),
           "categories": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])), "top_kernels": dict(top)}
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                     if ev.device_type == cuda and ev.time_range.end > ev.time_range.start)
    if kernels:
        gaps: dict[str, float] = defaultdict(float)
        idle = 0.0
        for (_, end, before), (start, _, name) in zip(kernels, kernels[1:]):
            if start - end > 5:   # microseconds: more than a launch's own latency
                idle += start - end
                gaps[f"{category(before)} -> {name[:80]}"] += (start - end) / 1e3 / n
        out["device_span_ms_per_step"] = (kernels[-1][1] - kernels[0][0]) / 1e3 / n
        out["device_idle_ms_per_step"] = idle / 1e3 / n
        out["idle_before"] = dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:12])
    host = sorted(((ev.key, ev.self_cpu_time_total / 1e3 / n, ev.count // n) for ev in prof.key_averages()
                   if ev.device_type != cuda), key=lambda r: -r[1])[:15]
    out["host_ops_ms_per_step"] = {k: [round(ms, 3), c] for k, ms, c in host}
    return out


# ---------------------------------------------------------------- the driver

def run_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--shape", args.shape,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile", str(args.profile)] + \
        (["--no-compile"] if args.no_compile else []) + (["--sync-debug"] if args.sync_debug else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {args.timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    return {"name": name, "error": f"exit {p.returncode}: " + " | ".join(tail)[-1500:]}


def add_ratios(results: list[dict]) -> None:
    ok = {r["name"]: r for r in results if "error" not in r}
    for r in ok.values():
        base = [b for b in ok.values() if b["impl"] == "hf" and b["group"] == r["group"]]
        best = max(base, key=lambda b: b["real_tokens_per_s"], default=None)
        r["best_baseline"] = best and best["name"]
        r["x_best_baseline"] = best and r["real_tokens_per_s"] / best["real_tokens_per_s"]
        ref = next((ok[n] for n in MEMORY_REF[r["group"]] if n in ok), None)
        r["memory_ref"] = ref and ref["name"]
        r["x_memory_ref"] = ref and r["peak_mem_gb"] / ref["peak_mem_gb"]


def table(results: list[dict], device: str) -> str:
    mem = "peak GB" if device == "cuda" else "peak RSS GB"
    lines = [f"| variant | tokens/s | real tokens/s | x best baseline | {mem} | x compiled baseline memory | "
             "loss first -> last |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:200]} |")
            continue
        x = "-" if r["x_best_baseline"] is None else f"{r['x_best_baseline']:.2f} ({r['best_baseline']})"
        xm = "-" if r["x_memory_ref"] is None else f"{r['x_memory_ref']:.2f} ({r['memory_ref']})"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['real_tokens_per_s']:,.0f} | {x} | "
                     f"{r['peak_mem_gb']:.2f} | {xm} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    return "\n".join(lines)


def previous_rows(out: Path, names: list[str], dev: str, args) -> list[dict]:
    """--out's rows for variants not in this run, when it was measured on this device, shape and step counts."""
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    same = (old["device"], old["args"]["shape"], old["args"]["steps"], old["args"]["warmup"]) == \
        (dev, args.shape, args.steps, args.warmup)
    if not same:
        raise ValueError(f"--append: {out} was measured on {old['device']} ({old['args']['shape']}, "
                         f"{old['args']['warmup']} + {old['args']['steps']} steps); this run differs: "
                         "use another --out")
    return [r for r in old["results"] if r["name"] not in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT, help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation; pad's recompile)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--no-compile", action="store_true", help="run the compiled variants eagerly (CPU smoke runs)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per variant's subprocess")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sft_throughput.json"))
    ap.add_argument("--append", action="store_true",
                    help="keep --out's rows of other variants (a run split over several calls; same device and shape)")
    ap.add_argument("--profile", type=int, default=0,
                    help="after the timed steps, this many more under torch.profiler: CUDA kernel time by category")
    ap.add_argument("--sync-debug", action="store_true",
                    help="after the timed steps, one more with torch.cuda's sync debug mode: where the host waits")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run this variant here, print its RESULT line
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps {args.steps} --warmup {args.warmup}: need steps >= 1 and warmup >= 0")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose among {', '.join(VARIANTS)}")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    shape = SHAPES[args.shape]
    print(f"{dev}, torch {torch.__version__}; {args.shape} {shape['model']}, {shape['batch']} x {shape['seq']} tokens, "
          f"{args.warmup} warm-up + {args.steps} timed steps{', not compiled' if args.no_compile else ''}", flush=True)
    out = Path(args.out)
    results = previous_rows(out, names, dev, args) if args.append else []
    for name in names:
        r = run_subprocess(name, args)
        results.append(r)
        if "error" in r:
            print(f"  {name}: failed: {r['error'][:300]}", flush=True)
        else:
            print(f"  {name}: {r['real_tokens_per_s']:,.0f} real tokens/s, {r['step_ms']:.1f} ms/step, "
                  f"peak {r['peak_mem_gb']:.2f} GB, loss {r['losses'][-1]:.3f}", flush=True)
            for where, n in r.get("host_syncs", {}).items():
                print(f"    host waits for the device {n}x in a step at {where}", flush=True)
            if "profile" in r:
                pr = r["profile"]
                print(f"    {pr['kernel_ms_per_step']:.1f} ms of kernels a step: " +
                      ", ".join(f"{c} {ms:.1f}" for c, ms in pr["categories"].items()), flush=True)
                if "device_idle_ms_per_step" in pr:
                    print(f"    device span {pr['device_span_ms_per_step']:.1f} ms a step, idle "
                          f"{pr['device_idle_ms_per_step']:.1f} ms; the longest waits (ms a step), before:", flush=True)
                    for where, ms in list(pr["idle_before"].items())[:8]:
                        print(f"      {ms:6.2f}  {where}", flush=True)
                print("    host operators (self ms a step, calls): " + ", ".join(
                    f"{k} {v[0]:.2f}/{v[1]}" for k, v in list(pr["host_ops_ms_per_step"].items())[:8]), flush=True)
        add_ratios(results)
        out.parent.mkdir(parents=True, exist_ok=True)   # rewritten after each variant: a crash keeps the rows
        out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                   "args": vars(args), "shape": shape, "results": results}, indent=2) + "\n")
    print(table(results, args.device))
    for r in results:
        if "profile" in r:
            pr = r["profile"]
            print(f"{r['name']}: {pr['kernel_ms_per_step']:.1f} ms of kernels per step: " +
                  ", ".join(f"{c} {ms:.1f}" for c, ms in pr["categories"].items()))
            for k, ms in list(pr["top_kernels"].items())[:12]:
                print(f"    {ms:6.2f} ms  {k[:100]}")
    for r in results:
        lengths = len(r.get("row_lengths", [0]))
        if r.get("compiled_graphs", 1) > lengths:
            print(f"{r['name']}: {r['compiled_graphs']} compiled graphs for {lengths} row length(s): graph breaks or "
                  f"recompiles (TORCH_LOGS=recompiles,graph_breaks python {sys.argv[0]} --one {r['name']} ... "
                  "says which)")
        if r.get("graphs_compiled_while_timed"):
            print(f"{r['name']}: {r['graphs_compiled_while_timed']} graph(s) compiled during the timed steps: its "
                  "tokens/s include compilation (raise --warmup)")
    print("Baselines train on the packed rows without the document mask (attention crosses conversations): "
          f"less work than kiln's packed rows. ln(V) = {math.log(shape['model']['vocab_size']):.3f}.")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
