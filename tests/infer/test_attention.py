"""One-query decode attention (kiln/infer/attention.py): the PyTorch reference against the model's plain path
(RoPE, cache write, SDPA over a mask), and the Triton kernel against the reference — in Triton's interpreter on
the CPU, on the device with CUDA."""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kiln.infer.attention import decode_attention, decode_attention_reference, decode_attention_triton, splits_for
from kiln.model.llama import apply_rope, rope_tables


def case(B=3, H=6, K=2, E=32, M=40, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)   # noqa: E731
    # q/k/v as views of one projection's output, as the model's stacked q/k/v matmul gives them
    qkv_BW = r(B, (H + 2 * K) * E)
    q, k, v = qkv_BW.split([H * E, K * E, K * E], -1)
    cos_ME, sin_ME = rope_tables(M, E, 10000.0)
    pos_B = torch.tensor([M - 1, 0, 17, 5, 31, 2, 9, 23][:B]).to(device)
    cache = r(2, B + 1, K, M, E)
    return (q.view(B, H, E), k.view(B, K, E), v.view(B, K, E), cos_ME[pos_B.cpu()].to(device),
            sin_ME[pos_B.cpu()].to(device), cache[0].clone(), cache[1].clone(), pos_B)


def plain_path(q_BHE, k_BKE, v_BKE, cos_BE, sin_BE, k_NKME, v_NKME, pos_B):
    """What the model does without the op: RoPE, the cache write, masked SDPA over the whole slot."""
    B, H, E = q_BHE.shape
    cos, sin = cos_BE[:, None, None], sin_BE[:, None, None]
    q = apply_rope(q_BHE[:, :, None], cos, sin)
    k = apply_rope(k_BKE[:, :, None], cos, sin)
    rows = torch.arange(B)
    k_NKME[rows, :, pos_B] = k[:, :, 0]
    v_NKME[rows, :, pos_B] = v_BKE
    mask = (torch.arange(k_NKME.size(2))[None, :] <= pos_B[:, None])[:, None, None]
    y = F.scaled_dot_product_attention(q, k_NKME[:B], v_NKME[:B], attn_mask=mask,
                                       enable_gqa=k_BKE.size(1) != H)
    return y[:, :, 0]


@pytest.mark.parametrize("H,K,E", [(6, 2, 32), (4, 4, 16), (3, 1, 64)])
def test_reference_equals_plain_path(H, K, E):
    args = case(H=H, K=K, E=E)
    ref_args = [a.clone() for a in args]
    want = plain_path(*args)
    got = decode_attention_reference(*ref_args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_args[5], args[5])   # the caches were written alike
    torch.testing.assert_close(ref_args[6], args[6])


def test_custom_op_under_compile_writes_the_cache():
    args = case()
    want_args = [a.clone() for a in args]
    want = decode_attention_reference(*want_args)
    got = torch.compile(lambda *a: decode_attention(*a, 40), fullgraph=True)(*args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(args[5], want_args[5])


def test_splits():
    assert splits_for(1, 9, 512, 64) == 8           # one block of keys per program
    assert splits_for(1, 9, 8192, 64) == 113        # ~1024 programs, two blocks each
    assert splits_for(32, 9, 512, 64) == 3
    assert splits_for(128, 12, 8192, 64) == 1       # many rows: one split
    assert splits_for(1, 1, 16, 64) == 1


INTERPRETED_CASES = [  # H, K, E, M, dtype, splits
    (6, 2, 32, 40, "float32", None),
    (4, 4, 16, 600, "float32", 3),      # keys split over 3 programs; a row at position 0 leaves two empty
    (3, 1, 32, 200, "float32", 1),      # one program walks every block
    (2, 1, 24, 40, "float32", None),    # a head_dim that is not a power of two
    (6, 2, 32, 300, "bfloat16", 2),     # bf16 rounding of RoPE and of the cache
]


def interpreted_cases() -> None:
    """Run in a process started with TRITON_INTERPRET=1 (Triton reads it when first imported)."""
    from kiln.infer.kernels import combine_kernel, decode_kernel
    from kiln.infer.attention import _counters
    for (H, K, E, M, dtype, splits), merge in itertools.product(INTERPRETED_CASES, (True, False)):
        dtype = getattr(torch, dtype)
        args = case(H=H, K=K, E=E, M=M, dtype=dtype)
        ref_args = [a.clone() for a in args]
        want = decode_attention_reference(*ref_args)
        got = decode_attention_triton(*args, M, kernels=(decode_kernel, combine_kernel), splits=splits, merge=merge)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(args[5], ref_args[5], **tol)
        torch.testing.assert_close(args[6], ref_args[6])
        assert all(int(c.abs().sum()) == 0 for c in _counters.values()), "a merge left its counter set"
    assert merge is False and _counters, "the in-kernel merge ran"
    print("ok", len(INTERPRETED_CASES))


def test_triton_kernel_equals_reference_interpreted():
    """The Triton kernel in Triton's interpreter on the CPU (GQA and plain heads, odd head_dim, several splits,
    bf16) against the reference, in a process of its own."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():   # the interpreter differs between Triton versions; the device is the truth
        pytest.skip("with CUDA the kernel itself runs: test_triton_kernel_equals_reference_cuda")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,K,E,M", [(9, 3, 64, 512), (6, 6, 128, 4096), (4, 1, 80, 300)])
def test_triton_kernel_equals_reference_cuda(dtype, H, K, E, M):
    pytest.importorskip("triton")
    args = case(B=8, H=H, K=K, E=E, M=M, dtype=dtype, device="cuda")
    ref_args = [a.clone() for a in args]
    want = decode_attention_reference(*ref_args)
    got = decode_attention(*args, M)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(args[5], ref_args[5], **tol)
    # one row (the split path)
    one = [a[:1].clone() if i < 5 or i == 7 else a.clone() for i, a in enumerate(case(B=1, H=H, K=K, E=E, M=M,
                                                                                     dtype=dtype, device="cuda"))]
    ref_one = [a.clone() for a in one]
    want_one = decode_attention_reference(*ref_one)
    torch.testing.assert_close(decode_attention(*one, M), want_one, **tol)
    assert math.isfinite(float(got.float().abs().max()))
    # the merge as a launch of its own gives the same; the in-kernel merge, launched again and again, the same
    # bits every time (a split read before its writer finished would show as a different result)
    torch.testing.assert_close(decode_attention_triton(*one, M, merge=False), want_one, **tol)
    first = decode_attention_triton(*one, M, merge=True)
    for _ in range(200):
        assert torch.equal(decode_attention_triton(*one, M, merge=True), first)


if __name__ == "__main__":
    interpreted_cases()
