"""Optimizer construction and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """2-D weight matrices get weight decay; embeddings, the (tied) head and norms do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed_tokens" in name or name.startswith("lm_head")
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (the fused kernel on CUDA: one launch for all parameters instead of one per tensor), or
    Muon for hidden matrices with AdamW for the rest."""
    if train.optimizer == "muon":
        return build_muon(model, train)
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=train.eps,
        fused=device.type == "cuda",
    )


def build_muon(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Muon groups: 2-D weights inside the blocks. AdamW groups: embeddings / head and norms, no decay.
    Each group's `lr_ratio` keeps its peak relative to the schedule's (which is `train.lr`)."""
    from kiln.train.muon import MuonWithAdamW
    decay, no_decay = param_groups(model, train.weight_decay)
    adam = {"params": no_decay["params"], "lr": train.lr, "lr_ratio": 1.0, "betas": (train.beta1, train.beta2),
            "eps": train.eps, "weight_decay": 0.0}
    muon = {"params": decay["params"], "use_muon": True, "lr": train.muon_lr, "lr_ratio": train.muon_lr / train.lr,
            "momentum": train.muon_momentum, "weight_decay": train.weight_decay * train.lr / train.muon_lr}
    return MuonWithAdamW([muon, adam])


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the configured decay."""
    peak, total, warmup = train.lr, train.max_steps, min(train.warmup_steps, train.max_steps)
    floor = peak * train.min_lr_ratio
    if step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    if train.schedule == "wsd":
        decay_start = max(warmup, int(total * (1 - train.decay_frac)))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(1, total - decay_start)
        return peak - (peak - floor) * progress
    progress = (step - warmup) / max(1, total - warmup)
    if train.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's learning rate; a group with `lr_ratio` (Muon) runs at that multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
