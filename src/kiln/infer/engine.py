"""The batched inference engine: continuous batching over a slot KV cache, per-request sampling.

Shape legend: N slots, B rows of one forward, T prompt tokens (padded), V vocabulary, D d_model.

One `step()` does, in order: drop cancelled requests (their slots are free at once), prefill a
batch of waiting prompts into free slots (ragged, right-padded; the head runs on each row's last
position only, or on all of them for prompt log-probabilities), then one decode step for every
running sequence. A request of `n` samples is prefilled once and its cache rows copied to n - 1
more slots. Decode runs over slots 0 .. B-1 in batch and length buckets (kiln/infer/decode_step.py: on CUDA
a captured graph per bucket, compiled with `compile=True`); slots are handed out lowest first so B stays
small, and free slots inside the bucket compute a throwaway row.

Prefix cache: a finished sequence's slot keeps its keys and values, and the engine remembers which tokens
they are (prompt and output, as far as they were cached). A new prompt that starts with at least
`min_prefix_tokens` of a free slot's tokens takes that slot and computes only the rest of its prompt: a
chat's next turn, or a shared system prompt, is not prefilled again. A plain prefill takes the lowest free
slot and overwrites what it held (slots stay dense for the decode buckets), so hits are opportunistic.
An engine over a model whose weights change between requests (training) needs `prefix_cache=False`.

Overlap (CUDA's default): the tokens a decode step samples stay on the device as the next step's inputs, and
the step after is launched *before* the host reads this one's tokens, so the host's work (stop checks,
detokenization, callbacks) runs while the device computes. The price: a sequence that stops is computed for
one step more, and that step's token is dropped. Limits known in advance (max_tokens, the context) are
never overrun: a sequence is not launched past them.

Threads: `submit` and `cancel` may be called from any thread; `step` only from one (the engine's
own, after `start()`). Results go to each request's `on_output` callback, on the engine's thread.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kiln.infer.decode_step import DecodeStep
from kiln.infer.sampling import SamplingParams, bias_logits, penalise, sample_rows, top_logprobs
from kiln.infer.slots import SlotCache
from kiln.infer.textstream import TextStream, first_stop, safe_end


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts (the server answers 503)."""


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]]   # the most likely ids and their log-probabilities


@dataclass
class Output:
    """What one sample of a request produced in one step; `finish_reason` set on its last."""

    index: int                     # which of the request's n samples
    token_ids: list[int]
    text: str                      # new text (empty without a tokenizer); stop strings cut off
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None   # "stop", "length", "abort" (cancelled) or "error"


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    prompt_logprobs: list[TokenLogprob | None] | None = None   # filled at prefill when asked for
    adapter: int = 0                # the LoRA adapter of its rows (the engine's AdapterBank; 0: none)
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    unfinished: int = 0


@dataclass
class _Sequence:
    request: Request
    index: int
    slot: int
    length: int                     # positions cached in the slot
    generator: torch.Generator | None
    finished: bool = False          # done: an in-flight step's token for it is dropped
    out_ids: list[int] = field(default_factory=list)
    stream: TextStream = field(default_factory=TextStream)   # out_ids as text, and how much of it was sent


class Engine:
    min_prefix_tokens = 16    # the shortest cached prefix worth a prefill of its own

    def __init__(self, model, tokenizer=None, max_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, prefill_tokens: int = 4096, cuda_graphs: bool | None = None, seed: int = 0,
                 compile: bool = False, overlap: bool | None = None, prefix_cache: bool = True,
                 fused_attention: bool | None = None, fused_layers: bool | None = None, adapters=None):
        """`adapters`: an AdapterBank (kiln/infer/adapters.py) already applied to `model`, whose adapters requests
        then choose (`submit`'s `adapter`)."""
        self.model, self.tok = model.eval(), tokenizer
        self.adapters = adapters
        if adapters is not None and compile:
            raise ValueError("compiling the decode step of a model with several LoRA adapters is not supported: "
                             "serve them without compile (or merge one adapter into the model)")
        self.device = next(model.parameters()).device
        self.vocab_size = model.cfg.vocab_size
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_slots, self.max_queue, self.prefill_tokens = max_slots, max_queue, prefill_tokens
        self.cache = SlotCache.for_model(model, max_slots, self.max_len)
        self._free = list(range(max_slots))          # a heap: lowest slot first
        self.prefix_cache = prefix_cache
        self._slot_tokens: list[list[int]] = [[] for _ in range(max_slots)]   # a free slot's cached tokens
        self._slot_adapter = [0] * max_slots                                    # and the adapter they were made with
        self._running: dict[int, _Sequence] = {}      # slot -> sequence
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._shared_gen = torch.Generator(device=self.device).manual_seed(seed)
        self._counts_NV = self._seen_NV = None        # penalties' state, allocated on first use
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0, "requests": 0,
                      "decode_steps": 0}
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._inflight: _Launched | None = None
        self.decoder = DecodeStep(model, self.cache, max_slots, self.max_len,
                                  self.device.type == "cuda" if cuda_graphs is None else cuda_graphs, compile,
                                  fused_attention, fused_layers, adapters)

    # ------------------------------------------------------------ requests (any thread)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_output: Callable[[Output], None],
               adapter: int = 0) -> Request:
        """Queue a request (`adapter`: the index of its LoRA adapter in the engine's AdapterBank, 0 for none);
        raises ValueError for a request that can never run, QueueFull when full."""
        params.validate(self.vocab_size)
        if adapter and (self.adapters is None or not 0 < adapter <= len(self.adapters.names)):
            raise ValueError(f"adapter {adapter}: the engine has {len(self.adapters.names) if self.adapters else 0}")
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt_ids) > self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_len}")
        if params.n > self.max_slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.max_slots} slots")
        if any(not 0 <= i < self.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        req = Request(list(prompt_ids), params, on_output, unfinished=params.n, adapter=adapter)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already wait (queue limit {self.max_queue})")
            self._waiting.append(req)
            self._lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; its slots are freed at the start of the next step."""
        with self._lock:
            req.cancelled = True
            self._lock.notify()

    @property
    def active_slots(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Whether the engine's own thread (`start()`) is running."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the loop

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._waiting or self._running or self._inflight):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:   # fail what is in flight, keep serving
                self._fail_all(f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """Admit and prefill, launch one decode step, then read the previous one (overlap) or this one."""
        self._drop_cancelled()
        self._prefill(self._admit())
        previous, self._inflight = self._inflight, self._launch_decode()
        if previous is not None:
            self._read(previous)
        if not self.overlap and self._inflight is not None:
            launched, self._inflight = self._inflight, None
            self._read(launched)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:
        """Run prompts to completion on the calling thread (no `start()`): each prompt's n token lists."""
        outs = [[[] for _ in range(params.n)] for _ in prompts]
        done = [0]

        def collect(i):
            def on_output(o: Output):
                outs[i][o.index] += o.token_ids
                done[0] += o.finish_reason is not None
            return on_output

        for i, p in enumerate(prompts):
            self.submit(p, params, collect(i))
        while done[0] < len(prompts) * params.n:
            self.step()
        return outs

    # ------------------------------------------------------------ scheduling

    def _drop_cancelled(self) -> None:
        for slot, seq in list(self._running.items()):
            if seq.request.cancelled:
                self._finish(seq, "abort", [], "", [])
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for r in gone:
            for i in range(r.params.n):
                r.on_output(Output(i, [], "", finish_reason="abort"))

    def _admit(self) -> list[Request]:
        batch: list[Request] = []
        with self._lock:
            free, longest = len(self._free), 0
            while self._waiting and self._waiting[0].params.n <= free:
                req = self._waiting[0]
                longest = max(longest, len(req.prompt_ids))
                if batch and (len(batch) + 1) * longest > self.prefill_tokens:
                    break
                batch.append(self._waiting.popleft())
                free -= req.params.n
        return batch

    def _take_slot(self) -> int:
        return heapq.heappop(self._free)

    def _finish(self, seq: _Sequence, reason: str, ids: list[int], text: str, lps: list[TokenLogprob]) -> None:
        seq.finished = True
        # Positions 0 .. length-1 hold the prompt and the outputs fed back so far (launched steps write before
        # anything queued after them). A free slot's throwaway decode rows write at its next position onwards,
        # clamped to the last one: so the last position is never claimed.
        cached = min(seq.length, self.max_len - 1)
        self._slot_tokens[seq.slot] = [] if reason == "error" else (seq.request.prompt_ids + seq.out_ids)[:cached]
        self._slot_adapter[seq.slot] = seq.request.adapter
        del self._running[seq.slot]
        heapq.heappush(self._free, seq.slot)
        seq.request.unfinished -= 1
        seq.request.on_output(Output(seq.index, ids, text, lps, reason))

    def _fail_all(self, message: str) -> None:
        self._inflight = None
        for seq in list(self._running.values()):
            self._finish(seq, "error", [], message, [])
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            for i in range(r.params.n):
                r.on_output(Output(i, [], message, finish_reason="error"))

    # ------------------------------------------------------------ prefill

    def _cached_prefix(self, req: Request) -> tuple[int, int] | None:
        """(free slot, tokens of `req`'s prompt already cached there), for the longest such prefix of at
        least `min_prefix_tokens`; one prompt token is always left to compute (its logits start the output).
        Not for prompt log-probabilities: they need every prompt position's output."""
        if not self.prefix_cache or req.params.prompt_logprobs is not None:
            return None
        ids, best, where = req.prompt_ids, 0, None
        for slot in self._free:
            toks = self._slot_tokens[slot]
            if self._slot_adapter[slot] != req.adapter:   # another adapter's keys and values
                continue
            need = max(best + 1, self.min_prefix_tokens)   # a slot that cannot beat the best so far costs one compare
            if len(toks) < need or toks[:need] != ids[:need]:
                continue
            best, where = _common_prefix(toks, ids), slot
        best = min(best, len(ids) - 1)
        return (where, best) if best >= self.min_prefix_tokens else None

    def _prefill(self, batch: list[Request]) -> None:
        if not batch:
            return
        dev = self.device
        lens = [len(r.prompt_ids) for r in batch]
        first_slots: list[int] = [-1] * len(batch)
        cached = [0] * len(batch)
        for b, r in enumerate(batch):   # prefix-cache hits claim their slots before plain prefills take any
            hit = self._cached_prefix(r)
            if hit is not None:
                first_slots[b], cached[b] = hit
                self._free.remove(hit[0])
                heapq.heapify(self._free)
        plain = [b for b in range(len(batch)) if not cached[b]]
        for b in plain:
            first_slots[b] = self._take_slot()
        last_V: list[torch.Tensor | None] = [None] * len(batch)
        hidden: dict[int, torch.Tensor] = {}
        if plain:
            T = max(lens[b] for b in plain)
            ids_BT = torch.zeros(len(plain), T, dtype=torch.long)
            for j, b in enumerate(plain):
                ids_BT[j, :lens[b]] = torch.tensor(batch[b].prompt_ids)
            pos_BT = torch.arange(T, device=dev).expand(len(plain), T)
            slots_B = torch.tensor([first_slots[b] for b in plain], device=dev)
            if self.adapters is not None:
                host = [batch[b].adapter for b in plain]
                self.adapters.select(torch.tensor(host, device=dev), host)
            h_BTD = self.model.hidden(ids_BT.to(dev), pos_BT, self.cache.prefill(slots_B))
            last_B = torch.tensor([lens[b] for b in plain], device=dev) - 1
            logits_BV = self.model.lm_head(h_BTD[torch.arange(len(plain), device=dev), last_B]).float()
            for j, b in enumerate(plain):
                last_V[b], hidden[b] = logits_BV[j], h_BTD[j, :lens[b]]
        for b in range(len(batch)):
            if cached[b]:
                last_V[b] = self._prefill_cached(batch[b], first_slots[b], cached[b])
        logits_BV = torch.stack(last_V)
        seqs, rows = [], []
        for b, r in enumerate(batch):
            self.stats["prompt_tokens"] += lens[b]
            self.stats["cached_prompt_tokens"] += cached[b]
            self.stats["requests"] += 1
            if r.params.prompt_logprobs is not None:   # never a prefix-cache hit: every position was computed
                r.prompt_logprobs = self._prompt_logprobs(hidden[b], r.prompt_ids, r.params.prompt_logprobs)
            gen = None
            if r.params.seed is not None:
                gen = torch.Generator(device=dev).manual_seed(r.params.seed)
            for i in range(r.params.n):
                slot = first_slots[b] if i == 0 else self._take_slot()
                if i:
                    self.cache.copy_slot(first_slots[b], slot, lens[b])
                seq = _Sequence(r, i, slot, lens[b], gen)
                self._running[slot] = seq
                if r.params.penalised:
                    self._reset_penalties(slot, r.prompt_ids)
                seqs.append(seq)
                rows.append(b)
        if rows != list(range(len(batch))):
            logits_BV = logits_BV[torch.tensor(rows, device=dev)]
        slots = [s.slot for s in seqs]
        next_B, lp = self._sample(seqs, logits_BV, slots)
        # The first decode step's inputs, on the device: each sequence's first token, at its prompt's length.
        slots_B = torch.tensor(slots, device=dev)
        self.decoder.tokens_N[slots_B] = next_B
        self.decoder.pos_N[slots_B] = torch.tensor([s.length for s in seqs], device=dev)
        if self.adapters is not None:
            self.decoder.adapter_N[slots_B] = torch.tensor([s.request.adapter for s in seqs], device=dev)
        self._read(self._to_host(seqs, next_B, lp))

    def _prefill_cached(self, req: Request, slot: int, start: int) -> torch.Tensor:
        """Logits (V,) after `req`'s prompt, computing only its tokens past the `start` cached in `slot`."""
        P, dev = len(req.prompt_ids), self.device
        ids_1T = torch.tensor([req.prompt_ids[start:]], device=dev)
        if self.adapters is not None:
            self.adapters.select(torch.tensor([req.adapter], device=dev), [req.adapter])
        pos_1T = torch.arange(start, P, device=dev)[None]
        h_1TD = self.model.hidden(ids_1T, pos_1T, self.cache.extend(slot, start, P), self.cache.extend_mask(start, P))
        return self.model.lm_head(h_1TD[0, -1]).float()

    def _prompt_logprobs(self, h_TD: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
        logits_TV = self.model.lm_head(h_TD[:-1]).float()
        target_T = torch.tensor(ids[1:], device=self.device)
        return [None] + _logprob_entries(*top_logprobs(logits_TV, target_T, k), target_T.tolist())

    # ------------------------------------------------------------ decode

    def _can_launch(self, seq: _Sequence) -> bool:
        """Whether another decode step may run for `seq`: the steps launched so far give it fewer than
        max_tokens tokens (its prefill's, then one per step), and the position it would write is in the context."""
        launched_tokens = seq.length - len(seq.request.prompt_ids) + 1
        return launched_tokens < seq.request.params.max_tokens and seq.length < self.max_len

    def _launch_decode(self) -> _Launched | None:
        """Queue one decode step for every running sequence not at its limit; nothing waits for the device.
        Its inputs are on the device already (the previous step's or the prefill's tokens and positions)."""
        seqs = sorted((s for s in self._running.values() if self._can_launch(s)), key=lambda s: s.slot)
        if not seqs:
            return None
        dec = self.decoder
        B = dec.bucket(seqs[-1].slot + 1)
        S = dec.length(max(s.length for s in seqs) + 1)   # this step writes position `length`, reads 0 .. it
        if self.adapters is not None:   # free rows take any adapter: their tokens are thrown away
            kinds = {s.request.adapter for s in seqs}
            dec.adapter_hint = [kinds.pop()] * B if len(kinds) == 1 else None
        logits_BV = dec.logits(B, S)   # the step also wrote greedy's tokens and moved every row on one position
        rows: list[_Sequence | None] = [None] * B      # free slots inside the bucket: throwaway greedy rows
        for s in seqs:
            rows[s.slot] = s
            s.length += 1
        self.stats["decode_steps"] += 1
        if all(s.request.params.plain_greedy for s in seqs):
            next_B, lp = dec.tokens_N[:B], None      # nothing to launch before the next step
        else:
            next_B, lp = self._sample(rows, logits_BV, range(B))
            dec.tokens_N[:B].copy_(next_B)
        return self._to_host(rows, next_B, lp)

    # ------------------------------------------------------------ sampling and output

    def _reset_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        if self._counts_NV is None:
            self._counts_NV = torch.zeros(self.max_slots, self.vocab_size, device=self.device)
            self._seen_NV = torch.zeros(self.max_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self._counts_NV[slot] = 0
        self._seen_NV[slot] = False
        self._seen_NV[slot, torch.tensor(prompt_ids, device=self.device)] = True

    def _sample(self, seqs: list[_Sequence | None], logits_BV: torch.Tensor, slots
                ) -> tuple[torch.Tensor, tuple | None]:
        """Each row's next token (B,) on the device (a None row greedy), and the log-probabilities asked for:
        the model's own (penalties and logit_bias change the choice, not what is reported, as vLLM's default).
        Row b is slot slots[b]. A penalised row's token counts at once: the next step samples before the
        host reads this one."""
        params = [s.request.params if s is not None else _GREEDY for s in seqs]
        sample_logits = logits_BV
        penalised = [b for b, p in enumerate(params) if p.penalised]
        if penalised:
            dev = self.device
            slots_B = torch.tensor(list(slots), device=dev)
            rep, freq, pres = (torch.tensor(c, device=dev)[:, None] for c in zip(*[
                (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params]))
            mask_B1 = torch.tensor([p.penalised for p in params], device=dev)[:, None]
            counts = torch.where(mask_B1, self._counts_NV[slots_B], 0.0)
            seen = self._seen_NV[slots_B] & mask_B1
            sample_logits = penalise(logits_BV.float(), counts, seen, rep, freq, pres)
        sample_logits = bias_logits(sample_logits, [p.logit_bias for p in params])
        next_B = sample_rows(sample_logits, params, [s.generator if s is not None else None for s in seqs],
                             self._shared_gen)
        if penalised:
            rows_P = torch.tensor(penalised, device=dev)
            at = (slots_B[rows_P], next_B[rows_P])
            self._counts_NV.index_put_(at, torch.ones(len(penalised), device=dev), accumulate=True)
            self._seen_NV[at] = True
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        return next_B, (top_logprobs(logits_BV, next_B, k) if k is not None else None)

    def _to_host(self, seqs: list[_Sequence | None], next_B: torch.Tensor, lp: tuple | None) -> _Launched:
        """Start copying a step's tokens (and log-probabilities) to the host without waiting for them."""
        # copy=True: on the CPU too, so that the next step's writes to the decode inputs cannot change these
        host = [t.to("cpu", non_blocking=True, copy=True) for t in (next_B, *(lp or ()))]
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return _Launched(seqs, host[0], tuple(host[1:]) or None, event)

    def _read(self, launched: _Launched) -> None:
        """Wait for a launched step's tokens and hand each live sequence its own (a sequence that finished
        since the launch loses its)."""
        if launched.event is not None:
            launched.event.synchronize()   # waits for this step only: the next one may be queued behind it
        tokens = launched.tokens.tolist()
        entries = _logprob_entries(*launched.logprobs, tokens) if launched.logprobs else None
        now = time.monotonic()
        for i, seq in enumerate(launched.seqs):
            if seq is None or seq.finished:
                continue
            req = seq.request
            if req.first_token_at is None:
                req.first_token_at = now
            lp = []
            if req.params.logprobs is not None:
                e = entries[i]
                lp = [TokenLogprob(e.id, e.logprob, e.top[:req.params.logprobs])]
            self._emit(seq, tokens[i], lp)

    def _emit(self, seq: _Sequence, token: int, lp: list[TokenLogprob]) -> None:
        p, out = seq.request.params, seq.stream
        if token in p.stop_ids and not p.ignore_stop_ids:
            self._finish(seq, "stop", [], out.flush(len(out.final(self.tok, seq.out_ids))), [])
            return
        seq.out_ids.append(token)
        self.stats["generated_tokens"] += 1
        text = out.advance(self.tok, seq.out_ids)
        cut = first_stop(text, p.stop, out.sent)
        if cut is not None:
            self._finish(seq, "stop", [token], out.flush(cut), lp)
        elif len(seq.out_ids) >= p.max_tokens or len(seq.request.prompt_ids) + len(seq.out_ids) > self.max_len:
            self._finish(seq, "length", [token], out.flush(len(out.final(self.tok, seq.out_ids))), lp)
        else:
            seq.request.on_output(Output(seq.index, [token], out.flush(max(safe_end(text, p.stop), out.sent)), lp))


_GREEDY = SamplingParams(temperature=0)


@dataclass
class _Launched:
    """A decode (or prefill) step whose tokens are on their way to the host."""

    seqs: list[_Sequence | None]          # row b's sequence (None: a free slot's throwaway row)
    tokens: torch.Tensor                  # (B,) on the host once `event` has passed
    logprobs: tuple | None
    event: torch.cuda.Event | None        # None on the CPU: the copy is done


def _logprob_entries(chosen_B, top_ids_BK, top_lp_BK, ids: list[int]) -> list[TokenLogprob]:
    chosen, tid, tlp = chosen_B.tolist(), top_ids_BK.tolist(), top_lp_BK.tolist()
    return [TokenLogprob(i, c, list(zip(a, b))) for i, c, a, b in zip(ids, chosen, tid, tlp)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection on slice equality (compared in C, not per token)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
