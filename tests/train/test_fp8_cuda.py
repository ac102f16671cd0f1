"""train.fp8 on a GPU with float8 tensor cores: real float8 matmuls, compiled, tracking bf16 training."""

import pytest
import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer

from cuda_steps import bf16_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                 reason="needs a GPU with float8 tensor cores (sm89+)")]


def _train(fp8: str, steps: int = 30) -> list[float]:
    from kiln.train.fp8 import apply_fp8, check_fp8
    torch.manual_seed(0)
    model = Transformer.from_config(ModelConfig(depth=2, d_model=256, head_dim=64, vocab_size=512,
                                                max_seq_len=128), device="cuda")
    if fp8 != "off":
        check_fp8(fp8, torch.device("cuda"))
        apply_fp8(model, fp8)
    return bf16_losses(torch.compile(model), model.parameters(), 16, steps)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_training_tracks_bf16(recipe):
    pytest.importorskip("torchao.float8")
    bf16, fp8 = _train("off"), _train(recipe)
    assert fp8[-1] < 0.5 * fp8[0]  # it learns (memorises the batch)
    assert abs(fp8[0] - bf16[0]) < 0.01 * bf16[0]
    assert abs(fp8[-1] - bf16[-1]) < 0.15 * bf16[0]
