"""Typed configuration for every stage.

A recipe (YAML under `recipes/`) is a serialised `Config`: any field left out
keeps its default. Field docstrings become the CLI's `--help` text.

Values that follow from the one size dial (`model.depth`) are left as `None`
and filled in by `ModelConfig.resolved()` / `resolve_train()`; the resolved
config is what each stage writes beside its output.

    base.py    errors, checks, from_dict (key-checked), YAML
    data.py    DataConfig and its cleaning steps
    stages.py  tokenizer, model, eval, generate, import/export, estimate, serve, and Config
    train.py   the training loop's settings (pretraining's and each post-training stage's)
    post.py    sft, dpo, grpo and LoRA
    deepspeed.py  the DeepSpeed JSON merged with the keys kiln owns
    patterns.py   the tokenizer's named pre-tokenisation patterns
    rundir.py  the run directory's layout and the finished-stage markers
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.config.base import (ConfigError, dump_yaml, from_dict, load_yaml, merge, non_negative, positive,
                              round_up, unknown_key_message)
from kiln.config.data import (CONTENT_TYPES, DOC_STEPS, LanguageConfig, GopherQualityConfig, GopherRepetitionConfig, C4Config, FineWebConfig, CodeQualityConfig, ClassifierConfig, PIIConfig, DecontaminateConfig, NearDedupConfig, DataConfig)
from kiln.config.eval import BenchmarkConfig, EvalConfig, MemorisationConfig
from kiln.config.post import LORA_TARGETS, ChatDataConfig, DPOConfig, GRPOConfig, LoRAConfig, SFTConfig, finetune_train
from kiln.config.stages import (Config, EstimateConfig, ExportConfig, GenerateConfig, ImportConfig, ModelConfig, TokenizeConfig, TokenizerConfig,
                                TrainConfig, derived_lr, grad_accum_steps, model_diff, resolve_train)


# ---------------------------------------------------------------- recipes

RECIPE_DIRS = (
    Path(__file__).resolve().parents[1] / "recipes",        # installed wheel: kiln/recipes
    Path(__file__).resolve().parents[3] / "recipes",        # source checkout / editable install
)


def recipe_names() -> list[str]:
    names: set[str] = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def recipe_path(recipe: str) -> Path:
    """A recipe name (`tiny`) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    for d in RECIPE_DIRS:
        candidate = d / f"{recipe}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"unknown recipe `{recipe}`; built-in recipes: {', '.join(recipe_names())} "
                      "(or give a path to a .yaml file)")


def load_recipe(recipe: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """Load a recipe (name or path), apply nested overrides, validate."""
    data = merge(load_yaml(recipe_path(recipe)), overrides or {})
    return from_dict(Config, data).validate()
