"""The countable parts of the estimate against real tensors: parameters, KV cache, optimizer state, saved
activations (saved-tensor hooks), FLOPs per token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.config import ModelConfig, TrainConfig
from kiln.infer.kv_cache import KVCache
from kiln.model.llama import Transformer
from kiln.plan.estimate import flops_per_token
from kiln.plan.memory import (TrainSetup, block_activation_bytes, kv_cache_bytes, lora_params, param_counts,
                              train_memory)
from kiln.train.optim import build_optimizer

CONFIGS = {
    "tied": dict(depth=2, d_model=64, head_dim=16, vocab_size=320, max_seq_len=32),
    "untied": dict(depth=3, d_model=64, head_dim=16, vocab_size=320, max_seq_len=32, tie_embeddings=False),
    "gqa": dict(depth=2, d_model=96, head_dim=16, n_kv_heads=2, vocab_size=256, max_seq_len=32),
    "qk_norm": dict(depth=2, d_model=64, head_dim=32, n_kv_heads=1, qk_norm=True, vocab_size=256, max_seq_len=32),
    "qkv_bias": dict(depth=2, d_model=64, head_dim=16, n_kv_heads=2, qkv_bias=True, vocab_size=256, max_seq_len=32),
    "ffn": dict(depth=1, d_model=48, head_dim=8, ffn_hidden=100, vocab_size=200, max_seq_len=16),
}


@pytest.fixture(params=list(CONFIGS))
def cfg(request) -> ModelConfig:
    return ModelConfig(**CONFIGS[request.param]).resolved()


def test_param_counts_match_the_model(cfg):
    model = Transformer(cfg)
    pc = param_counts(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.non_embedding == model.num_params(non_embedding=True)
    assert pc.matmul == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    decay = build_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu")).param_groups[0]["params"]
    assert pc.hidden_matrices == sum(p.numel() for p in decay)   # Muon's share: the decayed 2-D block weights


def test_flops_per_token_match_the_model(cfg):
    assert flops_per_token(cfg, 24)["total"] == Transformer(cfg).flops_per_token(24)


@pytest.mark.parametrize("batch, context", [(1, 32), (3, 20)])
def test_kv_cache_bytes_match_the_allocated_cache(cfg, batch, context):
    model = Transformer(cfg).to(torch.bfloat16)
    cache = KVCache.for_model(model, batch_size=batch, max_len=context)
    assert kv_cache_bytes(cfg, context, batch, 2) == cache.k_LBKME.nbytes + cache.v_LBKME.nbytes


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weights_grads_and_optimizer_state_match_the_tensors(cfg, optimizer):
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, optimizer=optimizer), torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    model(x, x).backward()
    opt.step()
    tm = train_memory(cfg, TrainSetup(seq_len=8, micro_batch=2, optimizer=optimizer))
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in model.parameters())
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    assert (tm.weights, tm.gradients, tm.optimizer) == (weights, grads, state)


def _saved_bytes(model, x, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward that scale with the tokens: parameters, their
    autocast copies and the RoPE tables are excluded (B * T is chosen to divide none of their sizes)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() % x.numel() == 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(x, model.rope_cos[:x.shape[1]], model.rope_sin[:x.shape[1]])
    return sum(seen.values())


@pytest.mark.parametrize("bf16", [True, False])
def test_block_activations_match_what_autograd_saves(cfg, bf16):
    """Every block's saved tensors, counted with saved-tensor hooks (CPU: PyTorch's composite rms_norm, which
    keeps one more fp32 tensor than CUDA's fused kernel)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 3, 7   # B * T matches no weight dimension, so activations and weight copies cannot be confused
    x = torch.randint(0, cfg.vocab_size, (B, T))
    saved = _saved_bytes(model, x, bf16)
    a = 2 if bf16 else 4
    per_block = block_activation_bytes(cfg, compute_bytes=a, residual_bytes=4, fused_norm=False)
    final_norm = 4 * cfg.d_model + 4 + 4 * cfg.d_model
    embedding_ids = 8
    assert saved == B * T * (cfg.depth * per_block + final_norm + embedding_ids)


def test_lora_params_count_rank_times_in_plus_out():
    cfg = ModelConfig(**CONFIGS["gqa"]).resolved()
    D, HE, KE, F = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden
    assert lora_params(cfg, 4, ["q", "v"]) == cfg.depth * 4 * ((D + HE) + (D + KE))
    assert lora_params(cfg, 2) == cfg.depth * 2 * ((D + HE) + 2 * (D + KE) + (HE + D) + 2 * (D + F) + (F + D))


def test_sharding_divides_what_it_shards():
    cfg = ModelConfig(**CONFIGS["untied"]).resolved()
    one = train_memory(cfg, TrainSetup(seq_len=16, optimizer="adamw"))
    z1 = train_memory(cfg, TrainSetup(seq_len=16, optimizer="adamw", parallel="zero1", gpus=8))
    z3 = train_memory(cfg, TrainSetup(seq_len=16, optimizer="adamw", parallel="zero3", gpus=8))
    fsdp = train_memory(cfg, TrainSetup(seq_len=16, optimizer="adamw", parallel="fsdp", gpus=4))
    n = param_counts(cfg).total
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * n, 2 * n, 12 * n / 8)    # ZeRO's 2 + 2 + 12 bytes
    assert z3.weights + z3.gradients + z3.optimizer == pytest.approx(16 * n / 8)
    assert fsdp.weights == one.weights / 4 and fsdp.optimizer == one.optimizer / 4
    offload = train_memory(cfg, dataclasses.replace(TrainSetup(seq_len=16, parallel="fsdp", gpus=4), cpu_offload=True))
    assert offload.weights == offload.gradients == offload.optimizer == 0 and offload.cpu > 0


def test_the_head_on_trained_positions_saves_what_loss_share_predicts():
    """Post-training runs the head on the trained positions only (rows_N): the final norm, head and loss then
    keep that share of their logits and inputs for backward. Counted with saved-tensor hooks, fp32 plain head."""
    cfg = ModelConfig(**CONFIGS["tied"]).resolved()
    torch.manual_seed(0)
    model = Transformer(cfg)
    B, T = 3, 7
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = x.clone()
    y[:, :4] = -100                                   # a 4-token prompt: 3 of 7 positions trained
    rows = (y.flatten() != -100).nonzero()[:, 0]

    def saved(**kw) -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, y, reduction="sum", **kw)
        return sum(seen.values())

    def predicted(share: float) -> float:
        return train_memory(cfg, TrainSetup(seq_len=T, micro_batch=B, precision="fp32", fused_head=False,
                                            loss_share=share)).head_saved

    share = rows.numel() / (B * T)
    assert predicted(share) < predicted(1.0)
    assert saved() - saved(rows_N=rows) == pytest.approx(predicted(1.0) - predicted(share), rel=0.01)
