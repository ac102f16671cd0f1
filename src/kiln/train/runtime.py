"""Device, precision and hardware facts the training loop needs (MFU peak table)."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings

import torch
import torch.nn.functional as F

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
    """`auto`: bf16 on CUDA, and on a CPU whose instructions do bf16 natively; fp32 elsewhere."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles (x86): where oneDNN runs bf16 matmuls faster than fp32 (1.75x tokens/s for
    the tiny recipe on a 2-core AMD EPYC with AVX512-BF16). Elsewhere bf16 would be emulated, and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


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
        return measure_matmul_peak(device, dtype), f"measured {_name(dtype)} matmul peak"
    return float(setting) * 1e12, "given peak"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def sdpa_backend(name: str):
    """Context that restricts scaled_dot_product_attention to one backend; `auto` leaves PyTorch's choice.

    The choice is read when an attention op runs forward (and when torch.compile traces it); the
    backward follows the op the forward recorded."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name])


def check_sdpa_backend(name: str, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device,
                       bf16: bool) -> None:
    """Fail before training when the forced SDPA backend cannot run this model's causal attention here
    (a backend missing on this device, GQA under cuDNN, an unsupported head size or dtype)."""
    if name == "auto":
        return
    dtype = torch.bfloat16 if bf16 else torch.float32
    q = torch.randn(1, n_heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, n_kv_heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    try:
        with sdpa_backend(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # PyTorch explains each refusal in a warning; the error says it once
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_heads != n_heads).sum().backward()
    except RuntimeError as e:
        raise ValueError(
            f"train.attention_backend={name!r} cannot run this model's attention on {device} ({n_heads} query "
            f"and {n_kv_heads} key/value heads of {head_dim}, {_name(dtype)}): "
            f"{str(e).splitlines()[0].rstrip('.')}. Use `auto` (PyTorch picks the fastest backend that fits) or another of "
            f"{', '.join(SDPA_BACKENDS)}") from None
