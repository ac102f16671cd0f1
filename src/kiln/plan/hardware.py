"""Accelerators the estimate can be asked about: memory and dense bf16 tensor FLOP/s, each with its source.

FLOP/s are the vendors' dense figures (no 2:4 sparsity), the same convention as kiln's MFU
(kiln/runtime/peaks.py). Memory is the marketed capacity in GiB (an "80 GB" H100 reports 79.2 GiB to
CUDA, the rest is reserved); what a process can use is less again (the CUDA context, ECC), which the
estimate's framework overhead accounts for. Apple publishes no bf16 tensor figure: give
--estimate.gpu_tflops for those (or for any GPU not listed), and --estimate.gpu_memory_gb for unlisted
memory sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float
    bf16_tflops: float | None   # dense, no sparsity; None = not published
    source: str


_NV = "NVIDIA {} datasheet ({}), dense = half the with-sparsity figure"
HARDWARE: dict[str, Accelerator] = {a.name.lower().replace(" ", "-"): a for a in (
    Accelerator("H100 SXM", 80, 989.4, _NV.format("H100 Tensor Core GPU", "nvidia.com/en-us/data-center/h100")),
    Accelerator("H100 PCIe", 80, 756.5, _NV.format("H100 Tensor Core GPU", "nvidia.com/en-us/data-center/h100")),
    Accelerator("H200", 141, 989.4, _NV.format("H200 Tensor Core GPU", "nvidia.com/en-us/data-center/h200")),
    Accelerator("A100 80GB", 80, 312, _NV.format("A100 Tensor Core GPU", "nvidia.com/en-us/data-center/a100")),
    Accelerator("A100 40GB", 40, 312, _NV.format("A100 Tensor Core GPU", "nvidia.com/en-us/data-center/a100")),
    Accelerator("L40S", 48, 362, _NV.format("L40S GPU", "nvidia.com/en-us/data-center/l40s")),
    Accelerator("L4", 24, 121, _NV.format("L4 Tensor Core GPU", "nvidia.com/en-us/data-center/l4")),
    Accelerator("RTX 4090", 24, 165.2, "NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix table: "
                "RTX 4090 peak BF16 tensor TFLOPS with FP32 accumulate (dense)"),
    Accelerator("RTX 3090", 24, 71, "NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix table: "
                "RTX 3090 peak BF16 tensor TFLOPS with FP32 accumulate (dense)"),
    Accelerator("Apple M4 Max", 128, None, "Apple MacBook Pro tech specs (apple.com/macbook-pro/specs): up to "
                "128 GB unified memory; macOS lets the GPU wire ~75% of it by default; no bf16 FLOP/s published"),
    Accelerator("Apple M3 Ultra", 512, None, "Apple Mac Studio tech specs (apple.com/mac-studio/specs): up to "
                "512 GB unified memory; no bf16 FLOP/s published"),
    Accelerator("Apple M2 Ultra", 192, None, "Apple Mac Studio (2023) tech specs: up to 192 GB unified memory; "
                "no bf16 FLOP/s published"),
)}
ALIASES = {"h100": "h100-sxm", "a100": "a100-80gb", "4090": "rtx-4090", "3090": "rtx-3090",
           "m4-max": "apple-m4-max", "m3-ultra": "apple-m3-ultra", "m2-ultra": "apple-m2-ultra"}


def accelerator(name: str, memory_gb: float | None = None, tflops: float | None = None) -> Accelerator:
    """The table's entry for `name` (case and spaces ignored), with user-given numbers taking precedence;
    an unlisted name needs both numbers."""
    key = name.lower().replace(" ", "-").replace("_", "-")
    key = ALIASES.get(key, key)
    base = HARDWARE.get(key)
    if base is None:
        if memory_gb is None:
            raise ValueError(f"unknown GPU {name!r}: choose one of {', '.join(HARDWARE)} or give its memory "
                             "(--estimate.gpu_memory_gb) and dense bf16 TFLOP/s (--estimate.gpu_tflops)")
        return Accelerator(name, memory_gb, tflops, "given by the user")
    if memory_gb is None and tflops is None:
        return base
    return Accelerator(base.name, memory_gb or base.memory_gib, tflops or base.bf16_tflops,
                       base.source + "; overridden by the user")


def match_device_name(device_name: str) -> Accelerator | None:
    """The entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    n = device_name.upper()
    for key, acc in HARDWARE.items():
        parts = acc.name.upper().replace("APPLE ", "").split()
        if all(p in n for p in parts):
            return acc
    if "H100" in n:
        return HARDWARE["h100-pcie" if "PCIE" in n else "h100-sxm"]
    if "A100" in n:
        return HARDWARE["a100-80gb" if "80" in n else "a100-40gb"]
    return None
