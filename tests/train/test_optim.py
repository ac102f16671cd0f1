import math

import pytest
import torch

from kiln.config import TrainConfig
from kiln.train.optim import lr_at, param_groups


def _cfg(**kw):
    return TrainConfig(lr=1.0, max_steps=100, warmup_steps=10, min_lr_ratio=0.1, **kw)


def test_warmup_is_linear_from_zero():
    t = _cfg()
    assert [lr_at(s, t) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, t) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_decay_reaches_floor_and_is_monotone(schedule):
    t = _cfg(schedule=schedule)
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_cosine_midpoint():
    t = _cfg(schedule="cosine")
    mid = 10 + 45
    assert lr_at(mid, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_is_flat_then_decays():
    t = _cfg(schedule="wsd", decay_frac=0.2)
    assert lr_at(79, t) == 1.0 and lr_at(85, t) < 1.0


def test_weight_decay_only_on_matrices_not_embeddings_or_norms():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(10, 4)
            self.q_proj = torch.nn.Linear(4, 4, bias=False)
            self.norm = torch.nn.Parameter(torch.ones(4))
    m = M()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["params"] == [m.q_proj.weight] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(m.embed_tokens.weight), id(m.norm)}


def test_mfu_divides_all_ranks_tokens_by_all_ranks_peak():
    from kiln.runtime.peaks import mfu
    one = mfu(6e8, 5e5, 1e15, 1)
    assert one == pytest.approx(0.3)
    assert mfu(6e8, 2 * 5e5, 1e15, 2) == pytest.approx(one)   # perfect scaling keeps MFU
