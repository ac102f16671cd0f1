"""The training loop of the CUDA tests: compiled or eager, bf16 autocast, fused AdamW, one memorised batch."""

import torch


def bf16_losses(step, params, rows: int, steps: int) -> list[float]:
    """Losses of `steps` steps of `step` (a model or its compiled form) on one random (rows, 128) batch of a
    512-token vocabulary, AdamW at 3e-3 over `params`."""
    opt = torch.optim.AdamW(params, lr=3e-3, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, 512, (rows, 128), device="cuda", generator=g)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x, torch.roll(x, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
