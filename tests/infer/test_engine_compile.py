"""The engine's compiled decode step (`compile=True`) gives the eager step's tokens; on the CPU (the graphs are
CUDA's), one length bucket, so the test compiles few graphs."""

import pytest
import torch

from kiln.config import ModelConfig
from kiln.infer.engine import Engine
from kiln.infer.fuse import fuse_projections
from kiln.infer.generate import generate
from kiln.infer.sampling import SamplingParams
from kiln.model.llama import Transformer


@pytest.mark.parametrize("attention", ["sdpa", "fused", "layers"])
def test_compiled_fused_step_equals_uncached_reference(attention):
    """Stacked projections, compiled; attention through SDPA or the one-kernel op (an opaque call under
    torch.compile that writes the caches), or whole layers through the ops (kiln/infer/fused_step.py)."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, d_model=32, head_dim=8, n_kv_heads=2, vocab_size=61, max_seq_len=32, init_std=0.3)
    model = Transformer(cfg).eval()
    prompts = [[5], [1, 2, 3], list(range(20, 30))]
    ref = [generate(model, p, 10, temperature=0, use_cache=False) for p in prompts]
    fuse_projections(model)
    torch._dynamo.reset()
    engine = Engine(model, max_slots=2, compile=True, overlap=True, fused_attention=attention != "sdpa",
                    fused_layers=attention == "layers")
    assert [o[0] for o in engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))] == ref
    assert engine._inflight is None and sorted(engine._free) == [0, 1]


def test_a_step_the_compiler_cannot_lower_decodes_uncompiled(capsys, monkeypatch):
    """A compiler failure at start falls back to the plain step, loudly, and the tokens are still right."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, d_model=32, head_dim=8, n_kv_heads=2, vocab_size=61, max_seq_len=32, init_std=0.3)
    model = Transformer(cfg).eval()
    ref = generate(model, [1, 2, 3], 6, temperature=0, use_cache=False)

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("LoweringException: no lowering for this op")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    engine = Engine(model, max_slots=2, compile=True)
    assert "torch.compile of the decode step failed (RuntimeError: LoweringException" in capsys.readouterr().err
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0][0] == ref
