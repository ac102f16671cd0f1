"""LoRA / QLoRA applied from outside the model (kiln/train/lora.py): a fresh adapter changes nothing, only the
adapters train, merging gives the same function, the NF4 base tracks the full-precision one, and the fused head
and torch.compile still work. The reference against PEFT itself is tests/formats/test_peft.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import LoRAConfig, ModelConfig, TrainConfig
from kiln.formats.hf import load_weights, save_weights
from kiln.model.llama import Transformer
from kiln.train.cross_entropy import apply_fused_cross_entropy
from kiln.train.lora import (LoRALinear, adapters_disabled, apply_lora, lora_state_dict, merge_lora,
                             targeted_linears)
from kiln.train.optim import build_optimizer

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_cfg(tie: bool = True, **kw) -> ModelConfig:
    # k/v projections (32 x 64) have 2048 values: NF4's scale blocks then need a scaler block below torchao's 256.
    return ModelConfig(**{**dict(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=97, max_seq_len=16,
                                 tie_embeddings=tie), **kw})


def base_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def lora_model(cfg: ModelConfig, seed: int = 0, **lora) -> Transformer:
    model = base_model(cfg, seed)
    apply_lora(model, LoRAConfig(**{**dict(enabled=True, rank=4, alpha=8.0), **lora}), "cpu")
    return model


def ids(cfg: ModelConfig, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def randomise_adapters(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if ".lora_B." in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def train_steps(model: Transformer, steps: int = 5, lr: float = 1e-2) -> list[float]:
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0), torch.device("cpu"))
    model.train()
    losses = []
    x = ids(model.cfg, seed=10, batch=4)   # one batch, memorised: the loss must fall
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fresh_adapters_change_nothing_and_only_they_train(tie):
    cfg = tiny_cfg(tie)
    base = base_model(cfg)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = base_model(cfg)
    n = apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8.0), "cpu")
    x = ids(cfg)
    assert torch.equal(logits(model, x), logits(base, x))   # B = 0: exactly the base

    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())   # every base name kept, same values
    extra = sorted(set(sd) - set(before))
    assert extra == sorted(f"model.layers.{i}.{g}.{t}.lora_{ab}.weight" for i in range(cfg.depth)
                           for g, ts in (("self_attn", ALL[:4]), ("mlp", ALL[4:])) for t in ts for ab in "AB")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(extra) == set(lora_state_dict(model))
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == sum(4 * (m.in_features + m.out_features) for _, m in targeted_linears(model, ALL))
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q, nn.Linear)
    assert q.lora_A.weight.shape == (4, cfg.d_model) and q.lora_B.weight.shape == (q.out_features, 4)
    # PEFT's init: A ~ kaiming_uniform(a=sqrt(5)), bound 1/sqrt(in); B = 0
    assert 0 < q.lora_A.weight.abs().max() <= 1 / math.sqrt(cfg.d_model) and not q.lora_B.weight.any()
    assert q.scaling == 2.0

    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    # While B = 0 only B learns (dL/dA goes through B), as in PEFT.
    assert all(g.any() if ".lora_B." in k else not g.any() for k, g in grads.items())


def test_optimizer_gets_the_adapters_only():
    model = lora_model(tiny_cfg())
    opt = build_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert len(in_opt) == 2 * 7 * model.cfg.depth


def test_targets_subset_and_refusals():
    model = lora_model(tiny_cfg(), targets=["q_proj", "v_proj"])
    kinds = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert kinds == {"q_proj", "v_proj"}
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
    with pytest.raises(ValueError, match="called twice"):
        apply_lora(model, LoRAConfig(enabled=True, targets=["q_proj"]), "cpu")

    class Float8Like(nn.Linear):
        pass

    other = base_model(tiny_cfg())
    other.model.layers[0].mlp.up_proj.__class__ = Float8Like
    with pytest.raises(ValueError, match="up_proj is a Float8Like.*before fp8"):
        apply_lora(other, LoRAConfig(enabled=True), "cpu")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_training_then_merge_gives_the_same_function(tie):
    cfg = tiny_cfg(tie)
    model = lora_model(cfg, dropout=0.1)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base_before.items())   # the base never moved
    model.eval()
    x = ids(cfg)
    trained = logits(model, x)
    assert (trained - logits(base_model(cfg), x)).abs().max() > 1e-3   # the adapters did something

    with adapters_disabled(model):   # the reference policy of DPO / GRPO: the base itself
        assert torch.equal(logits(model, x), logits(base_model(cfg), x))
    assert torch.equal(logits(model, x), trained)
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("restored on the way out")
    assert torch.equal(logits(model, x), trained)

    assert merge_lora(model) == 7 * cfg.depth
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_before)
    assert (logits(model, x) - trained).abs().max().item() <= 1e-5
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_checkpoint_weights_round_trip(tmp_path):
    """A LoRA model's weights file (what kiln/train/checkpoint.py writes) loads back into a LoRA model."""
    cfg = tiny_cfg()
    model = lora_model(cfg)
    train_steps(model, steps=2)
    save_weights(model, tmp_path / "model.safetensors")
    fresh = lora_model(cfg, seed=5)
    load_weights(fresh, tmp_path / "model.safetensors")
    x = ids(cfg)
    assert torch.equal(logits(fresh.eval(), x), logits(model.eval(), x))


def test_bf16_base_runs_without_autocast():
    """base_dtype=bfloat16: the whole frozen base (embedding and norms too) in bf16, adapters fp32."""
    cfg = tiny_cfg()
    model = lora_model(cfg, base_dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == (torch.float32 if "lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    assert model.rope_cos.dtype == torch.float32
    x = ids(cfg)
    ref = logits(base_model(cfg), x)
    # Measured: max |diff| 0.0064 on logits of max |l| 2.3 (bf16 weights and activations).
    assert (logits(model, x) - ref).abs().max().item() < 0.03
    randomise_adapters(model)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def dequantised_copy(model: Transformer) -> Transformer:
    """An fp32 model whose weights are exactly what the NF4 model computes with."""
    ref = base_model(model.cfg)
    sd = {k: v for k, v in model.state_dict().items() if "lora_" not in k}   # NF4 weights come back dequantised
    ref.load_state_dict(sd)
    return ref


def test_nf4_base_tracks_the_full_precision_base():
    pytest.importorskip("torchao")
    cfg = tiny_cfg(d_model=128, head_dim=32)
    model = lora_model(cfg, base_dtype="nf4")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q.weight).__name__ == "NF4Tensor" and not q.weight.requires_grad
    assert type(model.model.embed_tokens.weight) is nn.Parameter and model.model.embed_tokens.weight.dtype == torch.float32
    x = ids(cfg)
    nf4 = logits(model, x)
    # Exactly the arithmetic of the dequantised weights ...
    assert (nf4 - logits(dequantised_copy(model), x)).abs().max().item() <= 1e-5
    # ... whose error is NF4's: measured 9.2% relative RMS error per weight (blocks of 64, N(0, 0.02) weights) ...
    w = base_model(cfg).model.layers[0].self_attn.q_proj.weight
    assert ((q.weight.get_original_weight() - w).norm() / w.norm()).item() < 0.10
    # ... and on the logits, against the fp32 base: measured max |diff| 0.095-0.106 (logits up to 2.35) and 8.4-8.7%
    # relative RMS over three seeds (bf16 weights: 0.006 and 0.5%).
    full = logits(base_model(cfg), x)
    assert (nf4 - full).abs().max().item() < 0.2
    assert ((nf4 - full).norm() / full.norm()).item() < 0.12

    randomise_adapters(model)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    losses = train_steps(model, steps=4)
    assert losses[-1] < losses[0]


def test_nf4_state_dict_round_trip_and_merge(tmp_path):
    pytest.importorskip("torchao")
    cfg = tiny_cfg()
    model = lora_model(cfg, base_dtype="nf4")
    randomise_adapters(model)
    save_weights(model, tmp_path / "model.safetensors")   # NF4 weights saved dequantised
    x = ids(cfg)
    before = logits(model, x)
    resumed = lora_model(cfg, base_dtype="nf4")   # a resume: the same base quantised again, fresh adapters
    load_weights(resumed, tmp_path / "model.safetensors")
    assert torch.equal(logits(resumed, x), before)   # codes and scales kept exactly
    other = lora_model(cfg, seed=3, base_dtype="nf4")   # another base: the saved weights are quantised again
    load_weights(other, tmp_path / "model.safetensors")
    assert torch.equal(other.model.layers[1].mlp.down_proj.weight.quantized_data,
                       model.model.layers[1].mlp.down_proj.weight.quantized_data)
    assert (logits(other, x) - before).abs().max().item() <= 2e-3   # measured 3e-4: the scales' mean moves
    merge_lora(model)
    w = model.model.layers[1].mlp.down_proj.weight
    assert type(w) is nn.Parameter and w.dtype == torch.float32
    assert (logits(model, x) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("base_dtype", ["float32", "nf4"])
def test_fused_head_and_compile(base_dtype):
    """The fused head replaces `loss` on the instance; torch.compile traces the swapped classes (and NF4) in one
    graph. aot_eager: dynamo + AOTAutograd, no C++ build (Inductor on CPU takes ~25 s and passed by hand)."""
    if base_dtype == "nf4":
        pytest.importorskip("torchao")
    cfg = tiny_cfg(depth=1)
    model = lora_model(cfg, base_dtype=base_dtype)
    randomise_adapters(model)
    x = ids(cfg)
    plain = model(x[:, :-1], x[:, 1:])
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    apply_fused_cross_entropy(model)
    model.group_projections(True)   # as training's setup does: the grouped projection traced in the graph too
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    assert abs(loss.item() - plain.item()) <= 1e-5
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert max((got[n] - want[n]).abs().max().item() for n in want) <= 1e-5
    base = dequantised_copy(model) if base_dtype == "nf4" else base_model(cfg)
    # Same T as above, so the only recompile is the one the switch causes.
    with torch.no_grad(), adapters_disabled(model):   # the switch reaches the compiled graph (a recompile)
        assert (compiled(x[:, :-1]) - logits(base, x[:, :-1])).abs().max().item() <= 1e-5


def lora_grads(model: Transformer, x: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets,qkv_bias,ffn", [(ALL, False, 96), (ALL, True, 40),
                                                  (["q_proj", "v_proj", "down_proj"], False, 96)],
                         ids=["all", "qkv-bias-narrow-mlp", "some"])
def test_grouped_adapters_match_the_layers_one_by_one(monkeypatch, targets, qkv_bias, ffn):
    """Training's LoRA projection (stacked base, stacked A, block-diagonal B; one function with its own
    backward) gives the loss and adapter gradients of the plain layers, in float64 to rounding, under bf16
    autocast to bf16's precision. The narrow MLP (ffn 40 < d_model + 2 r) takes the other forward branch."""
    import kiln.train.lora as lora
    model = lora_model(tiny_cfg(qkv_bias=qkv_bias, ffn_hidden=ffn), targets=targets).double().train()
    randomise_adapters(model)
    model.group_projections(True)
    x = ids(model.cfg, seed=3)
    calls = []
    real = lora._LoRAProjection.apply
    monkeypatch.setattr(lora._LoRAProjection, "apply", lambda *a: calls.append(1) or real(*a))
    loss1, g1 = lora_grads(model, x)
    assert calls, "the grouped projection did not run"
    monkeypatch.setattr(lora, "_project", lambda x, linears: None)   # the plain layers, one by one
    model.group_projections(False)
    loss0, g0 = lora_grads(model, x)
    assert sorted(g1) == sorted(g0) and all(".lora_" in n for n in g0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12, msg=name)

    model.float()
    loss_ref, g_ref = lora_grads(model, x, autocast=True)
    monkeypatch.undo()
    model.group_projections(True)
    loss_bf, g_bf = lora_grads(model, x, autocast=True)
    torch.testing.assert_close(loss_bf, loss_ref, rtol=2e-2, atol=2e-2)
    for name in g_ref:
        cos = F.cosine_similarity(g_bf[name].flatten(), g_ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_grouped_adapters_fall_back_where_their_arithmetic_does_not_hold(monkeypatch):
    """Dropout while training, adapters switched off and evaluation without autograd run the plain layers."""
    import kiln.train.lora as lora
    model = lora_model(tiny_cfg(), dropout=0.1).train()
    model.group_projections(True)
    monkeypatch.setattr(lora._LoRAProjection, "apply", lambda *a: pytest.fail("grouped projection used"))
    x = ids(model.cfg)
    model(x[:, :-1], x[:, 1:]).backward()
    model.eval()
    with adapters_disabled(model):
        model(x[:, :-1], x[:, 1:])
    with torch.no_grad():
        model(x)


def test_grouped_adapters_over_an_nf4_base(monkeypatch):
    """QLoRA takes the grouped projection too (each NF4 weight dequantised inside it, forward and backward):
    the loss and adapter gradients of the plain NF4 layers, to fp32's rounding."""
    pytest.importorskip("torchao")
    import kiln.train.lora as lora
    model = lora_model(tiny_cfg(), base_dtype="nf4").train()
    randomise_adapters(model)
    x = ids(model.cfg, seed=3)
    model.group_projections(True)
    calls = []
    real = lora._LoRAProjection.apply
    monkeypatch.setattr(lora._LoRAProjection, "apply", lambda *a: calls.append(1) or real(*a))
    loss1, g1 = lora_grads(model, x)
    assert len(calls) == 4 * model.cfg.depth   # a layer: q/k/v, o, gate/up, down
    monkeypatch.setattr(lora, "_project", lambda x, linears: None)
    model.group_projections(False)
    loss0, g0 = lora_grads(model, x)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    assert sorted(g1) == sorted(g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


def saved_bytes(model: Transformer, x: torch.Tensor, autocast: bool = False) -> int:
    """Bytes of the tensors autograd keeps for backward over one forward, parameters left out, each storage
    counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        model(x[:, :-1], x[:, 1:])
    return sum(seen.values())


def test_grouped_adapters_keep_no_more_for_backward(monkeypatch):
    """The grouped projection keeps x and u, never a copy of the base weights, and attention keeps v alone, not
    the whole q/k/v block it was cut from (which held ~10% more here): what autograd holds over a forward is
    what the plain layers hold, give or take the stacked adapters (weight-sized, ~2% at 240 tokens)."""
    import kiln.train.lora as lora
    model = lora_model(tiny_cfg(ffn_hidden=96)).train()
    randomise_adapters(model)
    x = ids(model.cfg, batch=16)
    model.group_projections(True)
    grouped = saved_bytes(model, x)
    monkeypatch.setattr(lora, "_project", lambda x, linears: None)
    model.group_projections(False)
    plain = saved_bytes(model, x)
    assert 0 < grouped <= 1.03 * plain, (grouped, plain)


def test_grouped_full_weights_keep_no_more_for_backward():
    """Full fine-tuning under autocast: the grouped matmul keeps its input once (as the three did) and the bf16
    cast of the stacked weight (instead of each weight's), and attention v alone."""
    model = base_model(tiny_cfg(ffn_hidden=96)).train()
    x = ids(model.cfg, batch=16)
    model.group_projections(True)
    grouped = saved_bytes(model, x, autocast=True)
    model.group_projections(False)
    assert 0 < grouped <= saved_bytes(model, x, autocast=True)
