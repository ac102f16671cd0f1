"""A decode step's layers through kiln's Triton kernels: per layer, norm + q/k/v (`matvec`), RoPE + cache write
+ attention (`decode_attention`), o_proj + residual, norm + gate/up + SwiGLU, down + residual. The engine uses it
in its fused-attention decode buckets for every model it can take (`use_fused_layers`); it computes what
`Transformer.hidden` does for one new token per row (tests compare the two).
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.infer.attention import decode_attention
from kiln.infer.matvec import matvec


def unfused_reason(model) -> str | None:
    """Why `fused_hidden` cannot run this model (None: it can). It needs the stacked q/k/v and gate/up weights
    (kiln/infer/fuse.py), plain linear output projections (no int8, no LoRA wrapper) and no QK-norm."""
    if model.cfg.qk_norm:
        return "QK-norm (per-head norms between the projection and RoPE)"
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        if a.qkv_weight is None or m.gate_up_weight is None:
            return f"layer {i} has no stacked q/k/v and gate/up weights (kiln.infer.fuse.fuse_projections)"
        for name, lin in (("o_proj", a.o_proj), ("down_proj", m.down_proj)):
            if type(lin) is not nn.Linear or lin.bias is not None:
                return f"layer {i}'s {name} is a {type(lin).__name__}, not a plain bias-free nn.Linear"
    return None


def use_fused_layers(model, fused_attention: bool, asked: bool | None) -> bool:
    """Whether an engine runs its fused-attention buckets through `fused_hidden`: by default (`asked` None)
    wherever the model allows; asked for (True) where it cannot, a ValueError with the reason."""
    reason = unfused_reason(model) if fused_attention else None
    if asked and not fused_attention:
        raise ValueError("fused_layers needs fused_attention (CUDA graphs on CUDA with Triton, by default)")
    if asked and reason is not None:
        raise ValueError(f"fused_layers: the model has {reason}")
    return fused_attention and reason is None and asked is not False


def fused_hidden(model, tokens_B: torch.Tensor, pos_B: torch.Tensor, view) -> torch.Tensor:
    """Final-norm hidden states (B, D) of one new token per row at positions pos_B; `view` is the slot cache's
    decode view (its tensors, length bucket and positions)."""
    B = tokens_B.size(0)
    x_BD = model.model.embed_tokens(tokens_B)
    cos_BE, sin_BE = model.rope_cos[pos_B], model.rope_sin[pos_B]
    cache = view.cache
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        qkv = matvec(x_BD, a.qkv_weight, layer.input_layernorm.weight, layer.input_layernorm.eps, None, False)
        if a.qkv_bias is not None:   # Qwen2
            qkv = qkv + a.qkv_bias
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1)
        y_BHE = decode_attention(q.view(B, a.n_heads, a.head_dim), k.view(B, a.n_kv_heads, a.head_dim),
                                 v.view(B, a.n_kv_heads, a.head_dim), cos_BE, sin_BE, cache.k_NKME[i],
                                 cache.v_NKME[i], pos_B, view.S)
        x_BD = matvec(y_BHE.reshape(B, -1), a.o_proj.weight, None, 0.0, x_BD, False)
        norm = layer.post_attention_layernorm
        h_BF = matvec(x_BD, m.gate_up_weight, norm.weight, norm.eps, None, True)
        x_BD = matvec(h_BF, m.down_proj.weight, None, 0.0, x_BD, False)
    return model.model.norm(x_BD)
