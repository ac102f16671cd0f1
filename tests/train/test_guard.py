"""The non-finite skip against plain torch.optim behaviour, and the spike counter."""

import copy

import pytest
import torch

from kiln.train.guard import SpikeGuard, step_if_finite


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_step_is_a_step_that_never_happened(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)

    def backward(scale=1.0):
        (model(torch.randn(3, 8)).square().sum() * scale).backward()

    backward()
    step_if_finite(opt, torch.tensor(True))      # one real step: state exists
    opt.zero_grad()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    backward(float("nan"))
    step_if_finite(opt, torch.tensor(False))     # fused: found_inf on the device, no host read
    opt.zero_grad()
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[k], before[1]["state"][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert not hasattr(opt, "found_inf")

    # And a finite step through the guard equals a plain optimizer.step().
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    torch.manual_seed(1)
    backward()
    torch.manual_seed(1)
    (ref_model(torch.randn(3, 8)).square().sum()).backward()
    step_if_finite(opt, torch.tensor(True))
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_spike_guard_needs_patience_consecutive_spikes():
    g = SpikeGuard(factor=2.0, patience=3)
    assert not any(g.observe(s, 1.0) for s in range(1, 4))
    assert not g.observe(4, 5.0) and not g.observe(5, 5.0)
    assert not g.observe(6, 1.0)                  # the streak is broken
    assert not g.observe(7, 5.0) and not g.observe(8, float("nan")) and not g.observe(9, 5.0)
    assert g.observe(10, 5.0) and g.first_spike_step == 7
    assert not SpikeGuard(factor=0.0, patience=1).observe(1, 1e9)   # off
