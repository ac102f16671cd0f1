"""The batched inference engine: continuous batching over a slot KV cache, per-request sampling.

Shape legend: N slots, B rows of one forward, T prompt tokens (padded), V vocabulary, D d_model.

One `step()` does, in order: drop cancelled requests (their slots are free at once), prefill a
batch of waiting prompts into free slots (ragged, right-padded; the head runs on each row's last
position only, or on all of them for prompt log-probabilities), then one decode step for every
running sequence. A request of `n` samples is prefilled once and its cache rows copied to n - 1
more slots. Decode runs over slots 0 .. B-1 with B the smallest bucket (1, 2, 4, ... N) holding
every busy slot; slots are handed out lowest first so B stays small. Free slots inside the bucket
compute a throwaway row. On CUDA each bucket's decode step is one captured CUDA graph.

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

from kiln.infer.sampling import SamplingParams, penalise, sample_rows, top_logprobs
from kiln.infer.slots import SlotCache


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
    pending: int = -1               # the last sampled token, cached by the next decode step
    out_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0
    text: str = ""                  # out_ids decoded, up to the last whole character
    text_from: int = 0              # out_ids[text_from:] is the window decoded each step ...
    text_upto: int = 0              # ... of which out_ids[text_from:text_upto] is already in `text`


class Engine:
    def __init__(self, model, tokenizer=None, max_slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, prefill_tokens: int = 4096, cuda_graphs: bool | None = None, seed: int = 0):
        self.model, self.tok = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.vocab_size = model.cfg.vocab_size
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_slots, self.max_queue, self.prefill_tokens = max_slots, max_queue, prefill_tokens
        self.cache = SlotCache.for_model(model, max_slots, self.max_len)
        self.buckets = sorted({min(2 ** i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self._free = list(range(max_slots))          # a heap: lowest slot first
        self._running: dict[int, _Sequence] = {}      # slot -> sequence
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._shared_gen = torch.Generator(device=self.device).manual_seed(seed)
        self._tokens_N = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._pos_N = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self._counts_NV = self._seen_NV = None        # penalties' state, allocated on first use
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "decode_steps": 0}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs:
            self._capture()

    # ------------------------------------------------------------ requests (any thread)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_output: Callable[[Output], None]) -> Request:
        """Queue a request; raises ValueError for a request that can never run, QueueFull when full."""
        params.validate(self.vocab_size)
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt_ids) > self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_len}")
        if params.n > self.max_slots:
            raise ValueError(f"n={params.n} exceeds the engine's {self.max_slots} slots")
        if any(not 0 <= i < self.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        req = Request(list(prompt_ids), params, on_output, unfinished=params.n)
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
                while not (self._stop or self._waiting or self._running):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:   # fail what is in flight, keep serving
                self._fail_all(f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        self._prefill(self._admit())
        if self._running:
            self._decode()

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
        del self._running[seq.slot]
        heapq.heappush(self._free, seq.slot)
        seq.request.unfinished -= 1
        seq.request.on_output(Output(seq.index, ids, text, lps, reason))

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, "error", [], message, [])
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            for i in range(r.params.n):
                r.on_output(Output(i, [], message, finish_reason="error"))

    # ------------------------------------------------------------ prefill

    def _prefill(self, batch: list[Request]) -> None:
        if not batch:
            return
        lens = [len(r.prompt_ids) for r in batch]
        T = max(lens)
        ids_BT = torch.zeros(len(batch), T, dtype=torch.long)
        for b, r in enumerate(batch):
            ids_BT[b, :lens[b]] = torch.tensor(r.prompt_ids)
        first_slots = [self._take_slot() for _ in batch]
        dev = self.device
        slots_B = torch.tensor(first_slots, device=dev)
        pos_BT = torch.arange(T, device=dev).expand(len(batch), T)
        h_BTD = self.model.hidden(ids_BT.to(dev), pos_BT, self.cache.prefill(slots_B))
        last_B = torch.tensor(lens, device=dev) - 1
        logits_BV = self.model.lm_head(h_BTD[torch.arange(len(batch), device=dev), last_B]).float()
        seqs, rows = [], []
        for b, r in enumerate(batch):
            self.stats["prompt_tokens"] += lens[b]
            self.stats["requests"] += 1
            if r.params.prompt_logprobs is not None:
                r.prompt_logprobs = self._prompt_logprobs(h_BTD[b, :lens[b]], r.prompt_ids, r.params.prompt_logprobs)
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
        self._sample_and_emit(seqs, logits_BV[torch.tensor(rows, device=dev)] if rows != list(range(len(batch)))
                              else logits_BV)

    def _prompt_logprobs(self, h_TD: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
        logits_TV = self.model.lm_head(h_TD[:-1]).float()
        target_T = torch.tensor(ids[1:], device=self.device)
        return [None] + _logprob_entries(*top_logprobs(logits_TV, target_T, k), target_T.tolist())

    # ------------------------------------------------------------ decode

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _decode_logits(self, B: int) -> torch.Tensor:
        """Logits (B, V) of the tokens in _tokens_N[:B] at positions _pos_N[:B]: the step graphs capture."""
        pos_B = self._pos_N[:B]
        h_B1D = self.model.hidden(self._tokens_N[:B, None], pos_B[:, None], self.cache.decode(pos_B),
                                  self.cache.keys_mask(pos_B))
        return self.model.lm_head(h_B1D[:, 0]).float()

    def _capture(self) -> None:
        """One CUDA graph per bucket, captured before any request: the warm-up writes throwaway keys at
        position 0 of the bucket's slots."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for B in reversed(self.buckets):   # largest first: smaller ones reuse its pool memory
                for _ in range(2):
                    self._decode_logits(B)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode():
            for B in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._decode_logits(B)
                self._graphs[B] = (graph, out)
        torch.cuda.synchronize()

    def _decode(self) -> None:
        seqs = sorted(self._running.values(), key=lambda s: s.slot)
        B = self._bucket(seqs[-1].slot + 1)
        tokens, pos = [0] * B, [0] * B
        for s in seqs:
            tokens[s.slot], pos[s.slot] = s.pending, s.length
        self._tokens_N[:B].copy_(torch.tensor(tokens), non_blocking=True)
        self._pos_N[:B].copy_(torch.tensor(pos), non_blocking=True)
        if B in self._graphs:
            graph, out_BV = self._graphs[B]
            graph.replay()
        else:
            out_BV = self._decode_logits(B)
        for s in seqs:
            s.length += 1
        self.stats["decode_steps"] += 1
        rows = [s.slot for s in seqs]
        logits = out_BV if rows == list(range(B)) else out_BV[torch.tensor(rows, device=self.device)]
        self._sample_and_emit(seqs, logits)

    # ------------------------------------------------------------ sampling and output

    def _reset_penalties(self, slot: int, prompt_ids: list[int]) -> None:
        if self._counts_NV is None:
            self._counts_NV = torch.zeros(self.max_slots, self.vocab_size, device=self.device)
            self._seen_NV = torch.zeros(self.max_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        self._counts_NV[slot] = 0
        self._seen_NV[slot] = False
        self._seen_NV[slot, torch.tensor(prompt_ids, device=self.device)] = True

    def _sample_and_emit(self, seqs: list[_Sequence], logits_BV: torch.Tensor) -> None:
        params = [s.request.params for s in seqs]
        sample_logits = logits_BV
        if any(p.penalised for p in params):
            dev = self.device
            slots = torch.tensor([s.slot for s in seqs], device=dev)
            neutral = [(1.0, 0.0, 0.0)] * len(seqs)
            rep, freq, pres = (torch.tensor(c, device=dev)[:, None] for c in zip(*[
                (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) if p.penalised else n
                for p, n in zip(params, neutral)]))
            penalised = torch.tensor([p.penalised for p in params], device=dev)[:, None]
            counts = torch.where(penalised, self._counts_NV[slots], 0.0)
            seen = self._seen_NV[slots] & penalised
            sample_logits = penalise(logits_BV.float(), counts, seen, rep, freq, pres)
        next_B = sample_rows(sample_logits, params, [s.generator for s in seqs], self._shared_gen)
        tokens = next_B.tolist()   # host sync, once per step: stop checks and streaming need the ids
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        entries = None
        if k is not None:
            entries = _logprob_entries(*top_logprobs(logits_BV, next_B, k), tokens)
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            req = seq.request
            if req.first_token_at is None:
                req.first_token_at = now
            lp = []
            if req.params.logprobs is not None:
                e = entries[i]
                lp = [TokenLogprob(e.id, e.logprob, e.top[:req.params.logprobs])]
            self._emit(seq, token, lp)

    def _emit(self, seq: _Sequence, token: int, lp: list[TokenLogprob]) -> None:
        p = seq.request.params
        if token in p.stop_ids and not p.ignore_stop_ids:
            self._finish(seq, "stop", [], self._flush(seq, len(self._final_text(seq))), [])
            return
        seq.out_ids.append(token)
        self.stats["generated_tokens"] += 1
        if p.penalised:
            self._counts_NV[seq.slot, token] += 1
            self._seen_NV[seq.slot, token] = True
        text = self._advance_text(seq)
        cut = _first_stop(text, p.stop, seq.sent_chars)
        if cut is not None:
            self._finish(seq, "stop", [token], self._flush(seq, cut), lp)
        elif len(seq.out_ids) >= p.max_tokens or seq.length >= self.max_len:
            self._finish(seq, "length", [token], self._flush(seq, len(self._final_text(seq))), lp)
        else:
            seq.pending = token
            safe = _safe_end(text, p.stop)
            seq.request.on_output(Output(seq.index, [token], self._flush(seq, max(safe, seq.sent_chars)), lp))

    def _advance_text(self, seq: _Sequence) -> str:
        """The output's text after its newest token, decoding only a short window of recent tokens (the
        whole output decoded every step costs O(length) per token per sequence). The window starts at the
        token before the last whole-character boundary, so a tokenizer whose decoding depends on the
        neighbouring token (SentencePiece's leading space) decodes the new piece as the whole would; a
        window ending inside a character (U+FFFD at its end) waits for the token that completes it.
        Special tokens are not text."""
        if self.tok is None:
            return ""
        new = self._window_text(seq)
        if new and not new.endswith("\ufffd"):
            seq.text += new
            seq.text_from, seq.text_upto = seq.text_upto, len(seq.out_ids)
        return seq.text

    def _final_text(self, seq: _Sequence) -> str:
        """The whole text at the end: a character cut off by the last token stays U+FFFD, as a decode of
        the whole output gives it."""
        if self.tok is not None and seq.text_upto < len(seq.out_ids):
            seq.text += self._window_text(seq)
            seq.text_from = seq.text_upto = len(seq.out_ids)
        return seq.text

    def _window_text(self, seq: _Sequence) -> str:
        """The text the tokens after `text_upto` add, decoded with the window's earlier tokens as context."""
        before = self.tok.decode(seq.out_ids[seq.text_from:seq.text_upto], skip_special=True)
        return self.tok.decode(seq.out_ids[seq.text_from:], skip_special=True)[len(before):]

    def _flush(self, seq: _Sequence, upto: int) -> str:
        text = seq.text[seq.sent_chars:upto]
        seq.sent_chars = max(seq.sent_chars, upto)
        return text


def _logprob_entries(chosen_B, top_ids_BK, top_lp_BK, ids: list[int]) -> list[TokenLogprob]:
    chosen, tid, tlp = chosen_B.tolist(), top_ids_BK.tolist(), top_lp_BK.tolist()
    return [TokenLogprob(i, c, list(zip(a, b))) for i, c, a, b in zip(ids, chosen, tid, tlp)]


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string begins in `text` (searching from just before what was sent)."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` may be sent: not a tail that could begin a stop string, nor a cut character."""
    end = len(text)
    if text.endswith("\ufffd"):
        end = len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:n], 0, end):   # no slice: a copy of the whole text per step
                end -= n
                break
    return end
