"""Activation checkpointing, applied from outside the model (the model file stays architecture only).

    off        keep every activation for backward (fastest, most memory)
    block      keep only each block's input; recompute the whole block in backward (least memory,
               about one extra forward: ~1/3 more compute)
    selective  inside each block keep the outputs of matmuls and attention and recompute the cheap
               element-wise ops and norms (torch's selective activation checkpointing): most of the
               memory of the element-wise intermediates back for a few percent of compute; matmuls
               over a narrow contraction (LoRA's rank-r factor) count as cheap

The block's `forward` is replaced on the instance rather than wrapping the module, so parameter
names (and so checkpoints and the Hugging Face layout) do not change.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("off", "block", "selective")

_aten = torch.ops.aten
# Outputs worth keeping: the matmuls and attention (expensive to recompute). Everything else in a
# block (RMSNorm, RoPE, SiLU, products, residual adds) is recomputed.
_SAVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
try:   # flash attention over packed documents (kiln.model.llama.Documents), where this torch has it
    import torch.nn.attention.varlen  # noqa: F401  (registers torch_attn::_varlen_attn)
    _SAVE.add(torch.ops.torch_attn._varlen_attn.default)
except (ImportError, AttributeError):
    pass


# A matmul that contracts over a few columns is cheap to redo (2 x that many flops an output element) and, as
# LoRA's second factor (rank r), its output is never needed by backward: saving it only costs memory (LoRA r=16
# on every linear of a SmolLM2 step: 10.5 GB without checkpointing, 11.7 GB selective when it was kept).
# Linear layers only (mm, addmm): a bmm is attention's (the math path's scores contract over head_dim, and
# those are the attention's cost, worth keeping).
NARROW = 64
_MATMULS = {_aten.mm.default, _aten.addmm.default}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _MATMULS and (args[1] if op is _aten.addmm.default else args[0]).size(-1) <= NARROW:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, selective: bool, *args, **kwargs):
    context_fn = functools.partial(create_selective_checkpoint_contexts, _policy) if selective else None
    extra = {"context_fn": context_fn} if context_fn else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Checkpoint every transformer block of `model` (a kiln Transformer); returns how many."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "off":
        return 0
    blocks = list(model.model.layers)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward, mode == "selective")
    return len(blocks)
