"""Our Transformer against transformers' LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM on the same
weights."""

import json

import pytest
import torch

from kiln.config import ModelConfig
from kiln.formats.hf import save_weights, to_hf_config
from kiln.model.llama import Transformer

transformers = pytest.importorskip("transformers")

HAS_QWEN3 = hasattr(transformers, "Qwen3ForCausalLM")

CONFIGS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
}


def tiny_cfg(tie: bool, qk_norm: bool = False, **kw) -> ModelConfig:
    # Non-default rope_theta and norm_eps so a dropped mapping in to_hf_config shows up.
    return ModelConfig(depth=2, d_model=64, head_dim=16, vocab_size=97, max_seq_len=24, rope_theta=5000.0,
                       norm_eps=1e-6, tie_embeddings=tie, qk_norm=qk_norm, **kw)


def ours(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # every tensor random, norm gains included, so each one matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def hf_model(cfg: ModelConfig):
    hf_cfg = to_hf_config(cfg)
    if cfg.qk_norm:
        conf, cls = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    elif cfg.qkv_bias:
        conf, cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    else:
        conf, cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    return cls(conf(**hf_cfg, attn_implementation="eager")).eval()


def assert_same_logits(model: Transformer, hf) -> None:
    ids = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = model(ids)
        hf_logits = hf(input_ids=ids).logits.float()
    assert ours_logits.dtype == torch.float32
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("heads", list(CONFIGS))
def test_logits_match_llama(heads, tie):
    cfg = tiny_cfg(tie, **CONFIGS[heads])
    model, hf = ours(cfg), hf_model(cfg)
    hf.load_state_dict(model.state_dict(), strict=True)
    if tie:  # HF's tie must survive the load: its head is its embedding, which now holds ours
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert_same_logits(model, hf)


@pytest.mark.skipif(not HAS_QWEN3, reason="transformers has no Qwen3ForCausalLM")
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_qwen3_with_qk_norm(tie):
    cfg = tiny_cfg(tie, qk_norm=True, n_kv_heads=2)
    model, hf = ours(cfg), hf_model(cfg)
    hf.load_state_dict(model.state_dict(), strict=True)
    assert_same_logits(model, hf)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_qwen2_with_qkv_biases(tie):
    """The biases are random too (ours() draws every tensor), so a dropped or misplaced one changes the logits."""
    cfg = tiny_cfg(tie, qkv_bias=True, n_kv_heads=2)
    model, hf = ours(cfg), hf_model(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    hf.load_state_dict(model.state_dict(), strict=True)
    assert_same_logits(model, hf)


FAMILY = {"llama": {}, "qwen3": dict(qk_norm=True), "qwen2": dict(qkv_bias=True)}
ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_state_dict_keys_are_hf(tie, family):
    if family == "qwen3" and not HAS_QWEN3:
        pytest.skip("transformers has no Qwen3ForCausalLM")
    cfg = tiny_cfg(tie, n_kv_heads=2, **FAMILY[family])
    ours_sd, hf_sd = ours(cfg).state_dict(), hf_model(cfg).state_dict()
    assert list(ours_sd) == list(hf_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in hf_sd.items()}


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_exported_folder_loads_in_transformers(tmp_path, tie, family):
    """The export path itself: config.json + model.safetensors, read by from_pretrained."""
    if family == "qwen3" and not HAS_QWEN3:
        pytest.skip("transformers has no Qwen3ForCausalLM")
    cfg = tiny_cfg(tie, n_kv_heads=2, **FAMILY[family])
    model = ours(cfg)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_weights(model, tmp_path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ARCH[family]
    assert_same_logits(model, hf)
