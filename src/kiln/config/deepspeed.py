"""The DeepSpeed JSON (`train.deepspeed_config`) merged with the keys kiln owns (kiln/train/zero.py runs it).

The keys in `owned_config` are kiln's and always win, but a JSON value for one of them must equal kiln's
(or be "auto", the Hugging Face convention): a different value is refused with the key named, never
silently overridden. `optimizer` and `scheduler` sections are refused (kiln builds the optimizer and
drives the LR). Every other key is the JSON's, passed through unchanged. Pure dictionaries and one JSON
read: config validation checks a user's file at load time without importing DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.config.base import ConfigError

# JSON sections kiln refuses outright, and what to use instead.
_REFUSED = {"optimizer": "kiln builds AdamW from train.lr / beta1 / beta2 / eps / weight_decay",
            "scheduler": "kiln sets the learning rate every step from train.lr / warmup_steps / schedule",
            "fp16": "kiln trains in fp32 or bf16 (train.precision)"}


def owned_config(train, micro_batch: int | None = None, accum: int | None = None, world_size: int | None = None,
                 bf16: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed keys kiln owns, from kiln's config. Values not known yet (before the process count
    and device are) are left out, so config validation can check the rest early."""
    owned: dict[str, Any] = {"gradient_clipping": float(train.grad_clip),
                             "zero_optimization": {"stage": train.zero_stage}}
    if micro_batch is not None:
        owned.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accum,
                     train_batch_size=micro_batch * accum * world_size)
    if bf16 is not None:
        owned["bf16"] = {"enabled": bf16}
        if bf16:   # fp32 and ZeRO-3 skip a non-finite step regardless (see the module docstring)
            owned["bf16"]["check_grad_overflow"] = train.skip_nonfinite
    return owned


def read_user_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed_config={path}: no such file")
    try:
        user = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config={path}: must hold a JSON object, not {type(user).__name__}")
    return user


def merge_config(user: dict[str, Any], owned: dict[str, Any], source: str) -> dict[str, Any]:
    """`user` with kiln's `owned` keys filled in. A user value for an owned key must equal kiln's or be
    "auto"; anything else raises ConfigError naming the key (`source` says where the JSON came from)."""
    for key, why in _REFUSED.items():
        if key in user and not (key == "fp16" and not _enabled(user[key])):
            raise ConfigError(f"{source}: the \"{key}\" section is not supported with kiln: {why}; remove it")
    return _merge(user, owned, source, prefix="")


def _merge(user: dict, owned: dict, source: str, prefix: str) -> dict:
    out = dict(user)
    for key, mine in owned.items():
        name = prefix + key
        if isinstance(mine, dict):
            theirs = user.get(key, {})
            if not isinstance(theirs, dict):
                raise ConfigError(f"{source}: \"{name}\" must be an object, got {theirs!r}")
            out[key] = _merge(theirs, mine, source, name + ".")
            continue
        theirs = user.get(key, "auto")
        if theirs != "auto" and not _same(theirs, mine):
            raise ConfigError(f"{source}: \"{name}\" = {theirs!r} contradicts kiln's {mine!r} ({_KILN_KEY.get(name, name)});"
                              f" remove it from the JSON (or set it to \"auto\") and set the kiln value instead")
        out[key] = mine
    return out


# Where each owned DeepSpeed key comes from, for the error message.
_KILN_KEY = {"gradient_clipping": "train.grad_clip",
             "zero_optimization.stage": "train.zero_stage",
             "train_micro_batch_size_per_gpu": "train.micro_batch_size",
             "gradient_accumulation_steps": "train.batch_tokens / (micro_batch_size * max_seq_len * ranks)",
             "train_batch_size": "train.batch_tokens / max_seq_len",
             "bf16.enabled": "train.precision",
             "bf16.check_grad_overflow": "train.skip_nonfinite"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_user_config(train) -> None:
    """Config-time check of train.deepspeed_config against what is known before the run starts."""
    if train.deepspeed_config is None:
        return
    merge_config(read_user_config(train.deepspeed_config), owned_config(train),
                 f"train.deepspeed_config={train.deepspeed_config}")


def deepspeed_config(train, micro_batch: int, accum: int, world_size: int, bf16: bool) -> dict[str, Any]:
    """The full DeepSpeed config of this run."""
    user, source = {}, "kiln"
    if train.deepspeed_config is not None:
        user, source = read_user_config(train.deepspeed_config), f"train.deepspeed_config={train.deepspeed_config}"
    config = merge_config(user, owned_config(train, micro_batch, accum, world_size, bf16), source)
    config.setdefault("steps_per_print", 2 ** 31 - 1)   # kiln logs the steps itself
    return config
