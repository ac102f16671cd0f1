"""Stacked projections for inference, applied from outside the model: one matmul for q/k/v, one for gate/up.

`fuse_projections(model)` concatenates each layer's q/k/v weights into `Attention.qkv_weight` and its gate/up
weights into `MLP.gate_up_weight`, then makes the separate weights views of the stacked matrix, so memory does
not grow and the parameter names (and `state_dict()`) stay as they were. At decode sizes a step is bound by the
number of kernels, and this removes three of each layer's seven matmuls.

Only plain `nn.Linear` projections of one dtype and device are stacked (biases too, where all of them have one:
Qwen2's q/k/v): an int8 or LoRA-wrapped layer is left as it is (its own forward is what makes it int8 or LoRA).
Apply it after the model has its final device and dtype: `.to()` moves the stacked matrix and the views apart
(correct, but the memory saving is gone). Not for training: the views are no longer leaf parameters of their own.

Shape legend: O out_features stacked, I in_features.
"""

from __future__ import annotations

import torch
from torch import nn


def _stack(modules: list[nn.Module], name: str = "weight") -> torch.Tensor | None:
    """The modules' `name` tensors stacked along dim 0 (O, ...), each module's re-pointed at its rows; None if they
    cannot be stacked."""
    if not all(type(m) is nn.Linear for m in modules):
        return None
    ws = [getattr(m, name) for m in modules]
    if any(w is None for w in ws) or len({(w.dtype, w.device, w.shape[1:]) for w in ws}) != 1:
        return None
    stacked_O = torch.cat([w.detach() for w in ws])
    row = 0
    for m, w in zip(modules, ws):
        setattr(m, name, nn.Parameter(stacked_O[row:row + w.shape[0]], requires_grad=False))
        row += w.shape[0]
    return stacked_O


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v and gate/up in every layer of a kiln Transformer; returns how many groups were stacked."""
    done = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        biased = [m.bias is not None for m in qkv]
        if attn.qkv_weight is None and len(set(biased)) == 1:
            b = _stack(qkv, "bias") if biased[0] else None   # first: stacked weights without their biases would be wrong
            if (b is not None or not biased[0]) and (w := _stack(qkv)) is not None:
                attn.qkv_weight, attn.qkv_bias = w, b
                done += 1
        if mlp.gate_up_weight is None and not any(m.bias is not None for m in (mlp.gate_proj, mlp.up_proj)) \
                and (w := _stack([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up_weight = w
            done += 1
    return done
