"""One-query decode attention in one kernel: RoPE of the new query and key, the cache write, the attention.

Shape legend: B rows (row b is slot b of the cache), H query heads, K key/value heads (G = H / K queries share
one), E head_dim, N slots, M positions per slot, J splits of the keys.

At a decode step of one or a few rows the plain path spends, per layer, a RoPE kernel for q, one for k fused
with the cache write, and cuDNN's masked attention, which takes 7-9 us for one query (it is built for many):
~10 us of a SmolLM2-shaped layer's ~33 (profiled on an H100: bench/profile_decode.py). `decode_attention` does
all of it in one Triton program per (row, query head, split of the keys):

- RoPE (the model's `rotate_half` layout) of the row's query and new key, from the row's cos/sin, with the
  tables rounded to the compute dtype first and the rotated vectors rounded once, as the compiled plain
  path does;
- the new key and value written at the row's position (by the program of split 0 and the first query head of
  the group), and taken from registers, not read back, so no program depends on another's write;
- an online softmax over the row's cached keys 0 .. pos - 1, in blocks, plus the new key; no mask tensor.

At few rows the keys are split over J programs per head (flash-decoding) so that each walks one or two blocks
(a program's blocks are a chain of dependent loads), and the last of a head's programs to finish merges their
partial (max, sum, weighted values), found by an atomic counter per (row, head) (kiln/infer/kernels.py), when
`MERGE_IN_KERNEL`; else, or while a CUDA graph is captured before the counters exist, a second kernel merges;
with one split the first kernel writes the output directly. The counters are one buffer per device, zero
between launches: two of these launches must not run at once on two streams of one device (the engine runs
its steps on one stream). Measured (H100, batch 1,
compiled step): a step 464 -> 410 us (gpt2-small shape), 980 -> 888 us (SmolLM2); at 32 and 128 rows SDPA
is faster (the kernel reloads K/V once per query head of a group and walks more blocks per program), so the
engine uses it for small decode buckets only (`DecodeStep.fused_attention_rows`).

It is a `torch.library` custom op (`kiln::decode_attention`): torch.compile treats it as one opaque call that
mutates the two caches, the engine's CUDA graphs capture its launch, and off CUDA (or without Triton) the same
op runs `decode_attention_reference`, the arithmetic in PyTorch, which the tests compare with the kernel
(in Triton's interpreter on a CPU) and with the model's plain path.
"""

from __future__ import annotations

import functools
import math

import torch

from kiln.runtime.device import pdl_args, triton_available


def rope_one(x_BXE: torch.Tensor, cos_BE: torch.Tensor, sin_BE: torch.Tensor) -> torch.Tensor:
    """RoPE of one position per row (`rotate_half` layout), computed in fp32 with the tables in x's dtype,
    rounded once to x's dtype."""
    cos = cos_BE.to(x_BXE.dtype).float()[:, None]
    sin = sin_BE.to(x_BXE.dtype).float()[:, None]
    x = x_BXE.float()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x_BXE.dtype)


def decode_attention_reference(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B,
                               max_keys: int | None = None) -> torch.Tensor:
    """The op's arithmetic in PyTorch: write the rotated key and the value at each row's position, then attend
    over keys 0 .. pos (reading the first `max_keys` positions, default the whole slot: no host sync, so a
    CUDA graph can capture it). Returns (B, H, E) in q's dtype."""
    B, H, E = q_BHE.shape
    K = k_BKE.size(1)
    q_BHE = rope_one(q_BHE, cos_BE, sin_BE)
    rows_B = torch.arange(B, device=q_BHE.device)
    k_NKME[rows_B, :, pos_B] = rope_one(k_BKE, cos_BE, sin_BE).to(k_NKME.dtype)
    v_NKME[rows_B, :, pos_B] = v_BKE.to(v_NKME.dtype)
    S = max_keys or k_NKME.size(2)
    k_BKSE = k_NKME[:B, :, :S].float().repeat_interleave(H // K, dim=1)
    v_BKSE = v_NKME[:B, :, :S].float().repeat_interleave(H // K, dim=1)
    scores_BHS = torch.einsum("bhe,bhse->bhs", q_BHE.float(), k_BKSE) / math.sqrt(E)
    seen_BS = torch.arange(S, device=q_BHE.device)[None, :] <= pos_B[:, None]
    p_BHS = scores_BHS.masked_fill(~seen_BS[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhs,bhse->bhe", p_BHS, v_BKSE).to(q_BHE.dtype)


@torch.library.custom_op("kiln::decode_attention", mutates_args=("k_NKME", "v_NKME"))
def decode_attention(q_BHE: torch.Tensor, k_BKE: torch.Tensor, v_BKE: torch.Tensor, cos_BE: torch.Tensor,
                     sin_BE: torch.Tensor, k_NKME: torch.Tensor, v_NKME: torch.Tensor, pos_B: torch.Tensor,
                     max_keys: int) -> torch.Tensor:
    """Attention of one new query per row over its cached keys and its new key (see the module docstring).
    `max_keys` bounds every row's pos + 1 (the engine's length bucket): it sizes the splits, never a read."""
    if q_BHE.is_cuda and triton_available():
        return decode_attention_triton(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B, max_keys)
    return decode_attention_reference(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B, max_keys)


@decode_attention.register_fake
def _(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B, max_keys):
    return q_BHE.new_empty(q_BHE.shape)


def splits_for(rows: int, heads: int, max_keys: int, block: int, programs: int = 1024) -> int:
    """How many programs share one head's keys: at few rows, enough for ~`programs` programs in all, so that
    each walks one or two blocks of keys (a program's blocks are a chain of dependent loads: ~1 us each); at
    many rows, one split (the rows fill the device)."""
    return max(1, min(-(-max_keys // block), programs // max(1, rows * heads)))


# The in-kernel merge: 4.56 against 5.27 us a launch, a SmolLM2 step 815 against 842 us (H100, BENCHMARKS.md).
MERGE_IN_KERNEL = True


def counters(device: torch.device, n: int) -> torch.Tensor | None:
    """The device's zeroed int32 counters for the in-kernel merge (at least n), or None while a CUDA graph is
    being captured and the buffer is missing or too small (allocating would put a memset in the graph)."""
    have = _counters.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


_counters: dict[torch.device, torch.Tensor] = {}


def decode_attention_triton(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B, max_keys: int,
                            kernels=None, splits: int | None = None, merge: bool | None = None) -> torch.Tensor:
    """The Triton kernels' launch (`kernels`: another build of the two, e.g. in Triton's interpreter, for
    tests; `splits`: instead of `splits_for`'s; `merge`: in the kernel, instead of `MERGE_IN_KERNEL`)."""
    B, H, E = q_BHE.shape
    K = k_BKE.size(1)
    for name, t in (("q", q_BHE), ("k", k_BKE), ("v", v_BKE), ("k cache", k_NKME), ("v cache", v_NKME)):
        assert t.stride(-1) == 1, f"{name} must be contiguous along head_dim"
    cos_BE, sin_BE = cos_BE.contiguous(), sin_BE.contiguous()
    E_pow2 = 1 << max(0, (E - 1).bit_length())
    block = max(16, 4096 // E_pow2)
    J = splits or splits_for(B, H, max_keys, block)
    chunk = -(-max(1, max_keys) // J // block) * block      # keys per split, whole blocks
    out_BHE = q_BHE.new_empty(B, H, E)
    count_R = None
    if J > 1:
        acc_RE = torch.empty(B * H * J, E, device=q_BHE.device, dtype=torch.float32)
        ml_R2 = torch.empty(B * H * J, 2, device=q_BHE.device, dtype=torch.float32)
        if MERGE_IN_KERNEL if merge is None else merge:
            count_R = counters(q_BHE.device, B * H)
    else:
        acc_RE, ml_R2 = out_BHE, out_BHE   # unused: the kernel writes the output itself
    if B:
        decode, combine = kernels or _kernels()
        pdl = pdl_args(q_BHE.device, kernels is None)
        splits_pow2 = 1 << (J - 1).bit_length()
        decode[(B, H, J)](
            q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B, out_BHE, acc_RE, ml_R2,
            count_R if count_R is not None else pos_B,
            q_BHE.stride(0), q_BHE.stride(1), k_BKE.stride(0), k_BKE.stride(1), v_BKE.stride(0), v_BKE.stride(1),
            k_NKME.stride(0), k_NKME.stride(1), k_NKME.stride(2), chunk, 1.0 / math.sqrt(E),
            G=H // K, E=E, E_POW2=E_pow2, BLOCK=block, SPLITS=J, SPLITS_POW2=splits_pow2,
            MERGE=count_R is not None, num_warps=4, **pdl)
        if J > 1 and count_R is None:
            combine[(B * H,)](acc_RE, ml_R2, out_BHE, E=E, E_POW2=E_pow2, SPLITS=J, SPLITS_POW2=splits_pow2,
                              num_warps=4, **pdl)
    return out_BHE


@functools.cache
def _kernels():
    from kiln.infer.kernels import combine_kernel, decode_kernel   # imports triton: only where installed
    return decode_kernel, combine_kernel
