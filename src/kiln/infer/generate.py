"""Autoregressive generation from a kiln Transformer, one sequence at a time.

Prefill the whole prompt in one forward, then decode one token per forward with a
KV cache. `use_cache=False` re-runs the full sequence every step: slow, but the
reference the cached path is tested against.

Context limit: generation stops (without error) once the sequence fills
model.cfg.max_seq_len, i.e. at most max_seq_len - len(prompt) + 1 new tokens; there
is no sliding window, so cached and uncached decoding always see the same context.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from kiln.infer.kv_cache import KVCache
from kiln.infer.sampling import sample_next


@torch.inference_mode()
def stream(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
           seed: int = 0, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time. A stop id ends generation and is *not* yielded."""
    max_seq_len = model.cfg.max_seq_len
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token (e.g. the BOS id)")
    if len(prompt_ids) > max_seq_len:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens but model.max_seq_len is {max_seq_len}; "
                         "shorten the prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = set(stop_ids)
    ids_1T = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = None
    if use_cache:
        cache = KVCache.for_model(model, batch_size=1, max_len=min(max_seq_len, len(prompt_ids) + max_new_tokens))
    n_ctx = len(prompt_ids)
    x_1T = ids_1T
    for _ in range(max_new_tokens):
        logits_1V = model(x_1T, cache=cache)[:, -1]
        next_1 = sample_next(logits_1V, temperature, top_k, top_p, generator)
        token = int(next_1.item())  # host sync, once per token: needed to check stop ids and to yield
        if token in stop:
            return
        yield token
        if n_ctx >= max_seq_len:  # the next forward would need position max_seq_len
            return
        next_11 = next_1.view(1, 1)
        if use_cache:
            x_1T = next_11
        else:
            ids_1T = torch.cat((ids_1T, next_11), dim=1)
            x_1T = ids_1T
        n_ctx += 1


def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
             seed: int = 0, use_cache: bool = True) -> list[int]:
    """The new token ids (prompt excluded; a stop id ends generation and is not included)."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, stop_ids, seed, use_cache))
