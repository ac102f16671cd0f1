"""Setup shared by every training task: what is applied to a built model from outside, in torchtitan's order.

fp8 -> fused head -> activation checkpointing -> DDP / FSDP2 sharding -> optimizer -> DeepSpeed engine ->
torch.compile. The task builds the model (fresh init for pretraining; loaded weights for fine-tuning) and
hands it here; the loop (kiln/train/loop.py) then trains whatever `prepare` returns.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from kiln.config import Config, grad_accum_steps
from kiln.config.rundir import RunDir
from kiln.runtime.device import check_sdpa_backend, configure_torch, use_bf16
from kiln.runtime.peaks import mfu_peak
from kiln.train import zero
from kiln.train.cross_entropy import fuse_for_run
from kiln.train.distributed import Dist, parallelize, uses_autocast
from kiln.train.fp8 import apply_fp8, check_fp8
from kiln.train.loop import Trainer
from kiln.train.memory import apply_activation_checkpointing
from kiln.train.optim import build_optimizer


def prepare(cfg: Config, model: nn.Module, d: Dist, device: torch.device, fingerprint: dict, say=print) -> Trainer:
    """Everything between a built model (on CPU or `device`, weights set) and the first step. `cfg` is the
    resolved config; messages go through `say` (rank 0 prints)."""
    m, t = cfg.model, cfg.train
    bf16 = use_bf16(t.precision, device)
    configure_torch(device, t.threads)
    check_sdpa_backend(t.attention_backend, m.n_heads, m.n_kv_heads, m.head_dim, device, bf16)
    accum = grad_accum_steps(t, m, d.world_size)
    # A frozen weight (LoRA's base) gets no weight gradient: 4 FLOPs per parameter and token, not 6.
    frozen = sum(x.weight.numel() for x in model.modules() if isinstance(x, nn.Linear) and not x.weight.requires_grad)
    flops_per_token = model.flops_per_token(t.row_len(m.max_seq_len)) - 2.0 * frozen
    if t.fp8 != "off":   # before compile and sharding (torchao's order); names and checkpoints unchanged
        check_fp8(t.fp8, device)
        apply_fp8(model, t.fp8)
    fused_ce, warning = fuse_for_run(model, t.fused_cross_entropy, device, d.parallel, t.zero_stage)
    if warning is not None:
        say(warning, file=sys.stderr)
    # q/k/v and gate/up as one matmul each; not under ZeRO-3, which gathers each linear's weights in its forward
    zero3 = d.parallel == "deepspeed" and t.zero_stage == 3
    model.group_projections(not zero3)
    if zero3:
        say("train: under ZeRO-3 the q/k/v and gate/up projections run one by one (it gathers each layer's weights "
            "in that layer's own forward)", file=sys.stderr)
    apply_activation_checkpointing(model, t.activation_checkpointing)   # before sharding, as torchtitan does
    if t.compile and t.compile_scope == "blocks":   # in place, before sharding: names and hooks unchanged
        compile_blocks(model)
    wrapped = parallelize(model, d, device, bf16, t.cpu_offload)   # DDP wrapper, or `model` sharded in place
    optimizer = build_optimizer(model, t, device)
    if d.parallel == "deepspeed":   # the engine wraps model and optimizer together (kiln/train/zero.py)
        wrapped, optimizer = zero.initialize(model, optimizer, t, t.micro_batch_size, accum, d.world_size, bf16)
    peak, peak_source = mfu_peak(t.mfu_peak, device, bf16)
    say(f"train: {t.max_steps} steps x {t.batch_tokens} tokens (micro-batch {t.micro_batch_size} x accum {accum}"
        f"{f' x {d.world_size} ranks' if d.world_size > 1 else ''}), lr {t.lr:.2e} {t.schedule}, warmup "
        f"{t.warmup_steps}, device {device}, {'bf16' if bf16 else 'fp32'}"
        f"{f', {d.parallel}' if d.parallel != 'none' else ''}"
        f"{f' ZeRO-{t.zero_stage}' if d.parallel == 'deepspeed' else ''}"
        f"{(', compiled' + (' by block' if t.compile_scope == 'blocks' else '')) if t.compile else ''}"
        f"{f', activation checkpointing {t.activation_checkpointing}' if t.activation_checkpointing != 'off' else ''}"
        f"{f', attention {t.attention_backend}' if t.attention_backend != 'auto' else ''}"
        f"{', fused cross-entropy' if fused_ce else ''}")
    if peak:
        say(f"MFU against {peak / 1e12:.4g} TFLOP/s per device ({peak_source}), {flops_per_token / 1e6:.0f} MFLOP/token")
    return Trainer(cfg=cfg, rd=RunDir(cfg.run_path), d=d, device=device, model=model,
                   step_model=torch.compile(wrapped) if whole_model_compiled(cfg) else wrapped,
                   holder=wrapped if d.parallel == "deepspeed" else model, optimizer=optimizer,
                   amp=bf16 and uses_autocast(d), accum=accum, fingerprint=fingerprint,
                   flops_per_token=flops_per_token, peak=peak)


def eval_model(tr: Trainer) -> nn.Module:
    """What validation runs: DDP's forward hooks are for training, so the module inside (compiled like the
    step); FSDP and DeepSpeed must run their own forward."""
    if tr.d.parallel == "ddp":
        return torch.compile(tr.model) if whole_model_compiled(tr.cfg) else tr.model
    return tr.step_model


def compile_blocks(model: nn.Module, **compile_kw) -> None:
    """train.compile_scope=blocks: each transformer block of a kiln Transformer compiled in place (the identical
    blocks share one graph); the embedding, final norm and head stay eager."""
    for block in model.model.layers:
        block.compile(**compile_kw)


def whole_model_compiled(cfg: Config) -> bool:
    """Whether the step compiles the whole wrapped model (else it is eager, or its blocks are compiled)."""
    return cfg.train.compile and cfg.train.compile_scope == "model"


def full_weights_here(tr: Trainer) -> bool:
    """Whether this process holds every weight (samples can be generated from `tr.model`)."""
    t = tr.cfg.train
    return tr.d.is_main and tr.d.parallel != "fsdp" and not (tr.d.parallel == "deepspeed" and t.zero_stage == 3)
