"""What an importer hands over: a model read from a file kiln did not write (a GGUF file, a Hugging Face
folder), in kiln's terms, before anything is written to a run directory.

Every importer returns one `ImportedModel`, so `kiln import` writes a run directory the same way whatever the
source: `model` becomes the run's ModelConfig, `state_dict` its weights (HF Llama names), `tokenizer_json` and
`tokenizer_config` its tokenizer/ folder, `generation` its generation_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImportedModel:
    model: dict
    """ModelConfig field values: depth, d_model, head_dim, n_heads, n_kv_heads, ffn_hidden, vocab_size,
    max_seq_len, rope_theta, norm_eps, tie_embeddings, qk_norm, qkv_bias, rope_scaling (None or an HF-style dict such as
    {"rope_type": "llama3", "factor": 8.0, ...})."""
    state_dict: dict[str, torch.Tensor]
    """Weights under HF Llama names (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...,
    lm_head.weight unless tied), in the dtype asked for."""
    tokenizer_json: str
    """A `tokenizers` tokenizer.json (loads with `tokenizers.Tokenizer.from_str`)."""
    tokenizer_config: dict = field(default_factory=dict)
    """HF tokenizer_config.json content: bos_token, eos_token, pad_token, unk_token (str or None), add_bos_token,
    add_eos_token, chat_template, model_max_length."""
    generation: dict = field(default_factory=dict)
    """generation_config.json content: bos_token_id, eos_token_id (int, or a list with the end-of-turn ids),
    pad_token_id."""
    source: str = ""
    """Where it came from (a path)."""
    architecture: str = ""
    """The source's own architecture name ("llama", "qwen3", ...)."""
