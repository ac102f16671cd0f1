"""What an importer hands over: a model config, the weights under kiln's (= Hugging Face Llama) names, and the
tokenizer as the source defines it. `kiln import` turns one into a run directory (kiln/formats/importer.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ImportedModel:
    model: dict[str, Any]
    """ModelConfig field values (depth, d_model, head_dim, n_heads, n_kv_heads, ffn_hidden, vocab_size,
    max_seq_len, rope_theta, norm_eps, tie_embeddings, qk_norm, rope_scaling)."""
    state_dict: dict[str, torch.Tensor]
    """Weights under Hugging Face Llama names, in the import dtype; no `lm_head.weight` when tied."""
    tokenizer_json: str
    """A `tokenizers` tokenizer.json."""
    tokenizer_config: dict[str, Any]
    """tokenizer_config.json: bos/eos/pad/unk tokens, add_bos_token, chat_template, model_max_length."""
    generation: dict[str, Any] = field(default_factory=dict)
    """generation_config.json: bos_token_id, eos_token_id (an int or a list with the end-of-turn id)."""
    source: str = ""
    """The file or folder imported."""
    architecture: str = ""
    """The source's architecture name (LlamaForCausalLM, qwen3, ...)."""
