"""PackedLoader: token shards -> endless (inputs, targets) batches of packed, EOS-separated documents.

Shapes: B = batch_size, S = seq_len.

Epoch e (of one split):
  1. documents in order (shuffle: permuted by a numpy Generator seeded with (seed, e)),
     each followed by `eos_id`, are concatenated into one stream of N tokens;
  2. the stream is cut into rows of S + 1 tokens overlapping by one: row r is
     stream[r*S : r*S + S + 1], so inputs = row[:-1], targets = row[1:] and every
     stream token is a target exactly once; the incomplete tail is dropped;
  3. rows are permuted (shuffle, same Generator) or kept in order;
  4. rank k of W takes rows k, k+W, k+2W, ... of that order, truncated so all
     ranks get the same count, and yields them B at a time (a final partial
     batch is dropped, so all ranks take the same number of steps).
The loader then moves to epoch e+1, forever. Its position is (epoch, batch
index), identical on every rank, so one state_dict() serves all ranks.

Memory: the whole split is held as one int32 array (plus one permuted copy per
epoch): 8 bytes per token, fine for the ~10-50M-token splits of a single-machine
run. Larger corpora want memory-mapped shards and a per-shard permutation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

STATE_VERSION = 1


class PackedLoader:
    def __init__(self, files: Sequence[str | Path], seq_len: int, batch_size: int, eos_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("PackedLoader got no token shards; run `kiln tokenize` first")
        self.seq_len, self.batch_size, self.eos_id = seq_len, batch_size, eos_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle

        self._tokens, self._doc_starts, self._doc_lens = _read_shards(self.files)
        self.n_docs = len(self._doc_lens)
        self.stream_len = len(self._tokens) + self.n_docs          # + one EOS per document
        rows_total = max(0, self.stream_len - 1) // seq_len
        self._rows_per_rank = rows_total // world_size
        self.batches_per_epoch = self._rows_per_rank // batch_size
        if self.batches_per_epoch == 0:
            names = ", ".join(f.name for f in self.files[:5]) + (" ..." if len(self.files) > 5 else "")
            need = batch_size * world_size * seq_len + 1
            raise ValueError(
                f"{len(self.files)} token shard(s) in {self.files[0].parent} ({names}) hold {len(self._tokens):,} "
                f"tokens in {self.n_docs:,} documents ({self.stream_len:,} with EOS separators), fewer than one "
                f"batch needs: batch_size {batch_size} x world_size {world_size} x seq_len {seq_len} + 1 = "
                f"{need:,}. Use a smaller seq_len or batch size, or more data.")

        self._epoch = 0
        self._position = 0                 # batches of the current epoch already yielded
        self._built: int | None = None     # epoch whose stream/rows are in _stream/_rows
        self._stream = np.empty(0, dtype=np.int32)
        self._rows = np.empty(0, dtype=np.int64)

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
        """Target tokens this rank yields per epoch (rows_per_epoch * seq_len)."""
        return self.rows_per_epoch * self.seq_len

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each a (B, S) int64 CPU tensor; targets[:, t] == inputs[:, t + 1]."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
        stream, rows = self._epoch_data(self._epoch)
        p, B, S = self._position, self.batch_size, self.seq_len
        starts = rows[p * B:(p + 1) * B] * S                                 # (B,)
        batch = torch.from_numpy(stream[starts[:, None] + np.arange(S + 1)]).long()  # (B, S+1)
        self._position += 1
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Row indices this rank yields in `epoch`, in order (row r = stream[r*S : r*S+S+1])."""
        return self._epoch_data(epoch)[1].copy()

    def epoch_stream(self, epoch: int) -> np.ndarray:
        """The packed token stream of `epoch` (documents + EOS separators), int32."""
        return self._epoch_data(epoch)[0].copy()

    def _epoch_data(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._built != epoch:
            rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
            # Without shuffle every epoch is the same: build once.
            if rng is not None or self._built is None:
                doc_order = rng.permutation(self.n_docs) if rng is not None else np.arange(self.n_docs)
                self._stream = self._pack(doc_order)
                rows_total = (self.stream_len - 1) // self.seq_len
                order = rng.permutation(rows_total) if rng is not None else np.arange(rows_total)
                mine = order[:self._rows_per_rank * self.world_size][self.rank::self.world_size]
                self._rows = mine[:self.rows_per_epoch]
            self._built = epoch
        return self._stream, self._rows

    def _pack(self, doc_order: np.ndarray) -> np.ndarray:
        out = np.full(self.stream_len, self.eos_id, dtype=np.int32)
        # One slice copy per document: ~1 µs each, so about a second per epoch at a million documents.
        pos = 0
        for d in doc_order:
            start, n = self._doc_starts[d], self._doc_lens[d]
            out[pos:pos + n] = self._tokens[start:start + n]
            pos += n + 1                   # out[pos + n] stays eos_id
        assert pos == self.stream_len
        return out

    # ------------------------------------------------------------ exact resume

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; the same on every rank. A new loader + load_state_dict continues exactly."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "position": self._position, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "world_size": self.world_size, "docs": self.n_docs, "stream_tokens": self.stream_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expect = {"version": STATE_VERSION, "shuffle": self.shuffle, "seq_len": self.seq_len,
                  "batch_size": self.batch_size, "world_size": self.world_size, "docs": self.n_docs,
                  "stream_tokens": self.stream_len}
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expect.items() if state.get(k) != v]
        if wrong:
            raise ValueError("cannot resume the data loader exactly, its settings or data changed ("
                             + "; ".join(wrong) + "). Resume with the same tokens, seq_len, batch size and "
                             "world size, or start a new run.")
        if not 0 <= state["position"] <= self.batches_per_epoch:
            raise ValueError(f"loader state position {state['position']} is outside the epoch "
                             f"(0..{self.batches_per_epoch} batches)")
        self.seed = int(state["seed"])
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._built = None


def _read_shards(files: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All documents' token ids as one int32 array, with each document's start and length."""
    values, lengths = [], []
    for f in files:
        try:
            col = pq.read_table(f, columns=["ids"]).column("ids")
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{f}: not a token shard with an `ids` column ({e}); re-run `kiln tokenize`") from e
        for chunk in col.chunks:
            lengths.append(pc.list_value_length(chunk).fill_null(0).to_numpy().astype(np.int64))
            values.append(chunk.flatten().to_numpy().astype(np.int32, copy=False))
    tokens = np.concatenate(values) if values else np.empty(0, dtype=np.int32)
    lens = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    starts = np.zeros_like(lens)
    np.cumsum(lens[:-1], out=starts[1:])
    return tokens, starts, lens
