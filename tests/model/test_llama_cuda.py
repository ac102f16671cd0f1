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
    cfg = ModelConfig(depth=2, d_model=128, head_dim=64, n_kv_heads=1, vocab_size=211, max_seq_len=64,
                      init_std=0.1, **kw)
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
