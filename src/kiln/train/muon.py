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

import torch

# Coefficients of the quintic iteration, tuned to push singular values into ~[0.7, 1.2] in 5 steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            update = orthogonalize(update, group["ns_steps"])
            # An orthogonal (m x n) update has RMS sqrt(1/max(m,n)); scale tall/wide layers alike.
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()  # a CPU tensor: no device sync
            state["exp_avg"].lerp_(p.grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (state["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** t))
