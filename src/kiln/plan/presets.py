"""Named model sizes with published shapes, and a Hugging Face `config.json` read into a ModelConfig.

Each preset is a ModelConfig value (the same type kiln trains), so an estimate of `7b` is an estimate of
the model `kiln pretrain --model.* ...` with those fields would build. Shapes are the published ones:
GPT-2 (Radford et al. 2019, 124M / 350M with a 50,257 vocabulary, here rounded to 50,304) in kiln's
Llama layout (SwiGLU at 8/3 width, RMSNorm, RoPE, no biases: parameter counts differ slightly from
GPT-2's own), Llama 3.2 1B / 3B, Llama 3.1 8B / 70B (Meta's config.json files) and Llama 2 13B.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.config import ConfigError, ModelConfig
from kiln.config.base import from_dict, load_yaml

PRESETS: dict[str, tuple[ModelConfig, str]] = {
    "124m": (ModelConfig(depth=12, d_model=768, head_dim=64, n_heads=12, n_kv_heads=12, ffn_hidden=2048,
                         vocab_size=50304, max_seq_len=1024, tie_embeddings=True),
             "GPT-2 small shape (12 x 768, 12 heads, context 1024) in kiln's Llama layout"),
    "350m": (ModelConfig(depth=24, d_model=1024, head_dim=64, n_heads=16, n_kv_heads=16, ffn_hidden=2752,
                         vocab_size=50304, max_seq_len=1024, tie_embeddings=True),
             "GPT-2 medium shape (24 x 1024, 16 heads, context 1024) in kiln's Llama layout"),
    "1b": (ModelConfig(depth=16, d_model=2048, head_dim=64, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                       vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
           "Llama 3.2 1B config.json (16 x 2048, 32 heads / 8 KV, FFN 8192, vocab 128,256, tied)"),
    "3b": (ModelConfig(depth=28, d_model=3072, head_dim=128, n_heads=24, n_kv_heads=8, ffn_hidden=8192,
                       vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
           "Llama 3.2 3B config.json (28 x 3072, 24 heads / 8 KV, FFN 8192, vocab 128,256, tied)"),
    "8b": (ModelConfig(depth=32, d_model=4096, head_dim=128, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                       vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
           "Llama 3.1 8B config.json (32 x 4096, 32 heads / 8 KV, FFN 14,336, vocab 128,256)"),
    "13b": (ModelConfig(depth=40, d_model=5120, head_dim=128, n_heads=40, n_kv_heads=40, ffn_hidden=13824,
                        vocab_size=32000, max_seq_len=4096, tie_embeddings=False),
            "Llama 2 13B config.json (40 x 5120, 40 heads, FFN 13,824, vocab 32,000)"),
    "70b": (ModelConfig(depth=80, d_model=8192, head_dim=128, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                        vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
            "Llama 3.1 70B config.json (80 x 8192, 64 heads / 8 KV, FFN 28,672, vocab 128,256)"),
}
ALIASES = {"7b": "8b", "7-8b": "8b", "gpt2": "124m", "gpt2-medium": "350m"}

# Hugging Face config.json key -> ModelConfig field (Llama, Qwen2/3, Mistral... share these names).
HF_KEYS = {"hidden_size": "d_model", "intermediate_size": "ffn_hidden", "num_hidden_layers": "depth",
           "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
           "vocab_size": "vocab_size", "tie_word_embeddings": "tie_embeddings", "rope_theta": "rope_theta",
           "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len"}
REQUIRED_HF = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def preset_names() -> list[str]:
    return [*PRESETS, *ALIASES]


def preset(name: str) -> ModelConfig | None:
    """The preset's ModelConfig (a copy), or None when `name` is not one."""
    key = ALIASES.get(name.lower(), name.lower())
    return PRESETS[key][0] if key in PRESETS else None


def from_hf_config(path: str | Path) -> ModelConfig:
    """A ModelConfig from a Hugging Face `config.json` (or the folder holding it)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{p}: no config.json there (give a Hugging Face model folder or its config.json)")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON: {e}") from e
    hf = {**hf.get("text_config", {}), **hf}   # multimodal configs nest the language model's fields
    missing = [k for k in REQUIRED_HF if k not in hf]
    if missing:
        raise ConfigError(f"{file}: missing {', '.join(missing)}; the estimate needs the model's shape "
                          f"({', '.join(REQUIRED_HF)})")
    fields = {field: hf[key] for key, field in HF_KEYS.items() if hf.get(key) is not None}
    fields.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    fields["qk_norm"] = "qwen3" in str(hf.get("model_type", "")).lower()
    fields["qkv_bias"] = str(hf.get("model_type", "")).lower() == "qwen2"
    fields.setdefault("tie_embeddings", False)   # transformers' default for Llama-family configs
    return ModelConfig(**fields)


def resolve_model(spec: str | None, fallback: ModelConfig) -> tuple[ModelConfig, str]:
    """The model to estimate and where it came from: a preset name, a Hugging Face folder / config.json,
    or (spec None) the recipe's own model."""
    if not spec:
        return fallback, "the recipe's model"
    if (m := preset(spec)) is not None:
        key = ALIASES.get(spec.lower(), spec.lower())
        return m, f"preset {key}: {PRESETS[key][1]}"
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "config.yaml").is_file():
        return from_kiln_run(path), f"kiln run {spec}"
    if path.exists():
        return from_hf_config(spec), f"Hugging Face config {spec}"
    raise ConfigError(f"estimate.model={spec!r} is neither a preset ({', '.join(preset_names())}) nor an existing "
                      "Hugging Face folder / config.json or kiln run directory")


def from_kiln_run(run_dir: Path) -> ModelConfig:
    """The model of a kiln run directory (`kiln import` writes one): its saved config.yaml's model section."""
    data = load_yaml(run_dir / "config.yaml")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{run_dir / 'config.yaml'}: no model section; is this a kiln run directory?")
    return from_dict(ModelConfig, data["model"], "model.")
