"""What every post-training stage does around its task: find the base weights, lay out the stage's own run
directory, build the model from those weights (fresh optimizer), apply LoRA from outside, hand it to the
trainer setup, and write the adapter at the end.

A stage's run directory (default `<run_dir>/<stage>`) is a normal kiln run: `config.yaml`, `tokenizer/`
(copied from the base), `checkpoints/step_N/`, `metrics.jsonl`; with LoRA also `adapter/` in the PEFT
format. `kiln eval`, `generate`, `serve`, `export` and the next post-training stage read it as they read
any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import Config, ConfigError, LoRAConfig, derived_lr, dump_yaml, resolve_train
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import BEST, COMPLETE, checkpoint_config, latest_checkpoint
from kiln.tokenizer.loader import IGNORE
from kiln.train import loop
from kiln.train.distributed import Dist, init_distributed, shutdown
from kiln.train.setup import prepare

STAGES = ("sft", "dpo", "grpo")

LORA_LR = 2e-4
"""Default peak learning rate of LoRA adapters (the value PEFT / QLoRA recipes use)."""


@dataclass
class Stage:
    """A post-training stage, set up: the config the loop trains with, where it writes, what it starts from."""

    name: str
    cfg: Config               # the stage's resolved config: base model, the stage's train section, run_dir = out
    section: Any              # cfg.sft / cfg.dpo / cfg.grpo
    base: Path                # the checkpoint whose weights the stage starts from
    rd: RunDir                # the stage's own run directory
    tok: Any                  # kiln.tokenizer.Tokenizer of the base
    d: Dist
    device: torch.device
    say: Any


def trained_positions(targets_BT: np.ndarray) -> torch.Tensor:
    """The flat indices (N,) of a batch's counted targets (not IGNORE): `Transformer.forward`'s `rows_N`, which
    runs the head there only. Found by the loader, so the step has no host sync for them."""
    return torch.from_numpy(np.flatnonzero(targets_BT != IGNORE))


def varying_length(*tensors: torch.Tensor | None) -> None:
    """Mark dim 0 of each given tensor as changing from batch to batch (trained positions, document bounds):
    torch.compile then keeps one graph for every length instead of recompiling."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def run_stage(cfg: Config, name: str, body: Callable[[Stage], dict]) -> dict:
    """Set the stage up (`begin`), run `body` on it, and leave the process group however it ends."""
    st = begin(cfg, name)
    try:
        return body(st)
    finally:
        shutdown()


def say_on_main(d: Dist):
    return print if d.is_main else (lambda *a, **k: None)


# ---------------------------------------------------------------- where from, where to

def default_base(cfg: Config, stage: str) -> str:
    """sft starts from the run's own model; dpo and grpo from <run_dir>/sft when it has a checkpoint."""
    run = cfg.run_path
    if stage != "sft" and latest_checkpoint(run / "sft" / "checkpoints") is not None:
        return str(run / "sft")
    return str(run)


def base_checkpoint(spec: str) -> Path:
    """A run directory (its newest complete checkpoint) or a checkpoint directory."""
    p = Path(spec)
    if (p / COMPLETE).exists():
        return p
    ckpt = latest_checkpoint(p / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{p} holds no complete checkpoint to start from (looked in {p / 'checkpoints'}); "
                                "pretrain (`kiln pretrain`) or import (`kiln import SRC --run_dir DIR`) a model "
                                "first, or pass --base RUN_DIR|CHECKPOINT_DIR")
    return ckpt


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (checkpoints/step_N or checkpoints/best/step_N)."""
    up = ckpt.parent
    if up.name == BEST:
        up = up.parent
    return up.parent


def copy_tokenizer(base_run: Path, out: RunDir) -> None:
    src = base_run / "tokenizer"
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src / 'tokenizer.json'} does not exist: the base run has no tokenizer "
                                "(`kiln tokenizer`, or `kiln import`)")
    if out.tokenizer.resolve() == src.resolve():
        return
    tmp = out.root / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(out.tokenizer, ignore_errors=True)
    tmp.rename(out.tokenizer)


# ---------------------------------------------------------------- config

def default_lr(cfg: Config, lora: LoRAConfig) -> float:
    """Fine-tuning learning rate when the stage sets none: 2e-4 for adapters, a tenth of pretraining's
    width-scaled rate for full weights (6e-5 at width 768)."""
    return LORA_LR if lora.enabled else derived_lr(cfg.model.resolved().d_model) / 10


def stage_config(cfg: Config, name: str, base: Path, world_size: int) -> Config:
    """The config the loop trains with: the base's model, the stage's own train section as `train`, the
    stage's run directory as `run_dir`; the user's stage section kept (it is what the run was asked)."""
    section = getattr(cfg, name)
    base_cfg = checkpoint_config(base)
    out = Path(section.out) if section.out else cfg.run_path / name
    model = base_cfg.model.resolved()
    train = dataclasses.replace(section.train, lr=section.train.lr or default_lr(base_cfg, section.lora))
    if section.lora.enabled and train.optimizer == "muon":
        raise ConfigError(f"{name}.train.optimizer=muon with LoRA: Muon orthogonalises whole weight matrices, "
                          "adapters are thin low-rank factors; use adamw")
    if name in ("sft", "dpo"):   # rows of the stage's length, not the model's context (8,192 for SmolLM2)
        train = dataclasses.replace(train, seq_len=min(section.max_seq_len or model.max_seq_len, model.max_seq_len))
    train = resolve_train(train, model, world_size)
    return dataclasses.replace(cfg, name=f"{cfg.name}-{name}", run_dir=str(out), model=model, train=train,
                               data=base_cfg.data, tokenizer=base_cfg.tokenizer, tokenize=base_cfg.tokenize)


def begin(cfg: Config, name: str) -> Stage:
    """Distributed init, the base checkpoint, the stage's run directory with the base's tokenizer."""
    from kiln.tokenizer import Tokenizer
    section = getattr(cfg, name)
    t = section.train
    d, device = init_distributed(t.parallel, t.device, t.cpu_offload)
    say = say_on_main(d)
    base = base_checkpoint(section.base or default_base(cfg, name))
    scfg = stage_config(cfg, name, base, d.world_size)
    rd = RunDir(scfg.run_path)
    if rd.root.resolve() == run_dir_of(base).resolve():
        raise ConfigError(f"{name}: the stage would write into its base's own run directory {rd.root}; "
                          f"pass --{name}.out DIR (default <run_dir>/{name})")
    if d.is_main:
        rd.root.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(run_dir_of(base), rd)
        dump_yaml(scfg, rd.root / "config.yaml")
    from kiln.train.distributed import barrier
    barrier(d)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    say(f"{name}: from {base} -> {rd.root}")
    return Stage(name, scfg, section, base, rd, tok, d, device, say)


# ---------------------------------------------------------------- model and trainer

def load_base(st: Stage) -> torch.nn.Module:
    """The base weights as a trainable model: fp32 master weights for full fine-tuning; with LoRA the frozen
    base in lora.base_dtype (bf16 on CUDA by default, or NF4) and fp32 adapters."""
    from kiln.formats.checkpoint import load_model
    lora: LoRAConfig = st.section.lora
    model, _ = load_model(st.base, "cpu", torch.float32)
    model.train()
    if st.cfg.train.cpu_offload:
        return model
    if not lora.enabled:
        return model.to(st.device)
    if st.cfg.train.fp8 != "off":
        raise ConfigError(f"{st.name}.train.fp8 with LoRA is not supported: float8 training rebuilds the linear "
                          "layers the adapters live in; drop --" + st.name + ".train.fp8 or --lora")
    from kiln.train.lora import apply_lora
    # from the CPU copy, tensor by tensor: the full-precision base is never on the device at once (QLoRA)
    n = apply_lora(model, lora, st.device)
    total = sum(p.numel() for p in model.parameters())
    st.say(f"lora: rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}: {n / 1e6:.3f}M trainable "
           f"of {total / 1e6:.2f}M ({100 * n / max(total, 1):.2f}%), base {lora.base_dtype}")
    if lora.dropout > 0:   # kiln/train/lora.py's _LoRAProjection cannot drop the adapters' input alone
        st.say(f"lora: dropout {lora.dropout:g} runs each adapted layer as three matmuls and a sum (slower, more "
               f"memory); --{st.name}.lora.dropout 0 takes the grouped projection", file=sys.stderr)
    return model


def trainer(st: Stage, model: torch.nn.Module, fingerprint: dict) -> loop.Trainer:
    tr = prepare(st.cfg, model, st.d, st.device, fingerprint, st.say)
    if st.section.lora.enabled:
        tr.meta["lora"] = {"rank": st.section.lora.rank, "alpha": st.section.lora.alpha,
                           "targets": list(st.section.lora.targets)}
    tr.meta["base"] = str(st.base)
    return tr


def finish(st: Stage, tr: loop.Trainer, summary: dict) -> dict:
    """After training: the LoRA adapter in the PEFT format (adapter/), the stage's summary (summary.json)."""
    if st.d.is_main:
        if st.section.lora.enabled:
            from kiln.formats.peft import write_adapter
            from kiln.train.lora import lora_state_dict
            out = st.rd.root / "adapter"
            write_adapter(out, lora_state_dict(tr.model), st.section.lora, str(run_dir_of(st.base).resolve()))
            summary["adapter"] = str(out)
            st.say(f"{st.name}: LoRA adapter (PEFT format) in {out}")
        (st.rd.root / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def fingerprint_of(*parts: Any) -> str:
    """A short stable hash of the stage's inputs (token ids, pairs, settings): a resume must continue on them."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
