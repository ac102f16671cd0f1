"""Activation checkpointing changes memory, never the numbers or the parameter names."""

import dataclasses

import pytest
import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.train.memory import apply_activation_checkpointing


def _grads(mode):
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(depth=2, head_dim=16, n_kv_heads=1, max_seq_len=16), vocab_size=64)
    model = Transformer(cfg)
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, mode) == (0 if mode == "off" else 2)
    assert list(model.state_dict()) == keys   # checkpoints and HF export see the same names
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (3, 16), generator=g), torch.randint(0, 64, (3, 16), generator=g)
    loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_same_loss_and_gradients_as_without(mode):
    ref_loss, ref = _grads("off")
    loss, grads = _grads(mode)
    assert loss == ref_loss
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_recomputes_in_backward():
    """With `block`, backward runs each block's forward again: count the attention calls."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(depth=2, head_dim=16, max_seq_len=8), vocab_size=32)
    calls = {"n": 0}

    def run(mode):
        model = Transformer(cfg)
        apply_activation_checkpointing(model, mode)
        for block in model.model.layers:
            block.self_attn.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        calls["n"] = 0
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
        return calls["n"]

    assert run("off") == 2 and run("block") == 4


def test_unknown_mode():
    cfg = dataclasses.replace(ModelConfig(depth=1, head_dim=16, max_seq_len=8), vocab_size=32)
    with pytest.raises(ValueError, match="selective"):
        apply_activation_checkpointing(Transformer(cfg), "everything")


def test_selective_keeps_wide_matmuls_and_redoes_narrow_ones():
    """A linear's matmul contracting over a few columns (LoRA's rank-r factor) is redone, not kept; wide ones
    and attention's are kept."""
    from torch.utils.checkpoint import CheckpointPolicy

    from kiln.train.memory import NARROW, _policy
    mm, addmm = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    narrow, wide = torch.empty(8, 16), torch.empty(8, NARROW + 1)
    assert _policy(None, mm, narrow, torch.empty(16, 32)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _policy(None, mm, wide, torch.empty(NARROW + 1, 32)) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, addmm, torch.empty(32), narrow, torch.empty(16, 32)) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _policy(None, addmm, torch.empty(32), wide, torch.empty(NARROW + 1, 32)) == CheckpointPolicy.MUST_SAVE
    assert _policy(None, torch.ops.aten.mul.Tensor, wide, wide) == CheckpointPolicy.PREFER_RECOMPUTE
    # attention's bmm (the math path's scores contract over head_dim): kept, it is the attention's cost
    q, kt = torch.empty(2, 8, 16), torch.empty(2, 16, 8)
    assert _policy(None, torch.ops.aten.bmm.default, q, kt) == CheckpointPolicy.MUST_SAVE


def test_selective_with_lora_gives_the_same_adapter_gradients():
    from kiln.config.post import LoRAConfig
    from kiln.train.lora import apply_lora

    def grads(mode):
        torch.manual_seed(0)
        cfg = dataclasses.replace(ModelConfig(depth=2, head_dim=16, n_kv_heads=1, max_seq_len=16), vocab_size=64)
        model = Transformer(cfg)
        apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0), "cpu")
        with torch.no_grad():   # B starts at zero: give both factors values, so every path carries gradient
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        apply_activation_checkpointing(model, mode)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(0, 64, (3, 16), generator=g), torch.randint(0, 64, (3, 16), generator=g)
        model(x, y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref, got = grads("off"), grads("selective")
    assert ref and ref.keys() == got.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-7, msg=name)
