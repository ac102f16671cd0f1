"""Stacked projections for inference, applied from outside the model: one matmul for q/k/v, one for gate/up.

`fuse_projections(model)` concatenates each layer's q/k/v weights into `Attention.qkv_weight` and its gate/up
weights into `MLP.gate_up_weight`, then makes the separate weights views of the stacked matrix, so memory does
not grow and the parameter names (and `state_dict()`) stay as they were. At decode sizes a step is bound by the
number of kernels, and this removes three of each layer's seven matmuls.

Only plain bias-free `nn.Linear` projections of one dtype and device are stacked: an int8 or LoRA-wrapped layer is
left as it is (its own forward is what makes it int8 or LoRA). Apply it after the model has its final device and
dtype: `.to()` moves the stacked matrix and the views apart (correct, but the memory saving is gone). Not for
training: the views are no longer leaf parameters of their own.

Shape legend: O out_features stacked, I in_features.
"""

from __future__ import annotations

import torch
from torch import nn


def _stack(modules: list[nn.Module]) -> torch.Tensor | None:
    """(O, I) stacked weights with each module's weight re-pointed at its rows; None if they cannot be stacked."""
    if not all(type(m) is nn.Linear and m.bias is None for m in modules):
        return None
    ws = [m.weight for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    stacked_OI = torch.cat([w.detach() for w in ws])
    row = 0
    for m, w in zip(modules, ws):
        m.weight = nn.Parameter(stacked_OI[row:row + w.shape[0]], requires_grad=False)
        row += w.shape[0]
    return stacked_OI


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Stack q/k/v and gate/up in every layer of a kiln Transformer; returns how many groups were stacked."""
    done = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is None and (w := _stack([attn.q_proj, attn.k_proj, attn.v_proj])) is not None:
            attn.qkv_weight = w
            done += 1
        if mlp.gate_up_weight is None and (w := _stack([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up_weight = w
            done += 1
    return done
