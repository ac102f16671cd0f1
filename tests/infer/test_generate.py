import pytest
import torch

from kiln.config import ModelConfig
from kiln.infer.generate import generate, stream
from kiln.infer.kv_cache import KVCache
from kiln.infer.sampling import sample_next
from kiln.model.llama import Transformer

HEADS = {"mha": dict(), "gqa": dict(n_kv_heads=2), "gqa_qknorm": dict(n_kv_heads=2, qk_norm=True)}
PROMPTS = [[5], [1, 2, 3], [7, 7, 7, 7, 7, 9, 11], list(range(20, 40))]


def make(init_std=0.3, **kw) -> Transformer:
    # A large init_std gives peaked, well-separated logits, so greedy argmax is not a near-tie
    # that rounding between the cached and uncached paths could flip.
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, d_model=64, head_dim=16, vocab_size=89, max_seq_len=48, init_std=init_std, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("heads", list(HEADS))
def test_cached_greedy_equals_full_recomputation(heads):
    model = make(**HEADS[heads])
    for prompt in PROMPTS:
        cached = generate(model, prompt, 20, temperature=0, use_cache=True)
        full = generate(model, prompt, 20, temperature=0, use_cache=False)
        assert cached == full
        assert len(cached) == 20
    assert len({tuple(generate(model, p, 20, temperature=0)) for p in PROMPTS}) > 1  # not a constant output


@pytest.mark.parametrize("heads", list(HEADS))
def test_cached_logits_match_uncached_each_step(heads):
    # Logits of order 1, so 1e-5 absolute is a few fp32 ulps (kernels sum in different orders).
    model = make(init_std=0.1, **HEADS[heads])
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    cache = KVCache.for_model(model, batch_size=1)
    with torch.no_grad():
        step_logits = model(ids, cache=cache)
        assert cache.pos == 6
        assert (step_logits - model(ids)).abs().max().item() <= 1e-5
        for _ in range(12):
            nxt = step_logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            step_logits = model(nxt, cache=cache)
            assert (step_logits[:, -1] - model(ids)[:, -1]).abs().max().item() <= 1e-5
    assert cache.pos == ids.size(1)


@pytest.mark.parametrize("heads", list(HEADS))
def test_chunked_prefill_with_offset_mask_matches_full(heads):
    """Several new tokens after a cached prefix (T_q < T_k) need the offset causal mask."""
    model = make(**HEADS[heads])
    ids = torch.randint(0, 89, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 8), (8, 19), (19, 30)]]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_sampling_is_reproducible_per_seed():
    model = make(init_std=0.02)  # near-uniform logits: samples vary a lot between seeds
    a = generate(model, [1, 2], 30, temperature=1.0, seed=7)
    b = generate(model, [1, 2], 30, temperature=1.0, seed=7)
    c = generate(model, [1, 2], 30, temperature=1.0, seed=8)
    assert a == b
    assert a != c
    assert generate(model, [1, 2], 30, temperature=1.0, seed=7, use_cache=False) == a


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make(init_std=0.02)
    greedy = generate(model, [4, 5, 6], 25, temperature=0)
    assert generate(model, [4, 5, 6], 25, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, [4, 5, 6], 25, temperature=1.5, top_p=1e-6, seed=3) == greedy
    assert generate(model, [4, 5, 6], 25, temperature=1.5, seed=3) != greedy


def test_stop_ids_stop_generation_and_are_excluded():
    model = make()
    full = generate(model, [2, 3], 20, temperature=0)
    stop = full[4]
    first = full.index(stop)
    assert generate(model, [2, 3], 20, temperature=0, stop_ids=[stop]) == full[:first]
    assert generate(model, [2, 3], 20, temperature=0, stop_ids={stop, 10_000}, use_cache=False) == full[:first]


def test_stream_yields_what_generate_returns():
    model = make()
    it = stream(model, [8, 9], 10, temperature=0.9, top_k=20, top_p=0.9, seed=1)
    assert list(it) == generate(model, [8, 9], 10, temperature=0.9, top_k=20, top_p=0.9, seed=1)


def test_generation_stops_when_context_is_full():
    model = make()  # max_seq_len 48
    prompt = list(range(45))
    cached = generate(model, prompt, 10, temperature=0)
    assert len(cached) == 48 - 45 + 1  # the last token needs no forward of its own
    assert generate(model, prompt, 10, temperature=0, use_cache=False) == cached
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(49)), 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, 1.0, top_k=3, top_p=0.99, generator=g).tolist()) == {0, 1, 2}
    freq0 = (sample_next(logits, 1.0, generator=g) == 0).float().mean().item()
    assert freq0 == pytest.approx(0.5, abs=0.04)
    assert sample_next(logits[:2], 0).tolist() == [0, 0]
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next(logits, **{"temperature": 1.0, **bad})


def test_kv_cache_update_advance_reset():
    cache = KVCache(n_layers=2, batch_size=1, n_kv_heads=2, max_len=5, head_dim=4)
    k = torch.randn(1, 2, 3, 4)
    k_all, v_all = cache.update(0, k, -k)
    assert k_all.shape == (1, 2, 3, 4) and torch.equal(k_all, k) and torch.equal(v_all, -k)
    cache.advance(3)
    k2 = torch.randn(1, 2, 2, 4)
    k_all, _ = cache.update(1, k2, k2)
    assert k_all.shape == (1, 2, 5, 4) and torch.equal(k_all[:, :, 3:], k2)
    cache.advance(2)
    with pytest.raises(ValueError, match="full"):
        cache.update(0, k2[:, :, :1], k2[:, :, :1])
    cache.reset()
    assert cache.pos == 0 and cache.update(0, k, k)[0].shape[2] == 3
