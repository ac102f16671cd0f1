"""The weights-and-config side of a kiln checkpoint directory: what every stage that reads a model needs.

    checkpoints/step_0000600/       model.safetensors (HF names), config.yaml, state.json, COMPLETE, ...
    checkpoints/best/step_0000400/  the lowest validation loss so far (train.keep_best)

Training state (optimizer, RNGs, loader position) is written and read by kiln/train/checkpoint.py; eval,
infer, serve and export need only this: find a complete checkpoint, read its config, load its weights.
A directory without COMPLETE (a write cut short) is never listed or loaded.

A LoRA run's checkpoint holds the frozen base weights plus the adapters (`...q_proj.lora_A.weight`, ...) and
says their shape in state.json (`"lora": {"rank": r, "alpha": a, ...}`). Everything that reads weights here
gets the merged plain model, W + (alpha / r) B A, so eval, generate, serve and export need no LoRA code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.config import Config, ModelConfig, from_dict
from kiln.formats.hf import iter_weights, load_state, model_from_state, open_safetensors, weight_files
from kiln.formats.peft import is_adapter_key, iter_merged, merge_state, split_adapter

COMPLETE = "COMPLETE"     # written last: a directory without it is never loaded
MILESTONE = "MILESTONE"   # never pruned (train.milestone_every)
BEST = "best"             # checkpoints/best/step_N: the lowest validation loss so far (train.keep_best)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def step_of(ckpt: Path) -> int:
    """The step a checkpoint directory `step_N` holds."""
    m = _STEP_DIR.match(ckpt.name)
    if m is None:
        raise ValueError(f"{ckpt} is not a checkpoint directory (expected a name like step_0000600)")
    return int(m.group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first. Half-written ones (no COMPLETE marker) are ignored."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).exists():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def latest_before(root: Path, step: int) -> Path | None:
    """The newest complete checkpoint with a step < `step`."""
    done = [d for d in complete_checkpoints(root) if step_of(d) < step]
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint, without loading anything."""
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))


def checkpoint_config(ckpt: Path) -> Config:
    data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    return from_dict(Config, data)


def load_model(ckpt: Path, device: torch.device | str, dtype: torch.dtype | None = None
               ) -> tuple[torch.nn.Module, Config]:
    """A model ready for inference from a checkpoint directory (one weights file or shards), its parameters
    the loaded tensors themselves: in `dtype` (default: as stored), on `device`, no random init first.
    A LoRA run's checkpoint loads as the merged plain model."""
    cfg = checkpoint_config(ckpt)
    model = model_from_state(cfg.model, load_merged_state(ckpt, dtype, str(device)), device, ckpt)
    return model.eval(), cfg


def lora_of(ckpt: Path) -> dict[str, Any] | None:
    """state.json's `lora` entry ({"rank": r, "alpha": a, ...}) when the checkpoint's weights hold LoRA
    adapters; None for a plain checkpoint. Only reads file headers."""
    adapters = [n for n in _weight_names(ckpt) if is_adapter_key(n)]
    if not adapters:
        return None
    state = read_state(ckpt) if (ckpt / "state.json").is_file() else {}
    entry = state.get("lora")
    if not isinstance(entry, dict) or not {"rank", "alpha"} <= entry.keys():
        raise ValueError(f"{ckpt}: the weights hold LoRA adapters ({adapters[0]}, ...) but {ckpt / 'state.json'} "
                         'has no "lora": {"rank": r, "alpha": a} entry, so their scale alpha / r is unknown; add '
                         "the rank and alpha the run trained with (its lora.rank and lora.alpha)")
    return entry


def adapter_tensors(ckpt: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors of a checkpoint (kiln names), without reading the base weights."""
    out = {}
    for path in weight_files(ckpt):
        with open_safetensors(path, device) as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if is_adapter_key(k)})
    return out


def load_merged_state(ckpt: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint as a plain model's state dict, in `dtype` (default: as stored). A LoRA
    run's adapters are merged in fp32 from the stored tensors first, then the result is cast."""
    lora = lora_of(ckpt)
    if lora is None:
        return load_state(ckpt, dtype, device)
    base, adapters = split_adapter(load_state(ckpt, None, device))
    merged = merge_state(base, adapters, float(lora["alpha"]), int(lora["rank"]))
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in merged.items()}


def iter_merged_weights(ckpt: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_weights` of a checkpoint, one tensor in memory at a time, with a LoRA run's adapters merged."""
    lora = lora_of(ckpt)
    if lora is None:
        yield from iter_weights(ckpt, dtype)
        return
    merged = iter_merged(iter_weights(ckpt), adapter_tensors(ckpt), float(lora["alpha"]), int(lora["rank"]), ckpt)
    for name, t in merged:
        yield name, t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _weight_names(ckpt: Path) -> list[str]:
    names = []
    for path in weight_files(ckpt):
        with open_safetensors(path) as f:
            names.extend(f.keys())
    return names


def resolve_checkpoint(run_checkpoints: Path, spec: str) -> Path:
    """`latest`, `best` or a path to a checkpoint directory."""
    if spec == "latest":
        ckpt = latest_checkpoint(run_checkpoints)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_checkpoints}: train one (`kiln pretrain`, "
                                    "`kiln sft`) or bring one in (`kiln import SRC --run_dir DIR`) first")
        return ckpt
    if spec == BEST:
        ckpt = latest_checkpoint(run_checkpoints / BEST)
        if ckpt is None:
            raise FileNotFoundError(f"no best checkpoint in {run_checkpoints / BEST}: `kiln pretrain` writes it at "
                                    "each evaluation that improves the validation loss (train.keep_best, on by "
                                    "default); use `latest` or a checkpoint directory")
        return ckpt
    ckpt = Path(spec)
    if not (ckpt / COMPLETE).exists():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint directory (no {COMPLETE} marker)")
    return ckpt


def model_config_of(ckpt: Path) -> ModelConfig:
    return checkpoint_config(ckpt).model
