"""Device, precision, autocast, SDPA backend choice and CUDA memory counters: what every stage that runs a model needs."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it comes with CUDA builds of PyTorch; kiln's fused kernels need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def programmatic_launch(device: torch.device) -> bool:
    """Whether kiln's Triton decode kernels launch with programmatic dependent launch (PDL): each kernel of a
    chain is launched while the one before it still runs, loads what does not depend on it (its weights) and
    waits on the device (`griddepcontrol.wait`) before reading its input; CUDA graphs keep the dependency.
    Hopper (sm_90) or newer with a Triton that has it (3.3+). Opt-in (KILN_PDL=1): measured on an H100 it
    made SmolLM2's batch-1 decode 2.5% slower, not faster (BENCHMARKS.md, docs/decisions.md)."""
    if os.environ.get("KILN_PDL", "0") != "1" or device.type != "cuda" or not triton_available():
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device, allowed: bool = True) -> dict:
    """A kiln Triton kernel's `PDL` constexpr and the launch option that goes with it (kiln/infer/kernels.py);
    `allowed=False` (a test's interpreted build) always gives PDL=False."""
    pdl = allowed and programmatic_launch(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@functools.cache
def _pdl_capable(index: int) -> bool:
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


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
            f"and {n_kv_heads} key/value heads of {head_dim}, {dtype_name(dtype)}): "
            f"{str(e).splitlines()[0].rstrip('.')}. Use `auto` (PyTorch picks the fastest backend that fits) or another of "
            f"{', '.join(SDPA_BACKENDS)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
