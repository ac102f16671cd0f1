"""Memorisation: does the model reproduce its training text verbatim?

Prompt the model with the first `prefix_tokens` of training documents and of unseen (held-out)
documents, let it continue greedily for `new_tokens`, and measure for every generation the longest
run of its generated tokens that occurs verbatim in the training tokens. The result is the share of
generations with a match of at least `threshold` tokens (50 is the usual line), per group, with the
longest matches as examples. A model that memorises shows a far larger share for training prefixes
than for unseen ones; the unseen group says how often ordinary text (boilerplate, licences, common
code) reaches the threshold anyway. For training prefixes the share whose generation equals the
document's own continuation for at least `threshold` tokens is reported too ("extractable", Carlini
et al. 2022: the prefix extracts the suffix).

The index over the training tokens is a suffix array: documents are joined, each followed by a
separator SEP (-1, below every token), and a query position is looked up by binary search; a match
never crosses a document boundary because no query holds SEP. Suffixes are ordered by their text up
to and including their first SEP only (whatever follows cannot take part in a match), which bounds
the construction's rounds by the longest document rather than by the longest repeat across
documents (duplicated documents would otherwise cost a round per doubling of their total length).
Construction is prefix doubling in numpy (Manber-Myers with Larsson-Sadakane's rule: only suffixes
still tied with another are re-sorted), the first round keyed on several tokens packed into one
int64. bench/memorisation_index.py measures it on 2 cores: 30M tokens build in 11-14 s with ~0.4 GB
above the documents themselves; the index holds 8 bytes per token (tokens and suffix array, int32).
Measured the same way, libdivsufsort (pydivsufsort, a new dependency) is at most 1.4x faster with
1.6x the peak memory, and a sorted table of hashed 50-grams builds in 0.7-1x the time but holds
twice the bytes, peaks at 3x and answers only "is there a >= 50-token match": neither is used.

Query cost: a query of L tokens does L binary searches over the suffix array, each comparing up to
L tokens per step, so O(L^2 log N) token comparisons, vectorised over every start of every query at
once. Meant for generations of tens to hundreds of tokens.

Shape legend: N stream length (tokens + one SEP per document), A (query, start) pairs, W window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.config.rundir import RunDir

SEP = -1                  # follows every document in the stream; below every token in suffix order
MAX_TOKEN = 2**24 - 1     # tables indexed by token id (symbol counts) are built over the id range
_GATHER = 1 << 21         # corpus tokens gathered at once while comparing (bounds query memory: ~30 MB)

Generate = Callable[[list[list[int]], int], list[list[int]]]


class Match(NamedTuple):
    """The longest run of a query that occurs verbatim in the indexed documents."""
    length: int
    start: int       # where the run starts in the query
    position: int    # where it starts in the training tokens (documents concatenated, no separators); -1 if none
    doc: int         # which indexed document holds it; -1 if none
    offset: int      # where in that document; -1 if none


NO_MATCH = Match(0, 0, -1, -1, -1)


class TokenIndex:
    """Exact longest-match queries against a list of token documents (a suffix array over them)."""

    def __init__(self, docs: Sequence[Sequence[int] | np.ndarray], doc_ids: Sequence[str] | None = None,
                 source: dict[str, Any] | None = None):
        arrays = [_as_tokens(d, f"document {i}") for i, d in enumerate(docs)]
        if not arrays:
            raise ValueError("TokenIndex needs at least one document")
        if doc_ids is not None and len(doc_ids) != len(arrays):
            raise ValueError(f"{len(doc_ids)} doc_ids for {len(arrays)} documents")
        lens = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        self.doc_start = np.zeros(len(arrays), dtype=np.int64)    # stream offset of each document
        np.cumsum(lens[:-1] + 1, out=self.doc_start[1:])
        self.doc_end = self.doc_start + lens                      # its SEP
        self.stream = np.full(int(lens.sum()) + len(arrays), SEP, dtype=np.int32)   # (N,)
        for a, s in zip(arrays, self.doc_start.tolist()):
            self.stream[s:s + len(a)] = a
        self.doc_ids = list(doc_ids) if doc_ids is not None else None
        self.n_docs, self.n_tokens = len(arrays), int(lens.sum())
        self.source = source or {}
        self.sa = _suffix_array(self.stream, self.doc_end)        # (N,) stream offsets in suffix order
        # Suffix-array slots by first symbol: token v occupies [bounds[v + 1], bounds[v + 2]) (SEP: bin 0);
        # the final [N, N) is the empty range of every token above the largest indexed one.
        counts = np.bincount(self.stream + 1)
        self._bounds = np.concatenate([[0], np.cumsum(counts), [len(self.stream)]]).astype(np.int64)

    @classmethod
    def from_run(cls, run: str | Path | RunDir | Sequence[str | Path], split: str = "train",
                 max_tokens: int | None = 50_000_000) -> TokenIndex:
        """Index the token shards of a run directory's split (`tokens/{split}/*.parquet`, as `kiln
        tokenize` writes them: `id` string, `ids` list<int32>), or the given shard files.

        Whole documents are taken in shard and row order until the next would pass `max_tokens`
        (None: all); `source` records how much of the split is covered. Memory while building is about
        25 bytes per token (50M tokens: ~1.2 GB), 8 bytes per token after."""
        if isinstance(run, (str, Path, RunDir)):
            rd = run if isinstance(run, RunDir) else RunDir(run)
            files, where = rd.token_files(split), rd.tokens / split
        else:
            files, where = [Path(f) for f in run], "the given file list"
        if not files:
            raise ValueError(f"no token shards in {where}; run `kiln tokenize` first")
        docs, ids, full = [], [], True
        total = 0
        for f in files:
            shard_ids, shard_docs = _read_token_shard(f)
            for i, d in zip(shard_ids, shard_docs):
                if max_tokens is not None and total + len(d) > max_tokens:
                    full = False
                    break
                docs.append(d)
                ids.append(i)
                total += len(d)
            if not full:
                break
        if not docs:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the first document of {files[0]}")
        source = {"shards": len(files), "documents": len(docs), "tokens": total, "complete": full}
        if not full:
            source["split_tokens"] = _split_tokens(files)
        return cls(docs, ids, source)

    def document(self, i: int) -> np.ndarray:
        """Tokens of indexed document i (a read-only view)."""
        out = self.stream[self.doc_start[i]:self.doc_end[i]]
        out.flags.writeable = False
        return out

    def documents(self) -> list[np.ndarray]:
        return [self.document(i) for i in range(self.n_docs)]

    def nbytes(self) -> int:
        return self.stream.nbytes + self.sa.nbytes + self.doc_start.nbytes * 2 + self._bounds.nbytes

    def describe(self) -> dict[str, Any]:
        return {"kind": "suffix_array", "documents": self.n_docs, "tokens": self.n_tokens,
                "bytes": self.nbytes(), **({"source": self.source} if self.source else {})}

    def longest_match(self, tokens: Sequence[int] | np.ndarray) -> Match:
        """The longest contiguous run of `tokens` found verbatim inside one indexed document (the
        earliest such run of the query when several are equally long)."""
        return self.longest_matches([tokens])[0]

    def longest_matches(self, queries: Sequence[Sequence[int] | np.ndarray]) -> list[Match]:
        """`longest_match` of each query, all searched at once."""
        qs = [_as_tokens(q, f"query {i}") for i, q in enumerate(queries)]
        lens = np.array([len(q) for q in qs], dtype=np.int64)
        if not len(qs) or lens.max() == 0:
            return [NO_MATCH] * len(qs)
        W = int(lens.max())
        qmat = np.full((len(qs), 2 * W), SEP, dtype=np.int32)    # padded: every start sees W tokens
        for i, q in enumerate(qs):
            qmat[i, :len(q)] = q
        qi = np.repeat(np.arange(len(qs)), lens)                  # (A,) pairs: query, start
        st = np.arange(len(qi)) - np.repeat(np.cumsum(lens) - lens, lens)
        best_len = np.zeros(len(qi), dtype=np.int64)
        best_pos = np.full(len(qi), -1, dtype=np.int64)
        step = max(1, _GATHER // W)
        for lo in range(0, len(qi), step):
            sl = slice(lo, lo + step)
            best_len[sl], best_pos[sl] = self._match_starts(qmat, qi[sl], st[sl], W)
        out = []
        for a, n in zip((np.cumsum(lens) - lens).tolist(), lens.tolist()):   # a query's pairs are contiguous
            k = a + int(np.argmax(best_len[a:a + n])) if n else a            # argmax: the earliest longest start
            out.append(self._match(int(best_len[k]), int(st[k]), int(best_pos[k])) if n and best_len[k] else NO_MATCH)
        return out

    def _match(self, length: int, start: int, stream_pos: int) -> Match:
        doc = int(np.searchsorted(self.doc_start, stream_pos, side="right")) - 1
        return Match(length, start, stream_pos - doc, doc, stream_pos - int(self.doc_start[doc]))

    def _match_starts(self, qmat: np.ndarray, qi: np.ndarray, st: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray]:
        """For each pair, the longest prefix of query qi[a] from st[a] found in the stream, and a stream
        offset where it occurs. The longest common prefix with any suffix is reached at a neighbour of
        the query's insertion point in the suffix array, so one lower-bound search per pair suffices."""
        j = np.arange(W)
        q = qmat[qi[:, None], st[:, None] + j]                    # (A, W) the query from each start
        qlen = np.count_nonzero(q != SEP, axis=1)
        first = np.minimum(q[:, 0].astype(np.int64) + 1, len(self._bounds) - 2)
        lo0, hi0 = self._bounds[first], self._bounds[first + 1]   # slots whose first token is q[0]
        lo, hi = lo0.copy(), hi0.copy()
        while True:                                               # lower bound: first suffix >= q
            act = np.flatnonzero(lo < hi)
            if not len(act):
                break
            mid = (lo[act] + hi[act]) // 2
            _, less = self._compare(q[act], qlen[act], self.sa[mid])
            lo[act] = np.where(less, mid + 1, lo[act])
            hi[act] = np.where(less, hi[act], mid)
        best_len = np.zeros(len(qi), dtype=np.int64)
        best_pos = np.full(len(qi), -1, dtype=np.int64)
        for cand in (lo - 1, lo):                                 # the two neighbours
            ok = np.flatnonzero((cand >= lo0) & (cand < hi0))
            if not len(ok):
                continue
            pos = self.sa[cand[ok]].astype(np.int64)
            lcp, _ = self._compare(q[ok], qlen[ok], pos)
            better = lcp > best_len[ok]
            best_len[ok[better]], best_pos[ok[better]] = lcp[better], pos[better]
        return best_len, best_pos

    def _compare(self, q: np.ndarray, qlen: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Common prefix length of each query row with the suffix at stream offset pos, and whether
        that suffix sorts before the query. Reads past the stream end are clipped to its last SEP."""
        W = q.shape[1]
        c = self.stream[np.minimum(pos[:, None].astype(np.int64) + np.arange(W), len(self.stream) - 1)]
        diff = (c != q) & (np.arange(W) < qlen[:, None])          # (A, W)
        has = diff.any(axis=1)
        k = diff.argmax(axis=1)
        rows = np.arange(len(q))
        return np.where(has, k, qlen), has & (c[rows, k] < q[rows, k])


# ---------------------------------------------------------------- suffix array

def _suffix_array(stream: np.ndarray, sep_at: np.ndarray) -> np.ndarray:
    """Stream offsets ordered by their suffix up to and including its first SEP (ties among suffixes
    equal that far stay in an arbitrary order). `sep_at`: sorted offsets of the SEPs; the stream ends
    with one. Prefix doubling: after the round with step k every suffix is ranked by its first 2k
    symbols; rank = slot of the first suffix of its group, so ranks keep their order as groups split.
    Only suffixes still in a group of two or more whose shared prefix holds no SEP are re-sorted."""
    n = len(stream)
    idx = np.int32 if n < 2**31 - 1 else np.int64
    if n == 0:
        return np.empty(0, idx)
    # Dense symbols: 0 past the end, 1 SEP, 2.. the tokens present; h of them packed in one int64 key.
    present = np.zeros(int(stream.max()) + 2, dtype=bool)
    present[stream + 1] = True
    code = np.cumsum(present)                                     # SEP -> 1 (always present)
    bits = int(code[-1]).bit_length()
    h = max(1, min(63 // bits, n))
    key = np.zeros(n, dtype=np.int64)
    for j in range(h):
        key <<= bits
        key[:n - j] |= code[stream[j:] + 1]
    del present, code
    sa = np.argsort(key).astype(idx)                              # unstable is fine: ties are refined later
    ks = key[sa]
    del key
    head = np.empty(n, dtype=bool)
    head[0] = True
    np.not_equal(ks[1:], ks[:-1], out=head[1:])
    del ks
    rank = np.empty(n, dtype=idx)
    rank[sa] = np.maximum.accumulate(np.where(head, np.arange(n, dtype=idx), 0))
    act = np.flatnonzero(~(head & np.append(head[1:], True))).astype(idx)   # slots in groups of 2+
    del head
    k = h
    while len(act):
        pos = sa[act]
        live = sep_at[np.searchsorted(sep_at, pos)] - pos >= k    # shared prefix holds no SEP yet
        act, pos = act[live], pos[live]                           # (a group is live whole or not at all)
        if not len(act):
            break
        key = rank[pos].astype(np.int64) * n + rank[pos + k]      # pos + k <= its SEP: in range
        o = np.argsort(key)
        key, pos = key[o], pos[o]
        sa[act] = pos                                             # groups keep their slot ranges
        head = np.empty(len(act), dtype=bool)
        head[0] = True
        np.not_equal(key[1:], key[:-1], out=head[1:])
        rank[pos] = np.maximum.accumulate(np.where(head, act, 0))
        act = act[~(head & np.append(head[1:], True))]
        k *= 2
    return sa


# ---------------------------------------------------------------- token shards

def _read_token_shard(f: Path) -> tuple[list[str], list[np.ndarray]]:
    """(document ids, document token arrays) of one token shard."""
    try:
        table = pq.read_table(f, columns=["id", "ids"])
    except (OSError, pa.ArrowException, KeyError) as e:
        raise ValueError(f"{f}: not a token shard with `id` and `ids` columns ({e}); re-run `kiln tokenize`") from e
    col = table.column("ids")
    lens = [pc.list_value_length(c).fill_null(0).to_numpy(zero_copy_only=False) for c in col.chunks]
    vals = [pc.list_flatten(c).to_numpy(zero_copy_only=False) for c in col.chunks]
    n = np.concatenate(lens).astype(np.int64) if lens else np.empty(0, np.int64)
    flat = np.concatenate(vals).astype(np.int32, copy=False) if vals else np.empty(0, np.int32)
    cuts = np.cumsum(n)[:-1]
    return [str(x) for x in table.column("id").to_pylist()], np.split(flat, cuts) if len(n) else []


def _split_tokens(files: Sequence[Path]) -> int | None:
    """Tokens of the whole split from the tokenize stage's shard metadata; None when a shard lacks it."""
    total = 0
    for f in files:
        kv = pq.read_metadata(f).metadata or {}
        if b"kiln.tokens" not in kv:
            return None
        total += int(kv[b"kiln.tokens"])
    return total


def _as_tokens(x: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{what}: expected a 1-D sequence of integer token ids, got shape {a.shape} {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > MAX_TOKEN):
        raise ValueError(f"{what}: token ids must be in [0, {MAX_TOKEN}], got {a.min()}..{a.max()}")
    return a.astype(np.int32, copy=False)


# ---------------------------------------------------------------- the measurement

def measure_memorisation(generate: Generate, train_docs: Sequence[Sequence[int] | np.ndarray],
                         unseen_docs: Sequence[Sequence[int] | np.ndarray], index: TokenIndex,
                         prefix_tokens: int = 32, new_tokens: int = 64, threshold: int = 50,
                         max_docs: int = 256, examples: int = 5, seed: int = 0) -> dict[str, Any]:
    """Prompt with the first `prefix_tokens` of up to `max_docs` training and unseen documents (drawn at
    random, seeded, among those holding at least prefix + new tokens), generate `new_tokens` greedily
    with `generate(prompts, max_new_tokens) -> generations` (one list of new ids per prompt; it may stop
    early), and measure each generation's longest verbatim match in `index` (generated tokens only:
    the prompt of a training document matches trivially).

    `train_docs` should be the indexed documents (`index.documents()`): a training prefix whose own
    document is not indexed cannot be matched. Returns a plain dict; per group: n, the share with a
    match of >= threshold tokens, mean / max / quantiles / histogram of the longest match, and the
    `examples` generations with the longest matches (ids: see `decode_examples`). The train group
    adds the share that reproduces the document's own continuation for >= threshold tokens."""
    if prefix_tokens < 1 or new_tokens < 1:
        raise ValueError(f"prefix_tokens ({prefix_tokens}) and new_tokens ({new_tokens}) must be >= 1")
    if not 1 <= threshold <= new_tokens:
        raise ValueError(f"threshold ({threshold}) must be in [1, new_tokens={new_tokens}]: a match is "
                         "measured on the generated tokens only")
    if max_docs < 1:
        raise ValueError(f"max_docs ({max_docs}) must be >= 1")
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"prefix_tokens": prefix_tokens, "new_tokens": new_tokens, "threshold": threshold,
                           "seed": seed, "index": index.describe()}
    for group, docs in (("train", train_docs), ("unseen", unseen_docs)):
        picked = _pick(docs, prefix_tokens + new_tokens, max_docs, rng, group)
        prompts = [[int(t) for t in docs[i][:prefix_tokens]] for i in picked]
        gens = _generate(generate, prompts, new_tokens, group)
        matches = index.longest_matches(gens)
        truth = [np.asarray(docs[i][prefix_tokens:prefix_tokens + new_tokens]) for i in picked] \
            if group == "train" else None
        out[group] = _summary(picked, prompts, gens, matches, truth, threshold, new_tokens, examples)
    return out


def _pick(docs: Sequence, need: int, max_docs: int, rng: np.random.Generator, group: str) -> np.ndarray:
    lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    ok = np.flatnonzero(lens >= need)
    if not len(ok):
        longest = int(lens.max()) if len(lens) else 0
        raise ValueError(f"memorisation needs {group} documents of at least prefix_tokens + new_tokens = {need} "
                         f"tokens; none of the {len(docs)} given has that many (longest: {longest}). Use a "
                         "shorter prefix or fewer new tokens, or more data")
    if len(ok) > max_docs:
        ok = np.sort(rng.choice(ok, size=max_docs, replace=False))
    return ok


def _generate(generate: Generate, prompts: list[list[int]], new_tokens: int, group: str) -> list[list[int]]:
    gens = [[int(t) for t in g] for g in generate(prompts, new_tokens)]
    if len(gens) != len(prompts):
        raise ValueError(f"generate returned {len(gens)} generations for {len(prompts)} {group} prompts")
    long = [len(g) for g in gens if len(g) > new_tokens]
    if long:
        raise ValueError(f"generate returned {max(long)} tokens for max_new_tokens={new_tokens}: it must return "
                         "only the new tokens, not the prompt")
    return gens


def _summary(picked: np.ndarray, prompts: list[list[int]], gens: list[list[int]], matches: list[Match],
             truth: list[np.ndarray] | None, threshold: int, new_tokens: int, examples: int) -> dict[str, Any]:
    longest = np.array([m.length for m in matches], dtype=np.int64)
    edges = sorted({0, *(1 << i for i in range(new_tokens.bit_length()) if 1 << i < new_tokens),
                    threshold, new_tokens + 1})
    counts = np.histogram(longest, bins=edges)[0]
    s: dict[str, Any] = {
        "n": len(matches),
        "share_match": float(np.mean(longest >= threshold)),
        "mean_longest": round(float(longest.mean()), 3),
        "max_longest": int(longest.max()),
        "quantiles": {f"p{q}": float(np.quantile(longest, q / 100)) for q in (50, 90, 99)},
        "histogram": [{"from": a, "to": b - 1, "count": int(c)} for a, b, c in zip(edges, edges[1:], counts)],
    }
    if truth is not None:
        same = np.array([_common_prefix(g, t) for g, t in zip(gens, truth)], dtype=np.int64)
        s["share_extractable"] = float(np.mean(same >= threshold))
        s["mean_true_continuation"] = round(float(same.mean()), 3)
    order = sorted(range(len(matches)), key=lambda i: -matches[i].length)[:examples]
    s["examples"] = [{"doc": int(picked[i]), "prompt": prompts[i], "generated": gens[i],
                      "match_length": matches[i].length, "match_start": matches[i].start,
                      "corpus_position": matches[i].position, "corpus_doc": matches[i].doc,
                      "corpus_offset": matches[i].offset} for i in order]
    return s


def _common_prefix(a: Sequence[int], b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != b[:n])
    return int(diff[0]) if len(diff) else n


def decode_examples(result: dict[str, Any], decode: Callable[[list[int]], str],
                    index: TokenIndex | None = None) -> dict[str, list[dict[str, Any]]]:
    """The examples of a `measure_memorisation` result as text, per group: prompt, generation, the
    matched run, and (with `index`) the id of the training document that holds it."""
    out = {}
    for group in ("train", "unseen"):
        rows = []
        for ex in result.get(group, {}).get("examples", []):
            a, n = ex["match_start"], ex["match_length"]
            row = {"prompt": decode(ex["prompt"]), "generated": decode(ex["generated"]),
                   "matched": decode(ex["generated"][a:a + n]), "match_length": n}
            if index is not None and index.doc_ids is not None and ex["corpus_doc"] >= 0:
                row["corpus_doc_id"] = index.doc_ids[ex["corpus_doc"]]
            rows.append(row)
        out[group] = rows
    return out
