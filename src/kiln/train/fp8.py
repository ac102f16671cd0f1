"""FP8 matmuls for training (torchao float8), applied from outside the model.

Each eligible `nn.Linear` becomes torchao's `Float8Linear`: the same `weight` Parameter (fp32
master, unchanged name, so checkpoints and exports are untouched), with its input, weight and
output gradient cast to float8 with dynamic scales for the three matmuls of forward and
backward. lm_head stays in bf16: its error lands directly on the logits (the usual practice),
and so does any layer whose sides are not multiples of 16 (a float8 matmul requirement).

Measured on one H100 (BENCHMARKS.md): 1.13x tokens/s and 19% less memory at ~1.2B parameters
(d_model 1792), but 0.96x at 124M (d_model 768), where the casts and amax reductions cost more
than the faster matmuls save. Hence off by default.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

RECIPES = ("tensorwise", "rowwise")
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm89) and Hopper (sm90) onwards


def check_fp8(recipe: str, device: torch.device, emulate: bool = False) -> None:
    """Fail before any work when `train.fp8` cannot run here, saying what would make it run."""
    if recipe not in RECIPES:
        raise ValueError(f"train.fp8={recipe!r}: use 'off' or one of {', '.join(RECIPES)}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ValueError("train.fp8 needs torchao: pip install 'llmkiln[fp8]' (or set train.fp8=off)") from e
    if emulate:
        return
    if device.type != "cuda":
        raise ValueError(f"train.fp8={recipe!r} needs an NVIDIA GPU with float8 tensor cores (H100, L40S, "
                         f"RTX 4090 or newer); this run is on {device.type}. Set train.fp8=off.")
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise ValueError(f"train.fp8={recipe!r}: {torch.cuda.get_device_name(device)} (compute capability "
                         f"{cap[0]}.{cap[1]}) has no float8 tensor cores; it needs 8.9 or newer. Set train.fp8=off.")


def eligible(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn != "lm_head"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model: nn.Module, recipe: str, emulate: bool = False) -> int:
    """Swap eligible Linears for Float8Linear in place; returns how many were converted.

    Call before torch.compile and before FSDP2's fully_shard (torchao's order). `emulate` runs the
    float8 casts with fp32 matmuls: for tests on CPU, no speed-up.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    linears = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    convert_to_float8_training(model, config=config, module_filter_fn=eligible)
    kept = [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear]
    converted = len(linears) - len(kept)
    print(f"fp8 ({recipe}): {converted} linear layers in float8, kept in bf16: {', '.join(kept) or 'none'}",
          file=sys.stderr)
    return converted
