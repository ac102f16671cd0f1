"""Fused output head + cross-entropy for training, applied from outside the model.

The plain head computes logits (N, V), the loss reads them (log-softmax), and backward reads them
again to form d(loss)/d(logits) = softmax - onehot before the two matmuls of the head's backward;
eager PyTorch also upcasts the whole (N, V) block to fp32 on the way. Here one kernel per row reads
the logits once more after the matmul and writes, *in place*, both the row's loss and its gradient
(already scaled by the loss's reduction), so:

- no fp32 logits and no second (N, V) gradient buffer exist: the head's training memory is one
  (N, V) block in the compute dtype (3.3 GB at 32 x 1024 tokens and a 50k vocabulary in bf16; eager
  PyTorch adds an fp32 copy, an fp32 gradient and its bf16 cast: 19.9 GB against 3.6 GB, measured);
- backward is just the two matmuls of the head, with the upstream gradient (a scalar) applied to
  their small (N, D) and (V, D) outputs instead of to an (N, V) block.

Measured on an H100 (BENCHMARKS.md): the head, forward and backward, 1.10x faster than Inductor's
compiled plain path at a 50k vocabulary and 1.28x at 128k; a gpt2-small training step 1.026x.

On CUDA the row kernel is Triton: an online logsumexp over the row, then a second pass that writes
the gradient (partly from L2). Elsewhere it is the same arithmetic in PyTorch, in
chunks of rows so that the fp32 temporaries stay small; tests compare both with `F.cross_entropy`.

Only the training forward uses it (gradients on); validation and scoring without gradients keep the
plain path. `reduction="none"` (DPO's and GRPO's per-token log-probabilities) returns the per-row losses;
its backward scales the (N, D) and (V, D) sides by each row's upstream gradient instead of the (N, V)
block, so it needs no more memory than `sum`. Under DeepSpeed ZeRO-3 it is not applied: there the head's
weight is gathered by hooks on the module's own forward, which this bypasses.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from kiln.runtime.device import triton_available

MODES = ("auto", "on", "off")
_CPU_CHUNK_ROWS = 1024   # rows per fp32 temporary on the PyTorch path


def resolve_mode(mode: str, device: torch.device, parallel: str = "none", zero_stage: int = 0) -> bool:
    """Whether to fuse: `on` (checked against ZeRO-3 at config load), `auto` on CUDA with Triton, `off` never."""
    if mode not in MODES:
        raise ValueError(f"train.fused_cross_entropy={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or (parallel == "deepspeed" and zero_stage == 3):
        return False
    return mode == "on" or (device.type == "cuda" and triton_available())


def missing_kernel_warning(mode: str, device: torch.device) -> str | None:
    """What to say when a CUDA run cannot have the Triton kernel (the fused head is off, or slow)."""
    if device.type != "cuda" or mode == "off" or triton_available():
        return None
    effect = ("the head runs the PyTorch version of the fused arithmetic (slower than the kernel)" if mode == "on"
              else "the fused head + cross-entropy is off")
    return f"warning: Triton is not installed, so {effect}; pip install triton to get the fused kernel"


# ---------------------------------------------------------------- the row kernel: loss and gradient in place

@torch.library.custom_op("kiln::cross_entropy_loss_grad_", mutates_args=("logits",))
def cross_entropy_loss_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                             ignore_index: int) -> torch.Tensor:
    """Per-row losses (N,) in fp32; overwrites `logits` (N, V) with scale * d(loss_n)/d(logits_n).

    Rows whose target is `ignore_index` get loss 0 and gradient 0. `scale` is a 0-dim fp32 tensor on
    the logits' device (1/valid rows for a mean): read on the device, so no host sync.
    """
    if logits.is_cuda and triton_available():
        return _loss_grad_triton(logits, targets, scale, ignore_index)
    return _loss_grad_torch(logits, targets, scale, ignore_index)


@cross_entropy_loss_grad_.register_fake
def _(logits, targets, scale, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _loss_grad_torch(logits_NV, targets_N, scale, ignore_index):
    loss_N = torch.empty(logits_NV.shape[0], dtype=torch.float32, device=logits_NV.device)
    for i in range(0, logits_NV.shape[0], _CPU_CHUNK_ROWS):
        x = logits_NV[i:i + _CPU_CHUNK_ROWS].float()
        t = targets_N[i:i + _CPU_CHUNK_ROWS]
        ignored = t == ignore_index
        t = t.masked_fill(ignored, 0)[:, None]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        loss_N[i:i + _CPU_CHUNK_ROWS] = (lse - x.gather(1, t)).squeeze(1).masked_fill(ignored, 0.0)
        g = torch.exp(x - lse).scatter_add_(1, t, torch.full_like(t, -1, dtype=x.dtype))
        logits_NV[i:i + _CPU_CHUNK_ROWS] = (g * scale).masked_fill_(ignored[:, None], 0.0)
    return loss_N


@functools.cache
def _row_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_kernel(logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, V, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        # Online logsumexp, one running (max, sum) per lane. Masked lanes read -1e30, not -inf: a lane
        # that only ever sees padding then adds exp(-1e30 - max) = 0 at the end instead of a NaN.
        m = tl.full([BLOCK], -1e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=-1e30).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        row_max = tl.max(m, 0)
        lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
        target = tl.load(targets_ptr + row)
        ignored = target == ignore_index
        safe_target = tl.where(ignored, 0, target)
        x_target = tl.load(base + safe_target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_target))
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
        for start in range(0, V, BLOCK):   # the second read of the row comes partly from L2
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(idx == safe_target, 1.0, 0.0)
            tl.store(base + idx, (g * scale).to(logits_ptr.dtype.element_ty), mask=idx < V)

    return row_kernel


# Measured on an H100 (bench/cross_entropy.py --sweep): 8192-wide blocks, 16 warps. Holding a whole
# 50k row in registers (one read instead of two) spills and is 4.5x slower.
BLOCK, NUM_WARPS = 8192, 16


def _loss_grad_triton(logits_NV, targets_N, scale, ignore_index):
    assert logits_NV.stride(1) == 1, "logits must be contiguous along the vocabulary"
    N, V = logits_NV.shape
    loss_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    if N:
        # The kernel would read outside the row for a bad target; check on the device (no host sync),
        # as F.cross_entropy does.
        in_range = ((targets_N >= 0) & (targets_N < V)) | (targets_N == ignore_index)
        torch._assert_async(in_range.all(), f"cross-entropy target outside [0, {V}) and not ignore_index")
        _row_kernel()[(N,)](logits_NV, logits_NV.stride(0), targets_N, loss_N, scale, V, ignore_index,
                            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return loss_N


# ---------------------------------------------------------------- head + loss as one autograd node

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, ignore_index: int, reduction: str):
        logits_NV = h_ND @ w_VD.t()   # the only (N, V) buffer: it becomes the gradient below
        if reduction == "mean":
            scale = 1.0 / (targets_N != ignore_index).sum().float()   # on the device; inf when none count (mean -> NaN)
        else:
            scale = torch.ones((), dtype=torch.float32, device=h_ND.device)
        loss_N = cross_entropy_loss_grad_(logits_NV, targets_N, scale, ignore_index)
        ctx.save_for_backward(h_ND, w_VD, logits_NV)
        ctx.per_row = reduction == "none"
        return loss_N if ctx.per_row else loss_N.sum() * scale

    @staticmethod
    def backward(ctx, grad_loss):
        h_ND, w_VD, grad_NV = ctx.saved_tensors   # grad_NV: d(loss)/d(logits), reduction included
        need_h, need_w = ctx.needs_input_grad[:2]
        if ctx.per_row:   # row n's gradient is grad_loss[n] times its own: scale the thin sides, not (N, V)
            g_N1 = grad_loss.to(h_ND.dtype)[:, None]
            grad_h = (grad_NV @ w_VD) * g_N1 if need_h else None
            grad_w = grad_NV.t() @ (h_ND * g_N1) if need_w else None
            return grad_h, grad_w, None, None, None
        g = grad_loss.to(h_ND.dtype)
        grad_h = (grad_NV @ w_VD) * g if need_h else None
        grad_w = (grad_NV.t() @ h_ND) * g if need_w else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(h_ND @ w_VD.T, targets_N)` (fp32 loss) with the fused head; `mean`, `sum` or `none`
    ((N,), 0 at ignored rows).

    Under autocast both operands are cast to the autocast dtype first, as `nn.Linear` would.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
    dt = h_ND.device.type
    if torch.is_autocast_enabled(dt):
        cast = torch.get_autocast_dtype(dt)
        h_ND, w_VD = h_ND.to(cast), w_VD.to(cast)
    with torch.autocast(dt, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, ignore_index, reduction)


def fuse_for_run(model: nn.Module, mode: str, device: torch.device, parallel: str = "none",
                 zero_stage: int = 0) -> tuple[bool, str | None]:
    """`train.fused_cross_entropy` for one run: (whether the head is fused, a warning to print or None)."""
    fused = resolve_mode(mode, device, parallel, zero_stage)
    if fused:
        apply_fused_cross_entropy(model)
    return fused, missing_kernel_warning(mode, device)


def apply_fused_cross_entropy(model: nn.Module) -> None:
    """Route the training loss of a kiln Transformer through `linear_cross_entropy`.

    Replaces `loss` on the instance (names, checkpoints and exports unchanged); evaluation without
    gradients still takes the model's own path.
    """
    plain = model.loss

    def loss(self, h_BTD, targets_BT, reduction="mean"):
        if not torch.is_grad_enabled():
            return plain(h_BTD, targets_BT, reduction)
        out = linear_cross_entropy(h_BTD.flatten(0, 1), self.lm_head.weight, targets_BT.reshape(-1),
                                   reduction=reduction)
        return out.view(targets_BT.shape) if reduction == "none" else out

    model.loss = types.MethodType(loss, model)

