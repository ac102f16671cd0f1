"""CUDA paths: the fused attention kernels, bf16 autocast, and KV-cache decoding on the GPU."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kiln.config import ModelConfig
from kiln.infer.generate import generate
from kiln.infer.kv_cache import KVCache
from kiln.model.llama import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def make(device="cuda", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"depth": 2, "d_model": 128, "head_dim": 64, "n_kv_heads": 1, "vocab_size": 211,
                         "max_seq_len": 64, "init_std": 0.1, **kw})
    return Transformer.from_config(cfg, device=device)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_trains_through_flash_attention_with_gqa(qk_norm):
    model = make(qk_norm=qk_norm)
    ids = torch.randint(0, 211, (4, 64), device="cuda")
    # Only the flash kernel allowed: this fails if GQA or our dtypes push SDPA to the math fallback.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, ids)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp32_cuda_matches_cpu():
    gpu = make()
    cpu = make(device="cpu")
    cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    ids = torch.randint(0, 211, (2, 64))
    with torch.no_grad():
        diff = (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max().item()
    assert diff <= 1e-4


def test_cached_decoding_on_cuda():
    model = make().eval()
    prompt = [3, 1, 4, 1, 5]
    assert generate(model, prompt, 30, temperature=0) == generate(model, prompt, 30, temperature=0, use_cache=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cache = KVCache.for_model(model)
        assert cache.k_LBKME.dtype == torch.bfloat16  # K/V must match autocast's Q for SDPA
        out = generate(model, prompt, 30, temperature=0.8, top_k=20, seed=0)
        assert out == generate(model, prompt, 30, temperature=0.8, top_k=20, seed=0)
    assert len(out) == 30


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_packed_documents_through_varlen_flash_match_the_masked_path(n_kv_heads):
    """With the documents' bounds the packed rows go through variable-length flash attention: the loss and
    every gradient agree with the dense block-diagonal mask's (bf16 autocast; each document alone either way)."""
    from kiln.model import llama
    if llama._varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    if not llama.varlen_supported(torch.device("cuda")):
        pytest.skip("flash attention needs an Ampere or newer card")
    model = make(n_heads=2, n_kv_heads=n_kv_heads)
    lengths = [[20, 30, 14], [64], [5, 40]]                    # the last row ends in padding: a segment too
    seg = torch.zeros(3, 64, dtype=torch.long)
    starts = []
    for b, row in enumerate(lengths):
        at = 0
        for k, n in enumerate(row):
            seg[b, at:at + n] = k
            starts.append(b * 64 + at)
            at += n
        if at < 64:
            seg[b, at:] = len(row)
            starts.append(b * 64 + at)
    cu = torch.tensor(starts + [3 * 64], dtype=torch.int32, device="cuda")
    ids = torch.randint(0, 211, (3, 64), device="cuda")
    targets = torch.randint(0, 211, (3, 64), device="cuda")
    seg = seg.cuda()

    def run(bounds):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets, reduction="sum", segments_BT=seg, cu_seqlens_S=bounds)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    real = llama._varlen_attn
    llama._varlen_attn = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got, got_g = run(cu)
    finally:
        llama._varlen_attn = real
    assert len(calls) == 2                                      # both layers took the varlen kernel
    want, want_g = run(None)
    assert torch.allclose(got, want, rtol=2e-3)
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g, w, rtol=5e-2, atol=5e-3 * w.abs().max().item())
