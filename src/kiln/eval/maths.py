"""Maths word problems: reasoning-gym's GSM8K-style templates (and its other numeric tasks), exact match.

Items come from reasoning-gym, generated offline from (task, config, seed, size): the same four give the
same items on every machine, nothing downloads. The default task is `gsm_symbolic` (GSM8K problems turned
into templates, with a worked solution in GSM8K's own form ending `#### N`); any reasoning-gym task whose
answers are numbers works (`basic_arithmetic`, `chain_sum`, ...).

Base models: k-shot, lm-evaluation-harness's `gsm8k` task (v3.0) format, with its fewshot and target
delimiters (`\\n\\n` and one space):

    Question: {shot question}\\nAnswer: {shot worked solution ending "#### N"}\\n\\n      (k times)
    Question: {question}\\nAnswer:

greedy until "Question:", "</s>" or "<|im_end|>" (lm-eval's `until`), at most 256 new tokens (lm-eval's
default `max_gen_toks`).

Chat models (`scorer.chat`): zero-shot, one user message, `CHAT_PROMPT` (the question, then an instruction
to end with "The answer is N."); the scorer applies the chat template; no stop string, the reply ends at
the template's end-of-turn token.

Shots come from the same task with seed `seed + SHOT_SEED_OFFSET`: reasoning-gym draws item i of seed s
from `Random(s + i)`, so a nearby seed would replay test items; the offset keeps the two streams apart for
any size below it, and shots whose question equals a test question are dropped all the same. Every item
gets the same k shots (as GSM8K-CoT's fixed exemplars do; lm-eval samples per item from the train split).

Judging (answers.py has the extraction rules): the primary score, `exact_match`, takes the final number
of the generation (`####`, "The answer is", ... else the last number) and compares it with the item's
answer as numbers (exact for whole numbers, 1e-6 relative otherwise). The task's own verifier
(`dataset.score_answer`) judges the same extracted answer as a second opinion: `verifier_acc` counts the
items it gives a full 1.0 (gsm_symbolic gives 0.01 to any wrong number); `disagreements` counts the items
where the two differ (basic_arithmetic's verifier compares strings, so "-4.0" fails it and passes ours).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kiln.eval.answers import extract_number, same_number
from kiln.eval.report_card import harness_version

INSTALL = "pip install 'llmkiln[post]'"
DEFAULT_TASK = "gsm_symbolic"
SHOT_SEED_OFFSET = 10**9
STOP = ("Question:", "</s>", "<|im_end|>")
CHAT_PROMPT = ("Solve this maths problem. Work it out step by step, then end your reply with a line of the form "
               "\"The answer is N.\", where N is the final number alone (no units).\n\n{question}")
BASE_PROMPT = ("[Question: {shot question}\\nAnswer: {worked solution}\\n#### {N}\\n\\n] x k + "
               "Question: {question}\\nAnswer:")


@dataclasses.dataclass(frozen=True)
class MathsItem:
    question: str
    answer: str
    """The reference answer (a number, as reasoning-gym writes it)."""
    solution: str
    """A worked solution ending in GSM8K's `#### N` line: what a shot shows."""
    raw: Mapping[str, Any] = dataclasses.field(repr=False)
    """reasoning-gym's entry (question, answer, metadata): what its verifier needs."""


class MathsSet:
    """Items of one reasoning-gym task and the task's verifier."""

    def __init__(self, task: str, items: list[MathsItem], dataset, seed: int, config: Mapping[str, Any]):
        self.task, self.items, self.dataset, self.seed, self.config = task, items, dataset, seed, dict(config)

    def verify(self, extracted: str | None, item: MathsItem) -> float:
        """The task's own score of an extracted answer, in [0, 1]; 0 where the verifier fails on it."""
        try:
            return float(self.dataset.score_answer(extracted, dict(item.raw)))
        except Exception:   # noqa: BLE001 - model output the verifier cannot parse is a wrong answer, not a crash
            return 0.0

    def __len__(self) -> int:
        return len(self.items)


def worked_solution(entry: Mapping[str, Any]) -> str:
    """GSM8K's answer form for a reasoning-gym entry: the task's worked solution (`answer_cot`, gsm_symbolic),
    or `expression = answer` (basic_arithmetic, chain_sum), then `#### answer`."""
    answer = str(entry["answer"]).strip()
    meta = entry.get("metadata") if isinstance(entry.get("metadata"), Mapping) else {}
    cot = meta.get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        body = re.sub(r"\n?####.*\Z", "", cot.strip(), flags=re.DOTALL).strip()
    elif isinstance(meta.get("expression"), str) and meta["expression"].strip():
        body = f"{meta['expression'].strip()} = {answer}"
    else:
        body = ""
    return f"{body}\n#### {answer}" if body else f"#### {answer}"


def make_set(task: str = DEFAULT_TASK, seed: int = 0, size: int = 100,
             config: Mapping[str, Any] | None = None) -> MathsSet:
    """`size` items of reasoning-gym task `task` from `seed` (`config`: the task's keyword arguments)."""
    if size <= 0:
        raise ValueError(f"maths task {task!r}: size={size} must be > 0")
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ValueError(f"the maths benchmark generates its items with reasoning-gym, which is not installed: "
                         f"{INSTALL}") from None
    if task not in DATASETS:
        close = [n for n in sorted(DATASETS) if task.split("_")[0] in n][:8]
        raise ValueError(f"unknown reasoning-gym task {task!r}" + (f"; close ones: {', '.join(close)}" if close else "")
                         + "; numeric ones that suit this benchmark: gsm_symbolic, basic_arithmetic, chain_sum")
    config = dict(config or {})
    try:
        dataset = reasoning_gym.create_dataset(task, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as e:   # an unknown key, a value its validate() refuses
        raise ValueError(f"reasoning-gym task {task!r} refuses config {config}: {type(e).__name__}: {e}") from None
    items = []
    for i, entry in enumerate(dataset):
        answer = str(entry["answer"]).strip()
        if not re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
            raise ValueError(f"reasoning-gym task {task!r}: item {i} has the answer {answer!r}, not a number; the "
                             "maths benchmark judges numbers only (gsm_symbolic, basic_arithmetic, chain_sum suit it)")
        items.append(MathsItem(str(entry["question"]), answer, worked_solution(entry), entry))
    return MathsSet(task, items, dataset, seed, config)


def pick_shots(task: str, k: int, seed: int, config: Mapping[str, Any] | None, avoid: set[str]) -> list[MathsItem]:
    """k items of `task` from `seed` whose questions are not in `avoid` (the test questions)."""
    if k == 0:
        return []
    pool = make_set(task, seed, 4 * k + 8, config).items
    shots = [it for it in pool if it.question not in avoid][:k]
    if len(shots) < k:
        raise ValueError(f"maths task {task!r}: only {len(shots)} of {len(pool)} shot candidates (seed {seed}) differ "
                         f"from the test items; use fewer shots than {k}")
    return shots


def base_prompt(item: MathsItem, shots: Sequence[MathsItem]) -> str:
    """lm-eval gsm8k's k-shot prompt (see the module docstring)."""
    parts = [f"Question: {s.question}\nAnswer: {s.solution}\n\n" for s in shots]
    return "".join(parts) + f"Question: {item.question}\nAnswer:"


def chat_prompt(item: MathsItem) -> str:
    """The user message for a chat model."""
    return CHAT_PROMPT.format(question=item.question)


@dataclasses.dataclass
class MathsResult:
    task: str
    seed: int
    shot_seed: int | None
    shots: int
    chat: bool
    n: int
    exact_match: float
    """Primary: the extracted final number equals the answer (answers.same_number)."""
    verifier_acc: float
    """The task's verifier gives the extracted answer a full 1.0."""
    verifier_mean: float
    """The verifier's mean score, partial credit included."""
    disagreements: int
    """Items where exact_match and the verifier disagree."""
    unparsed: int
    """Generations with no number in them."""
    max_new_tokens: int
    generator: str
    per_item: list[dict]
    """Per item: question, target, generation, extracted, correct, verifier."""

    def summary(self) -> dict:
        """A report-card row (the keys `report_card.render_table` reads, and how to reproduce the score)."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k != "per_item"}
        row.update(benchmark=f"maths/{self.task}", format="exact_match", harness="kiln",
                   harness_version=harness_version(),
                   shots_from=f"{self.task} seed {self.shot_seed}" if self.shots else None,
                   prompt="chat: " + CHAT_PROMPT if self.chat else BASE_PROMPT,
                   stop=[] if self.chat else list(STOP))
        return row


def judge(maths: MathsSet, generations: Sequence[str]) -> list[dict]:
    """Per-item records of generations (one per item, in order)."""
    records = []
    for item, gen in zip(maths.items, generations, strict=True):
        extracted = extract_number(gen)
        score = maths.verify(extracted, item)
        records.append({"question": item.question, "target": item.answer, "generation": gen, "extracted": extracted,
                        "correct": same_number(extracted, item.answer), "verifier": score})
    return records


def evaluate_maths(scorer, task: str = DEFAULT_TASK, size: int = 100, seed: int = 0, k: int | None = None,
                   config: Mapping[str, Any] | None = None, max_new_tokens: int = 256,
                   shot_seed: int | None = None) -> MathsResult:
    """Generate greedily for `size` items of `task` and judge the final numbers.

    k: shots for a base model (default 5, lm-eval's gsm8k); a chat scorer runs zero-shot and refuses k > 0.
    """
    chat = bool(getattr(scorer, "chat", False))
    if k is None:
        k = 0 if chat else 5
    if k < 0:
        raise ValueError(f"maths: k={k} shots must be >= 0")
    if chat and k:
        raise ValueError(f"maths: a chat model is evaluated zero-shot with an instruction (k=0), not k={k}")
    maths = make_set(task, seed, size, config)
    shot_seed = (seed + SHOT_SEED_OFFSET if shot_seed is None else shot_seed) if k else None
    shots = pick_shots(task, k, shot_seed, config, {it.question for it in maths.items}) if k else []
    if chat:
        gens = scorer.generate_many([chat_prompt(it) for it in maths.items], max_new_tokens)
    else:
        gens = scorer.generate_many([base_prompt(it, shots) for it in maths.items], max_new_tokens, stop=STOP)
    records = judge(maths, [g[0] for g in gens])
    n = len(records)
    full = [r["verifier"] >= 1.0 for r in records]
    return MathsResult(
        task=task, seed=seed, shot_seed=shot_seed, shots=k, chat=chat, n=n,
        exact_match=sum(r["correct"] for r in records) / n, verifier_acc=sum(full) / n,
        verifier_mean=sum(r["verifier"] for r in records) / n,
        disagreements=sum(r["correct"] != f for r, f in zip(records, full)),
        unparsed=sum(r["extracted"] is None for r in records), max_new_tokens=max_new_tokens,
        generator=f"reasoning-gym {harness_version('reasoning-gym')} {task} {maths.config or ''}".rstrip(),
        per_item=records)
