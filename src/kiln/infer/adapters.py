"""Several LoRA adapters over one base model, chosen per request (multi-LoRA serving; vLLM's `--lora-modules`).

`AdapterBank(model, {name: adapter_dir})` reads each PEFT adapter (kiln.formats.peft.read_adapter) and gives every
linear layer that any of them adapts every adapter's factors, stacked: index 0 is "no adapter" (zeros), index i
the i-th name's. Ranks may differ (smaller ones are padded with zeros, which add nothing) and so may the targets
(an adapter that leaves a layer alone has zeros there). Each such layer computes, for a row whose adapter is a,

    y = x W^T (+ bias) + (x A_a^T) (scale_a B_a)^T            (scale_a = alpha_a / r_a, folded into B at load)

so rows of different adapters, and rows of none, share one batch. The rows' adapters are set before a forward
(`select`, one index per row); the engine's decode step selects its per-slot buffer, so a captured CUDA graph
reads each step's choice. Where the host knows that every row takes one adapter (or none), the forward uses
that adapter's factors directly (or skips them): no gather. The base weights are untouched, so the base model stays served beside its adapters.

Costs: two batched matmuls per adapted layer per forward (r columns), and the layers are no longer plain
linears, so the engine's stacked projections and Triton decode layers do not apply (one merged adapter,
`serve.adapter`, keeps them). Not compiled: `torch.compile` of the step is refused with a bank.

Shape legend: B rows, T tokens a row, I in_features, O out_features, R the largest rank, N adapters + 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kiln.formats.peft import LORA_A, LORA_B, read_adapter


class MultiLoRALinear(nn.Linear):
    """An `nn.Linear` whose rows each add their own adapter's low-rank update (the class an adapted layer of an
    AdapterBank is switched to; its weight, bias and parameter names stay as they were)."""

    bank: AdapterBank
    lora_A_NRI: torch.Tensor
    lora_B_NOR: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        one = self.bank.uniform
        if one == 0:        # every row is the base's
            return y
        if one is not None:   # every row one adapter's: its factors as they are, nothing gathered
            return y + F.linear(F.linear(x, self.lora_A_NRI[one]), self.lora_B_NOR[one])
        rows_B = self.bank.rows_B
        x_BTI = x.reshape(rows_B.numel(), -1, x.size(-1))
        h_BTR = torch.bmm(x_BTI, self.lora_A_NRI[rows_B].transpose(1, 2))
        return y + torch.bmm(h_BTR, self.lora_B_NOR[rows_B].transpose(1, 2)).view_as(y)


class AdapterBank:
    """The adapters of a served model, by name (index 0: the base alone); see the module docstring."""

    def __init__(self, model: nn.Module, adapters: dict[str, str | Path]):
        if not adapters:
            raise ValueError("AdapterBank needs at least one adapter")
        self.names = list(adapters)
        self.configs: dict[str, dict] = {}
        modules = dict(model.named_modules())
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        read = {}
        for name, folder in adapters.items():
            tensors, config = read_adapter(folder)
            for key, t in tensors.items():
                module = key[: -len(LORA_A)] if key.endswith(LORA_A) else key[: -len(LORA_B)]
                layer = modules.get(module)
                if type(layer) is not nn.Linear:
                    raise ValueError(f"{folder}: adapter {name!r} adapts {module}, which this model "
                                     f"{'lacks' if layer is None else 'has as a ' + type(layer).__name__} "
                                     "(an adapter of another model, or a layer made int8?)")
                want = (config["r"], layer.in_features) if key.endswith(LORA_A) else (layer.out_features, config["r"])
                if tuple(t.shape) != want:
                    raise ValueError(f"{folder}: {key} has shape {tuple(t.shape)}, {module} needs {want} "
                                     f"(adapter {name!r} is of another model)")
            read[name] = (tensors, config)
            self.configs[name] = config
        R = max(config["r"] for _, config in read.values())
        N = len(self.names) + 1
        adapted = sorted({k[: -len(LORA_A)] for tensors, _ in read.values() for k in tensors if k.endswith(LORA_A)})
        for module in adapted:
            layer = modules[module]
            a_NRI = torch.zeros(N, R, layer.in_features, device=device, dtype=dtype)
            b_NOR = torch.zeros(N, layer.out_features, R, device=device, dtype=dtype)
            for i, name in enumerate(self.names, start=1):
                tensors, config = read[name]
                if module + LORA_A in tensors:
                    r, scale = config["r"], config["lora_alpha"] / config["r"]
                    a_NRI[i, :r] = tensors[module + LORA_A].to(device, dtype)
                    b_NOR[i, :, :r] = (tensors[module + LORA_B].to(device, torch.float32) * scale).to(dtype)
            layer.__class__ = MultiLoRALinear
            layer.bank, layer.lora_A_NRI, layer.lora_B_NOR = self, a_NRI, b_NOR
        self.rows_B = torch.zeros(1, dtype=torch.long, device=device)
        self.uniform: int | None = None

    def index(self, name: str | None) -> int:
        """The adapter's index (0 for None: the base model alone)."""
        return 0 if name is None else self.names.index(name) + 1

    def select(self, rows_B: torch.Tensor, host: list[int] | None = None) -> None:
        """Each row's adapter index for the next forward (a long tensor on the model's device, one per row).
        `host`: the same indices known on the host, when they are: a forward whose rows all take one adapter
        (or none) then skips the per-row gather (or the adapters altogether). Without it (a CUDA graph being
        captured, replayed later with other rows) every forward gathers."""
        self.rows_B = rows_B
        self.uniform = host[0] if host and len(set(host)) == 1 else None

    def describe(self) -> str:
        return ", ".join(f"{name} (rank {c['r']}, alpha {c['lora_alpha']:g})" for name, c in self.configs.items())
