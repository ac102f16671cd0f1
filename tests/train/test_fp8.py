"""train.fp8: torchao float8 linears applied from outside the model (emulated on CPU)."""

import sys

import pytest
import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.train.fp8 import apply_fp8, check_fp8


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(depth=2, head_dim=32, vocab_size=256, max_seq_len=32))


def test_check_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="train.fp8='e4m3'"):
        check_fp8("e4m3", torch.device("cpu"))
    pytest.importorskip("torchao.float8")
    with pytest.raises(ValueError, match="float8 tensor cores.*train.fp8=off"):
        check_fp8("tensorwise", torch.device("cpu"))


def test_check_names_the_extra_when_torchao_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'llmkiln\[fp8\]'"):
        check_fp8("tensorwise", torch.device("cpu"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_keeps_names_and_tying_and_matches_bf16_closely(recipe):
    pytest.importorskip("torchao.float8")
    ref, fp8 = _model(), _model()
    n_linear = sum(isinstance(m, nn.Linear) for m in ref.modules())
    converted = apply_fp8(fp8, recipe, emulate=True)
    assert converted == n_linear - 1  # everything but lm_head
    assert type(fp8.lm_head) is nn.Linear
    assert list(fp8.state_dict()) == list(ref.state_dict())  # checkpoints and exports unchanged
    assert fp8.lm_head.weight is fp8.model.embed_tokens.weight
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    loss_ref, loss_fp8 = ref(x, y), fp8(x, y)
    loss_ref.backward()
    loss_fp8.backward()
    assert loss_fp8.item() != loss_ref.item()  # the casts do happen
    assert abs(loss_fp8.item() - loss_ref.item()) < 1e-2 * loss_ref.item()
    for (name, a), b in zip(ref.named_parameters(), fp8.parameters()):
        cos = nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cos > 0.98, f"{name}: gradient cosine {cos:.4f}"


def test_layers_with_sides_not_multiple_of_16_stay_bf16():
    pytest.importorskip("torchao.float8")
    model = nn.Sequential(nn.Linear(32, 48, bias=False), nn.Linear(48, 20, bias=False))
    assert apply_fp8(model, "tensorwise", emulate=True) == 1
    assert type(model[1]) is nn.Linear


def test_pretrain_on_cpu_refuses_fp8_before_any_step(micro_run):
    pytest.importorskip("torchao.float8")
    from micro import micro_config

    from kiln.pipeline import run_stage
    with pytest.raises(ValueError, match="float8 tensor cores.*train.fp8=off"):
        run_stage(micro_config(micro_run, train={"fp8": "tensorwise"}), "pretrain")
    assert not list((micro_run / "checkpoints").glob("step_*"))
