"""GGUF sizes by arithmetic: each tensor's type and bytes exactly as kiln's exporter writes them
(`kiln.formats.gguf_layout.tensor_plan`, the one place that decides them), plus an estimate of the header,
metadata and tokenizer.

Block sizes (ggml's type traits): Q8_0 stores 32 weights in 34 bytes (an fp16 scale + 32 int8),
Q4_0 32 in 18 (fp16 scale + 16 bytes of nibbles), Q4_1 32 in 20 (fp16 scale and min), Q5_0 32 in 22,
Q4_K 256 in 144, Q5_K 256 in 176, Q6_K 256 in 210. A row whose length (ne0, the last torch dimension)
is not a multiple of the block falls back to another type; 1-D tensors (norm gains) stay F32. kiln's
q4_0/q4_1 exports store the head (or the tied embedding) in Q8_0.

`q4_k_m` is llama-quantize's mix (src/llama-quant.cpp, llama_tensor_get_type): Q4_K everywhere but
- output.weight (token_embd.weight when the head is tied) -> Q6_K;
- attn_v.weight and ffn_down.weight of layer i of n -> Q6_K when use_more_bits(i, n):
  i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (the first and last eighth and every third between);
- attn_v.weight in a 70B-type model (llama.cpp's LLM_TYPE_70B: 80 layers) -> Q5_K where it would be Q4_K;
- k-quants need rows of a multiple of 256: otherwise Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
Tests compare these figures with the exporter's files (and llama-quantize's, where it is installed).
"""

from __future__ import annotations

import gguf

from kiln.config import ModelConfig
from kiln.formats.gguf_layout import ALIGN as ALIGNMENT
from kiln.formats.gguf_layout import QUANTS as _QUANT_TYPES
from kiln.formats.gguf_layout import tensor_bytes, tensor_plan, tensor_qtype

QUANTS = tuple(_QUANT_TYPES)


def bits_per_weight(ggml_type: str) -> float:
    n, b = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type.upper()]]
    return 8 * b / n


def gguf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch shape) of every tensor an export of this model holds, in file order."""
    return [(p.name, p.shape) for p in tensor_plan(cfg, "f32")]


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int = 0, tied: bool = False) -> str:
    """The ggml type `name` is stored in for the file type `quant` (lower case: "q6_k")."""
    if quant not in QUANTS:
        raise ValueError(f"GGUF type {quant!r}: choose one of {', '.join(QUANTS)}")
    return tensor_qtype(name, shape, quant, n_layers, tied).name.lower()


def gguf_tensor_bytes(shape: tuple[int, ...], quant: str, name: str = "", n_layers: int = 0,
                      tied: bool = False) -> int:
    """Bytes of one tensor's data in a GGUF file of type `quant` (no alignment padding)."""
    return tensor_bytes(shape, tensor_qtype(name, shape, quant, n_layers, tied))


def _string(s: str) -> int:
    return 8 + len(s.encode())


def gguf_metadata_bytes(cfg: ModelConfig, token_bytes: int | None = None, n_merges: int | None = None) -> int:
    """Header, key/value metadata and tensor-info table. The tokenizer dominates: every token as a string
    (8-byte length + its bytes), its type (int32) and every BPE merge as a string. Without a tokenizer the
    token text is taken as ~7 bytes each and merges as vocab - 256 of ~12 bytes (byte-level BPE averages)."""
    c = cfg.resolved()
    V = c.vocab_size
    token_bytes = V * 7 if token_bytes is None else token_bytes
    n_merges = max(0, V - 256) if n_merges is None else n_merges
    tokenizer = V * 8 + token_bytes + V * 4 + n_merges * (8 + 12)
    hparams = 40 * 48   # ~40 scalar keys (architecture, sizes, rope, special token ids...) with their names
    tensors = sum(_string(name) + 4 + 8 * len(shape) + 4 + 8 for name, shape in gguf_tensors(c))
    header = 4 + 4 + 8 + 8
    return header + hparams + tokenizer + tensors


def gguf_file_bytes(cfg: ModelConfig, quant: str, token_bytes: int | None = None, n_merges: int | None = None) -> int:
    """Predicted size of the GGUF file: metadata, padding to the alignment before the data, and each tensor's
    data padded to the alignment."""
    c = cfg.resolved()
    meta = gguf_metadata_bytes(c, token_bytes, n_merges)
    total = meta + (-meta) % ALIGNMENT
    for name, shape in gguf_tensors(c):
        n = gguf_tensor_bytes(shape, quant, name, c.depth, c.tie_embeddings)
        total += n + (-n) % ALIGNMENT
    return total


def gguf_weight_bytes(cfg: ModelConfig, quant: str) -> int:
    """Tensor data only: what llama.cpp holds in memory for the weights."""
    c = cfg.resolved()
    return sum(gguf_tensor_bytes(s, quant, n, c.depth, c.tie_embeddings) for n, s in gguf_tensors(c))
