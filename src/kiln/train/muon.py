"""Muon for the hidden weight matrices, AdamW for everything else, as one torch Optimizer.

Muon (Keller Jordan et al., 2024) keeps SGD momentum per matrix and replaces the update with
its nearest semi-orthogonal matrix, found by a quintic Newton-Schulz iteration: every direction
of the update gets the same size, which lets hidden layers take larger, better-conditioned steps
than Adam. Embeddings, the output head and the norm gains are not hidden matrices (a lookup, a
classifier, vectors) and stay on AdamW, as in the reference implementation.

One Optimizer (groups flagged `use_muon`) keeps checkpointing, the LR schedule and
gradient clipping unchanged: `state_dict()` holds both kinds of state.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication

# Coefficients of the quintic iteration, tuned to push singular values into ~[0.7, 1.2] in 5 steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
STACK_ELEMENTS = 1 << 27  # matrices orthogonalised together: at most 128M elements (512 MB in fp32)


def orthogonalize(g_MN: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (Newton-Schulz), in bf16 on CUDA and fp32 elsewhere."""
    a, b, c = NS_COEFFS
    x = g_MN.to(torch.bfloat16 if g_MN.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the short side: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g_MN.dtype)


def orthogonalize_all(updates: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """orthogonalize() of each matrix, run as one batched iteration per distinct shape.

    A model has a handful of shapes (q/k/v/o, gate/up, down) repeated per layer: stacking them
    turns ~7 x n_layers small matmul chains into ~3 batched ones, which is what keeps Muon's step
    cheap on a GPU (kernel launches, not FLOPs, dominate per-matrix iteration at d_model 768).

    A sharded (FSDP2 DTensor) update is gathered whole only inside its stack, and the result comes back
    as this rank's shard: at most one stack of whole matrices is ever held, not the whole model.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault(tuple(u.shape), []).append(i)
    out: list[torch.Tensor] = [None] * len(updates)  # type: ignore[list-item]
    for shape, idx in by_shape.items():
        per_batch = max(1, STACK_ELEMENTS // math.prod(shape))  # bounds the stacked copies' memory
        for start in range(0, len(idx), per_batch):
            chunk = idx[start:start + per_batch]
            stacked = orthogonalize(torch.stack([_gather(updates[i]) for i in chunk]), steps)
            for i, o in zip(chunk, stacked.unbind(0)):
                out[i] = _shard_like(o, updates[i])
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """Groups with `use_muon=True` (2-D hidden weights) get Muon; the others get AdamW.

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay.
    AdamW group keys: lr, betas, eps, weight_decay.
    Every group may carry `lr_ratio`, its learning rate relative to the schedule's.
    """

    def __init__(self, groups: list[dict]):
        for g in groups:
            g.setdefault("use_muon", False)
            g.setdefault("weight_decay", 0.0)
            if g["use_muon"]:
                g.setdefault("momentum", 0.95)
                g.setdefault("nesterov", True)
                g.setdefault("ns_steps", 5)
                if any(p.ndim != 2 for p in g["params"]):
                    raise ValueError("Muon groups take only 2-D weight matrices")
            else:
                g.setdefault("betas", (0.9, 0.95))
                g.setdefault("eps", 1e-8)
        super().__init__(groups, defaults={"lr": 0.02})

    # Honours `self.found_inf` (a 0-dim device tensor, nonzero = skip) like the fused AdamW kernel, so the
    # non-finite guard can skip a step without reading the flag on the host.
    supports_found_inf = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = getattr(self, "found_inf", None)
        keep = None if skip is None else skip == 0   # device bool: select new or old values, no sync
        # Under FSDP2 the parameters, gradients and state are DTensors; implicit replication lets the
        # plain 0-dim tensors (Adam's step, the skip flag) mix with them.
        with _dtensor_scalars(self.param_groups):
            for group in self.param_groups:
                if group["use_muon"]:
                    self._muon(group, keep)
                else:
                    self._adamw(group, keep)
        return loss

    def _muon(self, group: dict, keep: torch.Tensor | None) -> None:
        lr, mu = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        bufs, updates = [], []
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            new_buf = buf.lerp(p.grad, 1 - mu)  # mu * buf + (1 - mu) * grad
            bufs.append(new_buf)
            updates.append(p.grad.lerp(new_buf, mu) if group["nesterov"] else new_buf)
        # Newton-Schulz needs whole matrices: a sharded (FSDP2) update is gathered, orthogonalised on every
        # rank alike, and each rank keeps its own rows (no scatter: every rank holds the same result).
        for p, buf, update in zip(params, bufs, orthogonalize_all(updates, group["ns_steps"])):
            # An orthogonal (m x n) update has RMS sqrt(1/max(m,n)); scale tall/wide layers alike.
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            new_p = p * (1 - lr * group["weight_decay"]) - (lr * scale) * update
            _assign(self.state[p]["momentum_buffer"], buf, keep)
            _assign(p, new_p, keep)

    def _adamw(self, group: dict, keep: torch.Tensor | None) -> None:
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            t = state["step"] + 1   # a device tensor: the bias corrections need no host value
            m = state["exp_avg"].lerp(p.grad, 1 - b1)
            v = state["exp_avg_sq"] * b2 + (1 - b2) * p.grad * p.grad
            denom = (v / (1 - b2 ** t)).sqrt() + eps
            new_p = p * (1 - lr * group["weight_decay"]) - (lr / (1 - b1 ** t)) * m / denom
            for old, new in ((state["step"], t), (state["exp_avg"], m), (state["exp_avg_sq"], v), (p, new_p)):
                _assign(old, new, keep)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a DTensor (an all-gather); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this rank's shard of it when `like` is a DTensor (no communication)."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _dtensor_scalars(groups: list[dict]):
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]):
        return implicit_replication()
    return contextlib.nullcontext()


def _assign(dst: torch.Tensor, src: torch.Tensor, keep: torch.Tensor | None) -> None:
    """dst = src, or (keep False) dst unchanged; torch.where never lets the unchosen NaN through."""
    dst.copy_(src if keep is None else torch.where(keep, src, dst))
