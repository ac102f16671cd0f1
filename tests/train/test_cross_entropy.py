"""The fused head + cross-entropy against the plain `F.cross_entropy` of the logits."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from micro import micro_config
from kiln.config import ConfigError, load_recipe
from kiln.model.llama import Transformer
from kiln.pipeline import run_stage
from kiln.train import cross_entropy as ce
from kiln.train.cross_entropy import apply_fused_cross_entropy, cross_entropy_loss_grad_, linear_cross_entropy


def _inputs(n=37, d=16, v=1000, dtype=torch.float64, device="cpu", ignored=(3, 10)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g, dtype=dtype).to(device).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignored)] = -100
    return h, w, t.to(device)


def _plain(h, w, t, reduction="mean"):
    return F.cross_entropy((h @ w.t()).float(), t, reduction=reduction)


def _loss_and_grads(fn, h, w, t, reduction, upstream=1.7):
    loss = fn(h, w, t, reduction=reduction)
    return (loss, *torch.autograd.grad(loss * upstream, (h, w)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_match_the_plain_loss(reduction):
    h, w, t = _inputs()
    fused, plain = _loss_and_grads(linear_cross_entropy, h, w, t, reduction), _loss_and_grads(_plain, h, w, t, reduction)
    # The loss is fp32 by contract (as the plain path's), so fp64 inputs agree to fp32 precision.
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-6, atol=1e-6)


def test_chunk_boundaries_and_ignored_rows(monkeypatch):
    monkeypatch.setattr(ce, "_CPU_CHUNK_ROWS", 8)   # 37 rows: 5 chunks, the last partial
    h, w, t = _inputs(ignored=(0, 7, 8, 36))
    fused, plain = _loss_and_grads(linear_cross_entropy, h, w, t, "mean"), _loss_and_grads(_plain, h, w, t, "mean")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-6, atol=1e-6)
    assert fused[1][[0, 7, 8, 36]].abs().max() == 0   # an ignored row gets no gradient


def test_row_op_writes_the_scaled_gradient_in_place():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([1, -100, 6, 0, 3])
    ref = logits.clone().requires_grad_()
    ref_rows = F.cross_entropy(ref, t, reduction="none")
    (ref_rows.sum() * 0.25).backward()
    rows = cross_entropy_loss_grad_(logits, t, torch.tensor(0.25), -100)
    torch.testing.assert_close(rows.double(), ref_rows.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, ref.grad, rtol=1e-6, atol=1e-7)


def test_all_rows_ignored_gives_nan_mean_like_the_plain_loss_and_no_gradient():
    h, w, t = _inputs(n=4, ignored=(0, 1, 2, 3))
    loss = linear_cross_entropy(h, w, t)
    assert torch.isnan(loss) and torch.isnan(_plain(h, w, t))
    loss.backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bf16_autocast_casts_like_a_linear_and_keeps_fp32_master_gradients():
    h, w, t = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = _loss_and_grads(linear_cross_entropy, h, w, t, "mean"), _loss_and_grads(
            lambda h, w, t, reduction: F.cross_entropy(F.linear(h, w).float(), t), h, w, t, "mean")
    assert fused[0].dtype == torch.float32 and fused[2].dtype == torch.float32
    for a, b in zip(fused, plain):   # both from the same bf16 logits; the gradients are rounded to bf16
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_compiles_into_one_graph():
    h, w, t = _inputs(dtype=torch.float32)
    compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    fused = _loss_and_grads(compiled, h, w, t, "mean")
    for a, b in zip(fused, _loss_and_grads(_plain, h, w, t, "mean")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [1000, -1])
def test_a_target_outside_the_vocabulary_is_an_error_not_a_wrong_loss(bad):
    h, w, t = _inputs()
    t[5] = bad
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(h, w, t)


def test_per_row_losses_and_their_gradients_match_the_plain_loss():
    """reduction="none" (DPO's and GRPO's per-token log-probabilities): each row's loss, and the gradients of
    a weighted sum of them (a different upstream gradient per row, as a policy-gradient loss gives)."""
    h, w, t = _inputs()
    weights = torch.randn(len(t), generator=torch.Generator().manual_seed(5), dtype=h.dtype)
    got, want = [], []
    for fn, out in ((linear_cross_entropy, got), (_plain, want)):
        rows = fn(h, w, t, reduction="none")
        out += [rows, *torch.autograd.grad((rows * weights).sum(), (h, w))]
    assert got[0].shape == (len(t),) and got[0][[3, 10]].abs().max() == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-6, atol=1e-6)


def test_rejects_an_unknown_reduction():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="reduction='max'"):
        linear_cross_entropy(h, w, t, reduction="max")


def _tiny_model(tie=True):
    cfg = load_recipe("tiny").model
    cfg = dataclasses.replace(cfg, depth=2, d_model=64, n_heads=2, n_kv_heads=1, vocab_size=97, max_seq_len=16,
                              tie_embeddings=tie)
    torch.manual_seed(0)
    return Transformer(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_model_trains_the_same_with_the_fused_head(tie):
    plain, fused = _tiny_model(tie), _tiny_model(tie)
    apply_fused_cross_entropy(fused)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (3, 4, 16), generator=g)
    y = torch.randint(0, 97, (3, 4, 16), generator=g)
    y[0, 1, :5] = -100
    losses = {}
    for name, m in (("plain", plain), ("fused", fused)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[name] = []
        for i in range(3):
            loss = m(x[i], y[i])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-5)
    assert [k for k, _ in fused.state_dict().items()] == [k for k, _ in plain.state_dict().items()]
    with torch.no_grad():   # evaluation keeps the plain path, per-token losses included
        torch.testing.assert_close(fused(x[0], y[0], reduction="none"), plain(x[0], y[0], reduction="none"),
                                   rtol=1e-3, atol=1e-4)
    # per-token losses with gradients (DPO, GRPO) take the fused head, on the trained positions too (rows_N)
    fused.load_state_dict(plain.state_dict())   # the same weights (AdamW's steps above differ in the last bits)
    rows = (y[0].flatten() != -100).nonzero()[:, 0]
    weights = torch.randn(rows.numel(), generator=g)
    for kw in ({}, {"rows_N": rows}):
        grads = []
        for m in (plain, fused):
            m.zero_grad()
            per = m(x[0], y[0], reduction="none", **kw)
            ((per.flatten()[rows] if not kw else per) @ weights).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mode_resolution():
    cpu = torch.device("cpu")
    assert not ce.resolve_mode("auto", cpu)   # the PyTorch path saves memory on CPU, not time: opt-in there
    assert ce.resolve_mode("on", cpu)
    assert not ce.resolve_mode("off", cpu)
    assert not ce.resolve_mode("auto", torch.device("cuda"), "deepspeed", 3)
    with pytest.raises(ValueError, match="train.fused_cross_entropy='yes'"):
        ce.resolve_mode("yes", cpu)


def test_a_gpu_without_triton_is_told_so(monkeypatch):
    monkeypatch.setattr(ce, "triton_available", lambda: False)
    gpu = torch.device("cuda")
    assert not ce.resolve_mode("auto", gpu)
    assert "fused head + cross-entropy is off" in ce.missing_kernel_warning("auto", gpu)
    assert "PyTorch version" in ce.missing_kernel_warning("on", gpu)
    assert ce.missing_kernel_warning("off", gpu) is None and ce.missing_kernel_warning("auto", torch.device("cpu")) is None


def test_zero3_with_the_fused_head_forced_on_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fused_cross_entropy=on.*ZeRO-3"):
        micro_config(tmp_path, train={"fused_cross_entropy": "on", "parallel": "deepspeed", "zero_stage": 3})


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_pretrain_with_the_fused_head_matches_the_plain_run(micro_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    run_stage(micro_config(micro_run, train={"max_steps": 4, "fused_cross_entropy": "off"}), "pretrain")
    run_stage(micro_config(other, train={"max_steps": 4, "fused_cross_entropy": "on"}), "pretrain")
    (plain, plain_val), (fused, fused_val) = _losses(micro_run), _losses(other)
    assert len(fused) == 4 and fused == pytest.approx(plain, rel=1e-5)
    assert fused_val == pytest.approx(plain_val, rel=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("v", [1000, 4096, 50304, 70001])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_row_kernel_matches_the_plain_loss(v, dtype):
    assert ce.triton_available()
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(300, v, generator=g)).to("cuda", dtype)
    t = torch.randint(0, v, (300,), generator=g).cuda()
    t[::7] = -100
    t[1], t[2] = 0, v - 1   # the first and the last column
    ref = logits.float().requires_grad_()
    ref_rows = F.cross_entropy(ref, t, reduction="none")
    (ref_rows.sum() / (t != -100).sum()).backward()
    scale = 1.0 / (t != -100).sum().float()
    rows = cross_entropy_loss_grad_(logits, t, scale, -100)
    torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(logits.float(), ref.grad, **tol)


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_compiled_bf16_training_on_the_gpu_tracks_the_plain_head(compiled):
    torch.manual_seed(0)
    cfg = dataclasses.replace(load_recipe("gpt2-small").model, depth=2, vocab_size=50304, max_seq_len=256)
    plain = Transformer(cfg).cuda()
    fused = Transformer(cfg).cuda()
    fused.load_state_dict(plain.state_dict())
    apply_fused_cross_entropy(fused)
    x = torch.randint(0, 50304, (4, 8, 256), device="cuda")
    y = torch.randint(0, 50304, (4, 8, 256), device="cuda")
    losses, peaks = {}, {}
    for name, m in (("plain", plain), ("fused", fused)):
        step = torch.compile(m) if compiled else m
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        losses[name] = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step(x[i], y[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
        peaks[name] = torch.cuda.max_memory_allocated()
    assert losses["fused"] == pytest.approx(losses["plain"], abs=2e-3)
    assert peaks["fused"] < peaks["plain"]


@cuda
def test_triton_path_refuses_a_target_outside_the_vocabulary():
    """A device-side assert, as F.cross_entropy raises; in a subprocess, since it poisons the CUDA context."""
    code = ("import torch; from kiln.train.cross_entropy import cross_entropy_loss_grad_ as f; "
            "t = torch.tensor([1, 2, 10, 3], device='cuda'); "
            "f(torch.randn(4, 10, device='cuda'), t, torch.tensor(1.0, device='cuda'), -100); torch.cuda.synchronize()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "assert" in r.stderr.lower()
