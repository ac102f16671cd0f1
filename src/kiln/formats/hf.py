"""Hugging Face layout: config.json for our Transformer, and safetensors weights under HF names.

Our parameter names already are HF Llama's, so the weights need no renaming. The
one wrinkle is weight tying: `lm_head.weight` and `model.embed_tokens.weight` are
one tensor, which safetensors refuses to store twice. Like HF, we store only
`model.embed_tokens.weight` and restore the tie on load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kiln.config import ModelConfig

TIED_KEY = "lm_head.weight"
"""Dropped from the saved weights when embeddings are tied (HF does the same)."""


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
    """A `config.json` dict that `transformers` loads as LlamaConfig (or Qwen3Config with qk_norm).

    `dtype` is the dtype the weights are stored in ("float32", "bfloat16", ...).
    """
    c = cfg.resolved()
    if c.vocab_size is None:
        raise ValueError("model.vocab_size is not set: cannot write an HF config before the tokenizer exists")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        # transformers >= 5 reads rope_parameters; transformers 4.x and llama.cpp's
        # convert_hf_to_gguf.py read the top-level rope_theta. Both, so every reader agrees.
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": c.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    if c.qk_norm:
        # Llama has no QK-norm; Qwen3 is Llama plus per-head q_norm/k_norm before RoPE,
        # with the same parameter names as ours.
        if importlib.util.find_spec("transformers") is not None and \
                importlib.util.find_spec("transformers.models.qwen3") is None:
            raise ValueError("model.qk_norm=true exports as Qwen3ForCausalLM, which this transformers "
                             "lacks; upgrade transformers (>= 4.51) or train with qk_norm=false")
        del hf["mlp_bias"]  # not a Qwen3 field
        hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                  sliding_window=None, max_window_layers=c.depth)
    return hf


def storable(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights as safetensors can store them: HF names, contiguous, the tied head dropped (one tensor under
    two names, which safetensors refuses). The one place that decides what a saved weights file holds."""
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)
    return sd


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as safetensors can store them."""
    return storable(model.state_dict(), model.cfg)


def save_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, path: str | Path,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a full (gathered) state dict of a model with config `cfg` as `model.safetensors` in HF layout."""
    save_file(storable(state_dict, cfg), str(path), metadata=metadata)


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `model.safetensors` in HF layout (loads in transformers as is)."""
    save_state_dict(model.state_dict(), model.cfg, path, metadata)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a file written by `save_weights` (or an HF Llama/Qwen3 export) into `model`, in place.

    Missing keys other than the tied head, and any unexpected key, raise ValueError naming them.
    """
    device = next(model.parameters()).device
    sd = load_file(str(path), device=str(device))
    if model.cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)  # some exporters write the tied copy anyway; the embedding is the source
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {TIED_KEY} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model config: missing {sorted(set(missing) - allowed_missing)}, "
                         f"unexpected {sorted(unexpected)}")
