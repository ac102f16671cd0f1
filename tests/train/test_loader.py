"""PackedLoader: packing, EOS separators, shuffling, rank sharding and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kiln.train.loader import PackedLoader

EOS = 1


def make_docs(n_docs: int, seed: int = 0) -> list[list[int]]:
    """Documents of 1..60 tokens; token values (>= 10, never EOS) encode (document, position)."""
    rng = np.random.default_rng(seed)
    return [[10 + 1000 * d + i for i in range(int(rng.integers(1, 61)))] for d in range(n_docs)]


def write_shards(tmp_path, docs: list[list[int]], per_shard: int = 50) -> list:
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = []
    for k, i in enumerate(range(0, len(docs), per_shard)):
        chunk = docs[i:i + per_shard]
        table = pa.table({"id": [f"doc-{i + j}" for j in range(len(chunk))],
                          "ids": pa.array(chunk, type=pa.list_(pa.int32()))})
        files.append(tmp_path / f"shard-{k:05d}.parquet")
        pq.write_table(table, files[-1])
    return files


@pytest.fixture
def files(tmp_path):
    return write_shards(tmp_path / "train", make_docs(200))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_shapes_shift_and_eos_separators(files):
    docs = make_docs(200)
    loader = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, shuffle=False)
    expected = np.concatenate([np.array(d + [EOS]) for d in docs])
    assert np.array_equal(loader.epoch_stream(0), expected)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for r in range(4):                                    # shuffle=False: rows in stream order
        assert torch.equal(x[r], torch.from_numpy(expected[r * 16:r * 16 + 16]).long())
        assert torch.equal(y[r], torch.from_numpy(expected[r * 16 + 1:r * 16 + 17]).long())
    n_eos = int((x == EOS).sum())
    assert n_eos > 0 and n_eos == int((torch.from_numpy(expected[:4 * 16]) == EOS).sum())


def test_every_stream_token_is_a_target_once_per_epoch(files):
    loader = PackedLoader(files, seq_len=16, batch_size=1, eos_id=EOS, shuffle=False)
    targets = torch.cat([y[0] for _, y in take(loader, loader.batches_per_epoch)])
    stream = loader.epoch_stream(0)
    assert loader.stream_len == len(stream) == sum(len(d) + 1 for d in make_docs(200))
    assert loader.rows_per_epoch == (len(stream) - 1) // 16
    assert loader.tokens_per_epoch == loader.rows_per_epoch * 16
    assert np.array_equal(targets.numpy(), stream[1:loader.tokens_per_epoch + 1])


def test_shuffle_deterministic_per_seed_and_epoch(files):
    a = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, seed=3)
    b = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, seed=3)
    c = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, seed=4)
    n = a.batches_per_epoch
    ea, eb, ec = take(a, 2 * n), take(b, 2 * n), take(c, 2 * n)
    assert same(ea, eb) and not same(ea, ec)
    assert not same(ea[:n], ea[n:])                        # a new document and row order each epoch
    assert a.epoch == 1
    # Documents stay whole and EOS-separated in a shuffled stream: its pieces are permuted documents.
    stream = a.epoch_stream(1)
    pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    assert sorted(tuple(p[:-1]) for p in pieces) == sorted(tuple(d) for d in make_docs(200))
    assert [tuple(p[:-1]) for p in pieces] != [tuple(d) for d in make_docs(200)]


def test_validation_order_is_fixed(files):
    a = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, shuffle=False, seed=1)
    b = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, shuffle=False, seed=2)
    n = a.batches_per_epoch
    ea, eb = take(a, n + 3), take(b, n + 3)
    assert same(ea, eb) and same(ea[:3], ea[n:])            # every epoch identical


@pytest.mark.parametrize("where", ["start", "mid", "last", "end", "epoch1"])
def test_exact_resume(files, where):
    kw = dict(seq_len=16, batch_size=4, eos_id=EOS, seed=11)
    ref = PackedLoader(files, **kw)
    n = ref.batches_per_epoch
    consumed = {"start": 0, "mid": n // 2, "last": n - 1, "end": n, "epoch1": n + 7}[where]
    take(ref, consumed)
    state = json.loads(json.dumps(ref.state_dict()))       # JSON-serialisable
    expected = take(ref, 20)
    resumed = PackedLoader(files, **kw)
    resumed.load_state_dict(state)
    assert same(take(resumed, 20), expected)
    assert resumed.state_dict() == ref.state_dict()


def test_ranks_are_disjoint_and_cover_the_epoch(files):
    kw = dict(seq_len=16, eos_id=EOS, seed=5)
    single = PackedLoader(files, batch_size=1, **kw).epoch_rows(0)
    ranks = [PackedLoader(files, batch_size=1, rank=r, world_size=2, **kw) for r in range(2)]
    rows = [rk.epoch_rows(0) for rk in ranks]
    n = len(single) // 2
    assert len(rows[0]) == len(rows[1]) == n
    assert not set(rows[0]) & set(rows[1])
    assert set(rows[0]) | set(rows[1]) == set(single[:2 * n])
    assert np.array_equal(rows[0], single[0:2 * n:2]) and np.array_equal(rows[1], single[1:2 * n:2])
    # The batches hold those rows' tokens, and ranks take the same number of steps.
    stream = ranks[1].epoch_stream(0)
    x, y = next(ranks[1])
    assert torch.equal(x[0], torch.from_numpy(stream[rows[1][0] * 16:rows[1][0] * 16 + 16]).long())
    big = [PackedLoader(files, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    assert big[0].batches_per_epoch == big[1].batches_per_epoch == n // 4


def test_state_mismatch_and_too_little_data(tmp_path, files):
    state = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(files, seq_len=32, batch_size=4, eos_id=EOS).load_state_dict(state)
    small = write_shards(tmp_path / "val", make_docs(3))
    with pytest.raises(ValueError, match=r"shard-00000\.parquet.*smaller seq_len"):
        PackedLoader(small, seq_len=64, batch_size=8, eos_id=EOS)
