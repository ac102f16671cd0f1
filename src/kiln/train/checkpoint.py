"""Exact-state checkpoints, written atomically.

    checkpoints/step_0000600/
      model.safetensors   weights under Hugging Face Llama names (lm_head.weight left out when tied)
      optimizer.pt        optimizer.state_dict(): tensors and numbers only, read back with weights_only=True
      rng.pt              torch CPU (and CUDA) generator states, weights_only as well
      state.json          step, loader position, Python and NumPy RNG states, counters
      config.yaml         the resolved config the run was made with
      COMPLETE            written last: a directory without it is never loaded

The directory is assembled under `.tmp-step_N-<pid>`, every file fsynced, then
renamed into place; a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from kiln.config import Config, ModelConfig, from_dict
from kiln.model.hf import load_weights, save_weights
from kiln.rundir import fsync_dir, write_text_atomic

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], config: Config, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_torch_rng(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, **_host_rng()}), encoding="utf-8")
    (tmp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync_file(f)
    write_text_atomic(tmp / COMPLETE, f"step {step}\n")
    fsync_dir(tmp)
    if final.exists():  # an older, incomplete copy of this same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove stale temp dirs of crashed writers."""
    for d in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-step_*"):
        pid = d.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device) -> dict[str, Any]:
    """Restore weights, optimizer and every RNG; return state.json (step, loader position, ...)."""
    if not (ckpt / COMPLETE).exists():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    load_weights(model, ckpt / "model.safetensors")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    _set_torch_rng(torch.load(ckpt / "rng.pt", weights_only=True))
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    _set_host_rng(state)
    return state


def checkpoint_config(ckpt: Path) -> Config:
    data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    return from_dict(Config, data)


def load_model(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """A model ready for inference from a checkpoint directory."""
    from kiln.model.llama import Transformer
    cfg = checkpoint_config(ckpt)
    model = Transformer(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    return model.to(device).eval(), cfg


def resolve_checkpoint(run_checkpoints: Path, spec: str) -> Path:
    """`latest` or a path to a checkpoint directory."""
    if spec == "latest":
        ckpt = latest_checkpoint(run_checkpoints)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_checkpoints}; run `kiln pretrain` first")
        return ckpt
    ckpt = Path(spec)
    if not (ckpt / COMPLETE).exists():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint directory (no {COMPLETE} marker)")
    return ckpt


def model_config_of(ckpt: Path) -> ModelConfig:
    return checkpoint_config(ckpt).model


def _torch_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_torch_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _host_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_rng": [version, list(internal), gauss],
            "numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached]}


def _set_host_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
