"""Hardware peaks: the dense bf16 FLOP/s table, a matmul timed on this device, and MFU against either."""

from __future__ import annotations

import sys
import time

import torch

from kiln.runtime.device import dtype_name

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


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`: the practical peak of this very device
    (8192^3 on a GPU, where an H100 reaches ~790 of its datasheet 989 TFLOP/s; 1024^3 on a CPU)."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def seconds(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    seconds(2)   # warm-up: kernel selection, clocks
    return 2 * n ** 3 * reps / seconds(reps)


def mfu_peak(setting: str | float, device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """The per-device peak FLOP/s that MFU is computed against, and where it came from.

    `datasheet`: the vendor's dense bf16 peak (None off CUDA or for an unknown GPU: no MFU rather than
    a guess); `measured`: a square matmul timed here in the training dtype; a number: TFLOP/s as given."""
    if setting == "datasheet":
        peak = peak_flops(device)
        return peak, "datasheet bf16 peak" if peak else "none"
    if setting == "measured":
        dtype = torch.bfloat16 if bf16 else torch.float32
        return measure_matmul_peak(device, dtype), f"measured {dtype_name(dtype)} matmul peak"
    return float(setting) * 1e12, "given peak"


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_gpu: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of every GPU in the job
    (`tokens_per_s` counts all ranks' tokens, so the peak must count all ranks' GPUs)."""
    return flops_per_token * tokens_per_s / (peak_per_gpu * world_size)
