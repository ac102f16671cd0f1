import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kiln.eval.evaluate import score, unigram_loss
from kiln.tokenizer.loader import PackedLoader


def _shard(path, docs):
    pq.write_table(pa.table({"id": [str(i) for i in range(len(docs))],
                             "ids": pa.array(docs, type=pa.list_(pa.int32()))}), path)
    return path


class ConstantLoss(torch.nn.Module):
    """Stands in for a model whose loss is `c` nats on every target."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        return torch.full(y.shape, self.c)


def test_bits_per_byte_counts_only_byte_bearing_targets(tmp_path):
    eos = 0
    f = _shard(tmp_path / "v.parquet", [[1, 2, 3, 1, 2], [3, 3, 2, 1], [2, 2, 2]])
    loader = PackedLoader([f], seq_len=4, batch_size=2, eos_id=eos, shuffle=False)
    token_bytes = torch.tensor([0, 1, 2, 3])  # EOS stands for no bytes
    out = score(ConstantLoss(0.5), loader, 1, token_bytes, torch.device("cpu"), bf16=False)
    ys = next(iter(PackedLoader([f], seq_len=4, batch_size=2, eos_id=eos, shuffle=False)))[1]
    n_bytes = int(token_bytes[ys].sum())
    n_real = int((ys != eos).sum())
    assert out["loss"] == pytest.approx(0.5) and out["tokens"] == ys.numel() and out["bytes"] == n_bytes
    assert out["bits_per_byte"] == pytest.approx(0.5 * n_real / (math.log(2) * n_bytes))
    assert out["perplexity"] == pytest.approx(math.exp(0.5))


def test_unigram_baseline_is_cross_entropy_of_smoothed_counts(tmp_path):
    train = _shard(tmp_path / "t.parquet", [[1, 1, 1, 2], [1]])   # + 2 EOS (id 0)
    val = _shard(tmp_path / "v.parquet", [[1, 2]])                 # + 1 EOS
    counts = np.array([2, 4, 1, 0]) + 1.0                           # add-one over vocab 4
    p = counts / counts.sum()
    expected = -(np.log(p[1]) + np.log(p[2]) + np.log(p[0])) / 3
    assert unigram_loss([train], [val], vocab_size=4, separators=(0,)) == pytest.approx(expected)


class HalfNats(torch.nn.Module):
    """Loss 0.5 nats on a real target, 0 on an ignored (-100) one, as Transformer's reduction='none'."""

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        return torch.where(y != -100, 0.5, 0.0)


def test_masked_targets_are_not_counted_and_never_index_the_byte_table():
    x = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    y = torch.tensor([[6, 7, -100, -100], [-100, 3, 4, 1]])
    token_bytes = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 4])   # the last entry would be read by y == -100 unclamped
    out = score(HalfNats(), [(x, y)], 1, token_bytes, torch.device("cpu"), bf16=False)
    assert out["tokens"] == 5 and out["loss"] == pytest.approx(0.5)
    assert out["bytes"] == 3 + 4 + 2 + 2 + 1
    assert out["bits_per_byte"] == pytest.approx(5 * 0.5 / (math.log(2) * 12))
