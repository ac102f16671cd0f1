"""GGUF, the file llama.cpp and Ollama run: import (read_gguf) and export (write_gguf), both through the `gguf`
package (llama.cpp's own Python reader/writer and quantiser).

Format facts this module depends on (llama.cpp's convert_hf_to_gguf.py and src/llama-*.cpp):
- Tensor names: `token_embd`, `blk.N.attn_q` ... `output_norm`, `output` (absent when the head is tied).
  GGUF lists dimensions fastest-first (ggml's `ne`): a (out, in) matrix is stored with shape [in, out].
- Llama's q/k rows are permuted from HF's rotate-half RoPE pairs (i, i + E/2) to GGML's interleaved
  pairs (2i, 2i + 1); Qwen2 and Qwen3 use GGML's "neox" RoPE, which is rotate-half, so their q/k (and Qwen2's
  q/k biases) are stored as is.
- Llama 3.1's rope scaling is stored as a `rope_freqs.weight` tensor (one divisor per frequency).
- Norm gains and other 1-D tensors are F32 in every file type; quantised types work on blocks of 32
  (Q8_0, Q4_0, Q4_1) or 256 (K-quants) along a row, so a row of another length takes a wider type.

Names, shapes and each tensor's ggml type under a file type are kiln/formats/gguf_layout.py's (also what the
size plan and `gguf_size` read).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from kiln.config import ModelConfig
from kiln.formats.gguf_layout import (QUANTS, ROPE_FREQS, TensorPlan, gguf_name, hf_name, hf_shapes, permute_qk,
                                      tensor_bytes, tensor_plan, unpermute_qk)
from kiln.formats.gguf_vocab import GGUFVocab, tokenizer_from_gguf, vocab_for_gguf
from kiln.formats.imported import ImportedModel

ARCHITECTURES = ("llama", "qwen2", "qwen3")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
QUANTIZE_TOOL = "llama-quantize"   # llama.cpp's quantiser: the only source of K-quants
QUANTIZE_TIMEOUT_S = 3600


# ---------------------------------------------------------------- import

def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> ImportedModel:
    """A Llama, Qwen2 or Qwen3 GGUF file as config values, HF-named weights in `dtype`, and a rebuilt tokenizer.

    Tensors are dequantised one at a time from the memory-mapped file (any type `gguf` can dequantise), so
    the peak is about the model in `dtype` plus its largest tensor in fp32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:   # the reader raises ValueError, struct.error, ... on a damaged file
        # numpy's reshape or view failing on the memory map: a tensor's bytes run past the end of the file
        short = isinstance(e, ValueError) and ("cannot reshape" in str(e) or "must be a divisor" in str(e))
        hint = (f"; the file ({path.stat().st_size:,} bytes) ends before the data its header describes: truncated, "
                "as by an interrupted download or copy?") if short else ""
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}){hint}") from None
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not supported; kiln imports "
                         f"{', '.join(ARCHITECTURES)} GGUF files (Llama 2/3, Mistral layout, SmolLM2, Qwen2.5, Qwen3)")
    tensors = {t.name: t for t in reader.tensors}
    model = _config_of(fields, arch, tensors, path)
    c = model_config(model)
    expected = hf_shapes(c)
    state_dict = {}
    for name, t in tensors.items():
        if name == ROPE_FREQS:
            continue
        hf = hf_name(name, str(path))
        if hf not in expected:
            raise ValueError(f"{path}: tensor {name} ({hf}) does not belong in a {arch} model of this config")
        state_dict[hf] = _load_tensor(t, expected[hf], path, arch == "llama", c, dtype)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{path}: tensors missing for this config: {', '.join(gguf_name(m) for m in missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    tokenizer_json, tokenizer_config, generation = tokenizer_from_gguf(fields, str(path), c.max_seq_len)
    return ImportedModel(model=model, state_dict=state_dict, tokenizer_json=tokenizer_json,
                         tokenizer_config=tokenizer_config, generation=generation, source=str(path),
                         architecture=arch)


def model_config(values: dict) -> ModelConfig:
    """ModelConfig from imported values (rope_scaling dropped while ModelConfig has no such field and it is None)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if values.get("rope_scaling") and "rope_scaling" not in known:
        raise ValueError(f"this kiln's ModelConfig cannot hold rope_scaling {values['rope_scaling']}")
    return ModelConfig(**{k: v for k, v in values.items() if k in known}).resolved()


def _config_of(fields: dict, arch: str, tensors: dict, path: Path) -> dict:
    def key(name: str, default=None):
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{name} is missing")
        if isinstance(value, list):
            raise ValueError(f"{path}: {arch}.{name} varies per layer ({value[:4]}...); kiln needs one value")
        return value

    d_model, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", d_model // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path}: {arch}.attention.value_length differs from key_length ({head_dim}); kiln "
                         "needs one head width")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count={fields[f'{arch}.rope.dimension_count']} "
                         f"rotates part of a head of {head_dim}; kiln rotates whole heads")
    vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens") or []) or \
        int(tensors["token_embd.weight"].shape[-1])
    rope_theta = _f32(key("rope.freq_base", 10000.0))
    return {
        "depth": int(key("block_count")), "d_model": d_model, "head_dim": head_dim, "n_heads": n_heads,
        "n_kv_heads": int(key("attention.head_count_kv", n_heads)), "ffn_hidden": int(key("feed_forward_length")),
        "vocab_size": int(vocab), "max_seq_len": int(key("context_length")), "rope_theta": rope_theta,
        "norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "tie_embeddings": "output.weight" not in tensors, "qk_norm": arch == "qwen3", "qkv_bias": arch == "qwen2",
        "rope_scaling": _rope_scaling(fields, arch, tensors, head_dim, rope_theta, path),
    }


def _f32(value: float) -> float:
    """A float32 field as the decimal it was written from (1e-06, not 9.99999997e-07): the shortest string
    that rounds to the same float32."""
    return float(str(np.float32(value)))


def _load_tensor(t, shape: tuple[int, ...], path: Path, permuted: bool, c: ModelConfig,
                 dtype: torch.dtype) -> torch.Tensor:
    stored = tuple(int(n) for n in reversed(t.shape))   # ggml lists dimensions fastest-first
    if stored != shape:
        raise ValueError(f"{path}: tensor {t.name} has shape {list(stored)} (torch order) but the config "
                         f"implies {list(shape)}")
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                         "cannot dequantise; re-quantise the file to a common type (q8_0, q4_k_m, f16)") from None
    if not arr.flags.writeable:   # an F32 tensor is a view of the memory-mapped file
        arr = arr.copy()
    w = torch.from_numpy(arr.reshape(shape))
    if permuted and t.name.endswith(("attn_q.weight", "attn_k.weight")):
        w = unpermute_qk(w, c.n_heads if t.name.endswith("attn_q.weight") else c.n_kv_heads)
    return w.to(dtype).contiguous()


# ---------------------------------------------------------------- rope scaling

def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3's per-frequency divisors, as convert_hf_to_gguf.py writes them into rope_freqs.weight."""
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _rope_scaling(fields: dict, arch: str, tensors: dict, head_dim: int, theta: float, path: Path) -> dict | None:
    kind = fields.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (kiln reads llama3 "
                         "scaling, stored as a rope_freqs tensor)")
    if ROPE_FREQS not in tensors:
        return None
    factors = torch.from_numpy(gguf.quants.dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type)
                               .astype(np.float32).reshape(-1))
    if factors.numel() != head_dim // 2:
        raise ValueError(f"{path}: {ROPE_FREQS} has {factors.numel()} values for {head_dim // 2} frequencies")
    return _llama3_params(factors, head_dim, theta, path)


def _llama3_params(factors: torch.Tensor, head_dim: int, theta: float, path: Path) -> dict:
    """The llama3 rope_scaling that reproduces a rope_freqs tensor. Only ratios of its three lengths show
    in the factors, so low_freq_factor is fixed at 1 (Meta's value) unless the canonical set fits."""
    factor = float(factors.max())
    candidates = [{"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}]
    smooth = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if int(smooth.sum()) >= 2:   # s = old_ctx / wavelen / (high - low) - low / (high - low): a line in 1/wavelen
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        x = (freqs / (2 * math.pi))[smooth]
        s = (1 / factors.double()[smooth] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(x.numpy(), s.numpy(), 1)
        if b < 0:
            old_ctx = -a / b   # with low = 1: b = -1 / (high - 1), a = old_ctx / (high - 1)
            candidates.append({"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 1 - 1 / b,
                               "original_max_position_embeddings": int(round(old_ctx))})
    for p in candidates:
        if torch.allclose(llama3_rope_factors(head_dim, theta, p), factors, rtol=1e-5, atol=1e-6):
            return {"rope_type": "llama3", **p}
    raise ValueError(f"{path}: {ROPE_FREQS} does not match llama3 rope scaling for any parameters tried; "
                     "this kind of rope scaling is not supported")


# ---------------------------------------------------------------- export

def write_gguf(path: str | Path, model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer_dir: Path,
               quant: str = "f16", generation: dict | None = None, metadata: dict | None = None,
               overwrite: bool = False) -> dict:
    """Write the model as a llama.cpp GGUF file; return a summary (bytes, bits per weight, types, fallbacks).

    `metadata`: extra key/values (str, int, float or bool); a key without a dot goes under `general.`
    (e.g. {"name": "my-model"}). The file is written beside `path` under a temporary name, synced, then
    renamed: an interrupted export leaves no partial file. q4_k_m needs llama.cpp's `llama-quantize`.
    """
    path = Path(path)
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another --out or pass overwrite to replace it")
    if quant == "q4_k_m" and shutil.which(QUANTIZE_TOOL) is None:
        raise RuntimeError(f"q4_k_m is made by llama.cpp's {QUANTIZE_TOOL}, which is not on PATH (the gguf "
                           "package cannot write K-quants). Build it from a llama.cpp checkout with `cmake -B "
                           f"build && cmake --build build --target {QUANTIZE_TOOL}` and put build/bin on PATH, "
                           "or export q8_0 / q4_0 / q4_1, which kiln quantises itself")
    c = model_cfg.resolved()
    vocab = vocab_for_gguf(tokenizer_dir, c.vocab_size, generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if quant == "q4_k_m":
            f16 = path.with_name(f".{path.name}.f16.partial")
            try:
                _write(f16, c, state_dict, vocab, "f16", metadata)
                _quantize_k(f16, tmp, "Q4_K_M")
            finally:
                f16.unlink(missing_ok=True)
        else:
            _write(tmp, c, state_dict, vocab, quant, metadata)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summarize(path, quant, vocab.pre, tensor_plan(c, quant) if quant != "q4_k_m" else None)


def _write(path: Path, c: ModelConfig, state_dict: dict[str, torch.Tensor], vocab: GGUFVocab, quant: str,
           metadata: dict | None) -> None:
    plan = tensor_plan(c, quant)
    _check_state_dict(state_dict, c)
    arch = "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"
    w = gguf.GGUFWriter(path, arch)
    _add_metadata(w, c, quant, vocab, metadata)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), tensor_bytes(p.shape, p.qtype), raw_dtype=p.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:   # one tensor in memory at a time
            w.write_tensor_data(gguf.quants.quantize(_gguf_array(p, state_dict, c, arch), p.qtype))
    finally:
        w.close()


def _gguf_array(p: TensorPlan, state_dict: dict[str, torch.Tensor], c: ModelConfig, arch: str) -> np.ndarray:
    if p.hf_name is None:   # rope_freqs
        return llama3_rope_factors(c.head_dim, c.rope_theta, getattr(c, "rope_scaling")).numpy()
    t = state_dict[p.hf_name].detach().to("cpu", torch.float32)
    if arch == "llama" and p.name.endswith(("attn_q.weight", "attn_k.weight")):
        t = permute_qk(t, c.n_heads if p.name.endswith("attn_q.weight") else c.n_kv_heads)
    return t.contiguous().numpy()


def _check_state_dict(state_dict: dict[str, torch.Tensor], c: ModelConfig) -> None:
    expected = hf_shapes(c)
    extra = set(state_dict) - set(expected) - ({"lm_head.weight"} if c.tie_embeddings else set())
    missing = set(expected) - set(state_dict)
    if extra or missing:
        raise ValueError(f"weights do not fit the model config: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(extra)[:8]}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != shape:
            raise ValueError(f"weight {k} has shape {list(state_dict[k].shape)}, the config implies {list(shape)}")


def _add_metadata(w: gguf.GGUFWriter, c: ModelConfig, quant: str, vocab: GGUFVocab, metadata: dict | None) -> None:
    extra = {(k if "." in k else f"general.{k}"): v for k, v in (metadata or {}).items()}
    w.add_name(str(extra.pop("general.name", "kiln")))
    w.add_file_type(FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.depth)
    w.add_feed_forward_length(c.ffn_hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    scaling = getattr(c, "rope_scaling", None)
    if scaling and scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling {scaling} cannot be written to GGUF; kiln writes llama3 scaling only")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "padding": w.add_pad_token_id,
              "unknown": w.add_unk_token_id, "eot": w.add_eot_token_id}
    for k, i in vocab.special_ids.items():
        adders[k](i)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    for k, v in extra.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_int64(k, v)
        elif isinstance(v, float):
            w.add_float64(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            raise ValueError(f"metadata {k}={v!r}: values must be str, int, float or bool")


def _quantize_k(src: Path, dst: Path, kind: str) -> None:
    try:
        r = subprocess.run([QUANTIZE_TOOL, str(src), str(dst), kind], capture_output=True, text=True,
                           timeout=QUANTIZE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{QUANTIZE_TOOL} did not finish in {QUANTIZE_TIMEOUT_S} s") from None
    if r.returncode != 0:
        raise RuntimeError(f"{QUANTIZE_TOOL} {src.name} {kind} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def summarize(path: Path, quant: str, pre: str | None = None, plan: list[TensorPlan] | None = None) -> dict:
    """File bytes, tensor bytes, bits per weight and a count of tensor types of a written GGUF file: from the
    plan it was written by, else read back (llama-quantize's output)."""
    if plan is not None:
        shapes_types = [(p.shape, p.qtype) for p in plan]
    else:
        shapes_types = [(tuple(int(n) for n in reversed(t.shape)), t.tensor_type) for t in gguf.GGUFReader(path).tensors]
    n_weights = sum(math.prod(s) for s, _ in shapes_types)
    data = sum(tensor_bytes(s, q) for s, q in shapes_types)
    out = {"path": str(path), "quant": quant, "file_bytes": path.stat().st_size, "tensor_bytes": data,
           "n_weights": n_weights, "bits_per_weight": round(8 * data / n_weights, 4),
           "tensor_types": dict(Counter(q.name for _, q in shapes_types))}
    if pre is not None:
        out["tokenizer_pre"] = pre
    if plan is not None:
        out["fallbacks"] = [f"{p.name}: {p.wanted.name} -> {p.qtype.name} (row of {p.shape[-1]})"
                            for p in plan if p.qtype != p.wanted]
    return out
