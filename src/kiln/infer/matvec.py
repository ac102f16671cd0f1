"""A few rows times a weight matrix, with what surrounds it in a decoder layer folded in: the RMSNorm before
it, the SwiGLU after the stacked gate/up projection, the residual add after the output projections.

Shape legend: B rows (a decode step's, at most a few), K input width, N outputs.

At a decode step of one or a few rows each of a layer's four matmuls is a cuBLAS kernel of ~3.5-4 us that
reads ~1 MB of weights (a fifth of that time at the card's bandwidth), and the RMSNorms and SwiGLU between
them are kernels of their own (~1.1-1.5 us each; profiled on an H100, bench/profile_decode.py). `matvec` is
one Triton kernel per matmul that also does its neighbour: per layer, norm+q/k/v, attention, o_proj+residual,
norm+gate/up+SwiGLU, down+residual (kiln/infer/fused_step.py) — five launches and the attention's, instead of
~10. Rounding follows the model's: the norm in fp32 rounded once, each matmul's output rounded to the weights'
dtype before the SwiGLU or the residual add.

A `torch.library` custom op (`kiln::matvec`) like kiln/infer/attention.py's: opaque to torch.compile, captured
by CUDA graphs; off CUDA or without Triton, `matvec_reference` (PyTorch), which the tests compare with the kernel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.runtime.device import pdl_args, triton_available


def matvec_reference(x_BK: torch.Tensor, w_NK: torch.Tensor, gain_K: torch.Tensor | None, eps: float,
                     residual_BN: torch.Tensor | None, glu: bool) -> torch.Tensor:
    if gain_K is not None:
        x_BK = F.rms_norm(x_BK.float(), (x_BK.size(-1),), gain_K.float(), eps)
    y = F.linear(x_BK.to(w_NK.dtype), w_NK)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = (F.silu(gate.float()) * up.float()).to(w_NK.dtype)
    if residual_BN is not None:
        y = (y.float() + residual_BN.float()).to(residual_BN.dtype)
    return y


@torch.library.custom_op("kiln::matvec", mutates_args=())
def matvec(x_BK: torch.Tensor, w_NK: torch.Tensor, gain_K: torch.Tensor | None, eps: float,
           residual_BN: torch.Tensor | None, glu: bool) -> torch.Tensor:
    """(B, N): [rms_norm(x) * gain if gain is given, else x] @ w^T, then with `glu` silu(first half) * second
    half (N = w's rows / 2), then + residual if given."""
    if x_BK.is_cuda and triton_available():
        return matvec_triton(x_BK, w_NK, gain_K, eps, residual_BN, glu)
    return matvec_reference(x_BK, w_NK, gain_K, eps, residual_BN, glu)


@matvec.register_fake
def _(x_BK, w_NK, gain_K, eps, residual_BN, glu):
    N = w_NK.size(0) // 2 if glu else w_NK.size(0)
    return x_BK.new_empty(x_BK.size(0), N, dtype=residual_BN.dtype if residual_BN is not None else w_NK.dtype)


def matvec_config(B: int, N: int, K: int) -> dict:
    """The kernel's launch settings for B rows of width K into N outputs: BLOCK_N outputs a program, BLOCK_K
    inputs a step, DOT (tl.dot on rows padded to 16, BLOCK_N >= 16; else products summed on the CUDA cores).
    One row: 4 outputs a program summed on the CUDA cores, up to 512 inputs a step, the best of the sweep at
    every SmolLM2 matmul on the H100 (bench/decode_kernels.py: 12.7 us a layer against 17.0 with tl.dot; docs/
    decisions.md); more rows keep tl.dot (not yet swept)."""
    if B == 1:
        return dict(BLOCK_N=4, BLOCK_K=min(512, max(16, 1 << (K - 1).bit_length())), DOT=False, num_warps=4)
    return dict(BLOCK_N=16, BLOCK_K=min(256, max(16, 1 << (K - 1).bit_length())), DOT=True, num_warps=4)


def matvec_triton(x_BK, w_NK, gain_K, eps, residual_BN, glu, kernel=None, config: dict | None = None) -> torch.Tensor:
    """The launch (`kernel`: another build, e.g. in Triton's interpreter, for tests; it never gets PDL;
    `config`: instead of `matvec_config`'s)."""
    B, K = x_BK.shape
    N = w_NK.size(0) // 2 if glu else w_NK.size(0)
    assert x_BK.stride(1) == 1 and w_NK.is_contiguous(), "x contiguous along K, w contiguous"
    if residual_BN is not None:
        residual_BN = residual_BN.contiguous()
    out = torch.empty(B, N, device=x_BK.device, dtype=residual_BN.dtype if residual_BN is not None else w_NK.dtype)
    if B:
        cfg = config or matvec_config(B, N, K)
        rows = 1 << (B - 1).bit_length()
        (kernel or _kernel())[(-(-N // cfg["BLOCK_N"]),)](
            x_BK, w_NK, out, gain_K if gain_K is not None else out, residual_BN if residual_BN is not None else out,
            B, N, K, x_BK.stride(0), eps, B_POW2=max(16, rows) if cfg["DOT"] else rows,
            NORM=gain_K is not None, GLU=glu, RESIDUAL=residual_BN is not None, IEEE=w_NK.dtype == torch.float32,
            **cfg, **pdl_args(x_BK.device, kernel is None))
    return out


@functools.cache
def _kernel():
    from kiln.infer.kernels import matvec_kernel   # imports triton: only where installed
    return matvec_kernel
