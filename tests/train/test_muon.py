"""Muon against a plain reference written here; the AdamW half against torch.optim.AdamW."""

import copy

import pytest
import torch

from kiln.train.muon import MuonWithAdamW, orthogonalize


def reference_newton_schulz(g, steps=5):
    """The published quintic iteration, written out in fp64 on the original orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transpose else x


def reference_muon_step(w, grad, buf, lr, momentum, wd):
    buf = momentum * buf + (1 - momentum) * grad
    nesterov = (1 - momentum) * grad + momentum * buf
    update = reference_newton_schulz(nesterov)
    scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
    return w * (1 - lr * wd) - lr * scale * update, buf


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 24)])
def test_orthogonalize_matches_reference_and_flattens_spectrum(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    out = orthogonalize(g)
    torch.testing.assert_close(out.double(), reference_newton_schulz(g), atol=1e-4, rtol=1e-4)
    s = torch.linalg.svdvals(out.double())
    assert s.min() > 0.5 and s.max() < 1.3  # all directions brought to about the same size


def test_muon_steps_match_reference():
    torch.manual_seed(0)
    w = torch.randn(24, 12, dtype=torch.float64)
    param = torch.nn.Parameter(w.clone().float())
    opt = MuonWithAdamW([{"params": [param], "use_muon": True, "lr": 0.05, "momentum": 0.9,
                          "weight_decay": 0.01}])
    ref_w, ref_buf = w.clone(), torch.zeros_like(w)
    for step in range(4):
        grad = torch.randn(24, 12, dtype=torch.float64)
        param.grad = grad.float()
        opt.step()
        ref_w, ref_buf = reference_muon_step(ref_w, grad, ref_buf, 0.05, 0.9, 0.01)
        torch.testing.assert_close(param.data.double(), ref_w, atol=2e-5, rtol=1e-4, msg=f"step {step}")


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonWithAdamW([{"params": [a], "lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}])
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10, 4)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]  # noqa: E731
    p1 = make()
    p2 = [torch.nn.Parameter(t.detach().clone()) for t in p1]
    groups = lambda ps: [{"params": [ps[0]], "use_muon": True, "lr": 0.02}, {"params": [ps[1]], "lr": 1e-3}]  # noqa: E731
    o1 = MuonWithAdamW(groups(p1))
    grads = [(torch.randn(8, 8), torch.randn(8)) for _ in range(4)]
    for g in grads[:2]:
        p1[0].grad, p1[1].grad = g
        o1.step()
    for dst, src in zip(p2, p1):
        dst.data.copy_(src.data)
    o2 = MuonWithAdamW(groups(p2))
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as through a checkpoint file: no shared tensors
    for g in grads[2:]:
        for ps, o in ((p1, o1), (p2, o2)):
            ps[0].grad, ps[1].grad = g[0].clone(), g[1].clone()
            o.step()
    assert all(torch.equal(x, y) for x, y in zip(p1, p2))


def test_rejects_non_matrix_in_muon_group():
    with pytest.raises(ValueError, match="2-D"):
        MuonWithAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])


def test_found_inf_skips_the_step_exactly_without_reading_the_flag():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = MuonWithAdamW([{"params": [ps[0]], "use_muon": True, "lr": 0.02}, {"params": [ps[1]], "lr": 1e-2}])
    ps[0].grad, ps[1].grad = torch.randn(6, 4), torch.randn(4)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    ps[0].grad, ps[1].grad = torch.full((6, 4), float("nan")), torch.full((4,), float("inf"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    after = opt.state_dict()["state"]
    for k, st in state["state"].items():
        assert all(torch.equal(st[n], after[k][n]) for n in st)
    opt.found_inf = torch.tensor(0.0)  # a finite step with the flag present is an ordinary step
    ps[0].grad, ps[1].grad = torch.randn(6, 4), torch.randn(4)
    opt.step()
    assert not torch.equal(ps[0], before[0]) and torch.isfinite(ps[0]).all()


def test_batched_orthogonalisation_equals_one_matrix_at_a_time(monkeypatch):
    import kiln.train.muon as muon
    g = torch.Generator().manual_seed(3)
    shapes = [(48, 16), (16, 16), (48, 16), (16, 48), (16, 16), (48, 16)]
    updates = [torch.randn(*s, generator=g) for s in shapes]
    single = [muon.orthogonalize(u, 5) for u in updates]
    monkeypatch.setattr(muon, "STACK_ELEMENTS", 48 * 16 * 2)  # forces chunks of two
    for a, b in zip(muon.orthogonalize_all(updates, 5), single):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
