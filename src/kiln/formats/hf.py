"""Hugging Face layout: config.json for our Transformer, and safetensors weights under HF names.

Our parameter names already are HF Llama's, so the weights need no renaming. The
one wrinkle is weight tying: `lm_head.weight` and `model.embed_tokens.weight` are
one tensor, which safetensors refuses to store twice. Like HF, we store only
`model.embed_tokens.weight` and restore the tie on load.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.config import ModelConfig

TIED_KEY = "lm_head.weight"
"""Dropped from the saved weights when embeddings are tied (HF does the same)."""


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class a model of this config exports as: Qwen3 (QK-norm), Qwen2 (q/k/v biases) or Llama."""
    return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", bos_token_id: int | None = None,
                 eos_token_id: int | None = None) -> dict:
    """A `config.json` dict that `transformers` loads as LlamaConfig (Qwen3Config with qk_norm, Qwen2Config with
    qkv_bias).

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
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})},
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": c.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if c.rope_scaling:
        hf["rope_scaling"] = dict(c.rope_scaling)
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
    elif c.qkv_bias:
        # Qwen2 is Llama plus biases on q/k/v (fixed in its code, not a config field), same parameter names.
        del hf["attention_bias"], hf["mlp_bias"]   # not Qwen2 fields (attention_bias would add one to o_proj)
        hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
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


@contextmanager
def open_safetensors(path: str | Path, device: str = "cpu"):
    """safetensors' `safe_open`, with a file it cannot read (cut short, damaged) named in a ValueError."""
    try:
        f = safe_open(str(path), framework="pt", device=device)
    except Exception as e:   # safetensors raises its own SafetensorError, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); truncated or damaged, "
                         "as by an interrupted download or copy?") from None
    with f:
        yield f


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `model.safetensors` in HF layout (loads in transformers as is)."""
    save_state_dict(model.state_dict(), model.cfg, path, metadata)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a file written by `save_weights` (or an HF Llama/Qwen3 export) into `model`, in place.

    Missing keys other than the tied head, and any unexpected key, raise ValueError naming them.
    """
    device = next(model.parameters()).device
    with open_safetensors(path, str(device)) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if model.cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)  # some exporters write the tied copy anyway; the embedding is the source
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {TIED_KEY} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model config: missing {sorted(set(missing) - allowed_missing)}, "
                         f"unexpected {sorted(unexpected)}")


# ---------------------------------------------------------------- reading Hugging Face folders

HF_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}
"""model_type -> architecture of the configs kiln imports (SmolLM2 and Llama 3 are `llama`, Qwen2.5 `qwen2`)."""
INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some old exports saved; kiln recomputes them


def from_hf_config(hf: dict, where: str | Path = "config.json") -> dict:
    """ModelConfig field values from a Hugging Face `config.json` of a Llama, Mistral-layout, Qwen2 or Qwen3 model.
    A feature kiln's model lacks (biases other than Qwen2's on q/k/v, sliding-window attention, another
    activation) is an error, never a silently different model."""
    model_type = hf.get("model_type")
    arch = (hf.get("architectures") or [None])[0]
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{where}: architecture {arch or '?'} (model_type {model_type!r}) is not supported; kiln "
                         f"imports {', '.join(HF_FAMILIES.values())} and models built on them (SmolLM2, Llama 3)")
    unsupported = [f"{k}={hf[k]!r}" for k, ok in (("attention_bias", False), ("mlp_bias", False)) if hf.get(k, ok) != ok]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r}")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window is not None and window < hf.get("max_position_embeddings", 0):
        unsupported.append(f"sliding_window={window}")
    if unsupported:
        raise ValueError(f"{where}: {', '.join(unsupported)} is not supported by kiln's model (a {model_type} "
                         "with no biases, SiLU and full causal attention)")
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    try:
        n_heads = hf["num_attention_heads"]
        return dict(depth=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=n_heads,
                    head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                    n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_hidden=hf["intermediate_size"],
                    vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                    rope_theta=float(hf.get("rope_theta", params.get("rope_theta", 10000.0))),
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=model_type == "qwen3",
                    qkv_bias=model_type == "qwen2",
                    init_std=float(hf.get("initializer_range", 0.02)), rope_scaling=scaling)
    except KeyError as e:
        raise ValueError(f"{where}: no {e.args[0]!r}; not a complete {model_type} config") from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: `model.safetensors`, or the shards its index names."""
    index = folder / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (f"; {', '.join(pickled)} is a pickle, which kiln never loads: save it as safetensors first "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))") if pickled else ""
    raise FileNotFoundError(f"{folder}: no model.safetensors or {INDEX}{hint}")


def iter_weights(folder: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in a folder, one tensor in memory at a time, cast to `dtype`."""
    for path in weight_files(folder):
        with open_safetensors(path) as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                t = f.get_tensor(name)
                yield name, t if dtype is None or not t.is_floating_point() else t.to(dtype)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape for `cfg`, from a meta-device model (nothing allocated)."""
    from kiln.model.llama import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in storable(model.state_dict(), model.cfg).items()}


def check_weights(names_shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str | Path) -> None:
    """Raise naming every tensor that is missing, unexpected or of the wrong shape for `cfg`."""
    want = expected_shapes(cfg)
    got = dict(names_shapes)
    if cfg.tie_embeddings:
        got.pop(TIED_KEY, None)
    wrong = [f"{k}: file {tuple(got[k])} vs config {want[k]}" for k in want if k in got and tuple(got[k]) != want[k]]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if wrong or missing or extra:
        parts = ([f"shape mismatch: {'; '.join(wrong)}"] if wrong else []) + \
            ([f"missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else []) + \
            ([f"unexpected: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}"] if extra else [])
        raise ValueError(f"{where}: the weights do not fit the model config: {' | '.join(parts)}")


# ---------------------------------------------------------------- sharded safetensors

def save_sharded(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + the index once the weights
    pass `max_shard_bytes` (the layout transformers writes and reads). Tensors arrive one at a time; at most a
    shard is held. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[Path] = []
    size = total = 0

    def flush():
        path = folder / f".shard-{len(written):05d}.tmp"
        save_file(shards[-1], str(path), metadata={"format": "pt", **(metadata or {})})
        written.append(path)
        shards[-1] = {}

    for name, t in tensors:
        t = t.detach().contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size, total = size + n, total + n
    flush()
    if len(written) == 1:
        final = [folder / "model.safetensors"]
    else:
        final = [folder / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for tmp, path in zip(written, final):
        tmp.replace(path)
        with open_safetensors(path) as f:
            weight_map.update({k: path.name for k in f.keys()})
    if len(final) > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n", encoding="utf-8")
    return final


def load_state(folder: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of a folder (single file or shards), cast to `dtype`, on `device`."""
    return {k: v.to(device) for k, v in iter_weights(folder, dtype)}


def model_from_state(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                     where: str | Path = "weights") -> torch.nn.Module:
    """A Transformer whose parameters ARE the given tensors (built on the meta device, nothing initialised
    or copied twice), rope tables computed on `device`."""
    from kiln.model.llama import Transformer
    sd = dict(state_dict)
    if cfg.tie_embeddings:
        sd.pop(TIED_KEY, None)
    check_weights({k: tuple(v.shape) for k, v in sd.items()}, cfg, where)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=False, assign=True)
    model.tie_weights()
    model.rope_cos = torch.empty(model.rope_cos.shape, device=device)
    model.rope_sin = torch.empty(model.rope_sin.shape, device=device)
    model.init_rope()
    return model
