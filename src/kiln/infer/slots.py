"""A key/value cache in slots: one row of `max_len` positions per sequence, allocated once.

Shape legend: N slots, K key/value heads, M max_len (positions per slot), E head_dim,
B rows of one forward, T new tokens per row.

Unlike `kv_cache.KVCache` (one shared `pos`, a batch that starts and ends together), every slot has
its own length, so sequences join and leave between decode steps (continuous batching) and the
tensors never change shape: a decode step over the first B slots is the same kernels every time,
which is what lets CUDA graphs replay it. The model sees one of two views per forward:

- `prefill(slots_B)`: a right-padded batch of prompts, all starting at position 0, written into
  slots `slots_B`. Keys are returned as they came (S == T), so the model's plain causal attention
  applies; a padded tail is written too but lies beyond the row's length and is never read.
- `extend(slot, start, end)`: the tokens at positions start .. end-1 of one slot whose positions
  0 .. start-1 already hold a prompt's prefix (a prefix-cache hit); they attend over 0 .. end-1 under
  `extend_mask`.
- `decode(pos_B, S)`: one new token for each of slots 0 .. B-1, written at that slot's own position;
  every layer reads positions 0 .. S-1 of its slots (S <= M, more than every row's position) under the
  mask `keys_mask(pos_B, S)`. The engine picks S from a few length buckets, so a step's reads grow with
  the longest live sequence, not with the slots' capacity. With `fused=True` the view also offers `attend`:
  the layer's RoPE, cache write and attention in one or two kernels (kiln/infer/attention.py), no mask.
"""

from __future__ import annotations

import torch

from kiln.infer.attention import decode_attention


class SlotCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        # One tensor per layer, not views of one: a compiled decode step then writes its graph inputs in
        # place, where a write into a view of a shared base may be functionalised into a copy of the base.
        self.k_NKME = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v_NKME = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.n_slots, self.max_len = n_slots, max_len
        self.rows_N = torch.arange(n_slots, device=device)
        self.keys_M = torch.arange(max_len, device=device)

    @classmethod
    def for_model(cls, model, n_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> SlotCache:
        cfg = model.cfg
        param = next(model.parameters())
        return cls(cfg.depth, n_slots, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim, param.device,
                   dtype or param.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k_NKME + self.v_NKME)

    def prefill(self, slots_B: torch.Tensor) -> _Prefill:
        return _Prefill(self, slots_B)

    def extend(self, slot: int, start: int, end: int) -> _Extend:
        return _Extend(self, slot, start, end)

    def extend_mask(self, start: int, end: int) -> torch.Tensor:
        """(1, 1, T, end) for T = end - start queries at positions start ..: each sees keys up to its own."""
        q_T1 = torch.arange(start, end, device=self.keys_M.device)[:, None]
        return (self.keys_M[None, :end] <= q_T1)[None, None]

    def decode(self, pos_B: torch.Tensor, S: int | None = None, fused: bool = False) -> _Decode:
        return (_FusedDecode if fused else _Decode)(self, pos_B, S or self.max_len)

    def keys_mask(self, pos_B: torch.Tensor, S: int | None = None) -> torch.Tensor:
        """(B, 1, 1, S) True where a row's query (at pos_B) may attend: keys 0 .. pos_B (of the first S)."""
        return (self.keys_M[None, :S or self.max_len] <= pos_B[:, None])[:, None, None, :]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` the first `length` cached positions of `src` (n samples of one prompt)."""
        for t in self.k_NKME + self.v_NKME:
            t[dst, :, :length] = t[src, :, :length]


class _Prefill:
    pos = 0   # the model's KVCache protocol; unused by `Transformer.hidden`

    def __init__(self, cache: SlotCache, slots_B: torch.Tensor):
        self.cache, self.slots_B = cache, slots_B

    def update(self, layer_idx: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor):
        T = k_BKTE.size(2)
        if T > self.cache.max_len:
            raise ValueError(f"a prompt of {T} tokens does not fit a slot of {self.cache.max_len} positions")
        # .to: under autocast (a training model sampling its own rollouts) keys come in bf16 to a cache in
        # the weights' dtype
        k_NKME, v_NKME = self.cache.k_NKME[layer_idx], self.cache.v_NKME[layer_idx]
        k_NKME[self.slots_B, :, :T] = k_BKTE.to(k_NKME.dtype)
        v_NKME[self.slots_B, :, :T] = v_BKTE.to(v_NKME.dtype)
        return k_BKTE, v_BKTE

    def advance(self, n_tokens: int) -> None:
        pass


class _Extend:
    pos = 0

    def __init__(self, cache: SlotCache, slot: int, start: int, end: int):
        self.cache, self.slot, self.start, self.end = cache, slot, start, end

    def update(self, layer_idx: int, k_1KTE: torch.Tensor, v_1KTE: torch.Tensor):
        assert k_1KTE.size(2) == self.end - self.start
        s = self.slot
        k_NKME, v_NKME = self.cache.k_NKME[layer_idx], self.cache.v_NKME[layer_idx]
        k_NKME[s, :, self.start:self.end] = k_1KTE[0].to(k_NKME.dtype)
        v_NKME[s, :, self.start:self.end] = v_1KTE[0].to(v_NKME.dtype)
        return k_NKME[s:s + 1, :, :self.end], v_NKME[s:s + 1, :, :self.end]

    def advance(self, n_tokens: int) -> None:
        pass


class _Decode:
    pos = 0

    def __init__(self, cache: SlotCache, pos_B: torch.Tensor, S: int):
        self.cache, self.pos_B, self.S = cache, pos_B, S
        self.rows_B = cache.rows_N[:pos_B.size(0)]

    def update(self, layer_idx: int, k_BK1E: torch.Tensor, v_BK1E: torch.Tensor):
        B = k_BK1E.size(0)
        k_NKME, v_NKME = self.cache.k_NKME[layer_idx], self.cache.v_NKME[layer_idx]
        # Advanced indices around a slice: the indexed shape is (B, K, E). index_put_ takes device
        # tensors, so no host sync and the step stays capturable.
        k_NKME[self.rows_B, :, self.pos_B] = k_BK1E[:, :, 0].to(k_NKME.dtype)
        v_NKME[self.rows_B, :, self.pos_B] = v_BK1E[:, :, 0].to(v_NKME.dtype)
        return k_NKME[:B, :, :self.S], v_NKME[:B, :, :self.S]

    def advance(self, n_tokens: int) -> None:
        pass


class _FusedDecode(_Decode):
    def attend(self, layer_idx: int, q_B1HE, k_B1KE, v_B1KE, cos_B11E, sin_B11E) -> torch.Tensor:
        """RoPE, the cache write at pos_B and the attention over keys 0 .. pos_B of each row: (B, H, 1, E)."""
        B = q_B1HE.size(0)
        y_BHE = decode_attention(q_B1HE[:, 0], k_B1KE[:, 0], v_B1KE[:, 0], cos_B11E.reshape(B, -1),
                                 sin_B11E.reshape(B, -1), self.cache.k_NKME[layer_idx], self.cache.v_NKME[layer_idx],
                                 self.pos_B, self.S)
        return y_BHE[:, :, None]
