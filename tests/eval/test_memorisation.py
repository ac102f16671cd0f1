"""Memorisation: the suffix-array index against brute force (document edges, no cross-document
matches), the measurement with fake generators (copying, random, exactly threshold - 1 tokens) and
the index read from real token shards written by the tokenize stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.config.rundir import RunDir
from kiln.eval import memorisation
from kiln.eval.memorisation import NO_MATCH, SEP, TokenIndex, decode_examples, measure_memorisation
from kiln.tokenizer.tokenize import SCHEMA, ShardJob, encode_shard

from evalkit import TEXTS, tokenizer


def reference(docs: list[list[int]], q: list[int]) -> tuple[int, int]:
    """(length, earliest start) of the longest run of q inside one document, by dynamic programming:
    run[i, o] = length of the common run of q[i:] and the stream from o; SEP equals nothing."""
    stream = np.concatenate([np.append(np.asarray(d, np.int64), SEP) for d in docs])
    best, start = 0, 0
    nxt = np.zeros(len(stream) + 1, dtype=np.int64)
    for i in range(len(q) - 1, -1, -1):
        cur = np.zeros_like(nxt)
        cur[:-1] = np.where(stream == q[i], 1 + nxt[1:], 0)
        if cur.max() >= best and cur.max() > 0:
            best, start = int(cur.max()), i
        nxt = cur
    return best, start


def check(idx: TokenIndex, docs: list[list[int]], q: list[int]) -> None:
    m = idx.longest_match(q)
    assert (m.length, m.start) == reference(docs, q)
    if m.length == 0:
        assert m == NO_MATCH
        return
    assert list(docs[m.doc][m.offset:m.offset + m.length]) == list(q[m.start:m.start + m.length])
    assert m.position == sum(len(d) for d in docs[:m.doc]) + m.offset


def suffix_key(stream: np.ndarray, p: int) -> tuple[int, ...]:
    """A suffix up to and including its first SEP: all that the index orders by."""
    end = int(np.flatnonzero(stream[p:] == SEP)[0])
    return tuple(stream[p:p + end + 1].tolist())


DOCS = st.lists(st.lists(st.integers(0, 3), max_size=14), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(docs=DOCS, queries=st.lists(st.lists(st.integers(0, 4), max_size=12), min_size=1, max_size=4))
def test_longest_match_against_brute_force(docs, queries):
    idx = TokenIndex(docs)
    keys = [suffix_key(idx.stream, int(p)) for p in idx.sa]
    assert sorted(idx.sa.tolist()) == list(range(len(idx.stream))) and keys == sorted(keys)
    for q in queries:
        check(idx, docs, q)
    batch = idx.longest_matches(queries)                     # batched == one by one
    assert batch == [idx.longest_match(q) for q in queries]


def test_medium_corpus_with_repeats_against_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 6, 400)
    docs = [rng.integers(0, 6, int(rng.integers(1, 300))).tolist() for _ in range(30)]
    docs += [base[a:a + 120].tolist() for a in (0, 0, 50, 200)]      # duplicated and overlapping documents
    idx = TokenIndex(docs)
    queries = [rng.integers(0, 7, int(rng.integers(1, 60))).tolist() for _ in range(40)]
    queries += [base[10:90].tolist(), base[40:200].tolist(), docs[3][-20:] + docs[4][:20]]
    for q in queries:
        check(idx, docs, q)
    whole = idx.longest_matches(queries)
    monkeypatch.setattr(memorisation, "_GATHER", 2000)        # ~12 (query, start) pairs per chunk
    assert idx.longest_matches(queries) == whole


def test_matches_stop_at_document_edges():
    docs = [[1, 2, 3], [4, 5, 6], [7, 8]]
    idx = TokenIndex(docs)
    m = idx.longest_match([2, 3, 4, 5, 6, 7])                 # spans doc 0 | doc 1 | doc 2 in the stream
    assert (m.length, m.start, m.doc, m.offset, m.position) == (3, 2, 1, 0, 3)   # [4, 5, 6]: doc 1 whole
    assert idx.longest_match([3, 4]).length == 1              # the join of two documents is no match
    assert idx.longest_match([7, 8]) == (2, 0, 6, 2, 0)        # the last document, to its last token
    assert idx.longest_match([1, 2, 3]) == (3, 0, 0, 0, 0)     # the first, from its first token
    assert idx.longest_match([9, 9]) == NO_MATCH and idx.longest_match([]) == NO_MATCH
    assert idx.longest_match([2**24 - 1]) == NO_MATCH          # far above every indexed token
    with pytest.raises(ValueError, match="token ids must be"):
        idx.longest_match([1, -1])
    with pytest.raises(ValueError, match="1-D sequence of integer"):
        idx.longest_match([[1, 2]])
    with pytest.raises(ValueError, match="at least one document"):
        TokenIndex([])


# ---------------------------------------------------------------- the measurement

VOCAB = 5000


def corpus(n_docs: int, seed: int, lo: int = 0, hi: int = VOCAB,
           length: tuple[int, int] = (100, 200)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, int(rng.integers(*length))) for _ in range(n_docs)]


def continuation_of(docs, prefix: int, take: int | None = None, fill: int | None = None):
    """A fake greedy generator that knows `docs`: it continues a prompt with its document's true
    continuation (`take` tokens of it, then `fill` tokens that occur nowhere)."""
    by_prompt = {tuple(int(t) for t in d[:prefix]): d for d in docs}

    def generate(prompts, max_new):
        out = []
        for p in prompts:
            cont = [int(t) for t in by_prompt[tuple(p)][prefix:prefix + max_new]]
            if take is not None:
                cont = cont[:take] + [fill] * (max_new - take)
            out.append(cont)
        return out
    return generate


def test_copying_generator_memorises_training_and_not_unseen():
    train, unseen = corpus(80, seed=1), corpus(40, seed=2)
    idx = TokenIndex(train)
    res = measure_memorisation(continuation_of(train + unseen, 32), idx.documents(), unseen, idx,
                               prefix_tokens=32, new_tokens=64, threshold=50, max_docs=50, examples=3)
    tr, un = res["train"], res["unseen"]
    assert tr["n"] == 50 and un["n"] == 40
    assert tr["share_match"] == 1.0 and tr["share_extractable"] == 1.0 and tr["max_longest"] == 64
    assert tr["mean_true_continuation"] == 64 and tr["quantiles"]["p50"] == 64
    assert un["share_match"] == 0.0 and un["max_longest"] < 5         # random tokens: 1-2 token coincidences
    assert sum(b["count"] for b in tr["histogram"]) == 50 and tr["histogram"][-1] == {"from": 50, "to": 64, "count": 50}
    ex = tr["examples"][0]
    doc = idx.document(ex["corpus_doc"])
    assert len(tr["examples"]) == 3 and ex["match_length"] == 64 and ex["match_start"] == 0
    assert ex["corpus_doc"] == ex["doc"] and ex["corpus_offset"] == 32 and ex["prompt"] == doc[:32].tolist()
    assert doc[32:96].tolist() == ex["generated"]
    assert res["index"]["tokens"] == sum(len(d) for d in train)


def test_random_generator_memorises_nothing():
    train, unseen = corpus(30, seed=3), corpus(30, seed=4)
    idx = TokenIndex(train)
    rng = np.random.default_rng(5)

    def generate(prompts, max_new):
        return [rng.integers(0, VOCAB, max_new).tolist() for _ in prompts]
    res = measure_memorisation(generate, train, unseen, idx, prefix_tokens=16, new_tokens=64, threshold=50)
    for g in ("train", "unseen"):
        assert res[g]["share_match"] == 0.0 and res[g]["max_longest"] < 5
    assert res["train"]["share_extractable"] == 0.0


@pytest.mark.parametrize("take", [49, 50])
def test_threshold_boundary_is_exact(take):
    train, unseen = corpus(20, seed=6), corpus(20, seed=7, lo=VOCAB, hi=2 * VOCAB)   # unseen: disjoint tokens
    idx = TokenIndex(train)
    gen = continuation_of(train + unseen, 32, take=take, fill=3 * VOCAB)     # then a token found nowhere
    res = measure_memorisation(gen, train, unseen, idx, prefix_tokens=32, new_tokens=64, threshold=50)
    tr = res["train"]
    assert tr["max_longest"] == take and tr["mean_longest"] == take and tr["mean_true_continuation"] == take
    assert tr["share_match"] == tr["share_extractable"] == (1.0 if take >= 50 else 0.0)
    assert res["unseen"]["share_match"] == 0.0 and res["unseen"]["max_longest"] == 0
    bins = {(b["from"], b["to"]): b["count"] for b in tr["histogram"]}
    assert bins[(32, 49) if take == 49 else (50, 64)] == 20


def test_sampling_is_seeded_and_skips_short_documents():
    train = corpus(60, seed=8, length=(10, 200))
    idx = TokenIndex(train)
    seen = []

    def generate(prompts, max_new):
        seen.append(prompts)
        return [[] for _ in prompts]                               # stops at once: allowed
    a = measure_memorisation(generate, train, train, idx, prefix_tokens=40, new_tokens=60, threshold=50,
                             max_docs=10, seed=1)
    b = measure_memorisation(generate, train, train, idx, prefix_tokens=40, new_tokens=60, threshold=50,
                             max_docs=10, seed=1)
    assert a == b and seen[0] == seen[2] and a["train"]["share_match"] == 0.0 and a["train"]["max_longest"] == 0
    assert all(len(train[e["doc"]]) >= 100 for e in a["train"]["examples"])
    assert len(seen[0]) == 10 and all(len(p) == 40 for p in seen[0])


def test_errors_name_what_is_needed():
    train = corpus(5, seed=9, length=(20, 40))
    idx = TokenIndex(train)
    gen = continuation_of(train, 8)
    need = r"at least prefix_tokens \+ new_tokens = 96 tokens; none of the 5 .*longest: 3\d"
    with pytest.raises(ValueError, match=need):
        measure_memorisation(gen, train, train, idx, prefix_tokens=32, new_tokens=64, threshold=50)
    with pytest.raises(ValueError, match="unseen documents of at least .* none of the 0"):
        measure_memorisation(gen, train, [], idx, prefix_tokens=8, new_tokens=10, threshold=5)
    with pytest.raises(ValueError, match="threshold"):
        measure_memorisation(gen, train, train, idx, prefix_tokens=8, new_tokens=10, threshold=11)
    with pytest.raises(ValueError, match="2 generations for 5"):
        measure_memorisation(lambda p, n: [[1], [2]], train, train, idx, prefix_tokens=8, new_tokens=10, threshold=5)
    with pytest.raises(ValueError, match="only the new tokens"):
        measure_memorisation(lambda p, n: [q + [1] * n for q in p], train, train, idx, prefix_tokens=8,
                             new_tokens=10, threshold=5)


def test_decode_examples():
    docs = [list(range(10, 80)), list(range(100, 170))]
    idx = TokenIndex(docs, doc_ids=["a", "b"])
    res = measure_memorisation(continuation_of(docs, 8), docs, docs, idx, prefix_tokens=8, new_tokens=20,
                               threshold=20, examples=1)
    text = decode_examples(res, lambda ids: " ".join(map(str, ids)), idx)
    row = text["train"][0]
    assert row["match_length"] == 20 and row["corpus_doc_id"] in ("a", "b")
    first = int(row["prompt"].split()[0])
    assert row["matched"] == row["generated"] == " ".join(str(first + 8 + i) for i in range(20))


# ---------------------------------------------------------------- token shards of a run

def write_data_shard(path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"{path.stem}-{i}" for i in range(len(texts))], "text": texts}), path)


def test_from_run_reads_the_tokenize_stage_shards(tmp_path):
    tok = tokenizer()
    tok_file = tmp_path / "tok" / "tokenizer.json"
    tok_file.parent.mkdir()
    tok.backend.save(str(tok_file))
    rd = RunDir(tmp_path / "run")
    texts = [[t * (k + 1) for t in TEXTS[k:k + 3]] for k in range(2)]          # two shards of three documents
    for k, shard_texts in enumerate(texts):
        src = rd.data / "train" / f"part-{k:05d}.parquet"
        write_data_shard(src, shard_texts)
        (rd.tokens / "train").mkdir(parents=True, exist_ok=True)
        encode_shard(ShardJob("train", str(src), str(rd.tokens / "train" / f"shard-{k:05d}.parquet"),
                              str(tok_file), "sha", batch_docs=2))
    assert pq.read_schema(rd.token_files("train")[0]).remove_metadata() == SCHEMA
    expect = [tok.encode(t) for shard_texts in texts for t in shard_texts]

    idx = TokenIndex.from_run(tmp_path / "run")
    assert [d.tolist() for d in idx.documents()] == expect
    assert idx.doc_ids == ["part-00000-0", "part-00000-1", "part-00000-2", "part-00001-0", "part-00001-1",
                           "part-00001-2"]
    assert idx.source["complete"] and idx.source["tokens"] == sum(map(len, expect))
    q = expect[4][5:15]
    m = idx.longest_match([0, 0, 0] + q)
    assert m.length >= len(q) and (m.length, m.start) == reference(expect, [0, 0, 0] + q)
    assert idx.doc_ids[m.doc].startswith("part-0000")

    cap = len(expect[0]) + len(expect[1])                    # whole documents only, up to max_tokens
    part = TokenIndex.from_run(rd, max_tokens=cap + 1)
    assert part.n_docs == 2 and not part.source["complete"] and part.source["split_tokens"] == sum(map(len, expect))
    assert TokenIndex.from_run(rd.token_files("train")[1:], max_tokens=None).n_docs == 3
    with pytest.raises(ValueError, match="no token shards in .*tokens/val; run `kiln tokenize`"):
        TokenIndex.from_run(rd, split="val")
    with pytest.raises(ValueError, match="smaller than the first document"):
        TokenIndex.from_run(rd, max_tokens=1)
