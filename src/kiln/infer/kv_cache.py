"""Preallocated key/value cache for incremental decoding.

Shape legend: L layers, B batch, K key/value heads, M max_len (cache capacity),
T new tokens, E head_dim.

Protocol with `Transformer.forward(..., cache=c)`: every layer calls
`c.update(layer_idx, k, v)` to write its new keys/values at `c.pos` and read back
everything cached so far; after the last layer the model calls `c.advance(T)`
exactly once, so all layers of one forward see the same `pos`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k_LBKME = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBKME = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens already cached; a Python int so reading it never syncs with the GPU

    @classmethod
    def for_model(cls, model, batch_size: int = 1, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache shaped for `model` (a kiln Transformer) on its device.

        dtype defaults to the dtype the keys will be computed in: the autocast dtype when
        autocast is on for that device, else the parameters' dtype (K/V must match Q in SDPA).
        """
        cfg = model.cfg
        param = next(model.parameters())
        if dtype is None:
            dev = param.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else param.dtype
        return cls(cfg.depth, batch_size, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                   param.device, dtype)

    def update(self, layer_idx: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new keys/values at `pos`; return this layer's keys and values 0 .. pos + T - 1."""
        end = self.pos + k_BKTE.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens do not fit its max_len={self.max_len}")
        assert k_BKTE.dtype == self.k_LBKME.dtype, (
            f"keys are {k_BKTE.dtype} but the cache holds {self.k_LBKME.dtype}; build it with that dtype")
        self.k_LBKME[layer_idx, :, :, self.pos:end] = k_BKTE
        self.v_LBKME[layer_idx, :, :, self.pos:end] = v_BKTE
        # Views, not copies: strided along the sequence axis, which SDPA accepts.
        return self.k_LBKME[layer_idx, :, :, :end], self.v_LBKME[layer_idx, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Mark `n_tokens` more positions as cached (called by the model once per forward)."""
        self.pos += n_tokens

    def reset(self) -> None:
        """Forget everything cached; the buffers are reused, not zeroed (stale entries are never read)."""
        self.pos = 0
