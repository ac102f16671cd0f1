"""GGUF sizes by arithmetic: bytes per tensor for each quantisation type, the mix llama.cpp's `Q4_K_M`
uses, and the file's header, metadata and alignment.

Block sizes (ggml's type traits): Q8_0 stores 32 weights in 34 bytes (an fp16 scale + 32 int8),
Q4_0 32 in 18 (fp16 scale + 16 bytes of nibbles), Q4_1 32 in 20 (fp16 scale and min), Q5_0 32 in 22,
Q4_K 256 in 144, Q5_K 256 in 176, Q6_K 256 in 210. A row whose length (ne0, the last torch dimension)
is not a multiple of the block falls back to another type; 1-D tensors (norm gains) stay F32.

`q4_k_m` is llama-quantize's mix (src/llama-quant.cpp, llama_tensor_get_type): Q4_K everywhere but
- output.weight (token_embd.weight when the head is tied) -> Q6_K;
- attn_v.weight and ffn_down.weight of layer i of n -> Q6_K when use_more_bits(i, n):
  i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (the first and last eighth and every third between);
- attn_v.weight in a 70B-type model (llama.cpp's LLM_TYPE_70B: 80 layers) -> Q5_K where it would be Q4_K;
- k-quants need rows of a multiple of 256: otherwise Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
  (the head/embedding: Q8_0).
The other types are written tensor by tensor as the gguf Python package does (2-D tensors in the
chosen type, falling back to F16 when a row is not a multiple of 32; 1-D in F32).
`gguf_file_bytes` is what the GGUF exporter's files should measure (a test will compare them).
"""

from __future__ import annotations

from kiln.config import ModelConfig

# type -> (weights per block, bytes per block)
BLOCKS = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
          "q5_0": (32, 22), "q5_1": (32, 24), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m")
_K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
ALIGNMENT = 32   # general.alignment default: every tensor's data starts at a multiple of 32 bytes


def bits_per_weight(ggml_type: str) -> float:
    n, b = BLOCKS[ggml_type]
    return 8 * b / n


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def gguf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch shape) of every tensor llama.cpp's Llama layout stores for this model."""
    c = cfg.resolved()
    D, E = c.d_model, c.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (c.vocab_size, D))]
    for i in range(c.depth):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (D,)), (b + "attn_q.weight", (c.n_heads * E, D)),
                (b + "attn_k.weight", (c.n_kv_heads * E, D)), (b + "attn_v.weight", (c.n_kv_heads * E, D)),
                (b + "attn_output.weight", (D, c.n_heads * E))]
        if c.qk_norm:
            out += [(b + "attn_q_norm.weight", (E,)), (b + "attn_k_norm.weight", (E,))]
        out += [(b + "ffn_norm.weight", (D,)), (b + "ffn_gate.weight", (c.ffn_hidden, D)),
                (b + "ffn_up.weight", (c.ffn_hidden, D)), (b + "ffn_down.weight", (D, c.ffn_hidden))]
    out.append(("output_norm.weight", (D,)))
    if not c.tie_embeddings:
        out.append(("output.weight", (c.vocab_size, D)))
    return out


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int = 0, tied: bool = False) -> str:
    """The ggml type `name` is stored in for the file type `quant`."""
    if quant not in QUANTS:
        raise ValueError(f"GGUF type {quant!r}: choose one of {', '.join(QUANTS)}")
    if len(shape) < 2:
        return "f32"
    if quant != "q4_k_m":
        blk = BLOCKS[quant][0]
        return quant if shape[-1] % blk == 0 else "f16"
    t = "q4_k"
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if is_head:
        return "q6_k" if shape[-1] % 256 == 0 else "q8_0"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and use_more_bits(layer, n_layers):
        t = "q6_k"
    elif name.endswith("attn_v.weight") and n_layers == 80:
        t = "q5_k"
    if shape[-1] % 256:
        t = _K_FALLBACK[t]
    return t


def gguf_tensor_bytes(shape: tuple[int, ...], quant: str, name: str = "", n_layers: int = 0,
                      tied: bool = False) -> int:
    """Bytes of one tensor's data in a GGUF file of type `quant` (no alignment padding)."""
    t = tensor_type(name, shape, quant, n_layers, tied)
    per_block, block_bytes = BLOCKS[t]
    numel = 1
    for s in shape:
        numel *= s
    assert numel % per_block == 0, (name, shape, t)
    return numel // per_block * block_bytes


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
