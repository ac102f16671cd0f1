"""Stacked q/k/v and gate/up projections give the unstacked model's outputs, names and memory."""

import torch

from kiln.config import ModelConfig
from kiln.infer.engine import Engine
from kiln.infer.fuse import fuse_projections
from kiln.infer.quant import quantize_int8
from kiln.infer.sampling import SamplingParams
from kiln.model.llama import Transformer


def make(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=89, max_seq_len=48, init_std=0.3,
                      **kw)
    return Transformer(cfg).eval()


def test_fused_model_equals_unfused_and_keeps_its_state_dict():
    for kw in ({}, {"qk_norm": True}, {"qkv_bias": True}):
        model = make(**kw)
        with torch.no_grad():   # random biases (they start at 0), so a misplaced one shows
            for p in (p for name, p in model.named_parameters() if name.endswith(".bias")):
                p.normal_(0.0, 0.5)
        x = torch.randint(0, 89, (3, 17), generator=torch.Generator().manual_seed(1))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        n_params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            want = model(x)
            assert fuse_projections(model) == 4 and fuse_projections(model) == 0   # idempotent
            got = model(x)
        assert (got - want).abs().max() <= 1e-5
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
        assert sum(p.numel() for p in model.parameters()) == n_params
        attn = model.model.layers[0].self_attn
        base = attn.qkv_weight.untyped_storage().data_ptr()
        assert all(m.weight.untyped_storage().data_ptr() == base for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert (attn.qkv_bias is not None) == bool(kw.get("qkv_bias"))


def test_engine_on_fused_model_gives_the_same_tokens():
    model = make()
    prompts = [[5], [1, 2, 3], list(range(20, 40))]
    p = SamplingParams(max_tokens=12, temperature=0)
    want = Engine(model, max_slots=2).generate(prompts, p)
    fuse_projections(model)
    assert Engine(model, max_slots=2).generate(prompts, p) == want


def test_int8_layers_are_left_alone():
    model = quantize_int8(make())
    assert fuse_projections(model) == 0
    assert model.model.layers[0].self_attn.qkv_weight is None
