"""Where every tensor of a GGUF export goes and what it costs: HF <-> GGUF names, the shapes a config gives, and
the ggml type each tensor is stored in under a file type (llama.cpp's rules, kiln's one place for them, shared
by the writer (kiln/formats/gguf.py) and the size plan (kiln/plan/gguf.py)). No file is read or written here.

File size (docs/decisions.md, "GGUF: size formula"): header + metadata + tokenizer, then each tensor's
data padded to 32 bytes; a tensor of R rows of C columns in a type of blocks of b values in s bytes takes
R * C / b * s bytes. `gguf_size` gives the tensor part, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import torch
from gguf import GGMLQuantizationType as T

from kiln.config import ModelConfig

QUANTS = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
          "q4_k_m": T.Q4_K}
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT

# HF name under model.layers.N. -> GGUF name under blk.N.
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class TensorPlan:
    name: str                  # GGUF name
    hf_name: str | None        # None for rope_freqs
    shape: tuple[int, ...]     # torch order (rows, cols)
    qtype: T
    wanted: T                  # the file type's choice before a row length forced a wider one


# ---------------------------------------------------------------- names and shapes

def hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model under its HF name, with its torch shape (lm_head only when untied)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    block = {"input_layernorm.weight": (c.d_model,), "self_attn.q_proj.weight": (q, c.d_model),
             "self_attn.k_proj.weight": (kv, c.d_model), "self_attn.v_proj.weight": (kv, c.d_model),
             "self_attn.o_proj.weight": (c.d_model, q), "post_attention_layernorm.weight": (c.d_model,),
             "mlp.gate_proj.weight": (c.ffn_hidden, c.d_model), "mlp.up_proj.weight": (c.ffn_hidden, c.d_model),
             "mlp.down_proj.weight": (c.d_model, c.ffn_hidden)}
    if c.qk_norm:
        block |= {"self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,)}
    if c.qkv_bias:
        block |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    out = {"model.embed_tokens.weight": (c.vocab_size, c.d_model)}
    for i in range(c.depth):
        out |= {f"model.layers.{i}.{k}": v for k, v in block.items()}
    out["model.norm.weight"] = (c.d_model,)
    if not c.tie_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.d_model)
    return out


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".", 3)   # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _BLOCK:
        return f"blk.{parts[2]}.{_BLOCK[parts[3]]}"
    raise ValueError(f"weight {hf_name!r} has no GGUF name (not a Llama/Qwen2/Qwen3 weight)")


_HF_OF = {v: k for k, v in _TOP.items()}
_HF_OF_BLOCK = {v: k for k, v in _BLOCK.items()}


def hf_name(name: str, source: str) -> str:
    if name in _HF_OF:
        return _HF_OF[name]
    parts = name.split(".", 2)   # blk, N, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _HF_OF_BLOCK:
        return f"model.layers.{parts[1]}.{_HF_OF_BLOCK[parts[2]]}"
    raise ValueError(f"{source}: tensor {name!r} is not part of a Llama/Qwen2/Qwen3 model kiln can build")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> GGML interleaved rows, per head (llama.cpp's convert_hf_to_gguf permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- tensor types and sizes

def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get a wider type in *_K_M mixes (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _wanted_type(name: str, quant: str, layer: int, depth: int, tied: bool) -> T:
    base = QUANTS[quant]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if quant in ("q4_0", "q4_1") and is_output:
        return T.Q8_0   # llama.cpp gives the head Q6_K, which gguf.quants cannot write: Q8_0 is the nearest
    if quant == "q4_k_m":
        if is_output:
            return T.Q6_K
        if name.endswith(("attn_v.weight", "ffn_down.weight")) and _use_more_bits(layer, depth):
            return T.Q6_K
        if name.endswith("attn_v.weight") and depth == 80:
            return T.Q5_K   # llama.cpp's LLM_TYPE_70B (80 layers): V shared by 8 heads gets more bits
    return base


# llama.cpp's fallbacks when a row does not divide into the type's blocks (tensor_type_fallback).
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def _fit(qtype: T, cols: int, is_output: bool) -> T:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype
    if is_output and qtype == T.Q6_K:
        return T.Q8_0 if cols % 32 == 0 else T.F16
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def tensor_plan(model_cfg: ModelConfig, quant: str) -> list[TensorPlan]:
    """Every tensor a GGUF export of this config holds, in file order, with its type under `quant`."""
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} is not one of {', '.join(QUANTS)}")
    c = model_cfg.resolved()
    if c.vocab_size is None:
        raise ValueError("model.vocab_size is not set: GGUF export needs the tokenizer's vocabulary")
    plan = []
    scaling = getattr(c, "rope_scaling", None)
    if scaling:
        plan.append(TensorPlan(ROPE_FREQS, None, (c.head_dim // 2,), T.F32, T.F32))
    for hf, shape in hf_shapes(c).items():
        name = gguf_name(hf)
        if len(shape) == 1:
            plan.append(TensorPlan(name, hf, shape, T.F32, T.F32))
            continue
        plan.append(TensorPlan(name, hf, shape, tensor_qtype(name, shape, quant, c.depth, c.tie_embeddings),
                               _wanted_type(name, quant, _layer(name), c.depth, c.tie_embeddings)))
    return plan


def tensor_qtype(name: str, shape: tuple[int, ...], quant: str, depth: int, tied: bool) -> T:
    """The ggml type tensor `name` (GGUF name, torch shape) is stored in by an export of type `quant`: kiln's
    writer for the pure-Python types, llama-quantize's rule for q4_k_m."""
    if len(shape) == 1:
        return T.F32
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    return _fit(_wanted_type(name, quant, _layer(name), depth, tied), shape[-1], is_output)


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else 0


def tensor_bytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def gguf_size(model_cfg: ModelConfig, quant: str) -> int:
    """Bytes of tensor data in a GGUF export of this config (each tensor padded to 32 bytes): the file's size
    less its header, metadata and tokenizer. Exact for every quant; for q4_k_m it follows llama-quantize's
    per-tensor rule (llama.cpp 2026)."""
    return sum(_padded(tensor_bytes(p.shape, p.qtype)) for p in tensor_plan(model_cfg, quant))


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
