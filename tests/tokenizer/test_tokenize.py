"""Tokenize stage: shard layout, counts, worker-count independence, atomic shards, reruns."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokdata import make_config, make_run

from kiln.config import Config
from kiln.config.rundir import RunDir
from kiln.tokenizer import Tokenizer
from kiln.tokenizer.tokenize import run_tokenize
from kiln.tokenizer.train import run_tokenizer
from kiln.tokenizer import tokenize as tokenize_mod


def fresh_run(tmp_path, trained) -> Config:
    """A copy of the shared trained run (data + tokenizer) that a test may modify."""
    src = trained[0].run_path
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dataclasses.replace(trained[0], run_dir=str(dst))


def with_workers(cfg: Config, workers: int) -> Config:
    return dataclasses.replace(cfg, tokenize=dataclasses.replace(cfg.tokenize, workers=workers))


def read_tokens(cfg: Config) -> dict[str, pa.Table]:
    rd = RunDir(cfg.run_path)
    return {f"{s}/{p.name}": pq.read_table(p) for s in ("train", "val", "test") for p in rd.token_files(s)}


def mtimes(cfg: Config) -> dict[str, int]:
    rd = RunDir(cfg.run_path)
    return {f"{s}/{p.name}": p.stat().st_mtime_ns for s in ("train", "val", "test") for p in rd.token_files(s)}


def test_output_schema_counts_and_ids(tmp_path, trained):
    cfg = fresh_run(tmp_path, trained)
    rd = RunDir(cfg.run_path)
    meta = run_tokenize(cfg)
    tok = Tokenizer.from_file(rd.tokenizer)
    assert json.loads((rd.tokens / "meta.json").read_text()) == meta
    assert (meta["vocab_size"], meta["eos_id"], meta["bos_id"]) == (512, tok.eos_id, tok.bos_id)
    assert meta["tokenizer"] == str(rd.tokenizer_file()) and meta["shards_encoded"] == 4 + 1 + 1
    for split, n_docs in (("train", 400), ("val", 40), ("test", 20)):
        srcs, outs = rd.split_files(split), rd.token_files(split)
        assert [p.name for p in outs] == [f"shard-{i:05d}.parquet" for i in range(len(srcs))]
        docs = tokens = nbytes = 0
        for src, out in zip(srcs, outs):
            data, toks = pq.read_table(src), pq.read_table(out)
            assert toks.schema == tokenize_mod.SCHEMA
            assert toks.column("id").to_pylist() == data.column("id").to_pylist()
            texts = data.column("text").to_pylist()
            ids = toks.column("ids").to_pylist()
            assert ids == [tok.encode(t) for t in texts]          # plain text: no BOS/EOS added
            docs += len(ids)
            tokens += sum(map(len, ids))
            nbytes += sum(len(t.encode()) for t in texts)
        assert meta[split] == {"docs": n_docs, "tokens": tokens, "bytes": nbytes, "shards": len(srcs)}
        assert docs == n_docs


def test_identical_for_one_and_two_workers(tmp_path, trained):
    one = fresh_run(tmp_path / "one", trained)
    two = fresh_run(tmp_path / "two", trained)
    m1 = run_tokenize(with_workers(one, 1))
    m2 = run_tokenize(with_workers(two, 2))
    t1, t2 = read_tokens(one), read_tokens(two)
    assert t1.keys() == t2.keys() and len(t1) == 6
    assert all(t1[k].equals(t2[k]) for k in t1)
    assert all(m1[s] == m2[s] for s in ("train", "val", "test"))


def test_rerun_keeps_done_shards_and_redoes_the_rest(tmp_path, trained):
    cfg = fresh_run(tmp_path, trained)
    rd = RunDir(cfg.run_path)
    run_tokenize(cfg)
    reference, before = read_tokens(cfg), mtimes(cfg)

    meta = run_tokenize(cfg)                                      # nothing to do
    assert meta["shards_encoded"] == 0 and meta["shards_kept"] == 6 and mtimes(cfg) == before

    (rd.tokens / "train" / "shard-00002.parquet").unlink()         # missing
    (rd.tokens / "val" / "shard-00000.parquet").write_bytes(b"garbage")   # unreadable
    (rd.tokens / "train" / ".shard-00001.parquet.123.tmp").write_bytes(b"half")   # killed run's temp file
    (rd.tokens / "train" / "shard-00042.parquet").write_bytes(b"stale")   # no such input any more
    meta = run_tokenize(cfg)
    assert meta["shards_encoded"] == 2 and meta["shards_kept"] == 4
    after = mtimes(cfg)
    redone = {k for k in after if after[k] != before.get(k)}
    assert redone == {"train/shard-00002.parquet", "val/shard-00000.parquet"}
    assert sorted(os.listdir(rd.tokens / "train")) == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert read_tokens(cfg).keys() == reference.keys()
    assert all(read_tokens(cfg)[k].equals(reference[k]) for k in reference)

    src = rd.split_files("test")[0]                                # input changed
    pq.write_table(pq.read_table(src).slice(0, 5), src)
    meta = run_tokenize(cfg)
    assert meta["shards_encoded"] == 1 and meta["test"]["docs"] == 5


def test_new_tokenizer_redoes_every_shard(tmp_path, trained):
    cfg = fresh_run(tmp_path, trained)
    run_tokenize(cfg)
    run_tokenizer(make_config(cfg.run_path, vocab_size=400, vocab_multiple=1))
    meta = run_tokenize(cfg)
    assert meta["shards_encoded"] == 6 and meta["vocab_size"] == 400
    assert max(max(ids, default=0) for t in read_tokens(cfg).values() for ids in t.column("ids").to_pylist()) < 400


def test_killed_mid_shard_leaves_no_partial_file(tmp_path, trained, monkeypatch):
    cfg = fresh_run(tmp_path, trained)
    rd = RunDir(cfg.run_path)
    calls = {"n": 0}
    real = Tokenizer.encode_batch

    def dying(self, texts, **kw):
        calls["n"] += 1
        if calls["n"] == 6:            # shard 1 of train (4 batches of 32 per 100-doc shard)
            raise KeyboardInterrupt
        return real(self, texts, **kw)

    monkeypatch.setattr(Tokenizer, "encode_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        run_tokenize(cfg)
    assert sorted(os.listdir(rd.tokens / "train")) == ["shard-00000.parquet"]
    assert not (rd.tokens / "meta.json").exists()
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    meta = run_tokenize(cfg)
    assert meta["shards_encoded"] == 5 and meta["shards_kept"] == 1


def test_missing_inputs_fail_with_the_command_to_run(tmp_path):
    cfg = make_config(make_run(tmp_path / "r", n_train=10, n_val=0, n_test=0))
    with pytest.raises(FileNotFoundError, match="kiln tokenizer"):
        run_tokenize(cfg)


def test_process_count():
    processes = tokenize_mod.processes
    assert processes(2, cores=2, shard_sizes=[1, 1, 1]) == 2          # explicit: as asked
    assert processes(8, cores=2, shard_sizes=[1, 1]) == 2             # never more than shards
    assert processes(0, cores=2, shard_sizes=[5] * 10) == 1           # auto: one per 4 cores
    assert processes(0, cores=16, shard_sizes=[5] * 100) == 4
    assert processes(0, cores=16, shard_sizes=[300, 5, 2]) == 1       # one huge shard: one process


def test_byte_chunks_bound_encode_calls_without_changing_output(tmp_path, trained, monkeypatch):
    import numpy as np
    chunks = tokenize_mod._byte_chunks(np.array([5, 5, 20, 1, 1, 1]), limit=10)
    assert chunks == [(0, 2), (2, 3), (3, 6)]
    assert tokenize_mod._byte_chunks(np.array([], dtype=np.int64), limit=10) == []
    ref = fresh_run(tmp_path / "ref", trained)
    run_tokenize(ref)
    small = fresh_run(tmp_path / "small", trained)
    monkeypatch.setattr(tokenize_mod, "ENCODE_BYTES", 500)      # several encode calls per batch
    run_tokenize(small)
    a, b = read_tokens(ref), read_tokens(small)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)


def test_token_shards_feed_the_packed_loader(tmp_path, trained):
    from kiln.tokenizer.loader import PackedLoader
    cfg = fresh_run(tmp_path, trained)
    rd = RunDir(cfg.run_path)
    meta = run_tokenize(cfg)
    tok = Tokenizer.from_file(rd.tokenizer)
    loader = PackedLoader(rd.token_files("val"), seq_len=32, batch_size=2, eos_id=meta["eos_id"], shuffle=False)
    assert loader.stream_len == meta["val"]["tokens"] + meta["val"]["docs"]
    texts = [t for p in rd.split_files("val") for t in pq.read_table(p).column("text").to_pylist()]
    assert tok.decode(loader.epoch_stream(0).tolist()) == "".join(t + "<|eos|>" for t in texts)
