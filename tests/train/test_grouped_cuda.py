"""The grouped projections on a GPU, compiled, in bf16: full fine-tuning, LoRA and QLoRA take the same losses
as the layers one by one (eager) through a few training steps."""

import pytest
import torch

from kiln.config import LoRAConfig, ModelConfig
from kiln.model.llama import Transformer

from cuda_steps import bf16_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(mode: str, grouped: bool, steps: int = 12) -> list[float]:
    torch.manual_seed(0)
    model = Transformer.from_config(ModelConfig(depth=2, d_model=256, head_dim=64, n_kv_heads=2, vocab_size=512,
                                                max_seq_len=128), device="cpu")
    if mode == "full":
        model.cuda()
    else:
        from kiln.train.lora import apply_lora
        apply_lora(model, LoRAConfig(enabled=True, rank=8, alpha=16.0,
                                     base_dtype="nf4" if mode == "qlora" else "bfloat16"), "cuda")
    model.group_projections(grouped)
    return bf16_losses(torch.compile(model) if grouped else model, [p for p in model.parameters() if p.requires_grad],
                       8, steps)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_grouped_compiled_training_tracks_the_plain_layers(mode):
    if mode == "qlora":
        pytest.importorskip("torchao")
    plain, grouped = _train(mode, False), _train(mode, True)
    assert plain[-1] < plain[0] - 0.3, plain                      # the run learns (one batch, memorised)
    for a, b in zip(plain, grouped):                               # bf16: the same curve to its rounding
        assert abs(a - b) <= 0.03 * max(1.0, abs(a)), (plain, grouped)
