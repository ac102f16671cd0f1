"""`kiln grpo`: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath) on verifiable rewards, a task of
the one loop (kiln/train/loop.py).

The batch source, `Rollouts`, makes every micro-batch fresh:
  1. take grpo.prompts_per_step problems from the stream of training items (reshuffled every epoch);
  2. render each with the chat template: the system prompt, the question as the user turn, the assistant header;
  3. sample grpo.group_size completions of each with kiln's batched engine (kiln/infer/engine.py) over the very
     model object that trains: no second engine and no copy of the weights; the optimizer updates them in place
     and the next batch samples from the new ones;
  4. score each: the task's verifier on the extracted answer plus grpo.format_reward, or the user's grpo.reward;
  5. advantages within each group: A = (r - mean) / (std + eps);
  6. log-probabilities of the completions under the sampling policy (one no-grad pass) and, with kl_beta > 0,
     under the reference.
The loss (`GRPOLoss`) is PPO's clipped surrogate plus kl_beta times the k3 estimate of KL(policy || reference),
summed over completion tokens; the loop divides by the step's completion tokens.

Choices (and their hazards):
- Sampling mode: eval() while the engine or a log-prob pass runs (`Rollouts.sampling`; Engine() also sets it when
  built), the model's own mode restored after. Sampling and both log-prob passes run under the loss's own bf16
  autocast and SDPA backend, so the policy that samples is the one that is scored. CUDA graphs are off: the
  engine captures them once, at construction and outside autocast (they would decode in fp32, not in the bf16
  the policy trains in), and their memory pool would sit beside training's activations for the whole run.
- Stop tokens: the engine runs without stop ids and each completion is cut after its first stop id, which is
  kept: the policy must learn when to stop, and the engine's outputs do not say *which* stop id ended a sample
  (a chat model has two: <|end|> and <|eos|>). A request is cancelled once all its samples stopped, so decoding
  ends when the longest completion does, as with stop ids in the engine.
- One update per sample: the loop draws every micro-batch of a step before its first backward, so all of a
  step's completions come from the weights being updated and r = exp(logp - old_logp) is 1 up to rounding at
  the update (mu = 1 in DeepSeekMath's notation; the gradient is then A * grad log p, REINFORCE with the group
  baseline). The clip binds only where r drifts from 1 (several updates per sample; LoRA dropout, which is off
  while sampling and on in the loss: keep grpo.lora.dropout = 0). Log-probabilities are the model's own
  (temperature 1) whatever grpo.temperature samples with.
- Advantages are divided by the group's standard deviation (unbiased, eps 1e-4), as DeepSeekMath; Dr. GRPO
  (Liu et al. 2025) drops the division, which otherwise up-weights groups that nearly agree. A group whose
  rewards are all equal gives A = 0 (only the KL term acts on it); DAPO's dynamic sampling, which would draw
  more groups instead, is not done: `zero_var_groups` reports the share.
- The head runs on the trained completion tokens only (`build_rows`' rows): prompts, padding and dropped samples
  cost no vocabulary matmul and no logits, in the loss and in both log-prob passes (old_logp, ref_logp (N,)).
- Token-level normalisation (DAPO): every completion token of a step weighs the same, not every completion
  (GRPO's per-completion mean penalises a long wrong answer less per token, Dr. GRPO shows: lengths grow).
- A reward function that raises (or returns something not a finite number) drops its sample: it is not trained
  on (its tokens are masked) nor part of its group's statistics; `reward_errors` counts them and
  reward_errors.jsonl keeps each one with its item. A micro-batch whose every sample fails stops the run.
- Evaluation: greedy accuracy (the verifier scores 1) on grpo.eval_items held-out problems, before training and
  at every train.eval_every; the loop gets 1 - accuracy as its "validation loss" (lower is better, so
  checkpoints/best is the most accurate one; the loop's "ppl" printed beside it means nothing here).
- Resume: the source's state is the count of micro-batches drawn; problems follow from it and the sampling seed
  of a micro-batch from (train.seed, that count, rank), so a resumed run samples the very same completions.
- Reference (kl_beta > 0): with LoRA the model with adapters switched off; else a frozen copy of the starting
  weights (twice the weight memory).

Shapes: B rows (prompts_per_step x group_size completions), T positions (prompt + completion - 1, padded),
P prompts, G samples per prompt.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.config import ConfigError, GRPOConfig
from kiln.post.common import Stage, finish, fingerprint_of, load_base, run_stage, trainer, varying_length
from kiln.post.rollouts import STAT_KEYS, Problem, Rewarder, Rollouts, token_logp
from kiln.train import loop
from kiln.train.distributed import broadcast_object, sum_over_ranks

TRAIN_PROBLEMS = 4096
"""Problems generated for training (besides the held-out ones), cycled in epochs. Fixed, not derived from
train.max_steps, so that a run resumed with more steps continues on the same problems."""


# ---------------------------------------------------------------- advantages and loss

class GRPOLoss:
    """The clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps) A) per completion token, r = exp(logp - old_logp),
    plus kl_beta * (exp(ref - logp) - (ref - logp) - 1) (Schulman's k3: unbiased, always >= 0); the SUM over
    completion tokens. Keeps the KL and the clipped share on the device for `take_stats` (no host sync here)."""

    def __init__(self, clip_eps: float, kl_beta: float):
        self.clip_eps, self.kl_beta = clip_eps, kl_beta
        self._kl = self._clipped = self._tokens = None

    def __call__(self, model: nn.Module, batch: loop.Batch) -> torch.Tensor:
        """With `rows` (Rollouts' batches) the head runs on the trained positions only and old_logp, ref_logp
        are (N,) there; without, every position of (B, T) and `mask` picks the trained ones (the same loss)."""
        x, y, rows = batch["input_ids"], batch["targets"], batch.get("rows")
        if rows is None:
            logp = -model(x, y, reduction="none").float()                     # (B, T)
            mask, adv = batch["mask"], batch["advantages"].float()[:, None]
        else:
            varying_length(rows)
            logp = -model(x, y, reduction="none", rows_N=rows).float()        # (N,)
            mask = torch.ones_like(logp, dtype=torch.bool)                     # every one of them is trained
            adv = batch["advantages"].float()[rows // y.shape[1]]
        ratio = torch.exp(logp - batch["old_logp"])
        plain = ratio * adv
        clipped = ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv
        per_token = -torch.minimum(plain, clipped)
        kl = None
        if self.kl_beta > 0:
            d = batch["ref_logp"] - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + self.kl_beta * kl
        # where(), not a product with the mask: an overflowing ratio (inf) times 0 would be NaN
        loss = torch.where(mask, per_token, 0.0).sum()
        self._accumulate(mask, clipped < plain, kl)
        return loss

    @torch.no_grad()
    def _accumulate(self, mask: torch.Tensor, clip: torch.Tensor, kl: torch.Tensor | None) -> None:
        if self._tokens is None:
            self._kl, self._clipped, self._tokens = (torch.zeros((), dtype=torch.float64, device=mask.device)
                                                     for _ in range(3))
        self._tokens += mask.sum()
        self._clipped += (clip & mask).sum()
        if kl is not None:
            self._kl += torch.where(mask, kl.detach(), 0.0).sum().double()

    def take_stats(self) -> torch.Tensor | None:
        """(KL sum, clipped tokens, tokens) since the last call, a device tensor; None before any loss."""
        if self._tokens is None:
            return None
        out = torch.stack([self._kl, self._clipped, self._tokens])
        self._kl, self._clipped, self._tokens = None, None, None
        return out


def count_tokens(batch: loop.Batch) -> torch.Tensor:
    return batch["mask"].sum()


def step_metrics(source: Rollouts, loss: GRPOLoss, d, accum: int = 1) -> dict[str, float]:
    """The figures since the last log line, summed over ranks (every rank calls this at the same point).
    sample_s: seconds per optimizer step spent making batches (sampling, scoring, the log-prob passes)."""
    local = torch.tensor(source.stats, dtype=torch.float64, device=source.device)
    source.stats[:] = 0
    kl = loss.take_stats()
    if kl is None:
        kl = torch.zeros(3, dtype=torch.float64, device=source.device)
    s = dict(zip(STAT_KEYS + ("kl_sum", "clipped", "tokens"),
                 sum_over_ranks(torch.cat([local, kl.to(local.device)]), d).tolist()))
    scored = max(s["scored"], 1)
    out = {"reward": s["reward_sum"] / scored, "accuracy": s["correct"] / max(s["samples"], 1),
           "format": s["formatted"] / max(s["samples"], 1),
           "completion_len": s["completion_tokens"] / max(s["samples"], 1),
           "zero_var_groups": s["zero_var_groups"] / max(s["groups"], 1), "reward_errors": s["reward_errors"],
           "clip_frac": s["clipped"] / max(s["tokens"], 1),
           "sample_s": s["seconds"] / max(s["micro_batches"], 1) * accum}
    if loss.kl_beta > 0:
        out["kl"] = s["kl_sum"] / max(s["tokens"], 1)
    return out


# ---------------------------------------------------------------- the stage

def load_problems(sec: GRPOConfig, tok, seed: int, max_seq_len: int, say=print) -> tuple[Any, list[Problem],
                                                                                          list[Problem], dict]:
    """The task, its training and held-out problems (disjoint by question text), rendered; a report of counts."""
    from kiln.post.reasoning import SYSTEM_PROMPT, make_task
    task = make_task(sec.task, sec.task_config, seed=seed, size=sec.eval_items + TRAIN_PROBLEMS)
    system = SYSTEM_PROMPT if sec.system is None else sec.system
    room = max_seq_len - sec.max_new_tokens
    if room < 1:
        raise ConfigError(f"grpo.max_new_tokens={sec.max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {max_seq_len} tokens; lower grpo.max_new_tokens")
    report: dict[str, Any] = {"generated": len(task.items), "too_long": 0, "duplicate_of_eval": 0}
    rendered = []
    for item in task.items:
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": item.question}]
        try:
            ids = tok.encode_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ConfigError(f"grpo: the chat template refuses the prompt ({e}); a template without a system turn "
                              "takes --grpo.system ''") from e
        if len(ids) > room:
            report["too_long"] += 1
            continue
        rendered.append(Problem(item, ids))
    held, rest = rendered[:sec.eval_items], rendered[sec.eval_items:]
    held_q = {p.item.question for p in held}
    train = [p for p in rest if p.item.question not in held_q]
    report["duplicate_of_eval"] = len(rest) - len(train)
    report.update(train=len(train), eval=len(held))
    if not train:
        raise ConfigError(f"grpo: no training problems left of the {len(task.items)} of task {sec.task!r} "
                          f"({report['too_long']} leave fewer than grpo.max_new_tokens={sec.max_new_tokens} of the "
                          f"model's {max_seq_len} positions; {sec.eval_items} held out by grpo.eval_items): "
                          "shorten grpo.system, lower grpo.max_new_tokens or grpo.eval_items, or give more items")
    if report["too_long"]:
        say(f"grpo: {report['too_long']} of {len(task.items)} prompts do not leave grpo.max_new_tokens="
            f"{sec.max_new_tokens} in the context of {max_seq_len}: skipped", file=sys.stderr)
    return task, train, held, report


def reference_fn(policy: nn.Module, lora: bool) -> Callable[..., torch.Tensor]:
    """log p under the reference, (x, y, rows) -> token_logp: the policy with its adapters off (LoRA), else a
    frozen copy made now."""
    if lora:
        from kiln.train.lora import adapters_disabled

        def with_adapters_off(x, y, rows=None):
            with adapters_disabled(policy):
                return token_logp(policy, x, y, rows)
        return with_adapters_off
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return lambda x, y, rows=None: token_logp(frozen, x, y, rows)


def run_grpo(cfg) -> dict:
    return run_stage(cfg, "grpo", _grpo)


def _grpo(st: Stage) -> dict:
    from kiln.post.reasoning import load_function
    from kiln.runtime.device import sdpa_backend
    sec: GRPOConfig = st.section
    t, d = st.cfg.train, st.d
    if d.parallel == "fsdp" or (d.parallel == "deepspeed" and t.zero_stage == 3):
        raise ConfigError(f"grpo.train.parallel={d.parallel}{' ZeRO-3' if d.parallel == 'deepspeed' else ''}: "
                          "sampling needs every weight on each rank; use ddp, or deepspeed with zero_stage <= 2")
    task, train, held, report = load_problems(sec, st.tok, t.seed, st.cfg.model.max_seq_len, st.say)
    fn = load_function(sec.reward, what="grpo.reward") if sec.reward else None
    rewarder = Rewarder(task, sec.format_reward, fn, sec.reward, sec.reward_timeout)
    st.say(f"grpo: task {sec.task}: {report['train']} training / {report['eval']} held-out problems; "
           f"{sec.prompts_per_step} prompts x {sec.group_size} completions per micro-batch, reward "
           f"{sec.reward or f'verifier + {sec.format_reward:g} for the format'}, kl_beta {sec.kl_beta:g}")

    fingerprint = {"problems": fingerprint_of([p.prompt_ids for p in train[:500]], len(train)),
                   "base": str(st.base), "reward": sec.reward, "group": [sec.prompts_per_step, sec.group_size]}
    model = load_base(st)
    reference = reference_fn(model, sec.lora.enabled) if sec.kl_beta > 0 else None
    tr = trainer(st, model, fingerprint)
    error_log = st.rd.root / ("reward_errors.jsonl" if d.world_size == 1 else f"reward_errors.rank{d.rank}.jsonl")
    source = Rollouts(tr.model, st.tok, train, rewarder, sec, st.device, tr.amp, t.seed, reference, held,
                      d.rank, d.world_size, error_log, st.say)
    loss = GRPOLoss(sec.clip_eps, sec.kl_beta)
    evals = EvalLog(st.rd.root / "grpo_eval.json", d.is_main)

    def evaluate() -> float:
        r = source.evaluate(held, d)
        evals.add(source.batches // tr.accum, r)
        ex = r["example"] or {"question": "", "completion": ""}
        st.say(f"grpo eval: greedy accuracy {r['accuracy']:.3f}, format {r['format_rate']:.3f} on {r['items']} "
               f"held-out problems; e.g. {ex['question'][:60]!r} -> {ex['completion'][:80]!r}")
        return 1.0 - r["accuracy"]

    grpo_task = loop.Task(batches=source, loss=loss, count=count_tokens, source=source, evaluate=evaluate,
                          metrics=lambda: step_metrics(source, loss, d, tr.accum), eval_is_loss=False)
    ts = loop.start(tr, grpo_task, st.say)
    trim_error_log(error_log, source.batches)
    evals.resume(ts.step)
    evals.before = broadcast_object(evals.before, d)   # rank 0's file decides: evaluate() is a collective
    if evals.before is None:
        with sdpa_backend(t.attention_backend):
            evals.before = source.evaluate(held, d)
        evals.write()
        st.say(f"grpo eval before training: greedy accuracy {evals.before['accuracy']:.3f}, format "
               f"{evals.before['format_rate']:.3f}")
        for warning in start_warnings(evals.before, sec):
            st.say(f"grpo: warning: {warning}")
    summary = loop.run(tr, grpo_task, ts, st.say)
    after = evals.history[-1] if evals.history else evals.before
    errors = int(sum_over_ranks(torch.tensor(source.errors_total, device=st.device), d).item())
    summary.update(reward_errors=errors, eval_accuracy_before=evals.before["accuracy"],
                   eval_accuracy_after=after["accuracy"],
                   eval_format_before=evals.before["format_rate"], eval_format_after=after["format_rate"],
                   eval_items=len(held), train_problems=len(train), problems=report)
    return finish(st, tr, summary)


def start_warnings(before: dict, sec: GRPOConfig) -> list[str]:
    """What the evaluation before training says GRPO cannot learn from this start: samples that never show what
    the reward pays for give every group one reward, and so no signal (measured: SmolLM2-135M-Instruct straight
    from import wrote the format in 0 of 200 answers, and 40 GPU steps moved nothing; BENCHMARKS.md)."""
    out = []
    if sec.reward is None and sec.format_reward > 0 and before["items"] and before["format_rate"] == 0:
        out.append(f"the start model writes the think-then-answer format in none of {before['items']} held-out "
                   f"answers, so the format bonus ({sec.format_reward:g}) will likely never be drawn: SFT on the "
                   f"format first (`kiln sft` with reasoning-gym:{sec.task} among sft.data.sources, as the "
                   "recipes do), then GRPO from that (grpo.base)")
    if before["items"] and before["accuracy"] == 0:
        out.append(f"the start model answers none of {before['items']} held-out problems; groups where every "
                   "sample scores the same carry no signal: an easier grpo.task_config, more grpo.group_size or "
                   "a higher grpo.temperature give the groups some right answers to learn from")
    return out


def trim_error_log(path: Path, batches: int) -> None:
    """Keep the errors of the micro-batches before `batches` (a resumed run samples the rest again; a fresh
    start, batches = 0, keeps none)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(ln)["micro_batch"] < batches:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):   # a line cut short by a crash
            continue
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


class EvalLog:
    """grpo_eval.json: the greedy accuracy before training and at each evaluation (rewritten each time; a resumed
    run keeps what it had up to its step)."""

    def __init__(self, path: Path, write: bool):
        self.path, self.writes = path, write
        self.before: dict | None = None
        self.history: list[dict] = []

    def resume(self, step: int) -> None:
        if step == 0 or not self.path.exists():
            return
        saved = json.loads(self.path.read_text(encoding="utf-8"))
        self.before = saved.get("before")
        self.history = [h for h in saved.get("evaluations", []) if h["step"] <= step]

    def add(self, step: int, result: dict) -> None:
        self.history.append({"step": step, **result})
        self.write()

    def write(self) -> None:
        if not self.writes:
            return
        after = self.history[-1] if self.history else None
        out = {"before": self.before, "after": after, "evaluations": self.history}
        self.path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
