"""Next-token sampling: temperature, top-k, then top-p (nucleus). Shapes: B batch, V vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row, LongTensor (B,).

    temperature 0 is greedy argmax (top_k / top_p are then irrelevant). Otherwise logits are
    divided by temperature, filtered to the top_k largest, then to the smallest set of tokens
    whose probability reaches top_p (the most likely token always survives), and one token is
    drawn with `generator`, which must live on the logits' device.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None)")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.size(-1):
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token once the more likely ones before it already reach top_p of the mass.
        drop_sorted_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- per-row sampling for the batched engine

@dataclass
class SamplingParams:
    """How one request is sampled (the OpenAI parameters, plus top_k, min_p and repetition_penalty)."""

    max_tokens: int = 16
    temperature: float = 1.0     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0
    min_p: float = 0.0           # drop tokens below min_p * the most likely one's probability
    repetition_penalty: float = 1.0   # CTRL / HF: logits of tokens in prompt or output divided (> 0) or multiplied
    frequency_penalty: float = 0.0    # OpenAI: minus penalty * count in the output
    presence_penalty: float = 0.0     # OpenAI: minus penalty once a token is in the output
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()    # end generation, not part of the output
    ignore_stop_ids: bool = False     # benchmarks: always generate max_tokens
    n: int = 1                        # samples of one prompt, sharing its prefill
    logit_bias: dict[int, float] | None = None   # OpenAI: added to these tokens' logits before sampling (greedy too)
    logprobs: int | None = None       # with each generated token: its log-probability and this many top ones
    prompt_logprobs: int | None = None   # the same for every prompt token after the first (echo)

    def validate(self, vocab_size: int) -> SamplingParams:
        checks = [(self.max_tokens >= 1, "max_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (self.n >= 1, "n must be >= 1"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
                  (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt logprobs must be in [0, 20]"),
                  (all(0 <= i < vocab_size for i in self.stop_ids), f"stop token ids must be in [0, {vocab_size})"),
                  (all(0 <= i < vocab_size for i in self.logit_bias or ()),
                   f"logit_bias token ids must be in [0, {vocab_size})"),
                  (all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()),
                   "logit_bias values must be in [-100, 100]")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to add to the model's argmax: no penalties, bias or log-probabilities."""
        return self.temperature == 0 and not self.penalised and not self.logit_bias and self.logprobs is None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


def penalise(logits_BV: torch.Tensor, counts_BV: torch.Tensor, seen_BV: torch.Tensor, rep_B1: torch.Tensor,
             freq_B1: torch.Tensor, pres_B1: torch.Tensor) -> torch.Tensor:
    """Repetition penalty on tokens seen in prompt or output (`seen_BV`), frequency and presence penalties
    on the output's token counts (`counts_BV`). Rows with neutral values come back unchanged."""
    rep = torch.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
    logits_BV = torch.where(seen_BV, rep, logits_BV)
    return logits_BV - freq_B1 * counts_BV - pres_B1 * (counts_BV > 0)


def bias_logits(logits_BV: torch.Tensor, biases: list[dict[int, float] | None]) -> torch.Tensor:
    """Logits plus each row's logit_bias (a new tensor where any row has one; the input is left as it was)."""
    at = [(b, i, v) for b, bias in enumerate(biases) for i, v in (bias or {}).items()]
    if not at:
        return logits_BV
    rows, ids, vals = zip(*at)
    dev = logits_BV.device
    return logits_BV.float().index_put((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                                       torch.tensor(vals, device=dev), accumulate=True)


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                shared: torch.Generator) -> torch.Tensor:
    """One token per row (B,), each row with its own SamplingParams; greedy rows take argmax.

    Sampling draws `argmax(p / q)` with q ~ Exp(1), which picks token i with probability p_i (the
    exponential race), so one noise tensor serves the whole batch: rows with a seed draw theirs from
    their own generator (their tokens do not depend on who else is in the batch), the rest from `shared`.
    """
    greedy_B = logits_BV.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy_B
    dev = logits_BV.device
    temp_B1 = torch.tensor([p.temperature or 1.0 for p in params], device=dev)[:, None]
    logits_BV = logits_BV.float() / temp_B1
    if any(p.top_k or p.top_p < 1 for p in params):
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        top_k_B1 = torch.tensor([p.top_k or logits_BV.size(-1) for p in params], device=dev)[:, None]
        top_p_B1 = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        rank_BV = torch.arange(logits_BV.size(-1), device=dev)[None, :]
        # Drop a token once the more likely ones before it already reach top_p (the first always stays).
        drop_sorted_BV = (rank_BV >= top_k_B1) | (probs_BV.cumsum(dim=-1) - probs_BV >= top_p_B1)
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p_B1 = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        probs_BV = probs_BV.masked_fill(probs_BV < min_p_B1 * probs_BV.amax(dim=-1, keepdim=True), 0.0)
    noise_BV = torch.empty_like(probs_BV).exponential_(generator=shared)
    for b, g in enumerate(generators):
        if g is not None:
            noise_BV[b].exponential_(generator=g)
    sampled_B = (probs_BV / noise_BV).argmax(dim=-1)
    is_greedy_B = torch.tensor([p.temperature == 0 for p in params], device=dev)
    return torch.where(is_greedy_B, greedy_B, sampled_B)


def top_logprobs(logits_BV: torch.Tensor, chosen_B: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (no temperature, no penalties): of `chosen_B` (B,), and the k most
    likely ids and theirs (B, k)."""
    logp_BV = logits_BV.float().log_softmax(dim=-1)
    chosen = logp_BV.gather(-1, chosen_B[:, None])[:, 0]
    if k == 0:
        return chosen, chosen_B[:, None][:, :0], logp_BV[:, :0]
    top = logp_BV.topk(k, dim=-1)
    return chosen, top.indices, top.values
