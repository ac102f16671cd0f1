"""A PEFT adapter with random factors, for tests that serve or apply adapters."""

from pathlib import Path

import torch

from kiln.config import LoRAConfig
from kiln.formats.peft import write_adapter


def random_adapter(folder: Path, model, rank: int, targets: list[str], seed: int, scale: float, base: str) -> str:
    """An adapter of `model` on `targets`, factors N(0, scale^2) (large enough to change greedy tokens)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale
            tensors[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    cfg = LoRAConfig(enabled=True, rank=rank, alpha=2.0 * rank, targets=list(targets))
    return str(write_adapter(folder, tensors, cfg, base))
