"""Batched log-likelihood scoring: the one scorer every benchmark, the lm-eval adapter and file perplexity use.

A request is a (context, continuation) pair; its score is the summed log-probability of the
continuation's tokens given the context, and whether greedy decoding would have produced them.

Batching and padding never change a score: rows are right-padded and the model is causal, so a real
token never attends to a pad; only the hidden states at the continuation's positions go through the
output head (the head is a fifth of a 135M model's FLOPs and every other position would be thrown
away). Requests with the same context share one row: the context once, then each continuation's
tail (all of it but its last token) after it, at the positions it would have alone and seeing only the
context and itself (a tree mask), so the four answers of a cloze question cost one context, not four,
and the four one-token answers " A" .. " D" of a letter-format question cost one row. Rows run longest
first, so a batch pads little and the first batch shows at once whether memory suffices.

Encoding follows lm-evaluation-harness (`HFLM._encode_pair`): trailing spaces of the context move to
the continuation, the pair is encoded whole and the context alone, and the continuation is what the
whole has beyond the context; so kiln's scores and the adapter's agree token for token.

Shape legend: B rows in a batch, T padded length, D d_model, N scored positions in a batch, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from kiln.runtime.device import autocast


@dataclasses.dataclass(frozen=True)
class Scored:
    logprob: float
    """Summed log-probability (nats) of the continuation's tokens."""
    greedy: bool
    """Every continuation token is the argmax at its position."""
    n_tokens: int


class Scorer:
    """A kiln Transformer and its tokenizer, scoring and generating in batches on one device."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32, bf16: bool = False,
                 max_len: int | None = None, head_chunk: int = 8192, chat: bool = False):
        self.model, self.tok = model, tokenizer
        self.device = next(model.parameters()).device
        self.batch_size, self.bf16 = batch_size, bf16
        self.max_len = max_len or model.cfg.max_seq_len
        self.head_chunk = head_chunk   # positions through the head at once: bounds the (N, V) fp32 logits
        self.chat = chat
        """Contexts and prompts are one user message in the tokenizer's chat template, followed by the
        assistant's generation prompt (a chat model's benchmarks); continuations follow it as given."""
        if chat and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat scoring needs a tokenizer with a chat template; this one has none (a base model)")
        self._engine = None

    # ------------------------------------------------------------ encoding

    @property
    def prefix(self) -> list[int]:
        """What every scored text starts with: BOS when the tokenizer adds one, else nothing."""
        bos = getattr(self.tok, "bos_id", None)
        return [bos] if bos is not None and getattr(self.tok, "add_bos_token", True) else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (with the prefix) and continuation ids, split as lm-eval splits them."""
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """`encode_pair` of many pairs, each distinct text encoded once, on the tokenizer's thread pool."""
        if self.chat:   # the context is a whole user turn: its ids never merge with the continuation's
            conts = self.tok.encode_batch([c for _, c in pairs])
            return [(self.prompt_ids(ctx), cont) for (ctx, _), cont in zip(pairs, conts)]
        split = []
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((context, context + continuation))
        texts = list(dict.fromkeys(t for pair in split for t in pair))
        ids = dict(zip(texts, self.tok.encode_batch(texts)))
        out = []
        for context, whole in split:
            ctx = ids[context] if context else []
            ctx_ids = self.prefix + ctx
            if not ctx_ids:   # nothing to condition the first token on: lm-eval's HFLM uses EOS there
                ctx_ids = [self.tok.eos_id]
            out.append((ctx_ids, ids[whole][len(ctx):]))
        return out

    # ------------------------------------------------------------ scoring

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        return self.loglikelihood_tokens(self.encode_pairs(pairs))

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """Scores of (context ids, continuation ids) pairs; contexts longer than the window lose their start."""
        rows, where = plan_rows(pairs, self.max_len)
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens))
        by_row: dict[int, list[int]] = {}
        for i, (row, _, _) in enumerate(where):
            by_row.setdefault(row, []).append(i)
        out: list[Scored | None] = [None] * len(where)
        pending = []   # (requests, their log-probs, their misses) still on the device
        for b in range(0, len(order), self.batch_size):
            chunk = order[b:b + self.batch_size]
            reqs = [i for r in chunk for i in by_row[r]]
            pending.append((reqs, *self._score_batch([rows[r] for r in chunk], {r: j for j, r in enumerate(chunk)},
                                                     reqs, where)))
            if len(pending) == 8:   # bounded: a few batches ahead of the device, never the whole set in memory
                self._collect(pending, where, out)
        self._collect(pending, where, out)
        return out  # type: ignore[return-value]

    @staticmethod
    def _collect(pending: list, where: list, out: list) -> None:
        """Move finished batches' scores to the host: one sync for several batches, so the host builds and
        launches the next batches while the device computes."""
        if not pending:
            return
        lp = torch.cat([p[1] for p in pending]).tolist()
        miss = torch.cat([p[2] for p in pending]).tolist()
        k = 0
        for reqs, _, _ in pending:
            for i in reqs:
                out[i] = Scored(lp[k], miss[k] == 0, len(where[i][2]))
                k += 1
        pending.clear()

    def _score_batch(self, rows: list[_Row], slot: dict[int, int], reqs: list[int],
                     where: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's summed log-probability (float64) and count of non-argmax targets, on the device."""
        T = len(rows[0].tokens)
        ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
        for j, r in enumerate(rows):
            ids_BT[j, :len(r.tokens)] = torch.as_tensor(r.tokens)
        b_idx, t_idx, targets, owner = [], [], [], []
        for k, i in enumerate(reqs):
            row, positions, cont = where[i]
            b_idx += [slot[row]] * len(cont)
            t_idx += positions
            targets += cont
            owner += [k] * len(cont)
        if any(r.branched for r in rows):
            pos_BT, mask_BTT = _tree_inputs(rows, T)
            h_BTD = self._hidden(self._upload(ids_BT), self._upload(pos_BT), self._upload(mask_BTT))
        else:
            h_BTD = self._hidden(self._upload(ids_BT))
        h_ND = h_BTD[self._upload(torch.as_tensor(b_idx)), self._upload(torch.as_tensor(t_idx))]
        tgt_N = self._upload(torch.as_tensor(targets))
        lp_N, hit_N = self._target_logprobs(h_ND, tgt_N)
        own_N = self._upload(torch.as_tensor(owner))
        lp = torch.zeros(len(reqs), dtype=torch.float64, device=self.device).index_add_(0, own_N, lp_N.double())
        miss = torch.zeros(len(reqs), dtype=torch.long, device=self.device).index_add_(0, own_N, (~hit_N).long())
        return lp, miss

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for the device: a plain copy from pageable memory
        synchronises, which would stall the host behind every batch in flight."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _hidden(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor | None = None,
                mask_BTT: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of the backbone: the model's forward up to its head; with
        positions and a mask for rows whose continuations share their context (`_tree_inputs`)."""
        m, T = self.model, ids_BT.size(1)
        with autocast(self.device, self.bf16):
            if pos_BT is None:
                return m.model(ids_BT, m.rope_cos[:T], m.rope_sin[:T])
            return m.hidden(ids_BT, pos_BT, None, mask_BTT[:, None])

    def _target_logprobs(self, h_ND: torch.Tensor, tgt_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 log-probability of each target and whether it is the argmax, `head_chunk` positions at a time."""
        lps, hits = [], []
        for s in range(0, h_ND.size(0), self.head_chunk):
            with autocast(self.device, self.bf16):
                logits_NV = self.model.lm_head(h_ND[s:s + self.head_chunk]).float()
            t = tgt_N[s:s + self.head_chunk]
            logp_NV = torch.log_softmax(logits_NV, dim=-1)
            lps.append(logp_NV.gather(1, t[:, None])[:, 0])
            hits.append(logits_NV.argmax(dim=-1) == t)
        if not lps:
            return h_ND.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=h_ND.device)
        return torch.cat(lps), torch.cat(hits)

    # ------------------------------------------------------------ whole texts

    def rolling_windows(self, ids: list[int], stride: int | None = None) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) pairs that score every token of `ids` once, each with up to a full window
        of context. The first window scores its first `max_len` tokens; each later one moves by `stride`
        (default: the window, lm-eval's disjoint windows) and scores only the tokens it adds, seeing
        `max_len - stride` tokens before them. `ids` starts with what conditions its first token (BOS)."""
        W = self.max_len
        S = stride or W
        if not 0 < S <= W:
            raise ValueError(f"stride {S} must be between 1 and the window ({W})")
        pairs, a = [], 1
        while a < len(ids):
            b = min(len(ids), a + (W if a == 1 else S))
            pairs.append((ids[max(0, b - 1 - W):a], ids[a:b]))
            a = b
        return pairs

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[Scored]:
        """Log-likelihood of each whole text (every token, conditioned on the prefix), by sliding windows."""
        spans, pairs = [], []
        for text in texts:
            ids = self.prefix + self.tok.encode(text)
            if not self.prefix:
                ids = [self.tok.eos_id] + ids
            w = self.rolling_windows(ids, stride)
            spans.append((len(pairs), len(pairs) + len(w)))
            pairs += w
        scored = self.loglikelihood_tokens(pairs)
        return [Scored(sum(s.logprob for s in scored[a:b]), all(s.greedy for s in scored[a:b]),
                       sum(s.n_tokens for s in scored[a:b])) for a, b in spans]

    # ------------------------------------------------------------ generation

    def prompt_ids(self, text: str) -> list[int]:
        """What generation from `text` (or scoring after it) conditions on: the prefix and the text, or for a
        chat scorer the text as one user message followed by the assistant's generation prompt."""
        if self.chat:
            return self.tok.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        return self.prefix + self.tok.encode(text)

    def generate_many(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (),
                      temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0) -> list[list[str]]:
        """For each prompt, `n` completions (greedy at temperature 0), each cut before its first stop string
        and ended by the tokenizer's stop ids or the budget; batched through kiln's engine."""
        return self.generate_ids([self.prompt_ids(p) for p in prompts], max_new_tokens, stop, temperature,
                                 top_p, n, seed)

    def generate_ids(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (),
                     temperature: float = 0.0, top_p: float = 1.0, n: int = 1, seed: int = 0,
                     ignore_stop_ids: bool = False) -> list[list[str]]:
        """`generate_many` from token ids. A prompt longer than the window loses its start (it keeps room for
        at least one new token); sample i of prompt p uses seed `seed + p`, so a batch's composition never
        changes what a prompt gets."""
        texts, _ = self._generate(prompts, max_new_tokens, stop, temperature, top_p, n, seed, ignore_stop_ids)
        return [[cut_at_stop(t, stop) for t in row] for row in texts]

    def generate_tokens(self, prompts: Sequence[list[int]], max_new_tokens: int,
                        ignore_stop_ids: bool = False) -> list[list[int]]:
        """Greedy new token ids of each prompt (ended by a stop id, unless ignored, or the budget)."""
        return [row[0] for row in self._generate(prompts, max_new_tokens, (), 0.0, 1.0, 1, 0, ignore_stop_ids)[1]]

    def _generate(self, prompts, max_new_tokens, stop, temperature, top_p, n, seed, ignore_stop_ids):
        from kiln.infer.engine import Output
        from kiln.infer.sampling import SamplingParams

        texts = [[""] * n for _ in prompts]
        ids: list[list[list[int]]] = [[[] for _ in range(n)] for _ in prompts]
        left = [len(prompts) * n]

        def collect(p: int):
            def on_output(o: Output) -> None:
                if o.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {o.text}")
                texts[p][o.index] += o.text
                ids[p][o.index] += o.token_ids
                left[0] -= o.finish_reason is not None
            return on_output

        stop_ids = () if ignore_stop_ids else tuple(getattr(self.tok, "stop_ids", (self.tok.eos_id,)))
        with autocast(self.device, self.bf16):
            engine = self._generation_engine(n)
            queue = list(enumerate(prompts))[::-1]
            while left[0]:
                while queue and engine.waiting < engine.max_queue:
                    p, prompt = queue.pop()
                    prompt = list(prompt)[-(self.max_len - 1):]
                    budget = min(max_new_tokens, self.max_len - len(prompt))
                    params = SamplingParams(max_tokens=budget, temperature=temperature, top_p=top_p,
                                            seed=seed + p, stop=tuple(stop), stop_ids=stop_ids, n=n,
                                            ignore_stop_ids=ignore_stop_ids)
                    engine.submit(prompt, params, collect(p))
                engine.step()
        return texts, ids

    def _generation_engine(self, n: int):
        """The engine generation runs on, made once (its slot cache and CUDA graphs are the costly part)."""
        from kiln.infer.engine import Engine

        slots = max(self.batch_size, n)
        if self._engine is None or self._engine.max_slots < slots:
            self._engine = None   # free the old cache before allocating the new one
            # No prefix cache: the validation step scores a model whose weights change between calls.
            self._engine = Engine(self.model, self.tok, max_slots=slots, max_len=self.max_len, max_queue=4 * slots,
                                  prefix_cache=False)
        return self._engine

    def generate(self, prompt_ids: list[int], max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> str:
        """One completion of `prompt_ids` (see `generate_ids`)."""
        return self.generate_ids([prompt_ids], max_new_tokens, stop, temperature, seed=seed)[0][0]


@dataclasses.dataclass
class _Row:
    """One model input: a context, then the tails of continuations scored after it, each tail placed
    right after the context (positions restart there) and seeing the context and itself only."""

    ctx: tuple[int, ...]
    tails: list[tuple[int, ...]]

    @property
    def tokens(self) -> list[int]:
        return [*self.ctx, *(t for tail in self.tails for t in tail)]

    @property
    def branched(self) -> bool:
        return sum(bool(t) for t in self.tails) > 1


def plan_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> tuple[list[_Row], list]:
    """The rows that score `pairs` (each context once, with as many of its continuations' tails as fit the
    window) and per request: its row, the positions whose outputs predict it, its targets."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}   # context -> its distinct tails
    keys = []                                                          # per request: (context, tail)
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation: nothing to score")
        if not ctx:
            raise ValueError("empty context: nothing conditions the continuation's first token (give BOS)")
        if len(cont) > max_len:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_len}-token window")
        inp = (list(ctx) + list(cont))[-(max_len + 1):-1]
        cut = len(inp) - len(cont) + 1    # inp[:cut] predicts cont[0]; the tail inp[cut:] is cont[:-1]
        key = (tuple(inp[:cut]), tuple(inp[cut:]))
        groups.setdefault(key[0], {})[key[1]] = None
        keys.append(key)
    rows: list[_Row] = []
    place: dict = {}   # (context, tail) -> (row, index of the tail's first token)
    for ctx, tails in groups.items():
        row, length = _Row(ctx, []), len(ctx)
        for tail in tails:
            if row.tails and length + len(tail) > max_len:
                rows.append(row)
                row, length = _Row(ctx, []), len(ctx)
            place[ctx, tail] = (len(rows), length)
            row.tails.append(tail)
            length += len(tail)
        rows.append(row)
    where = []
    for (ctx, tail), (_, cont) in zip(keys, pairs):
        r, start = place[ctx, tail]
        where.append((r, [len(ctx) - 1, *range(start, start + len(tail))], list(cont)))
    return rows, where


def _tree_inputs(rows: list[_Row], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and attention mask (B, T, T; True = may attend) for rows of shared contexts:
    causal, except that a tail's tokens do not see the tails before it. Pads sit after every real token,
    so no real token sees one (and each pad sees something: no empty softmax row)."""
    B = len(rows)
    pos_BT = torch.zeros(B, T, dtype=torch.long)
    mask_BTT = torch.ones(T, T, dtype=torch.bool).tril().repeat(B, 1, 1)
    for b, r in enumerate(rows):
        c = len(r.ctx)
        pos_BT[b, :c] = torch.arange(c)
        s = c
        for tail in r.tails:
            e = s + len(tail)
            pos_BT[b, s:e] = torch.arange(c, c + len(tail))
            mask_BTT[b, s:e, c:s] = False
            s = e
    return pos_BT, mask_BTT


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest of the stop strings."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def perplexity_stats(nats: float, n_tokens: int, n_bytes: int) -> dict[str, float | int]:
    """Loss per token, perplexity and bits per UTF-8 byte from summed nats."""
    loss = nats / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n_tokens, "bytes": n_bytes,
            "bits_per_byte": nats / (math.log(2) * max(n_bytes, 1))}
