"""The weights-and-config side of a kiln checkpoint directory: what every stage that reads a model needs.

    checkpoints/step_0000600/       model.safetensors (HF names), config.yaml, state.json, COMPLETE, ...
    checkpoints/best/step_0000400/  the lowest validation loss so far (train.keep_best)

Training state (optimizer, RNGs, loader position) is written and read by kiln/train/checkpoint.py; eval,
infer, serve and export need only this: find a complete checkpoint, read its config, load its weights.
A directory without COMPLETE (a write cut short) is never listed or loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.config import Config, ModelConfig, from_dict
from kiln.formats.hf import load_state, model_from_state

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
    the loaded tensors themselves: in `dtype` (default: as stored), on `device`, no random init first."""
    cfg = checkpoint_config(ckpt)
    model = model_from_state(cfg.model, load_state(ckpt, dtype, str(device)), device, ckpt)
    return model.eval(), cfg


def resolve_checkpoint(run_checkpoints: Path, spec: str) -> Path:
    """`latest`, `best` or a path to a checkpoint directory."""
    if spec == "latest":
        ckpt = latest_checkpoint(run_checkpoints)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_checkpoints}; run `kiln pretrain` first")
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
