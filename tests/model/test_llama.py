import math

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.formats.hf import load_weights, save_weights
from kiln.model.llama import Transformer


def cfg_of(**kw) -> ModelConfig:
    base = dict(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=101, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def build(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg_of(**kw))


def batch(model, B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    return ids, targets


def test_loss_is_cross_entropy_of_logits():
    model = build()
    ids, targets = batch(model)
    targets[0, :5] = -100
    logits = model(ids)
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
    assert torch.allclose(model(ids, targets), expected, atol=1e-6)
    assert torch.allclose(model(ids, targets, reduction="sum"),
                          F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction="sum"),
                          atol=1e-4)


def test_reduction_none_shape_and_ignore_index():
    model = build()
    ids, targets = batch(model)
    targets[1, 3:9] = -100
    per_token = model(ids, targets, reduction="none")
    assert per_token.shape == targets.shape
    assert (per_token[1, 3:9] == 0).all()
    assert (per_token[targets != -100] > 0).all()
    assert torch.allclose(per_token[targets != -100].mean(), model(ids, targets), atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        model(ids, targets, reduction="avg")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qk_norm,qkv_bias", [(True, False), (False, False), (False, True)])
def test_num_params_matches_manual_count(tie, qk_norm, qkv_bias):
    model = build(tie_embeddings=tie, qk_norm=qk_norm, qkv_bias=qkv_bias, ffn_hidden=96)
    L, D, H, K, E, F_, V = 2, 64, 4, 2, 16, 96, 101
    attn = D * H * E + 2 * D * K * E + H * E * D + (2 * E if qk_norm else 0) + ((H + 2 * K) * E if qkv_bias else 0)
    block = attn + 3 * D * F_ + 2 * D
    embed = V * D
    expected = embed + L * block + D + (0 if tie else V * D)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - embed
    attn_flops = 12 * L * H * E * 32
    matmul = L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F_) + V * D  # lm_head counted even when tied
    assert model.flops_per_token(32) == 6 * matmul + attn_flops


def test_init_weights_statistics():
    torch.manual_seed(0)
    cfg = ModelConfig(depth=4, d_model=256, head_dim=64, vocab_size=512, max_seq_len=16, init_std=0.02)
    model = Transformer(cfg)
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * 4)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert abs(layer.mlp.down_proj.weight.mean().item()) < 1e-3
    assert (layer.input_layernorm.weight == 1).all() and (model.model.norm.weight == 1).all()


def test_init_is_deterministic_and_meta_build_works():
    a, b = build(), build()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(0)
    m = Transformer.from_config(cfg_of(), device="cpu")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.allclose(m.rope_cos, a.rope_cos) and torch.allclose(m.rope_sin, a.rope_sin)
    ids, _ = batch(m)
    assert torch.isfinite(m(ids)).all()


def test_causal_future_tokens_do_not_change_past_logits():
    model = build()
    ids, _ = batch(model)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % model.cfg.vocab_size
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_tied_weights_share_storage_and_untied_do_not():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_bf16_model_returns_fp32_logits():
    model = build(qk_norm=True).to(torch.bfloat16)
    ids, targets = batch(model)
    logits = model(ids)
    assert logits.dtype == torch.float32
    assert torch.isfinite(model(ids, targets))


def test_too_long_sequence_and_missing_vocab_raise():
    model = build()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelConfig(depth=1))


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_roundtrip(tmp_path, tie):
    model = build(tie_embeddings=tie)
    save_weights(model, tmp_path / "w.safetensors")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "w.safetensors"))
    assert ("lm_head.weight" in keys) == (not tie) and "model.embed_tokens.weight" in keys
    torch.manual_seed(123)
    fresh = Transformer(model.cfg)
    load_weights(fresh, tmp_path / "w.safetensors")
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tie
    ids, _ = batch(model)
    assert torch.equal(model(ids), fresh(ids))
    with pytest.raises(ValueError, match="missing"):
        load_weights(Transformer(cfg_of(depth=3, tie_embeddings=tie)), tmp_path / "w.safetensors")


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(cfg_of(vocab_size=64))
    ids, targets = batch(model, B=4, T=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss = model(ids, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(64), rel=0.05)  # near-uniform predictions at init
    assert loss.item() < 0.2 * first


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["plain", "qkv_bias"])
def test_grouped_projections_match_the_layers_one_by_one(qkv_bias, monkeypatch):
    """Training's grouping (q/k/v and gate/up as one matmul each, under autocast) computes the loss and the
    gradients of the layers one by one, to bf16's rounding; without autocast it leaves them one by one (the
    stacked weight would be kept for backward beside the weights)."""
    model = build(qkv_bias=qkv_bias, ffn_hidden=96)
    if qkv_bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.1)
    ids, targets = batch(model)
    widths = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: widths.append(w.shape[0]) or linear(x, w, b))

    def run(on: bool, autocast: bool):
        model.group_projections(on)
        model.zero_grad(set_to_none=True)
        widths.clear()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(ids, targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sorted(set(widths))

    qkv, gate_up = 64 + 2 * 2 * 16, 2 * 96
    loss0, g0, w0 = run(False, True)
    loss1, g1, w1 = run(True, True)
    assert qkv in w1 and gate_up in w1 and qkv not in w0 and gate_up not in w0
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-2)
    assert g1.keys() == g0.keys()
    for name in g0:
        cos = F.cosine_similarity(g1[name].flatten().float(), g0[name].flatten().float(), dim=0)
        assert cos > 0.99, (name, float(cos))
    model.double()
    loss0, g0, _ = run(False, False)
    loss1, g1, w1 = run(True, False)
    assert qkv not in w1 and gate_up not in w1 and torch.equal(loss1, loss0)
    assert model.model.layers[0].self_attn.grouped and model.model.layers[1].mlp.grouped
