"""Weight-only int8 (kiln/infer/quant.py): the codes and scales against their definition, the fast kernel against
the plain path, logits against the fp32 model, the engine on a quantised model, names, bytes and misuse."""

import copy
import weakref

import pytest
import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.infer.engine import Engine
from kiln.infer.generate import generate
from kiln.infer.quant import (TARGETS, Int8Linear, describe, int8_layers, quantize_int8, quantize_weight,
                              weight_bytes)
from kiln.infer.sampling import SamplingParams
from kiln.model.llama import Transformer

CPU = torch.device("cpu")


def make(init_std=0.02, tie_embeddings=True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=97, max_seq_len=64,
                      init_std=init_std, tie_embeddings=tie_embeddings, **kw)
    return Transformer(cfg).eval()


def test_codes_and_scales_are_the_definition():
    torch.manual_seed(0)
    w = torch.randn(40, 48) * torch.logspace(-3, 1, 40)[:, None]   # rows of very different sizes
    w[3] = 0                                                         # a zero row: scale 0, codes 0, no NaN
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (40,)
    assert torch.equal(s, w.abs().amax(dim=1) / 127)
    assert q.abs().max() <= 127 and torch.equal(q[3], torch.zeros(48, dtype=torch.int8)) and s[3] == 0
    rows = torch.arange(40) != 3
    assert torch.equal(q[rows].abs().amax(dim=1), torch.full((39,), 127, dtype=torch.int8))   # each row's max
    deq = q.float() * s[:, None]
    assert ((deq - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()   # within half a step (plus fp32 rounding)
    assert torch.equal(q, torch.round(w / s.clamp_min(1e-38)[:, None]).to(torch.int8))


def test_quantised_model_layers_names_and_bytes():
    model = make(tie_embeddings=False)
    before_names = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    gone = weakref.ref(model.model.layers[1].mlp.down_proj.weight)
    assert quantize_int8(model) is model
    assert gone() is None                                                     # the float weights are freed
    layers = dict(int8_layers(model))
    assert sorted(layers) == sorted(n for n, _ in ref.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    assert len(layers) == 2 * 7 and not isinstance(model.lm_head, Int8Linear)
    sd = model.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == before_names      # same names, shapes, dtypes
    for name, m in layers.items():
        assert torch.equal(sd[name + ".weight"], m.dequantize())
        assert torch.equal(m.weight_int8, quantize_weight(ref.get_submodule(name).weight)[0])
    linear = sum(m.weight.numel() for n, m in ref.named_modules() if n in layers)
    rows = sum(m.weight.shape[0] for n, m in ref.named_modules() if n in layers)
    assert weight_bytes(ref) == 4 * sum(p.numel() for p in ref.parameters())
    assert weight_bytes(model) == weight_bytes(ref) - 4 * linear + linear + 4 * rows


def test_state_dict_round_trip_keeps_the_codes():
    """Loading a quantised model's (dequantised) state dict into another quantised model gives the same codes;
    loading fp32 weights quantises them."""
    model = quantize_int8(make())
    other = quantize_int8(make(init_std=0.05))
    other.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(int8_layers(model), int8_layers(other)):
        assert torch.equal(a.weight_int8, b.weight_int8)
        torch.testing.assert_close(a.weight_scale, b.weight_scale, rtol=1e-6, atol=0)
    fresh = make(init_std=0.05)
    other.load_state_dict(fresh.state_dict())
    assert torch.equal(other.model.layers[0].mlp.up_proj.weight_int8,
                       quantize_weight(fresh.model.layers[0].mlp.up_proj.weight)[0])
    bad = {k: (v[:, :-1] if k.endswith("q_proj.weight") else v) for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.q_proj.weight"):
        other.load_state_dict(bad)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_close_to_fp32(tie):
    """To first order each layer's relative weight error e_l = |W^ - W| / |W| reaches the logits scaled by its
    branch's share of the residual stream (below 1 at init_std 0.02, where the embedding dominates), and the
    layers' independent rounding errors add in quadrature: relative logit error <= sqrt(sum e_l^2) (~2%; measured
    ~0.25%). It is not zero either: the model did change."""
    model = make(tie_embeddings=tie)
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    quant = quantize_int8(copy.deepcopy(model))
    e = torch.stack([(m.dequantize() - model.get_submodule(n).weight).norm() / model.get_submodule(n).weight.norm()
                     for n, m in int8_layers(quant)])
    with torch.no_grad():
        ref, got = model(ids), quant(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel <= e.norm().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_int8pack_kernel_matches_plain_path():
    """bf16 on CPU runs torch._weight_int8pack_mm; it agrees with the fp32 product of the dequantised weight to
    bf16 rounding (fp32 accumulation, one bf16 rounding of the output and of the scale: < 2 * 2^-8). A width the
    kernel cannot take (72: not a multiple of 16) and a misaligned input take the safe paths, equally right."""
    torch.manual_seed(0)
    for in_features in (64, 72):
        layer = Int8Linear.from_linear(nn.Linear(in_features, 48, bias=True))
        want = "int8pack" if in_features % 16 == 0 else "dequantise"
        assert layer.kernel_name(CPU, torch.bfloat16) == want
        assert layer.kernel_name(CPU, torch.float32) == "dequantise"
        buf = torch.randn(5 * in_features + 1).to(torch.bfloat16)
        for x in (buf[:-1].view(5, in_features), buf[1:].view(5, in_features)):   # aligned, then off by 2 bytes
            ref = x.float() @ layer.dequantize(torch.float32).T + layer.bias.float()
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                got = layer(x.to(dtype)[None]).float()[0]   # leading dims kept
                tol = 2 ** -6 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-5
                assert ((got - ref).abs().max() / ref.abs().max()).item() < tol, (in_features, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_generates_with_the_quantised_model(dtype):
    model = quantize_int8(make(init_std=0.3).to(dtype))
    prompts = [[5], [1, 2, 3], list(range(20, 40))]
    ref = [generate(model, p, 12, temperature=0, use_cache=False) for p in prompts]
    out = Engine(model, max_slots=2).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert [o[0] for o in out] == ref and all(len(r) == 12 for r in ref)
    assert "torch._weight_int8pack_mm in 14" in describe(model, CPU, torch.bfloat16)


def test_misuse_is_refused():
    model = quantize_int8(make())
    with pytest.raises(ValueError, match="already int8: quantize_int8 was called twice"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="tied to the token embedding"):
        quantize_int8(make(), targets=(*TARGETS, "lm_head"))
    with pytest.raises(ValueError, match="no module of the model is named"):
        quantize_int8(make(), targets=("qkv",))
    untied = quantize_int8(make(tie_embeddings=False), targets=(*TARGETS, "lm_head"))
    assert isinstance(untied.lm_head, Int8Linear) and "head int8" in describe(untied, CPU, torch.float32)
