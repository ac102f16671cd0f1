"""Exact-state checkpoints, written atomically.

    checkpoints/step_0000600/
      model.safetensors   weights under Hugging Face Llama names (lm_head.weight left out when tied); with
                          parallel=fsdp/deepspeed the consolidated (gathered) fp32 copy, so eval/generate/export
                          need neither DCP nor DeepSpeed
      optimizer.pt        parallel=none/ddp: optimizer.state_dict(), read back with weights_only=True
      dcp/                parallel=fsdp: model + optimizer through torch.distributed.checkpoint, one shard file
                          per rank plus .metadata; loads at any rank count (DCP reshards), also into none/ddp
      deepspeed/          parallel=deepspeed: engine.save_checkpoint's ZeRO shards (tag `state`) and layout.json
                          (rank count, stage); loads into deepspeed only, at another rank count or stage through
                          a universal checkpoint (kiln/train/zero.py)
      rng.pt              torch CPU (and CUDA) generator states of rank 0, weights_only as well
      state.json          step, loader position, data fingerprint, Python and NumPy RNG states, counters
      config.yaml         the resolved config the run was made with
      MILESTONE           present on milestone checkpoints (train.milestone_every): never pruned
      COMPLETE            written last: a directory without it is never loaded

checkpoints/best/step_N (train.keep_best) has the same layout plus `val_loss` in state.json: the checkpoint
with the lowest validation loss so far, its files hard links to checkpoints/step_N's when that step has one.

The directory is assembled under `.tmp-step_N-<pid of rank 0>`, every file fsynced, then renamed into
place; a crash at any moment leaves the previous checkpoint intact. Under torchrun every rank takes
part (DCP writes are collective) and rank 0 alone writes the single files and renames.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
import yaml
from kiln.config import Config, ConfigError
from kiln.formats.checkpoint import (BEST, COMPLETE, MILESTONE, checkpoint_config, complete_checkpoints,
                                    latest_before, latest_checkpoint, read_state, step_dir, step_of)
from kiln.formats.hf import load_weights, save_state_dict, save_weights
from kiln.config.rundir import fsync_dir, write_text_atomic
from kiln.train import zero
from kiln.train.distributed import Dist, barrier, broadcast_object

def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], config: Config, keep: int, d: Dist = Dist(),
                    milestone: bool = False) -> Path:
    """Write checkpoint `step`; under torchrun every rank must call this (rank 0 writes the single files).

    `model` is the Transformer (for fsdp: the sharded one, for ddp: the unwrapped one), or for deepspeed the
    engine (which holds the sharded optimizer)."""
    final = step_dir(root, step)
    tmp = None
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = broadcast_object(tmp, d)
    if d.parallel == "fsdp":
        _save_sharded(tmp, step, model, optimizer, d)
    elif d.parallel == "deepspeed":
        zero.save(model, tmp, step, d)
    elif d.is_main:
        save_weights(model, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if d.is_main:
        torch.save(_torch_rng(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, **_host_rng()}), encoding="utf-8")
        (tmp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
        if milestone:
            (tmp / MILESTONE).write_text(f"step {step}\n", encoding="utf-8")
        _publish(tmp, final, step, keep)
    barrier(d)
    return final


def _publish(tmp: Path, final: Path, step: int, keep: int) -> None:
    """fsync everything in `tmp`, mark it COMPLETE, rename it to `final` (replacing an older copy of the
    same step) and prune its root to `keep` checkpoints."""
    root = final.parent
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    for sub in sorted(tmp.rglob("*"), reverse=True):   # dcp/, deepspeed/state/, deepspeed/
        if sub.is_dir():
            fsync_dir(sub)
    write_text_atomic(tmp / COMPLETE, f"step {step}\n")
    fsync_dir(tmp)
    old = None
    if final.exists():  # this step again (an incomplete copy, or a re-save after a rollback): set it aside
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(root, keep)


def link_checkpoint(src: Path, root: Path, state_update: dict[str, Any], keep: int, d: Dist = Dist()) -> Path:
    """The complete checkpoint `src` again under `root` (same step name), its files hard-linked rather than
    rewritten (copied where the filesystem has no hard links), with `state_update` merged into its
    state.json. Checkpoints are never modified in place, so the two copies cannot drift apart; pruning
    either leaves the other whole. Same atomic publish as save_checkpoint."""
    final = root / src.name
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{src.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(COMPLETE, MILESTONE, "state.json"))
        state = json.loads((src / "state.json").read_text(encoding="utf-8"))
        (tmp / "state.json").write_text(json.dumps({**state, **state_update}), encoding="utf-8")
        _publish(tmp, final, step_of(src), keep)
    barrier(d)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _save_sharded(tmp: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    """FSDP: each rank writes its shards of model + optimizer through DCP; rank 0 also writes the
    consolidated HF-named weights (gathered to its CPU: the full model must fit in host memory)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        save_state_dict(full, model.cfg, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and every milestone; remove stale temp dirs of
    crashed writers."""
    for d in complete_checkpoints(root)[:-keep]:
        if not (d / MILESTONE).exists():
            shutil.rmtree(d, ignore_errors=True)
    for d in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
        pid = d.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(d, ignore_errors=True)


def remove_after(root: Path, step: int) -> list[Path]:
    """Delete complete checkpoints (milestones too) past `step`: after a rollback they belong to a
    trajectory that no longer exists, and a later --resume must not pick them."""
    gone = [d for d in complete_checkpoints(root) if step_of(d) > step]
    for d in gone:
        (d / COMPLETE).unlink()   # first, so a crash mid-delete leaves an ignored directory
        shutil.rmtree(d, ignore_errors=True)
    return gone


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device, d: Dist = Dist()) -> dict[str, Any]:
    """Restore weights, optimizer and every RNG; return state.json (step, loader position, ...).

    A sharded (dcp/) checkpoint loads into any layout at any rank count; a single-file one loads
    into none/ddp directly and into fsdp through a full state dict that set_state_dict shards."""
    if not (ckpt / COMPLETE).exists():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    check_layout(ckpt, d.parallel)
    if d.parallel == "deepspeed":
        zero.load(model, ckpt, d)
    elif (ckpt / "dcp").is_dir():
        _load_sharded(ckpt / "dcp", model, optimizer)
    elif d.parallel == "fsdp":
        _load_single_into_fsdp(ckpt, model, optimizer, device)
    else:
        load_weights(model, ckpt / "model.safetensors")
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    _set_torch_rng(torch.load(ckpt / "rng.pt", weights_only=True))
    state = read_state(ckpt)
    _set_host_rng(state)
    return state


def check_layout(ckpt: Path, parallel: str, zero_stage: int | None = None) -> None:
    """DeepSpeed's sharded state loads into a DeepSpeed engine only (ZeRO-3 into ZeRO-3, ZeRO-1/2 into
    ZeRO-1/2), and only a DeepSpeed checkpoint does."""
    written_by_deepspeed = (ckpt / "deepspeed").is_dir()
    if written_by_deepspeed == (parallel == "deepspeed"):
        if written_by_deepspeed and zero_stage is not None:
            zero.check_stage(ckpt, zero_stage)
        return
    if written_by_deepspeed:
        raise ConfigError(f"cannot resume from {ckpt} with train.parallel={parallel}: it was written by "
                          "train.parallel=deepspeed, whose optimizer state is DeepSpeed's sharded format. Resume "
                          "with --train.parallel deepspeed (any rank count or ZeRO stage), or start a new run "
                          "from its weights (model.safetensors)")
    raise ConfigError(f"cannot resume from {ckpt} with train.parallel=deepspeed: it was written by another "
                      "train.parallel mode, and kiln does not convert optimizer state into DeepSpeed's; resume "
                      "with the mode that wrote it (none, ddp and fsdp load each other's checkpoints)")


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    # get_state_dict/set_state_dict, not optimizer.load_state_dict: a fresh optimizer has no state
    # to load into (get_state_dict creates it), and DCP keys the state by parameter name, not index.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)
    no_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())  # one plain process
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist)
        set_model_state_dict(model, sd["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _load_single_into_fsdp(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                           device: torch.device) -> None:
    """A none/ddp checkpoint into a sharded model: load it into a plain CPU copy on every rank, then
    let set_state_dict shard the full (name-keyed) state. Needs the full model in host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from kiln.model.llama import Transformer
    plain = Transformer(model.cfg)
    load_weights(plain, ckpt / "model.safetensors")
    plain_opt = None
    if optimizer is not None:
        accepted = inspect.signature(type(optimizer)).parameters
        kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "fused"}
        plain_opt = type(optimizer)(_plain_groups(plain, model, optimizer), **kwargs)
        plain_opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    model_sd, optim_sd = get_state_dict(plain, plain_opt or [])
    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, model_sd, options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def _plain_groups(plain: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """`optimizer`'s parameter groups (same order, same hyperparameters) over the plain copy's tensors:
    both models list their parameters in the same order (a tied tensor once)."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    mine = list(plain.parameters())
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [mine[position[id(p)]] for p in g["params"]]}
            for g in optimizer.param_groups]


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


def data_fingerprint(tokens_meta: Path, tokenizer_file: Path) -> dict[str, str]:
    """Hashes that identify the training data and tokenizer: tokens/meta.json without the fields that
    vary between identical runs (timings, paths, shard reuse counts), and tokenizer.json's bytes."""
    meta = json.loads(tokens_meta.read_text(encoding="utf-8"))
    for volatile in ("tokenizer", "seconds", "tokens_per_s", "shards_encoded", "shards_kept"):
        meta.pop(volatile, None)
    return {"tokens": xxhash.xxh3_64_hexdigest(json.dumps(meta, sort_keys=True).encode()),
            "tokenizer": xxhash.xxh3_64_hexdigest(tokenizer_file.read_bytes())}


def check_fingerprint(ckpt: Path, saved: dict[str, str] | None, now: dict[str, str], force: bool) -> None:
    """Refuse to resume onto different data or a different tokenizer unless forced."""
    if saved is None or saved == now:
        return
    what = " and ".join(k for k in now if saved.get(k) != now[k])
    msg = (f"cannot resume from {ckpt}: it was trained on different {what} (data fingerprint "
           f"{saved} now {now}); the tokens or tokenizer of this run changed since. Resume onto the "
           "original data, start a new run (drop --resume or use a new --run_dir), or pass "
           "--train.force_resume true to continue on the new data anyway")
    if not force:
        raise ConfigError(msg)
    print(f"warning: {msg.replace('cannot resume', 'resuming')} (forced)", file=sys.stderr)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
