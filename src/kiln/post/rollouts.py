"""GRPO's batch source (kiln/post/grpo.py has the loss and the stage): problems in, sampled groups scored,
advantages normalised within each group, rows with their completion masks and old log-probabilities out.
The choices and their hazards are in grpo.py's docstring.

Shapes: B rows (prompts_per_step x group_size completions), T positions (prompt + completion - 1, padded),
P prompts, G samples per prompt, N trained positions (the completion tokens of the samples that scored).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.config import GRPOConfig
from kiln.infer.engine import Engine, Output
from kiln.infer.sampling import SamplingParams
from kiln.post.common import trained_positions, varying_length
from kiln.runtime.limits import time_limit
from kiln.tokenizer.loader import IGNORE
from kiln.train import loop
from kiln.train.distributed import sum_over_ranks

ADV_EPS = 1e-4      # added to the group's std (TRL's value): groups that nearly agree get large but finite A
ROW_MULTIPLE = 16   # rows are padded to a multiple of this: fewer distinct shapes for the allocator and kernels


def group_advantages(rewards_PG: torch.Tensor, valid_PG: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group (row) over its valid samples; 0 for invalid samples and for
    groups with fewer than 2 valid ones (no baseline to compare with). std is the unbiased one."""
    valid = valid_PG.float()
    n_P1 = valid.sum(dim=1, keepdim=True)
    r = torch.where(valid_PG, rewards_PG.float(), 0.0)
    mean_P1 = r.sum(dim=1, keepdim=True) / n_P1.clamp(min=1)
    var_P1 = (((r - mean_P1) * valid) ** 2).sum(dim=1, keepdim=True) / (n_P1 - 1).clamp(min=1)
    adv = (r - mean_P1) / (var_P1.sqrt() + eps)
    return torch.where(valid_PG & (n_P1 >= 2), adv, 0.0)


def token_logp(model: nn.Module, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor,
               rows_N: torch.Tensor | None = None) -> torch.Tensor:
    """log p of each target under `model` (B, T) fp32, 0 where the target is IGNORE; with `rows_N` (the flat
    indices of the trained targets, `build_rows`' `rows`) the head runs there only and the result is (N,)."""
    with torch.no_grad():
        if rows_N is not None:
            varying_length(rows_N)
        return -model(input_ids_BT, targets_BT, reduction="none", rows_N=rows_N).float()


# ---------------------------------------------------------------- rewards

@dataclass
class Score:
    reward: float | None      # None: the reward function failed (the sample is dropped)
    correct: bool             # the task's verifier scores 1
    formatted: bool           # <think>...</think><answer>...</answer>
    error: str | None = None


class Rewarder:
    """The reward of a completion: the task's verifier (kiln/post/reasoning.py) plus format_reward when the format
    holds, or `fn(prompt, completion, item)` (grpo.reward) alone. prompt is the question (the user turn), item
    the reasoning.TaskItem (question, answer, raw). The verifier's verdict is kept either way (accuracy)."""

    def __init__(self, task, format_reward: float, fn: Callable[[str, str, Any], float] | None = None,
                 spec: str | None = None, timeout: float = 0.0):
        self.task, self.format_reward, self.fn, self.spec, self.timeout = task, format_reward, fn, spec, timeout

    def __call__(self, completion: str, item) -> Score:
        from kiln.post.reasoning import format_ok
        formatted = format_ok(completion)
        try:
            verdict = float(self.task.score(completion, item))
        except Exception as e:   # noqa: BLE001 - a user task's verifier may raise anything; counted, not trained on
            return Score(None, False, formatted, f"the verifier of task {self.task.name}: {type(e).__name__}: {e}")
        if self.fn is None:
            return Score(verdict + (self.format_reward if formatted else 0.0), verdict >= 1.0, formatted)
        try:
            with time_limit(self.timeout):   # one that hangs is counted, not a stalled run
                value = self.fn(item.question, completion, item)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
        except Exception as e:   # noqa: BLE001 - the user's code may raise anything; counted, never trained on
            return Score(None, verdict >= 1.0, formatted, f"grpo.reward {self.spec}: {type(e).__name__}: {e}")
        return Score(float(value), verdict >= 1.0, formatted)


# ---------------------------------------------------------------- sampling

@dataclass
class Problem:
    item: Any                 # reasoning.TaskItem
    prompt_ids: list[int]     # the rendered chat prompt, ending with the assistant header


def sample_completions(engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
                       stop_ids: set[int]) -> list[list[list[int]]]:
    """Each prompt's n completions, on the calling thread. The engine runs without stop ids (see the module
    docstring); a completion is cut after its first stop id, which it keeps, and a request is cancelled once
    every one of its samples has stopped."""
    outs = [[[] for _ in range(p.n)] for p in params]
    stopped = [[False] * p.n for p in params]
    finished = [0]
    requests: list[Any] = []

    def collect(i: int):
        def on_output(o: Output) -> None:
            ids, done = outs[i][o.index], stopped[i]
            for t in o.token_ids:
                if done[o.index]:
                    break
                ids.append(t)
                done[o.index] = t in stop_ids
            if o.finish_reason is not None:
                finished[0] += 1
                done[o.index] = True
            if all(done) and requests[i].unfinished > 0:
                engine.cancel(requests[i])   # honoured at the next step; its samples come back as "abort"
        return on_output

    for i, (p, prm) in enumerate(zip(prompts, params)):
        requests.append(engine.submit(p, prm, collect(i)))   # callbacks run in step(), never in submit()
    total = sum(p.n for p in params)
    while finished[0] < total:
        engine.step()
    return outs


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (train.seed, micro-batch, rank, prompt): no two draws share a stream."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def build_rows(prompts: list[list[int]], completions: list[list[int]], trained: list[bool], pad_id: int,
               max_len: int) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded: input_ids (B, T), targets (B, T) = the next token where it is a
    completion token of a trained sample (else IGNORE), mask (B, T) = targets != IGNORE, rows (N,) = the flat
    indices of mask's True positions (where the loss runs the head; found here, so the step needs no host sync)."""
    n = [len(p) + len(c) - 1 for p, c in zip(prompts, completions)]
    T = min(-(-max(n) // ROW_MULTIPLE) * ROW_MULTIPLE, max_len)
    B = len(prompts)
    x = np.full((B, T), pad_id, dtype=np.int64)
    y = np.full((B, T), IGNORE, dtype=np.int64)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        full = np.asarray(p + c, dtype=np.int64)
        x[b, :n[b]] = full[:-1]
        if trained[b]:
            y[b, len(p) - 1:n[b]] = full[len(p):]
    targets = torch.from_numpy(y)
    return {"input_ids": torch.from_numpy(x), "targets": targets, "mask": targets != IGNORE,
            "rows": trained_positions(y)}


class Rollouts:
    """The batch source (see the module docstring): endless micro-batches of input_ids, targets, mask (B, T),
    rows (N,), advantages (B,), old_logp (N,) and with a reference ref_logp (N,) (each trained position's, in
    `rows`' order); CPU tensors. Resumable: the state is
    the count of micro-batches drawn on this rank."""

    def __init__(self, policy: nn.Module, tok, problems: list[Problem], rewarder: Rewarder, sec: GRPOConfig,
                 device: torch.device, amp: bool, seed: int, reference: Callable | None = None,
                 eval_problems: list[Problem] = (), rank: int = 0, world_size: int = 1,
                 error_log: Path | None = None, say=print):
        if not problems:
            raise ValueError("grpo: no training problems")
        self.policy, self.tok, self.problems, self.rewarder, self.sec = policy, tok, problems, rewarder, sec
        self.device, self.amp, self.seed, self.reference = device, amp, seed, reference
        self.rank, self.world, self.error_log, self.say = rank, world_size, error_log, say
        self.stop_ids = set(tok.stop_ids)
        self.batches = 0
        self._perm: tuple[int, np.ndarray] | None = None
        self.stats = np.zeros(len(STAT_KEYS))
        self.first_error: str | None = None
        self.errors_total = 0      # reward errors over the whole run on this rank (the summary's figure)
        longest = max(len(p.prompt_ids) for p in [*problems, *eval_problems])
        self.max_len = min(policy.cfg.max_seq_len, longest + sec.max_new_tokens)
        slots = sec.prompts_per_step * sec.group_size
        was = policy.training
        # The engine holds `policy` itself: every update is seen by the next batch. Its KV cache is allocated once.
        # No prefix cache: the weights change between batches, so keys cached by an earlier policy are stale.
        self.engine = Engine(policy, None, max_slots=slots, max_len=self.max_len, cuda_graphs=False, prefix_cache=False,
                             max_queue=max(sec.prompts_per_step, len(eval_problems)) + 1, seed=seed)
        policy.train(was)   # Engine() switched it to eval

    # ------------------------------------------------------------ the stream

    def problem(self, q: int) -> Problem:
        """The q-th problem of the stream: epochs of the training problems, each in its own shuffled order."""
        n = len(self.problems)
        epoch = q // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return self.problems[int(self._perm[1][q % n])]

    def __iter__(self) -> Iterator[loop.Batch]:
        return self

    def __next__(self) -> loop.Batch:
        t0 = time.perf_counter()
        P, G = self.sec.prompts_per_step, self.sec.group_size
        first = (self.batches * self.world + self.rank) * P
        problems = [self.problem(first + j) for j in range(P)]
        seed = derive_seed(self.seed, self.batches, self.rank)
        params = [SamplingParams(max_tokens=self.sec.max_new_tokens, temperature=self.sec.temperature, n=G,
                                 seed=derive_seed(seed, j)) for j in range(P)]
        with self.sampling():
            outs = sample_completions(self.engine, [p.prompt_ids for p in problems], params, self.stop_ids)
        scores = [[self.score(problems[j], ids) for ids in outs[j]] for j in range(P)]
        valid_PG = torch.tensor([[s.reward is not None for s in row] for row in scores])
        if not valid_PG.any():
            raise ValueError(f"every one of the {P * G} completions of micro-batch {self.batches} failed to score; "
                             f"the first: {self.first_error}. Fix grpo.reward (or the task)")
        rewards_PG = torch.tensor([[s.reward if s.reward is not None else 0.0 for s in row] for row in scores])
        adv_PG = group_advantages(rewards_PG, valid_PG)
        prompts = [p.prompt_ids for p in problems for _ in range(G)]
        completions = [ids for row in outs for ids in row]
        batch = build_rows(prompts, completions, valid_PG.flatten().tolist(), self.tok.pad_id, self.max_len)
        batch["advantages"] = adv_PG.flatten()
        batch.update(self.logps(batch))
        self.batches += 1
        self._count(scores, rewards_PG, valid_PG, completions, time.perf_counter() - t0)
        return batch

    @contextlib.contextmanager
    def sampling(self):
        """The engine's mode (eval) and the loss's autocast; the model's mode restored after."""
        from kiln.runtime.device import autocast
        was = self.policy.training
        self.policy.eval()
        try:
            with autocast(self.device, self.amp):
                yield
        finally:
            self.policy.train(was)

    def logps(self, batch: loop.Batch) -> dict[str, torch.Tensor]:
        """old_logp (the policy that sampled: eval mode, as the engine ran it) and ref_logp at the trained
        positions (N,), on the CPU."""
        x, y, rows = (batch[k].to(self.device) for k in ("input_ids", "targets", "rows"))
        out = {}
        with self.sampling():
            out["old_logp"] = token_logp(self.policy, x, y, rows)
            if self.reference is not None:
                out["ref_logp"] = self.reference(x, y, rows)
        return {k: v.cpu() for k, v in out.items()}   # a host sync, once per micro-batch (sampling has many)

    def score(self, problem: Problem, ids: list[int]) -> Score:
        text = self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special=True)
        s = self.rewarder(text, problem.item)
        if s.error is not None:
            self._log_error(problem, text, s.error)
        return s

    def _log_error(self, problem: Problem, completion: str, error: str) -> None:
        self.errors_total += 1
        if self.first_error is None:
            self.first_error = f"{error} (question {problem.item.question[:80]!r})"
            self.say(f"warning: {self.first_error}; such samples are dropped (not trained on), counted in "
                     f"reward_errors{f' and written to {self.error_log}' if self.error_log else ''}",
                     file=sys.stderr, flush=True)
        if self.error_log is not None:
            rec = {"micro_batch": self.batches, "rank": self.rank, "error": error, "question": problem.item.question,
                   "answer": problem.item.answer, "completion": completion}
            with open(self.error_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    def _count(self, scores, rewards_PG, valid_PG, completions, seconds: float) -> None:
        flat = [s for row in scores for s in row]
        n_valid = valid_PG.sum(dim=1)
        spread = torch.where(valid_PG, rewards_PG, rewards_PG.max()).amin(dim=1) != \
            torch.where(valid_PG, rewards_PG, rewards_PG.min()).amax(dim=1)
        self.stats += np.array([
            len(flat), sum(s.reward is not None for s in flat), float(rewards_PG[valid_PG].sum()),
            sum(s.correct for s in flat), sum(s.formatted for s in flat),
            sum(len(c) for c in completions), int((n_valid >= 2).sum()), int(((n_valid >= 2) & ~spread).sum()),
            sum(s.reward is None for s in flat), seconds, 1])

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, problems: list[Problem], d) -> dict[str, Any]:
        """Greedy accuracy and format rate on `problems` (each rank takes its share), and one example."""
        mine = problems[self.rank::self.world]
        params = [SamplingParams(max_tokens=self.sec.max_new_tokens, temperature=0.0)] * len(mine)
        outs = []
        if mine:
            with self.sampling():
                outs = sample_completions(self.engine, [p.prompt_ids for p in mine], params, self.stop_ids)
        correct = formatted = 0
        example = None
        from kiln.post.reasoning import format_ok
        for p, (ids,) in zip(mine, outs):
            text = self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special=True)
            correct += float(self.rewarder.task.score(text, p.item)) >= 1.0
            formatted += format_ok(text)
            example = example or {"question": p.item.question, "completion": text, "answer": p.item.answer}
        totals = sum_over_ranks(torch.tensor([correct, formatted, len(mine)], dtype=torch.float64,
                                             device=self.device), d).tolist()
        n = max(totals[2], 1)
        return {"accuracy": totals[0] / n, "format_rate": totals[1] / n, "items": int(totals[2]), "example": example}

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "problems": len(self.problems)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("problems") != len(self.problems):
            raise ValueError(f"the checkpoint was trained on {state.get('problems')} grpo problems, this run has "
                             f"{len(self.problems)} (grpo.task, task_config, eval_items or max_seq_len changed)")
        self.batches = int(state["batches"])


STAT_KEYS = ("samples", "scored", "reward_sum", "correct", "formatted", "completion_tokens", "groups",
             "zero_var_groups", "reward_errors", "seconds", "micro_batches")

