"""The engine's decode step: one new token for each of slots 0 .. B-1, in buckets, compiled and captured.

Shape legend: N slots, B rows of a step, S positions a step attends over, V vocabulary, D d_model.

A step runs over slots 0 .. B-1 with B the smallest batch bucket (1, 2, 4, ... N) holding every busy slot, and
reads the first S positions of each slot, S the smallest length bucket (128, 256, ... the context) past every
row's position. Its inputs stay on the device (`tokens_N`, `pos_N`: what the last step sampled, where it goes),
so a step can be launched before the host has read the one before (kiln/infer/engine.py's overlap). The step
itself writes greedy's choice into `tokens_N` and moves every row on one position, so that a step whose rows
are all greedy launches nothing besides its graph (a sampled row's token then overwrites greedy's).

On CUDA each (batch, length) bucket's step is one CUDA graph captured at construction (of the torch.compiled
step with `compile=True`: at decode sizes the step is bound by kernel count, not bytes, and compilation fuses
each layer's norms, RoPE, SwiGLU, residual adds and cache writes). In buckets of at most
`fused_attention_rows` rows each layer's RoPE, cache write and attention are one Triton kernel
(`fused_attention`, kiln/infer/attention.py), and where the model allows, the whole layer is five
(`fused_layers`, kiln/infer/fused_step.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from kiln.infer.fused_step import fused_hidden, use_fused_layers
from kiln.infer.slots import SlotCache
from kiln.runtime.device import triton_available


class DecodeStep:
    min_length_bucket = 128   # the shortest span a step attends over (a power of two)
    # Buckets of at most this many rows attend through kiln/infer/attention.py's kernel (when `fused_attention`);
    # larger ones through SDPA, faster there (H100, SmolLM2 shape: -21% at 128 rows).
    fused_attention_rows = 8

    def __init__(self, model, cache: SlotCache, max_slots: int, max_len: int, cuda_graphs: bool,
                 compile: bool = False, fused_attention: bool | None = None, fused_layers: bool | None = None,
                 adapters=None):
        self.model, self.cache, self.max_len, self.adapters = model, cache, max_len, adapters
        device = next(model.parameters()).device
        # Default: under CUDA graphs with Triton, where the kernels' launches are replayed. Launched eagerly, each
        # adds a Python launch to a step that is host-bound already (GRPO's rollouts; not measured); off CUDA
        # the op is PyTorch arithmetic.
        self.fused_attention = (cuda_graphs and device.type == "cuda" and triton_available()) \
            if fused_attention is None else fused_attention
        # The whole layer through kiln/infer/fused_step.py in those buckets (H100, SmolLM2 shape, batch 1: 1,177
        # against 1,077 tokens/s): wherever the model allows it (int8, LoRA, QK-norm, unstacked projections don't).
        self.fused_layers = use_fused_layers(model, self.fused_attention, fused_layers)
        self.buckets = sorted({min(2 ** i, max_slots) for i in range(max_slots.bit_length() + 1)})
        low = self.min_length_bucket.bit_length() - 1
        self.lengths = sorted({min(2 ** i, max_len) for i in range(low, max(low, max_len.bit_length()) + 1)})
        self.tokens_N = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.pos_N = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.adapter_N = torch.zeros(max_slots, dtype=torch.long, device=device)   # each slot's LoRA adapter
        self.adapter_hint: list[int] | None = None   # the same for the next step's rows, as the host knows them
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}   # (B, S) -> graph, out
        # Dynamic shapes: the (batch, length) buckets share a few compiled graphs (a batch of 1, a whole-slots
        # batch and a whole-slot length are specialised), whatever the number of buckets, under dynamo's limit.
        self._step_logits = self._compiled_step() if compile else self._step
        if cuda_graphs:
            self._capture()

    def bucket(self, n: int) -> int:
        """The batch bucket holding slots 0 .. n-1."""
        return next(b for b in self.buckets if b >= n)

    def length(self, n: int) -> int:
        """The length bucket holding positions 0 .. n-1."""
        return next(s for s in self.lengths if s >= n)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) bucket, largest first."""
        return [(B, S) for B in reversed(self.buckets) for S in reversed(self.lengths)]

    def logits(self, B: int, S: int) -> torch.Tensor:
        """Logits (B, V) of the tokens in tokens_N[:B] at positions pos_N[:B], attending over S positions: the
        bucket's graph replayed where there is one. Then tokens_N[:B] holds each row's argmax and pos_N[:B] is
        one further on. Returns the graph's own output tensor: read it before the next replay of the bucket."""
        if (B, S) in self.graphs:
            graph, logits_BV = self.graphs[B, S]
            graph.replay()
            return logits_BV
        return self._run(B, S)

    def _run(self, B: int, S: int) -> torch.Tensor:
        fused = self.fused_attention and B <= self.fused_attention_rows
        mask_B11S = None if fused else self.cache.keys_mask(self.pos_N[:B], S)
        if self.adapters is not None:   # a view of the slots' buffer: a captured graph reads each step's choice
            # (the hint is None while graphs are captured, at construction: a graph must gather for any rows)
            self.adapters.select(self.adapter_N[:B], self.adapter_hint[:B] if self.adapter_hint is not None else None)
        logits_BV = self._step_logits(self.tokens_N[:B], self.pos_N[:B],
                                      self.cache.decode(self.pos_N[:B], S, fused), mask_B11S)
        self.tokens_N[:B].copy_(logits_BV.argmax(dim=-1))
        # Every row moves on one position; a free or finished row's is clamped so that its throwaway write
        # stays inside its slot (a running row never reaches the last position: the engine's `_can_launch`).
        self.pos_N[:B].add_(1).clamp_(max=self.max_len - 1)
        return logits_BV

    def _step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, cache, mask_B11S: torch.Tensor | None
              ) -> torch.Tensor:
        if self.fused_layers and mask_B11S is None:   # a fused-attention bucket
            return self.model.lm_head(fused_hidden(self.model, tokens_B, pos_B, cache)).float()
        h_B1D = self.model.hidden(tokens_B[:, None], pos_B[:, None], cache, mask_B11S)
        return self.model.lm_head(h_B1D[:, 0]).float()

    def _compiled_step(self) -> Callable:
        """The step under torch.compile, compiled now on every bucket (throwaway keys at the first positions of
        free slots); if compilation fails (a layer inductor cannot lower, say CPU int8; on CUDA in fp32, a compiled
        SDPA step whose input strides inductor asserted wrongly at a smaller length bucket, torch 2.11), the
        plain step, with a warning: slower, never wrong."""
        self._step_logits = step = torch.compile(self._step, fullgraph=True, dynamic=True)
        try:
            with torch.inference_mode():
                for B, S in self.shapes():
                    self._run(B, S)
        except Exception as e:   # noqa: BLE001 -- any compiler failure: decode uncompiled, say so
            first = (str(e).splitlines() or [""])[0][:200]
            print(f"warning: torch.compile of the decode step failed ({type(e).__name__}: {first}); decoding "
                  "uncompiled", file=sys.stderr, flush=True)
            return self._step
        return step

    def _capture(self) -> None:
        """One CUDA graph per (batch, length) bucket, captured before any request: the warm-up writes
        throwaway keys at the first positions of the bucket's slots."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        shapes = self.shapes()   # largest first: the rest reuse its pool
        with torch.inference_mode(), torch.cuda.stream(stream):
            for B, S in shapes:
                for _ in range(2):
                    self._run(B, S)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode():
            for B, S in shapes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._run(B, S)
                self.graphs[B, S] = (graph, out)
        torch.cuda.synchronize()
