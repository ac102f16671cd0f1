"""PackedLoader: token shards -> endless (inputs, targets) batches of packed documents.

Shapes: B = batch_size (per rank), W = world_size, G = B * W (global batch), S = seq_len.
A row is S + 1 tokens: inputs = row[:-1], targets = row[1:].

Epoch e of one split, identical on every rank and for every world size:
  1. shards are taken in an order permuted by a numpy Generator seeded with (seed, e), and the
     documents of each shard in an order seeded with (seed, e, shard) (shuffle=False: file order);
     each document becomes a unit `[bos] + ids + [eos]` (bos only when bos_id is given);
  2. packing="concat": the units form one stream; row r is stream[r*S : r*S + S + 1] (rows
     overlap by one token, so every stream token after the first is a target exactly once; the
     incomplete tail is dropped). A block is the rows that start inside one shard's units.
     packing="bestfit": per shard, units longer than a row are split into S + 1 pieces that
     overlap by one token (nothing is cropped), then pieces are best-fit-decreasing packed into
     rows that each start at a piece start; the rest of a row is padded with pad_id. Targets are
     -100 (the loss's ignore_index) at padding and where a continuation piece starts mid-row (its
     first token was already a target in the previous piece). A block is one shard's rows;
  3. rows are permuted within their block (seeded with (seed, e, shard)); the epoch's rows are the
     blocks in shard order;
  4. global batch g is epoch rows [g*G, (g+1)*G); rank k takes the contiguous slice
     [g*G + k*B, g*G + (k+1)*B). Concatenating the ranks' batches of one step gives exactly the
     batch a single rank with batch G sees, so the position (epoch, global batches consumed) is
     the same for every world size: a state saved by 2 ranks x B resumes on 1 rank x 2B. The last
     partial global batch of an epoch is dropped.

Memory: one shard's tokens at a time (plus a few cached; a concat row may reach into the next
shard), and per document one length (bestfit) -- never the whole split. Parquet footers give
document counts; token counts come from the tokenize stage's `kiln.tokens` shard metadata, or
one scan of the shard when absent. A background thread (prefetch > 0) builds the next batches;
they are a pure function of the position, so prefetching never changes what is yielded.

Document mask (doc_mask=True): batches also carry positions and segment ids, shape (B, S) each,
derived from the inputs: a segment ends after each EOS input (and starts at each BOS), positions
count from 0 at each segment and at each row start (a row may start mid-document).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kiln.tokenizer.packing import bestfit_rows, split_pieces, document_mask
from kiln.tokenizer.prefetch import Prefetcher

STATE_VERSION = 2
IGNORE = -100           # target of a padding position; the model's cross-entropy ignores it
PACKINGS = ("concat", "bestfit")
_CACHE_SHARDS = 4       # decoded shards kept; a concat row spans several only if shards are < S tokens


class Batch(NamedTuple):
    """A batch with its document mask; each field (B, S) int64."""
    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor


class _Block(NamedTuple):
    rows: np.ndarray          # (n, S+1) int32, possibly a strided view of a concat stream
    valid: np.ndarray | None  # (n, S) bool, targets that count (bestfit); None when all do
    order: np.ndarray         # (n,) local row permutation


class PackedLoader:
    def __init__(self, files: Sequence[str | Path], seq_len: int, batch_size: int, eos_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, *, packing: str = "concat",
                 bos_id: int | None = None, pad_id: int | None = None, doc_mask: bool = False,
                 prefetch: int = 2, pin_memory: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}; expected one of {', '.join(PACKINGS)}")
        if prefetch < 0:
            raise ValueError(f"prefetch ({prefetch}) must be >= 0")
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("PackedLoader got no token shards; run `kiln tokenize` first")
        self.seq_len, self.batch_size, self.eos_id = seq_len, batch_size, eos_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.packing, self.bos_id, self.doc_mask = packing, bos_id, doc_mask
        self.pad_id = eos_id if pad_id is None else pad_id
        self.global_batch = batch_size * world_size
        self.prefetch = prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._extra = 1 + (bos_id is not None)                      # separator tokens per document

        self._docs, self._tokens, self._lens = _scan_shards(self.files, need_lengths=packing == "bestfit")
        self.n_docs = int(self._docs.sum())
        self.n_tokens = int(self._tokens.sum())                     # document tokens, no separators
        self._units = self._tokens + self._extra * self._docs      # stream tokens per shard
        self.stream_len = int(self._units.sum())
        if packing == "concat":
            self.rows_total = max(0, self.stream_len - 1) // seq_len
            target_tokens, padded, self._block_rows = self.rows_total * seq_len, 0, None
        else:
            self._block_rows = np.zeros(len(self.files), dtype=np.int64)
            target_tokens = padded = 0
            for i in range(len(self.files)):
                _, lens, cont = split_pieces(self._unit_lens(i), seq_len + 1)
                (_, col), fill = bestfit_rows(lens, seq_len + 1)
                self._block_rows[i] = len(fill)
                target_tokens += int(fill.sum()) - len(fill) - int((cont & (col > 0)).sum())
                padded += int((seq_len + 1 - fill).sum())
            self.rows_total = int(self._block_rows.sum())
        self.batches_per_epoch = self.rows_total // self.global_batch
        if self.batches_per_epoch == 0:
            names = ", ".join(f.name for f in self.files[:5]) + (" ..." if len(self.files) > 5 else "")
            raise ValueError(
                f"{len(self.files)} token shard(s) in {self.files[0].parent} ({names}) hold {self.n_tokens:,} "
                f"tokens in {self.n_docs:,} documents ({self.stream_len:,} with separators), {self.rows_total:,} "
                f"row(s) of {packing} packing, fewer than one batch needs: batch_size {batch_size} x world_size "
                f"{world_size} = {self.global_batch} rows of seq_len {seq_len} + 1. Use a smaller seq_len or "
                "batch size, or more data.")
        used_rows = self.batches_per_epoch * self.global_batch
        slots = self.rows_total * seq_len
        # padded: target slots of padding; ignored: all -100 targets (padding + the repeated first token of
        # continuation pieces placed mid-row); cropped: stream tokens never a target (concat: the epoch's
        # tail; bestfit: the first token of each row). The dropped partial global batch is separate.
        self.packing_stats = {
            "packing": packing, "rows": self.rows_total, "rows_used": used_rows,
            "stream_tokens": self.stream_len, "target_tokens": target_tokens,
            "padded_share": round(padded / slots, 6) if slots else 0.0,
            "ignored_share": round(1 - target_tokens / slots, 6) if slots else 0.0,
            "cropped_share": round(1 - target_tokens / self.stream_len, 6) if self.stream_len else 0.0,
            "dropped_rows_share": round(1 - used_rows / self.rows_total, 6),
        }

        self._lock = threading.Lock()
        self._shard_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._block_cache: OrderedDict[tuple[int, int], _Block] = OrderedDict()
        self._plan_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epoch = 0
        self._position = 0                 # global batches of the current epoch already yielded
        self._worker: Prefetcher | None = None

    # ------------------------------------------------------------ sizes

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (an exhausted epoch rolls over when the next batch is taken)."""
        return self._epoch

    @property
    def rows_per_epoch(self) -> int:
        """Sequences this rank yields per epoch."""
        return self.batches_per_epoch * self.batch_size

    @property
    def tokens_per_epoch(self) -> int:
        """Input positions this rank yields per epoch (rows_per_epoch * seq_len; bestfit pads some)."""
        return self.rows_per_epoch * self.seq_len

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | Batch]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor] | Batch:
        """(inputs, targets), each a (B, S) int64 CPU tensor (pinned with pin_memory on CUDA), or a
        `Batch` with the document mask when doc_mask is set. targets[:, t] == inputs[:, t + 1] except
        where the target is -100 (bestfit padding)."""
        if self._position >= self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        key = (self._epoch, self._position)
        if self.prefetch:
            if self._worker is None or self._worker.next_key != key:
                self._stop_worker()
                self._worker = Prefetcher(self, key)
            arrays = self._worker.get()
        else:
            arrays = self.arrays_at(*key)
        out = self._tensors(arrays)
        self._position += 1
        return out

    def batch_at(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor] | Batch:
        """This rank's batch `index` of `epoch`: a pure function of its arguments."""
        return self._tensors(self.arrays_at(epoch, index))

    def arrays_at(self, epoch: int, index: int) -> tuple[np.ndarray, ...]:
        """batch_at as int64 numpy arrays (what the prefetch thread builds: numpy only, no torch, so
        that no thread is inside torch's C++ when the interpreter exits)."""
        lo = index * self.global_batch + self.rank * self.batch_size
        rows, valid = self._rows(epoch, np.arange(lo, lo + self.batch_size))        # (B, S+1)
        x, y = rows[:, :-1].astype(np.int64), rows[:, 1:].astype(np.int64)           # copies
        if valid is not None:
            y[~valid] = IGNORE
        return (x, y, *document_mask(x, self.eos_id, self.bos_id)) if self.doc_mask else (x, y)

    def _tensors(self, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, torch.Tensor] | Batch:
        out = tuple(torch.from_numpy(a) for a in arrays)
        if self.pin_memory:       # page-locked, so that .to(device, non_blocking=True) is asynchronous
            out = tuple(t.pin_memory() for t in out)
        return Batch(*out) if self.doc_mask else out

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Epoch-row ids this rank yields in `epoch`, in order. Ids number the rows unshuffled: blocks
        in the epoch's shard order, rows in packing order (concat: row r = epoch_stream[r*S : r*S+S+1])."""
        starts, _ = self._plan(epoch)
        out = []
        for g in range(self.batches_per_epoch):
            lo = g * self.global_batch + self.rank * self.batch_size
            idx = np.arange(lo, lo + self.batch_size)
            b = np.searchsorted(starts, idx, side="right") - 1
            for i, blk in zip(idx, b):
                order = self._block(epoch, int(blk)).order
                out.append(starts[blk] + order[i - starts[blk]])
        return np.asarray(out, dtype=np.int64)

    def epoch_stream(self, epoch: int) -> np.ndarray:
        """The packed unit stream of `epoch` (documents with separators), int32. Holds the whole split."""
        order, _ = self._shard_order(epoch)
        return np.concatenate([self._packed_shard(epoch, int(s)) for s in order])

    def close(self) -> None:
        """Stop the prefetch thread (it also stops when the loader is garbage-collected)."""
        self._stop_worker()

    def __del__(self) -> None:
        self._stop_worker()

    def _stop_worker(self) -> None:
        w, self._worker = getattr(self, "_worker", None), None
        if w is not None:
            w.stop()

    # ------------------------------------------------------------ epoch layout

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Shards in epoch order, and each one's first stream offset in that order."""
        n = len(self.files)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(self._units[order], out=offsets[1:])
        return order, offsets

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """First epoch-row id of each block (plus the total at the end), and the shard order."""
        key = epoch if self.shuffle else 0
        with self._lock:
            if key not in self._plan_cache:
                order, offsets = self._shard_order(epoch)
                if self.packing == "concat":
                    first = np.minimum(-(-offsets // self.seq_len), self.rows_total)  # ceil(offset / S)
                else:
                    first = np.zeros(len(order) + 1, dtype=np.int64)
                    np.cumsum(self._block_rows[order], out=first[1:])
                if len(self._plan_cache) > 2:
                    self._plan_cache.clear()
                self._plan_cache[key] = (first, order)
            return self._plan_cache[key]

    def _rows(self, epoch: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Epoch rows idx (epoch order, shuffled), (len(idx), S+1) int32, and their valid targets (bestfit)."""
        starts, _ = self._plan(epoch)
        b = np.searchsorted(starts, idx, side="right") - 1
        rows = np.empty((len(idx), self.seq_len + 1), dtype=np.int32)
        valid = np.empty((len(idx), self.seq_len), dtype=bool) if self.packing == "bestfit" else None
        for blk in np.unique(b):
            sel = np.flatnonzero(b == blk)
            block = self._block(epoch, int(blk))
            local = block.order[idx[sel] - starts[blk]]
            rows[sel] = block.rows[local]
            if valid is not None:
                valid[sel] = block.valid[local]
        return rows, valid

    def _block(self, epoch: int, blk: int) -> _Block:
        key = (epoch if self.shuffle else 0, blk)
        with self._lock:
            if key in self._block_cache:
                self._block_cache.move_to_end(key)
                return self._block_cache[key]
        block = self._build_block(epoch, blk)
        with self._lock:
            self._block_cache[key] = block
            while len(self._block_cache) > 2:
                self._block_cache.popitem(last=False)
        return block

    def _build_block(self, epoch: int, blk: int) -> _Block:
        S = self.seq_len
        starts, order = self._plan(epoch)
        n = int(starts[blk + 1] - starts[blk])
        shard = int(order[blk])
        if self.packing == "concat":
            # Rows starts[blk].. cover stream [first*S, last*S + S + 1): this shard's units and maybe the next's.
            _, offsets = self._shard_order(epoch)
            lo, hi = int(starts[blk]) * S, int(starts[blk + 1]) * S + 1 if n else int(starts[blk]) * S
            parts, k = [], blk
            while k < len(order) and offsets[k] < hi:
                s = self._packed_shard(epoch, int(order[k]))
                parts.append(s[max(0, lo - offsets[k]):max(0, hi - offsets[k])])
                k += 1
            seg = np.concatenate(parts) if parts else np.empty(0, np.int32)
            rows = np.lib.stride_tricks.as_strided(seg, (n, S + 1), (seg.strides[0] * S, seg.strides[0]),
                                                   writeable=False) if n else np.empty((0, S + 1), np.int32)
            valid = None
        else:
            rows, valid = self._bestfit_block(epoch, shard)
            assert len(rows) == n
        rng = np.random.default_rng([self.seed, epoch, shard, 1]) if self.shuffle else None
        return _Block(rows, valid, rng.permutation(n) if rng is not None else np.arange(n))

    def _packed_shard(self, epoch: int, shard: int) -> np.ndarray:
        """Shard's documents in epoch order as units [bos] + ids + [eos], concatenated, int32."""
        key = (epoch if self.shuffle else 0, shard)
        with self._lock:
            if key in self._shard_cache:
                self._shard_cache.move_to_end(key)
                return self._shard_cache[key]
        tokens, offsets = _read_shard(self.files[shard])
        lens = np.diff(offsets)
        n = len(lens)
        perm = np.random.default_rng([self.seed, epoch, shard, 0]).permutation(n) if self.shuffle else np.arange(n)
        units = lens[perm] + self._extra
        out_start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(units, out=out_start[1:])
        pre = self._extra - 1
        # Source index of every output position: out_start[k] + pre + j <- offsets[perm[k]] + j.
        src = np.arange(out_start[-1], dtype=np.int64) - np.repeat(out_start[:-1] + pre - offsets[perm], units)
        out = tokens[np.clip(src, 0, max(len(tokens) - 1, 0))] if len(tokens) else np.zeros(len(src), np.int32)
        out[out_start[1:] - 1] = self.eos_id
        if pre:
            out[out_start[:-1]] = self.bos_id
        with self._lock:
            self._shard_cache[key] = out
            while len(self._shard_cache) > _CACHE_SHARDS:
                self._shard_cache.popitem(last=False)
        return out

    def _unit_lens(self, shard: int) -> np.ndarray:
        return self._lens[shard] + self._extra

    def _bestfit_block(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.seq_len + 1
        stream = self._packed_shard(epoch, shard)
        n = len(self._lens[shard])
        perm = np.random.default_rng([self.seed, epoch, shard, 0]).permutation(n) if self.shuffle else np.arange(n)
        starts, lens, cont = split_pieces(self._unit_lens(shard)[perm], L)
        (row, col), fill = bestfit_rows(lens, L)
        rows = np.full((len(fill), L), self.pad_id, dtype=np.int32)
        # One flat gather for all pieces: token j of piece p goes from starts[p] + j to row*L + col + j.
        before = np.zeros(len(lens), dtype=np.int64)
        np.cumsum(lens[:-1], out=before[1:])
        j = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(before, lens)
        rows.reshape(-1)[np.repeat(row * L + col, lens) + j] = stream[np.repeat(starts, lens) + j]
        valid = np.arange(1, L)[None, :] < fill[:, None]                  # (n, S): not padding
        mid = cont & (col > 0)
        valid[row[mid], col[mid] - 1] = False                             # already a target in its previous piece
        return rows, valid

    # ------------------------------------------------------------ exact resume

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; the same on every rank and valid for any world size whose
        global batch (batch_size * world_size) is the same. A new loader + load_state_dict continues exactly."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "position": self._position,
                "rows_consumed": self._position * self.global_batch, "global_batch": self.global_batch,
                "seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len, "packing": self.packing,
                "bos": self.bos_id is not None, "docs": self.n_docs, "stream_tokens": self.stream_len,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}: it was "
                             "saved by an older kiln whose row order differs, so it cannot be resumed exactly; "
                             "start a new run")
        expect = {"shuffle": self.shuffle, "seq_len": self.seq_len, "global_batch": self.global_batch,
                  "packing": self.packing, "bos": self.bos_id is not None, "docs": self.n_docs,
                  "stream_tokens": self.stream_len}
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expect.items() if state.get(k) != v]
        if wrong:
            raise ValueError("cannot resume the data loader exactly, its settings or data changed ("
                             + "; ".join(wrong) + "). Resume with the same tokens, seq_len, packing and global "
                             "batch (batch_size x world_size; the world size itself may change), or start a new run.")
        if not 0 <= state["position"] <= self.batches_per_epoch:
            raise ValueError(f"loader state position {state['position']} is outside the epoch "
                             f"(0..{self.batches_per_epoch} global batches)")
        self._stop_worker()
        with self._lock:
            if self.seed != int(state["seed"]):
                self._plan_cache.clear()
                self._block_cache.clear()
                self._shard_cache.clear()
            self.seed = int(state["seed"])
        self._epoch, self._position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------- document mask

def _scan_shards(files: list[Path], need_lengths: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Documents and tokens per shard (footer / tokenize metadata when present), and document lengths
    when needed; reads one shard at a time."""
    import pyarrow as pa   # here, not at the top: post-training, serving and eval import this module, not shards
    import pyarrow.parquet as pq
    docs, tokens, lens = [], [], []
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{f}: not a token shard ({e}); re-run `kiln tokenize`") from e
        kv = meta.metadata or {}
        if not need_lengths and b"kiln.tokens" in kv and b"kiln.docs" in kv and int(kv[b"kiln.docs"]) == meta.num_rows:
            docs.append(meta.num_rows)
            tokens.append(int(kv[b"kiln.tokens"]))
            continue
        _, offsets = _read_shard(f, values=False)
        n = np.diff(offsets)
        docs.append(len(n))
        tokens.append(int(n.sum()))
        if need_lengths:
            lens.append(n.astype(np.int64))
    return np.asarray(docs, dtype=np.int64), np.asarray(tokens, dtype=np.int64), lens


def _read_shard(f: Path, values: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, document offsets int64 of length docs + 1) of one token shard."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    try:
        col = pq.read_table(f, columns=["ids"]).column("ids")
    except (OSError, pa.ArrowException, KeyError) as e:
        raise ValueError(f"{f}: not a token shard with an `ids` column ({e}); re-run `kiln tokenize`") from e
    lengths = [pc.list_value_length(c).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
               for c in col.chunks]
    n = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    if not values:
        return np.empty(0, np.int32), offsets
    vals = [c.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False) for c in col.chunks]
    tokens = np.concatenate(vals) if vals else np.empty(0, np.int32)
    return tokens, offsets


# ---------------------------------------------------------------- prefetch
