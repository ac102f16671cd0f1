"""LoRA adapters in the PEFT format, and merging adapters into base weights.

    adapter/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...
    adapter/adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r, in), ...

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)` loads what `write_adapter`
writes; `read_adapter` reads what PEFT's `save_pretrained` writes. Inside kiln an adapter tensor is named as
in a LoRA run's checkpoint (kiln/train/lora.py): the base weight's module plus `.lora_A.weight` /
`.lora_B.weight`, so PEFT's name is `base_model.model.` + kiln's.

The update of a linear is W' = W + (alpha / r) B A. PEFT's rsLoRA variant scales by alpha / sqrt(r); kiln has
one convention, so `read_adapter` rewrites such a config to the alpha giving the same scale. Other PEFT
options that change the arithmetic (DoRA, biases, per-module ranks, extra trained modules) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kiln.config import LORA_TARGETS, LoRAConfig
from kiln.config.rundir import write_json_atomic
from kiln.formats.hf import open_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."     # PeftModel -> LoraModel -> the transformers model
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KILN_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def is_adapter_key(name: str) -> bool:
    return name.endswith((LORA_A, LORA_B))


def split_adapter(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapter tensors) of a LoRA model's state dict."""
    base = {k: v for k, v in state_dict.items() if not is_adapter_key(k)}
    return base, {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def adapter_targets(tensors: dict[str, torch.Tensor], where: str | Path = "adapter") -> list[str]:
    """The linear names (q_proj, ...) that carry adapters, in LORA_TARGETS order; every key is checked."""
    found = set()
    for key in tensors:
        m = _KILN_KEY.match(key)
        if m is None or _GROUP.get(m.group(3)) != m.group(2):
            raise ValueError(f"{where}: {key!r} is not an adapter of a kiln linear layer (expected "
                             "model.layers.N.self_attn.q_proj.lora_A.weight and the like, targets "
                             f"{', '.join(LORA_TARGETS)})")
        found.add(m.group(3))
    return [t for t in LORA_TARGETS if t in found]


def check_pairs(tensors: dict[str, torch.Tensor], rank: int | None, where: str | Path = "adapter") -> None:
    """Every lora_A has its lora_B and their shapes fit one another: A (r, in), B (out, r), r = `rank`."""
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            continue
        b_key = key[: -len(LORA_A)] + LORA_B
        b = tensors.get(b_key)
        if b is None:
            raise ValueError(f"{where}: {key} has no {b_key}")
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0] or (rank is not None and a.shape[0] != rank):
            raise ValueError(f"{where}: {key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} do not make a rank-"
                             f"{rank if rank is not None else 'r'} update (A is (r, in), B is (out, r))")
    orphans = [k for k in tensors if k.endswith(LORA_B) and k[: -len(LORA_B)] + LORA_A not in tensors]
    if orphans:
        raise ValueError(f"{where}: {orphans[0]} has no matching lora_A")


# ---------------------------------------------------------------- writing

def write_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: LoRAConfig,
                  base_model_name_or_path: str) -> Path:
    """Write `tensors` (kiln names, from kiln.train.lora.lora_state_dict) as a PEFT LoRA adapter in `out_dir`
    (created; files replaced atomically). `base_model_name_or_path` is recorded for PEFT's AutoPeftModel*."""
    out = Path(out_dir)
    where = f"adapter for {out}"
    if not tensors:
        raise ValueError(f"{where}: no adapter tensors to write (was LoRA applied?)")
    targets = adapter_targets(tensors, where)
    if set(targets) != set(cfg.targets):
        raise ValueError(f"{where}: the tensors adapt {targets} but lora.targets is {list(cfg.targets)}")
    check_pairs(tensors, cfg.rank, where)
    out.mkdir(parents=True, exist_ok=True)
    weights = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp-{os.getpid()}"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / ADAPTER_WEIGHTS)
    write_json_atomic(out / ADAPTER_CONFIG, peft_config(cfg, targets, base_model_name_or_path))
    return out


def peft_config(cfg: LoRAConfig, targets: list[str], base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json: the keys PEFT has read since 0.9 (newer ones left to PEFT's defaults, so older
    PEFT versions, which reject keys they do not know, load it too)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": cfg.rank,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }


# ---------------------------------------------------------------- reading

def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors under kiln's names, adapter_config.json as a dict) of a PEFT LoRA adapter directory.

    The config comes back normalised to kiln's scale convention: an rsLoRA adapter's `lora_alpha` becomes
    alpha * sqrt(r) (its update is (alpha / sqrt(r)) B A), `use_rslora` false, the original kept under
    `rslora_lora_alpha`. Options kiln cannot reproduce raise ValueError naming the key.
    """
    folder = Path(adapter_dir)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory (a PEFT adapter is a directory with "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if not cfg_path.is_file():
        have = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG}, so not a PEFT adapter directory (it holds "
                                f"{', '.join(have[:8]) + (' ...' if len(have) > 8 else '') if have else 'nothing'})")
    if not w_path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}" + (
            "; adapter_model.bin is a pickle, which kiln never loads: re-save the adapter with "
            "save_pretrained(dir, safe_serialization=True)" if pickled else ""))
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config = check_config(config, cfg_path)
    tensors: dict[str, torch.Tensor] = {}
    with open_safetensors(w_path) as f:
        for key in f.keys():
            tensors[kiln_name(key, w_path)] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"{w_path}: holds no tensors")
    adapter_targets(tensors, w_path)
    check_pairs(tensors, config["r"], w_path)
    return tensors, config


def check_config(config: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """Refuse what kiln's LoRA cannot reproduce; a copy normalised to the alpha / r scale (see read_adapter)."""
    config = dict(config)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {config['peft_type']!r}; kiln reads LoRA adapters only")
    if not isinstance(config.get("r"), int) or config["r"] <= 0 or "lora_alpha" not in config:
        raise ValueError(f"{where}: needs an integer r > 0 and lora_alpha")
    refused = [(k, ok) for k, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                                     ("lora_bias", False)) if config.get(k, ok) != ok]
    refused += [(k, "empty") for k in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                                       "target_parameters", "trainable_token_indices") if config.get(k)]
    if refused:
        raise ValueError(f"{where}: {', '.join(f'{k}={config[k]!r}' for k, _ in refused)} is not supported "
                         f"(kiln applies plain LoRA: {', '.join(f'{k}={ok}' for k, ok in refused)}); merge this "
                         "adapter with PEFT's merge_and_unload() and import the merged model instead")
    if config.get("use_rslora"):
        config["rslora_lora_alpha"] = config["lora_alpha"]
        config["lora_alpha"] = config["lora_alpha"] * math.sqrt(config["r"])
        config["use_rslora"] = False
    return config


def kiln_name(peft_key: str, where: str | Path = "adapter") -> str:
    """`base_model.model.model.layers.0....lora_A.weight` -> `model.layers.0....lora_A.weight`."""
    if not peft_key.startswith(PEFT_PREFIX):
        raise ValueError(f"{where}: tensor {peft_key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter file")
    key = peft_key[len(PEFT_PREFIX):]
    key = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", key)   # an adapter-name infix
    if key.startswith("layers."):   # an adapter of the bare LlamaModel (no ForCausalLM around it)
        key = "model." + key
    return key


def lora_config_from(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoRAConfig:
    """kiln's LoRAConfig of an adapter that read_adapter returned (for training on, or applying it)."""
    return LoRAConfig(enabled=True, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      dropout=float(config.get("lora_dropout") or 0.0), targets=adapter_targets(tensors))


# ---------------------------------------------------------------- merging

def iter_merged(weights: Iterable[tuple[str, torch.Tensor]], adapters: dict[str, torch.Tensor], alpha: float,
                rank: int, where: str | Path = "weights") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `weights` with each adapted `X.weight` replaced by W + (alpha / rank) B A, computed in
    fp32 and stored in W's dtype; adapter keys met in `weights` are dropped. One tensor at a time (for
    streaming exports). Raises at the end if an adapter found no base weight."""
    check_pairs(adapters, rank, where)
    scale = alpha / rank
    pending = {k[: -len(LORA_A)] for k in adapters if k.endswith(LORA_A)}
    for name, w in weights:
        if is_adapter_key(name):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in pending:
            a, b = adapters[module + LORA_A], adapters[module + LORA_B]
            if w.shape != (b.shape[0], a.shape[1]):
                raise ValueError(f"{where}: {name} {tuple(w.shape)} does not fit its adapter: lora_B "
                                 f"{tuple(b.shape)} @ lora_A {tuple(a.shape)}")
            delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scale
            w = (w.float() + delta).to(w.dtype)
            pending.discard(module)
        yield name, w
    if pending:
        raise ValueError(f"{where}: adapters for {', '.join(sorted(pending)[:4])} have no base weight "
                         f"{next(iter(sorted(pending)))}.weight (an adapter of another model?)")


def merge_state(state_dict: dict[str, torch.Tensor], adapter_tensors: dict[str, torch.Tensor], alpha: float,
                rank: int, where: str | Path = "weights") -> dict[str, torch.Tensor]:
    """A new state dict: the base weights of `state_dict` with the adapters merged (see iter_merged) and no
    adapter keys left. Unadapted tensors are the same objects (not copied)."""
    return dict(iter_merged(state_dict.items(), adapter_tensors, alpha, rank, where))


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Merge a PEFT LoRA adapter directory (read_adapter) into `model`'s weights in place, and return its
    LoRAConfig. An adapter of another model (a weight it has no base for, or a shape that does not fit) is a
    ValueError naming the tensor; the model is then unchanged."""
    tensors, config = read_adapter(adapter_dir)
    state = model.state_dict()
    merged = merge_state(state, tensors, config["lora_alpha"], config["r"], where=adapter_dir)
    with torch.no_grad():
        for name, t in merged.items():
            if t is not state[name]:
                state[name].copy_(t)
    return lora_config_from(config, tensors)
