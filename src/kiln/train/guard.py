"""Guards against bad steps: skip a non-finite update, roll back after a run of loss spikes.

Non-finite skip, without a host sync. The decision "is this step's gradient norm finite" lives on
the device. A fused AdamW (kiln's optimizer on CUDA) takes it as `found_inf`, the same hook
torch.amp.GradScaler uses: the kernel leaves parameters, both moments and the step count untouched
when the flag is set, so a skipped step is exactly a step that never happened, and the CPU never
waits for the GPU. kiln's Muon honours the same attribute (selecting old or new values on the
device). Other optimizers have no such hook; they read the flag (`bool(finite)`), which on
CPU tensors is no device sync at all, and on a GPU is one sync per step (warned about once).

The alternative, `torch.where(finite, new, old)` over every parameter and moment, costs a full copy
of the weights and optimizer state per step; checking lazily at log time cannot undo an update
that already mixed NaN into the moments.

Spikes. At log time (the loss is read there anyway) a loss above `factor` x the running mean of
earlier, non-spike logged losses counts as a spike; `patience` consecutive spikes ask for a rollback.
The caller restores the newest checkpoint from before the first spike and keeps the loader where it
is, so the batches since that checkpoint are skipped (PaLM's recipe for loss spikes).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

_warned_sync = False


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step(), or nothing at all when `finite` (a 0-dim bool tensor) is False."""
    global _warned_sync
    if getattr(optimizer, "supports_found_inf", False) or all(g.get("fused") for g in optimizer.param_groups):
        optimizer.found_inf = (~finite).float()   # read on the device by the fused kernel
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    if finite.device.type != "cpu" and not _warned_sync:
        _warned_sync = True
        print("warning: the optimizer is not fused, so skipping non-finite steps reads a flag from the GPU "
              "every step (a host sync)", file=sys.stderr)
    if bool(finite):
        optimizer.step()


class SpikeGuard:
    """Counts consecutive logged losses above `factor` x the running mean (an EMA of non-spike losses)."""

    def __init__(self, factor: float, patience: int, beta: float = 0.9):
        self.factor, self.patience, self.beta = factor, patience, beta
        self.mean: float | None = None
        self.streak = 0
        self.first_spike_step: int | None = None

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss logged at `step`; True when `patience` spikes in a row call for a rollback."""
        if self.factor <= 0 or not math.isfinite(loss):  # off, or a skipped step (handled by the NaN guard)
            return False
        if self.mean is not None and loss > self.factor * self.mean:
            if self.streak == 0:
                self.first_spike_step = step
            self.streak += 1
            return self.streak >= self.patience
        self.streak, self.first_spike_step = 0, None
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "streak": self.streak, "first_spike_step": self.first_spike_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.streak, self.first_spike_step = state["mean"], state["streak"], state["first_spike_step"]
