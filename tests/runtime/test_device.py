"""Attention-backend forcing and the MFU peak, on CPU (the CUDA backends are checked in test_llama_cuda)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from micro import micro_config
from kiln.config import ConfigError, load_recipe
from kiln.model.llama import Transformer
from kiln.pipeline import run_stage
from kiln.runtime.device import check_sdpa_backend, sdpa_backend
from kiln.runtime.peaks import mfu_peak

CPU = torch.device("cpu")


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 16, 8, generator=g) for _ in range(3)]


def test_forced_backend_is_really_the_only_one():
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_backend("math"):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), want)
    with sdpa_backend("efficient"), pytest.raises(RuntimeError):   # no memory-efficient kernel on CPU
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    F.scaled_dot_product_attention(q, k, v, is_causal=True)   # the context restored every backend


@pytest.mark.parametrize("name", ["auto", "flash", "math"])
def test_backends_that_run_on_cpu_pass_the_check(name):
    check_sdpa_backend(name, 4, 2, 32, CPU, bf16=False)   # GQA: 4 query heads share 2 key/value heads


@pytest.mark.parametrize("name", ["cudnn", "efficient"])
def test_backend_that_cannot_run_is_refused_with_the_key_and_the_way_out(name):
    with pytest.raises(ValueError, match=rf"train.attention_backend='{name}'.*cpu.*4 query and 2 key/value.*`auto`"):
        check_sdpa_backend(name, 4, 2, 32, CPU, bf16=False)


def test_mfu_peak_sources():
    assert mfu_peak("datasheet", CPU, False) == (None, "none")   # no table entry for a CPU: no MFU, no guess
    assert mfu_peak(790.0, CPU, True) == (790e12, "given peak")
    peak, source = mfu_peak("measured", CPU, False)
    assert 1e8 < peak < 1e14 and source == "measured float32 matmul peak"


@pytest.mark.parametrize("bad", [0, -5.0, "fast"])
def test_mfu_peak_rejects_nonsense(bad):
    with pytest.raises(ConfigError, match="train.mfu_peak"):
        load_recipe("tiny", {"train": {"mfu_peak": bad}})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_with_forced_backend_and_given_peak(micro_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    run_stage(micro_config(other, train={"max_steps": 3, "attention_backend": "math", "mfu_peak": 0.001}),
              "pretrain")
    auto, math_ = _metrics(micro_run), _metrics(other)
    # The same training, through another kernel: equal up to fp32 summation order.
    assert [r["loss"] for r in math_ if "loss" in r] == pytest.approx([r["loss"] for r in auto if "loss" in r],
                                                                      rel=1e-5)
    assert all("mfu" not in r for r in auto)   # CPU, datasheet peak: none known, none reported
    cfg = micro_config(other).model
    cfg.vocab_size = 384
    flops = Transformer(cfg).flops_per_token(cfg.max_seq_len)
    for r in (r for r in math_ if "loss" in r):   # MFU = FLOPs/token x tokens/s / the given 1 GFLOP/s
        assert r["mfu"] == pytest.approx(flops * r["tok_per_s"] / 1e9, rel=1e-6)


def test_pretrain_stops_before_training_when_the_backend_cannot_run(micro_run):
    with pytest.raises(ValueError, match="train.attention_backend='cudnn'"):
        run_stage(micro_config(micro_run, train={"attention_backend": "cudnn"}), "pretrain")
    assert not (micro_run / "metrics.jsonl").exists() and not any((micro_run / "checkpoints").glob("step_*"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", ["flash", "cudnn", "efficient", "math"])
@pytest.mark.parametrize("kv_heads", [12, 4])
def test_check_agrees_with_running_attention_on_the_gpu(name, kv_heads):
    """Whatever this PyTorch and GPU support (cuDNN and GQA, say), the check passes exactly when the
    backend runs the model's attention, forward and backward."""
    dev = torch.device("cuda")
    q = torch.randn(2, 12, 256, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 256, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    try:
        with sdpa_backend(name):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 12).sum().backward()
        runs = True
    except RuntimeError:
        runs = False
    if runs:
        check_sdpa_backend(name, 12, kv_heads, 64, dev, bf16=True)
    else:
        with pytest.raises(ValueError, match=f"train.attention_backend='{name}'"):
            check_sdpa_backend(name, 12, kv_heads, 64, dev, bf16=True)
    if name == "math":
        assert runs


@cuda
def test_measured_peak_on_the_gpu_is_below_the_datasheet():
    dev = torch.device("cuda")
    measured, _ = mfu_peak("measured", dev, True)
    sheet, _ = mfu_peak("datasheet", dev, True)
    assert measured > 1e13 and (sheet is None or measured < sheet)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_is_bf16_exactly_where_the_cpu_does_bf16(monkeypatch, native):
    from kiln.runtime import device as runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.use_bf16("auto", CPU) is native
    assert runtime.use_bf16("fp32", CPU) is False and runtime.use_bf16("bf16", CPU) is True


def test_native_bf16_probe_follows_the_cpu_features(monkeypatch):
    from kiln.runtime import device as runtime
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_has_native_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_has_native_bf16() is True
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert runtime.cpu_has_native_bf16() is False   # a torch without the probes: fp32, never a guess


def test_programmatic_launch_is_opt_in_and_only_on_cuda(monkeypatch):
    from kiln.runtime.device import pdl_args, programmatic_launch
    monkeypatch.delenv("KILN_PDL", raising=False)
    assert pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("KILN_PDL", "1")
    assert not programmatic_launch(torch.device("cpu"))            # a CPU never gets the launch option
    if torch.cuda.is_available():
        monkeypatch.delenv("KILN_PDL")
        assert pdl_args(torch.device("cuda")) == {"PDL": False}   # off unless asked
        monkeypatch.setenv("KILN_PDL", "1")
        want = torch.cuda.get_device_capability()[0] >= 9
        assert pdl_args(torch.device("cuda")) == ({"PDL": True, "launch_pdl": True} if want else {"PDL": False})
        assert pdl_args(torch.device("cuda"), allowed=False) == {"PDL": False}   # an interpreted build
