"""PackedLoader: packing (concat, bestfit), EOS separators, shuffling, rank sharding, exact resume
(also across world sizes), document mask, prefetch and streaming."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.tokenizer import loader as loader_mod
from kiln.tokenizer import packing
from kiln.tokenizer.loader import Batch, PackedLoader, document_mask

EOS = 1
BOS = 0
PAD = 2


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
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))
                                    for x, y in zip(a, b))


def cat_ranks(per_rank: list[list]) -> list:
    """Batches of several ranks, step by step, concatenated rank 0 first: what one rank would see."""
    return [tuple(torch.cat(parts) for parts in zip(*step)) for step in zip(*per_rank)]


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


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_two_ranks_equal_one_rank_with_the_global_batch(files, packing):
    kw = dict(seq_len=16, eos_id=EOS, seed=7, packing=packing)
    one = PackedLoader(files, batch_size=4, **kw)
    two = [PackedLoader(files, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    n = one.batches_per_epoch
    assert n == two[0].batches_per_epoch == two[1].batches_per_epoch and one.rows_per_epoch == 2 * two[0].rows_per_epoch
    ref = take(one, n + 5)                                   # into the second epoch
    got = cat_ranks([take(rk, n + 5) for rk in two])
    assert same(ref, got)
    rows = [rk.epoch_rows(0) for rk in two]
    assert not set(rows[0]) & set(rows[1])
    assert np.array_equal(np.concatenate([rows[0].reshape(-1, 2), rows[1].reshape(-1, 2)], 1).ravel(),
                          one.epoch_rows(0))


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_resume_across_world_sizes(files, packing):
    kw = dict(seq_len=16, eos_id=EOS, seed=7, packing=packing)
    one = PackedLoader(files, batch_size=4, **kw)
    n = one.batches_per_epoch
    take(one, n - 2)
    state_one = json.loads(json.dumps(one.state_dict()))
    expected = take(one, 6)                                  # crosses the epoch boundary
    # saved by 1 rank x 4, resumed by 2 ranks x 2
    two = [PackedLoader(files, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for rk in two:
        rk.load_state_dict(state_one)
    assert same(cat_ranks([take(rk, 6) for rk in two]), expected)
    # saved by 2 ranks x 2, resumed by 1 rank x 4
    state_two = two[1].state_dict()
    assert state_two == {**two[0].state_dict(), "world_size": 2}
    expected = take(one, 3)
    again = PackedLoader(files, batch_size=4, **kw)
    again.load_state_dict(state_two)
    assert same(take(again, 3), expected)
    # a different global batch cannot continue exactly
    with pytest.raises(ValueError, match="global_batch"):
        PackedLoader(files, batch_size=2, **kw).load_state_dict(state_one)


def test_state_of_an_older_version_or_other_packing_fails_loudly(files):
    state = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS).state_dict()
    with pytest.raises(ValueError, match="packing"):
        PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, packing="bestfit").load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS).load_state_dict({**state, "version": 1})


def epoch_batches(loader) -> list:
    return take(loader, loader.batches_per_epoch)


@pytest.mark.parametrize("shuffle", [False, True])
def test_bestfit_rows_start_at_documents_and_cover_every_token_once(files, shuffle):
    docs = make_docs(200)
    loader = PackedLoader(files, seq_len=16, batch_size=1, eos_id=EOS, bos_id=BOS, pad_id=PAD,
                          packing="bestfit", seed=3, shuffle=shuffle)
    assert loader.batches_per_epoch == loader.rows_total            # batch 1: nothing dropped
    targets, firsts, n_pad, n_ignored = [], [], 0, 0
    for x, y in epoch_batches(loader):
        real = y[0] != -100
        assert bool(real[0])                                       # a row starts with a real target
        fill = 16 - int((x[0] == PAD).sum())                       # padding only at the end of a row
        assert (x[0, fill:] == PAD).all() and not real[fill:].any()
        n_pad += 17 - fill if fill < 16 else int(not real[-1])   # padding target slots
        n_ignored += int((~real).sum())
        assert torch.equal(y[0, :-1][real[:-1]], x[0, 1:][real[:-1]])
        targets += y[0][real].tolist()
        firsts.append(int(x[0, 0]))
    # A row starts with BOS (a document start) or continues a document longer than a row.
    continued = [t for t in firsts if t != BOS]
    assert all(t % 1000 - 10 >= 15 for t in continued)             # position >= S - 1 in its document
    text = [t for t in targets if t not in (BOS, EOS)]
    assert len(text) == len(set(text))                             # each document token a target at most once
    assert set(text) == {t for d in docs for t in d}               # and every one of them once
    assert targets.count(EOS) == len(docs)                         # every document closed
    # Stats are those of the file order: exact without shuffle. (Shuffled, the row count and padding are the
    # same, but which pieces open a row can differ, which moves a few targets between kept and ignored.)
    stats = loader.packing_stats
    assert stats["padded_share"] == round(n_pad / (loader.rows_total * 16), 6) and 0 < stats["padded_share"] < 0.2
    if not shuffle:
        assert stats["ignored_share"] == round(n_ignored / (loader.rows_total * 16), 6) > stats["padded_share"]
        assert stats["target_tokens"] == len(targets)
        assert stats["cropped_share"] == round(1 - len(targets) / loader.stream_len, 6)   # only row-leading tokens
    assert abs(stats["target_tokens"] - len(targets)) < 0.01 * len(targets)


def test_bestfit_row_count_is_the_same_every_epoch_and_order_is_shuffled(files):
    kw = dict(seq_len=16, batch_size=1, eos_id=EOS, packing="bestfit")
    a = PackedLoader(files, seed=1, **kw)
    e0, e1 = epoch_batches(a), epoch_batches(a)
    assert a.epoch == 1 and not same(e0, e1)
    flat = lambda batches: {t for x, y in batches for t in x[0].tolist() + y[0].tolist()}   # noqa: E731
    assert flat(e0) == flat(e1) == {t for d in make_docs(200) for t in d} | {EOS, -100}   # other rows and order
    assert same(epoch_batches(PackedLoader(files, seed=1, **kw)), e0)
    v = PackedLoader(files, shuffle=False, **kw)
    assert same(epoch_batches(v), epoch_batches(v))


def test_document_mask(files):
    loader = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, bos_id=BOS, doc_mask=True, shuffle=False)
    b = next(loader)
    assert isinstance(b, Batch)
    x, y, pos, seg = b
    plain = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, bos_id=BOS, shuffle=False)
    assert same([(x, y)], [next(plain)])
    for r in range(4):                                             # reference: walk the row token by token
        s, p = 0, 0
        for t in range(16):
            if t > 0 and (int(x[r, t - 1]) == EOS or int(x[r, t]) == BOS):
                s, p = s + 1, 0
            assert (int(seg[r, t]), int(pos[r, t])) == (s, p), (r, t)
            p += 1
    pos2, seg2 = document_mask(np.array([[5, 1, 0, 7, 1, 1, 9]]), eos_id=1)
    assert pos2.tolist() == [[0, 1, 0, 1, 2, 0, 0]] and seg2.tolist() == [[0, 0, 1, 1, 1, 2, 3]]


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_prefetch_changes_nothing(files, packing):
    kw = dict(seq_len=16, batch_size=3, eos_id=EOS, seed=2, packing=packing)
    a, b = PackedLoader(files, prefetch=0, **kw), PackedLoader(files, prefetch=4, **kw)
    n = a.batches_per_epoch
    ea, eb = take(a, n + 4), take(b, n + 4)
    assert same(ea, eb)
    b.load_state_dict(a.state_dict())                              # restarts the thread at the new position
    a2 = PackedLoader(files, prefetch=0, **kw)
    a2.load_state_dict(a.state_dict())
    assert same(take(b, 5), take(a2, 5))
    b.close()


def test_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    docs = make_docs(400, seed=1)
    files = write_shards(tmp_path / "many", docs, per_shard=20)     # 20 shards
    for f in files:                                                 # as the tokenize stage writes them
        t = pq.read_table(f)
        counts = {"kiln.docs": str(t.num_rows), "kiln.tokens": str(sum(map(len, t.column("ids").to_pylist())))}
        pq.write_table(t.replace_schema_metadata(counts), f)
    reads = []
    real = loader_mod._read_shard
    monkeypatch.setattr(loader_mod, "_read_shard", lambda f, values=True: reads.append(f.name) or real(f, values))
    loader = PackedLoader(files, seq_len=16, batch_size=4, eos_id=EOS, seed=9, prefetch=0)
    assert reads == []                                              # sizes from the footers alone
    assert loader.stream_len == sum(len(d) + 1 for d in docs)
    seen = []
    for _ in range(loader.batches_per_epoch):
        next(loader)
        seen.append(len(loader._shard_cache))
    assert max(seen) <= loader_mod._CACHE_SHARDS
    assert len(reads) <= 20 + 1 and set(reads) == {f.name for f in files}   # each shard read about once
    order, _ = loader._shard_order(0)
    assert list(order) != sorted(order)                             # shard-level shuffle
    assert list(loader._shard_order(1)[0]) != list(order)


def test_pin_memory_flag_is_harmless_without_cuda(files):
    x, _ = next(PackedLoader(files, seq_len=16, batch_size=2, eos_id=EOS, pin_memory=True))
    assert x.is_pinned() == torch.cuda.is_available()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(2, 17))
def test_pieces_and_bestfit_property(units, L):
    units = np.array(units, dtype=np.int64)
    starts, lens, cont = packing.split_pieces(units, L)
    assert cont.sum() == len(lens) - len(units)
    assert (lens >= 1).all() and (lens <= L).all()
    # covered: every stream position, and pieces overlap by exactly one token inside a unit
    covered = np.zeros(int(units.sum()), dtype=np.int64)
    for s, n in zip(starts, lens):
        covered[s:s + n] += 1
    assert (covered >= 1).all()
    (row, col), fill = packing.bestfit_rows(lens, L)
    assert (fill <= L).all() and fill.sum() == lens.sum()
    for r in range(len(fill)):                                      # pieces of a row tile it without overlap
        mine = np.flatnonzero(row == r)
        spans = sorted(zip(col[mine], lens[mine]))
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    # row count depends only on the multiset of lengths
    assert len(packing.bestfit_rows(lens[::-1].copy(), L)[1]) == len(fill)
