"""DeepSpeed ZeRO as a third data-parallel mode, next to DDP and FSDP2 (an optional extra).

    pip install 'llmkiln[deepspeed]'
    torchrun --nproc_per_node=N -m kiln pretrain RECIPE --train.parallel deepspeed --train.zero_stage 2

ZeRO-1 partitions the AdamW state over the ranks, ZeRO-2 the gradients too, ZeRO-3 the weights too.
kiln keeps everything that decides *what* is trained and hands DeepSpeed only *how* it is distributed:

- kiln builds the model and its AdamW (parameter groups, betas, eps, weight decay: kiln/train/optim.py)
  and `deepspeed.initialize` wraps both; the learning rate is kiln's `lr_at`, written into the engine's
  optimizer param groups before every step exactly as for the other modes (no DeepSpeed scheduler).
- Gradient accumulation is the engine's: `engine.backward(loss)` scales by 1/accum and `engine.step()`
  after every micro-batch updates only at the accumulation boundary. ZeRO-1 reduces once, at the boundary;
  ZeRO-2/3 reduce-scatter every micro-batch into their gradient shard (that is how they avoid holding
  full gradients; nothing is reduced twice). Clipping (`gradient_clipping`) happens inside the engine
  on the global norm, which `train_step` returns like the plain path does.
- Precision: fp32, or DeepSpeed's bf16 mode (bf16 weights, gradients and communication; fp32 master
  weights and Adam state inside the ZeRO optimizer). That is not kiln's none/ddp recipe (autocast over
  fp32 weights, fp32 gradients): it is DeepSpeed's, as FSDP's MixedPrecisionPolicy is FSDP's. For fp32
  gradient accumulation add `"data_types": {"grad_accum_dtype": "fp32"}` to the DeepSpeed JSON.
- Non-finite steps. DeepSpeed decides, on the global gradient norm, and skips the update itself (the
  engine logs it as skipped; `get_global_grad_norm()` is then inf, which kiln counts as a skipped step).
  fp32 and ZeRO-3 always skip a non-finite step, so `skip_nonfinite=false` only changes bf16 ZeRO-1/2,
  through `bf16.check_grad_overflow`. A NaN *loss* with finite gradients cannot happen (the NaN reaches
  the gradients), so the rule is the one kiln applies under torchrun.

The DeepSpeed JSON (`train.deepspeed_config`) is merged into kiln's: the keys in `owned_config` are
kiln's and always win, but a JSON value for one of them must equal kiln's (or be "auto", the Hugging
Face convention) -- a different value is refused with the key named, never silently overridden.
`optimizer` and `scheduler` sections are refused (kiln builds the optimizer and drives the LR). Every
other key (`zero_optimization.*` tuning and offload, `communication_data_type`, `data_types`, ...) is
the JSON's, passed through unchanged.

Checkpoints: `engine.save_checkpoint` writes the sharded ZeRO state (one optimizer file per rank; with
ZeRO-3 one weights file per rank) into `deepspeed/` of kiln's atomic checkpoint directory; rank 0 adds
the consolidated fp32 weights as model.safetensors (gathered master weights, so eval/generate/export
never need DeepSpeed). A resume on another rank count or another ZeRO stage goes through DeepSpeed's
universal checkpoint: rank 0 converts `deepspeed/` (ds_to_universal) into a temporary directory beside
the checkpoints, every rank loads it, the temporary copy is deleted. DeepSpeed's files are pickles that
it loads with `torch.load(weights_only=False)`: resume only from checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.config import ConfigError
from kiln.config.deepspeed import deepspeed_config
from kiln.train.distributed import Dist, barrier, broadcast_object

TAG = "state"             # the one DeepSpeed checkpoint tag inside a kiln step directory
LAYOUT = "layout.json"    # beside it: the rank count and ZeRO stage that wrote it

def require() -> None:
    """Import DeepSpeed, or stop with the command that installs it."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError("train.parallel=deepspeed needs DeepSpeed, which is not installed in this environment: "
                          "pip install 'llmkiln[deepspeed]'") from e


def select_accelerator(device: torch.device) -> None:
    """DeepSpeed picks its accelerator on first use (CUDA when it sees one); make it the device kiln trains on.
    Call before importing deepspeed. On CPU its communication is torch's gloo."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")


# ---------------------------------------------------------------- engine

def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train, micro_batch: int, accum: int,
               world_size: int, bf16: bool):
    """Wrap kiln's model and AdamW in a DeepSpeed engine. Returns (engine, the engine's optimizer):
    set the LR on the latter's param_groups; `model` stays the Transformer (sharded in place with ZeRO-3)."""
    import deepspeed
    config = deepspeed_config(train, micro_batch, accum, world_size, bf16)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    assert engine.gradient_accumulation_steps() == accum
    return engine, ds_optimizer


def is_engine(model: torch.nn.Module) -> bool:
    """`model` is a DeepSpeed engine (without importing deepspeed where nothing else did)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


# ---------------------------------------------------------------- checkpoints

def save(engine, directory: Path, step: int, d: Dist) -> None:
    """Every rank: DeepSpeed's sharded state into `directory`/deepspeed; rank 0 also writes the
    consolidated fp32 weights (gathered to its CPU) as `directory`/model.safetensors."""
    import deepspeed
    from kiln.formats.hf import save_state_dict
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    ds_dir = directory / "deepspeed"
    # The universal-checkpoint marker lets ds_to_universal convert it for a resume on other ranks.
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(ds_dir), tag=TAG, client_state=info, save_latest=False)
    full = consolidated_state_dict(engine, d.is_main)
    if d.is_main:
        save_state_dict(full, engine.module.cfg, directory / "model.safetensors",
                        metadata={"format": "pt", "step": str(step)})
        layout = {"world_size": d.world_size, "zero_stage": engine.zero_optimization_stage(),
                  "deepspeed": deepspeed.__version__}
        (ds_dir / LAYOUT).write_text(json.dumps(layout), encoding="utf-8")
    barrier(d)   # every rank's shard is on disk before rank 0 renames the directory


def consolidated_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor]:
    """The fp32 master weights under HF names, complete on rank 0 (a collective: every rank calls it).
    Buffers are left out: the model's are all non-persistent (RoPE tables)."""
    from deepspeed.utils import safe_get_full_fp32_param
    out: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    for name, p in engine.module.named_parameters(remove_duplicate=False):
        if id(p) in names:          # a tied weight: the same tensor under a second name
            if is_main:
                out[name] = out[names[id(p)]]
            continue
        names[id(p)] = name
        full = safe_get_full_fp32_param(p)   # ZeRO-1/2: all-reduce of fragments; ZeRO-3: all-gather
        if is_main:
            out[name] = full.detach().float().cpu().contiguous()
    return out


def load(engine, ckpt: Path, d: Dist) -> None:
    """Restore the engine (weights, optimizer, DeepSpeed's counters) from kiln checkpoint `ckpt`. Same
    rank count and stage: the native shards. Otherwise: a universal checkpoint converted on the fly."""
    ds_dir = ckpt / "deepspeed"
    layout = read_layout(ckpt)
    stage = engine.zero_optimization_stage()
    if layout["world_size"] == d.world_size and layout["zero_stage"] == stage:
        _load(engine, ds_dir, universal=False)
        return
    check_stage(ckpt, stage)
    # Named like kiln's checkpoint temp dirs, so prune() removes it if this process dies mid-way.
    tmp = ckpt.parent / f".tmp-{ckpt.name}-universal-{broadcast_object(os.getpid(), d)}"
    try:
        if d.is_main:
            print(f"{ckpt.name} was written by {layout['world_size']} rank(s) at ZeRO-{layout['zero_stage']}, this "
                  f"run has {d.world_size} at ZeRO-{stage}: converting it to a DeepSpeed universal checkpoint",
                  flush=True)
            _to_universal(ds_dir / TAG, tmp / TAG)
        barrier(d)
        _load(engine, tmp, universal=True)
    finally:
        barrier(d)
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def read_layout(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "deepspeed" / LAYOUT).read_text(encoding="utf-8"))


def check_stage(ckpt: Path, stage: int) -> None:
    """Refuse what DeepSpeed's universal checkpoint cannot do: move between ZeRO-3 and ZeRO-1/2. (Tried
    with 0.19.8: a ZeRO-3 conversion holds per-rank weight files that a ZeRO-1/2 engine does not look
    for, and the other way round; the load stops on an assertion.)"""
    saved = read_layout(ckpt)["zero_stage"]
    if (saved == 3) != (stage == 3):
        raise ConfigError(f"cannot resume {ckpt} (ZeRO-{saved}) at train.zero_stage={stage}: DeepSpeed's universal "
                          "checkpoint does not cross between ZeRO-3 and ZeRO-1/2; resume with --train.zero_stage "
                          f"{saved}{' (or 1)' if saved == 2 else ' (or 2)' if saved == 1 else ''} at any rank count")


def _load(engine, ds_dir: Path, universal: bool) -> None:
    # The universal switch is read at load time only (DeepSpeedConfig.load_universal_checkpoint), so one
    # engine can load a native checkpoint after a universal one (a spike rollback after a resume).
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(str(ds_dir), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ds_dir}/{TAG}")
    if universal:
        # Two bugs of DeepSpeed 0.19.8's ZeRO-3 universal load, both silent: every param group gets the first
        # group's hyperparameters (weight decay on the norms and embeddings) -- they are kiln's config anyway,
        # put them back -- and every group's Adam state gets one shared `step` tensor, which AdamW then
        # increments once per group per step (wrong bias correction from the second group on).
        for group, hyper in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(hyper)
        for state in engine.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _to_universal(src: Path, dst: Path) -> None:
    """ds_to_universal in this process (one worker: no process pool inside a torchrun rank)."""
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)

