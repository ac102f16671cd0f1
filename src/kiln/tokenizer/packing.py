"""Row packing helpers of the loader: best-fit packing of documents into rows, and document masks.

L = seq_len + 1 (a row holds the inputs and, shifted by one, the targets).
"""

from __future__ import annotations

import bisect

import numpy as np


def document_mask(x: np.ndarray, eos_id: int, bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions, segment_ids), int64, of inputs x (B, S): a new segment starts after each EOS and at each BOS."""
    B, S = x.shape
    start = np.zeros(x.shape, dtype=bool)
    start[:, 1:] = x[:, :-1] == eos_id
    if bos_id is not None:
        start |= x == bos_id
    start[:, 0] = True
    seg = np.cumsum(start, axis=1, dtype=np.int64) - 1                          # (B, S)
    t = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
    seg_start = np.maximum.accumulate(np.where(start, t, 0), axis=1)
    return t - seg_start, seg


# ---------------------------------------------------------------- packing

def split_pieces(units: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split units (lengths, in stream order) into pieces of at most L tokens overlapping by one token,
    so that every token of a unit but its first is a target exactly once; (stream starts, lengths,
    is-continuation). The last piece of a split unit holds at least 2 tokens."""
    S = L - 1
    unit_start = np.zeros(len(units), dtype=np.int64)
    np.cumsum(units[:-1], out=unit_start[1:])
    # pieces per unit: 1 if u <= L else ceil((u - 1) / S)
    k = np.where(units <= L, 1, -(-(units - 1) // S))
    idx = np.repeat(np.arange(len(units)), k)
    j = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)                  # piece number within its unit
    starts = unit_start[idx] + j * S
    lens = np.minimum(units[idx] - j * S, L)
    return starts, lens, j > 0


def bestfit_rows(lens: np.ndarray, L: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Best-fit-decreasing: ((row, column) of each piece, tokens per row). The row count depends only
    on the multiset of lengths, so it is the same in every epoch whatever the document order."""
    order = np.argsort(-lens, kind="stable")
    row = np.empty(len(lens), dtype=np.int64)
    col = np.empty(len(lens), dtype=np.int64)
    full = order[lens[order] == L]
    row[full], col[full] = np.arange(len(full)), 0
    fill = [L] * len(full)
    free: list[tuple[int, int]] = []          # (free space, row), sorted: best fit = first with space >= n
    for p in order[len(full):].tolist():
        n = int(lens[p])
        i = bisect.bisect_left(free, (n, -1))
        if i < len(free):
            space, r = free.pop(i)
        else:
            space, r = L, len(fill)
            fill.append(0)
        row[p], col[p] = r, fill[r]
        fill[r] += n
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return (row, col), np.asarray(fill, dtype=np.int64)


# ---------------------------------------------------------------- shards
