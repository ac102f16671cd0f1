"""Device, precision and hardware facts the training loop needs (MFU peak table)."""

from __future__ import annotations

import contextlib
import sys

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
# MFU against these is the convention of the PaLM paper and nanoGPT; unknown GPUs get no MFU
# rather than a guessed one.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available here; use `auto` or `cpu`")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast over fp32 master weights; a no-op context in fp32."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak of this GPU, or None (with a warning once) when unknown or on CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    if "H100" in name:
        return PEAK_BF16_FLOPS["H100 SXM"]
    print(f"warning: no bf16 peak known for GPU {name!r}; MFU will not be reported", file=sys.stderr)
    return None


def configure_torch(device: torch.device, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
