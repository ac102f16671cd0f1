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


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_gpu: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of every GPU in the job
    (`tokens_per_s` counts all ranks' tokens, so the peak must count all ranks' GPUs)."""
    return flops_per_token * tokens_per_s / (peak_per_gpu * world_size)


def configure_torch(device: torch.device, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cuda_memory_stats(device: torch.device) -> dict:
    """Peak allocated / reserved GB since the last reset, and the allocator's retries and OOMs.

    `alloc_retries` > 0 means the caching allocator had to free its cache and retry a cudaMalloc:
    the run is at the edge of memory and slows down (cudaFree synchronises). A reserved peak well
    above the allocated one is fragmentation (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps).
    Reads counters only: no device sync.
    """
    if device.type != "cuda":
        return {}
    s = torch.cuda.memory_stats(device)
    return {"peak_mem_gb": s.get("allocated_bytes.all.peak", 0) / 1e9,
            "peak_reserved_gb": s.get("reserved_bytes.all.peak", 0) / 1e9,
            "alloc_retries": s.get("num_alloc_retries", 0),
            "ooms": s.get("num_ooms", 0)}


def oom_advice(device: torch.device, micro_batch_size: int, checkpointing: str) -> str:
    """What to say when a step runs out of GPU memory: the numbers, then the knobs, cheapest first."""
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    knobs = [f"a smaller --train.micro_batch_size (now {micro_batch_size}; gradient accumulation keeps "
             "the global batch)"]
    if checkpointing != "block":
        knobs.append("--train.activation_checkpointing block (recomputes activations: ~20% slower, far less memory)")
    knobs.append("--train.parallel fsdp under torchrun to shard weights and optimizer state over GPUs")
    return (f"CUDA out of memory on {torch.cuda.get_device_name(device)} ({total:.1f} GB; peak allocated "
            f"{peak:.1f} GB). Try " + "; or ".join(knobs) + ".")
