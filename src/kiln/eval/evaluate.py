"""Evaluation of a checkpoint: loss, perplexity, bits per byte, train/val gap, baselines, samples.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the scored tokens stand for,
so models with different tokenizers compare fairly. Targets that are special tokens (EOS between
documents) stand for no bytes and are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from kiln.runtime.device import autocast
from kiln.tokenizer.loader import IGNORE


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: Iterable, n_batches: int, device: torch.device, bf16: bool,
              token_bytes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Summed loss over the real (non-ignored) targets of `n_batches` batches, their count and, with
    `token_bytes`, the loss and UTF-8 bytes of the byte-bearing ones: fp64 device tensors, so a caller can
    add them over ranks before dividing (the validation step of training does). A batch is
    `(inputs, targets)` or a dict with `input_ids` and `targets`."""
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("nats", "tokens", "nats_bytes", "bytes")}
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    it = iter(batches)
    for _ in range(n_batches):
        batch = next(it)
        x, y = (batch["input_ids"], batch["targets"]) if isinstance(batch, dict) else batch[:2]
        x, y = x.to(device), y.to(device)
        with autocast(device, bf16):
            losses = model(x, y, reduction="none").float()  # (B, T), 0 at ignored targets
        real = y != IGNORE
        sums["nats"] += losses.sum()
        sums["tokens"] += real.sum()
        if token_bytes is not None:
            nb = torch.where(real, token_bytes[y.clamp(min=0)], 0)  # (B, T) bytes each real target stands for
            sums["nats_bytes"] += (losses * (nb > 0)).sum()
            sums["bytes"] += nb.sum()
    return sums


def score(model: torch.nn.Module, loader: Iterable, batches: int, token_bytes: torch.Tensor,
          device: torch.device, bf16: bool) -> dict[str, float]:
    """Loss per real target token, perplexity, and bits per byte over the byte-bearing targets."""
    s = {k: v.item() for k, v in loss_sums(model, loader, batches, device, bf16, token_bytes).items()}
    loss = s["nats"] / max(s["tokens"], 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(s["tokens"]), "bytes": int(s["bytes"]),
            "bits_per_byte": s["nats_bytes"] / (math.log(2) * max(s["bytes"], 1))}


def unigram_loss(train_files: list[Path], val_files: list[Path], vocab_size: int,
                 separators: tuple[int, ...]) -> float:
    """Cross-entropy (nats/token) of validation tokens under the training set's unigram distribution
    (add-one smoothed), counting the per-document separators the loader inserts (EOS, BOS): what a
    model that ignores context entirely can reach."""
    counts = _token_counts(train_files, vocab_size, separators) + 1.0
    logp = np.log(counts / counts.sum())
    val = _token_counts(val_files, vocab_size, separators)
    return float(-(val * logp).sum() / val.sum())


def _token_counts(files: list[Path], vocab_size: int, separators: tuple[int, ...]) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.float64)
    for f in files:
        col = pq.read_table(f, columns=["ids"]).column("ids")
        for chunk in col.chunks:
            flat = chunk.values.to_numpy(zero_copy_only=False)
            counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
            for sep in separators:
                counts[sep] += len(chunk)
    return counts
