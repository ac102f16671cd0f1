"""`matvec` (kiln/infer/matvec.py): the PyTorch reference against the model's own modules (RMSNorm, Linear,
SwiGLU, residual), the Triton kernel against the reference — in Triton's interpreter on the CPU (a process of
its own) and on the device with CUDA — and the engine's fused layers against the model's path."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.infer.matvec import matvec, matvec_reference, matvec_triton
from kiln.model.llama import RMSNorm


def tensors(B, K, N, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)   # noqa: E731
    return r(B, K), r(N, K) / K ** 0.5, (1 + 0.1 * torch.randn(K, generator=g)).to(device, dtype), r(B, N)


def test_reference_is_the_models_arithmetic():
    x, w, gain, res = tensors(3, 48, 40)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data.copy_(gain)
    torch.testing.assert_close(matvec_reference(x, w, gain, 1e-5, None, False), F.linear(norm(x), w))
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    torch.testing.assert_close(matvec_reference(x, w, None, 0.0, None, True), F.silu(gate) * up)
    torch.testing.assert_close(matvec_reference(x, w, None, 0.0, res, False), res + F.linear(x, w))


CASES = [  # B, K, N, dtype, norm, glu, residual
    (1, 48, 40, "float32", True, False, False),
    (3, 300, 70, "float32", False, True, False),     # K past one 256-wide block, N not a multiple of 16
    (5, 64, 33, "float32", False, False, True),
    (2, 96, 64, "float16", True, True, False),       # 16-bit rounding (Triton's interpreter gets bf16 dots wrong)
]


CONFIGS = [None,   # matvec_config's
           dict(BLOCK_N=4, BLOCK_K=64, DOT=False, num_warps=4),    # products on the CUDA cores, several K steps
           dict(BLOCK_N=32, BLOCK_K=32, DOT=True, num_warps=2)]


def interpreted_cases() -> None:
    """Run in a process started with TRITON_INTERPRET=1 (Triton reads it when first imported)."""
    from kiln.infer.kernels import matvec_kernel
    for (B, K, N, dtype, norm, glu, residual), config in itertools.product(CASES, CONFIGS):
        dtype = getattr(torch, dtype)
        x, w, gain, res = tensors(B, K, 2 * N if glu else N, dtype)
        args = (x, w, gain if norm else None, 1e-5, res[:, :N] if residual else None, glu)
        want = matvec_reference(*args)
        got = matvec_triton(*args, kernel=matvec_kernel, config=config)
        tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, want, **tol)
    print("ok", len(CASES))


def test_triton_kernel_equals_reference_interpreted():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("with CUDA the kernel itself runs: test_triton_kernel_equals_reference_cuda")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES + [(8, 576, 960, "bfloat16", True, False, False),
                                          (4, 1536, 576, "bfloat16", False, False, True),
                                          (1, 576, 1536, "bfloat16", True, True, False)])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_triton_kernel_equals_reference_cuda(case, config):
    pytest.importorskip("triton")
    B, K, N, dtype, norm, glu, residual = case
    dtype = getattr(torch, dtype)
    x, w, gain, res = tensors(B, K, 2 * N if glu else N, dtype, "cuda")
    args = (x, w, gain if norm else None, 1e-5, res[:, :N] if residual else None, glu)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    got = matvec(*args) if config == 0 else matvec_triton(*args, config=CONFIGS[config])
    torch.testing.assert_close(got, matvec_reference(*args), **tol)


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_engine_fused_layers_equal_the_models_path(monkeypatch, qkv_bias):
    """Greedy tokens of the engine with every layer through the ops (their PyTorch arithmetic on the CPU) equal
    the uncached single-sequence reference (Qwen2's q/k/v biases, random, included); a model the path cannot take
    is refused with the reason."""
    from kiln.infer.decode_step import DecodeStep
    from kiln.infer.engine import Engine
    from kiln.infer.fuse import fuse_projections
    from kiln.infer.generate import generate
    from kiln.infer.sampling import SamplingParams
    from kiln.model.llama import Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(depth=2, d_model=64, head_dim=16, n_kv_heads=2, vocab_size=89, max_seq_len=48,
                                    init_std=0.3, qkv_bias=qkv_bias)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    prompts = [[5], [1, 2, 3], list(range(20, 40))]
    ref = [generate(model, p, 12, temperature=0, use_cache=False) for p in prompts]
    with pytest.raises(ValueError, match="stacked q/k/v"):
        Engine(model, max_slots=2, fused_attention=True, fused_layers=True)
    assert not Engine(model, max_slots=2, fused_attention=True).decoder.fused_layers    # by default: where it can
    fuse_projections(model)
    assert Engine(model, max_slots=2, fused_attention=True).decoder.fused_layers
    assert not Engine(model, max_slots=2, fused_attention=True, fused_layers=False).decoder.fused_layers
    with pytest.raises(ValueError, match="needs fused_attention"):
        Engine(model, max_slots=2, fused_attention=False, fused_layers=True)
    monkeypatch.setattr(DecodeStep, "fused_attention_rows", 2)   # buckets of 1 and 2 rows fused, 4 not
    for slots in (1, 2, 4):
        engine = Engine(model, max_slots=slots, fused_attention=True, fused_layers=True)
        assert [o[0] for o in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0))] == ref
    qk = Transformer(ModelConfig(depth=1, d_model=32, head_dim=8, vocab_size=61, max_seq_len=32, qk_norm=True))
    fuse_projections(qk)
    with pytest.raises(ValueError, match="QK-norm"):
        Engine(qk, max_slots=2, fused_attention=True, fused_layers=True)
    assert not Engine(qk, max_slots=2, fused_attention=True).decoder.fused_layers


if __name__ == "__main__":
    interpreted_cases()
