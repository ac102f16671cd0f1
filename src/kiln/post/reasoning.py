"""Verifiable tasks for post-training: reasoning-gym's generated problems, or a user's own list, with their scorers.

One task object serves three stages: SFT data (`worked_answer` as the assistant turn), DPO pair building
(sampled answers ranked by `Task.score`) and GRPO (the reward). All of them use the same answer format:

    <think>
    reasoning
    </think>
    <answer>final answer</answer>

`SYSTEM_PROMPT` asks for it, `format_ok` checks it, `extract_answer` takes the final answer out of a completion
and `Task.score` hands that to the task's verifier (reasoning-gym's own `score_answer`, or exact match for a
user task). reasoning-gym generates problems offline from a seed, so the same (name, config, seed, size) gives
the same items on every machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL = "pip install 'llmkiln[post]'"

SYSTEM_PROMPT = (
    "Solve the problem. First think it through step by step inside <think> </think> tags, then give only the "
    "final answer inside <answer> </answer> tags, exactly like this:\n"
    "<think>\nyour reasoning\n</think>\n<answer>your final answer</answer>"
)
"""The system prompt of reasoning tasks (SFT data built here, GRPO's default)."""

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def extract_answer(text: str) -> str:
    """The final answer in a completion, stripped.

    In order: the content of the last closed `<answer>...</answer>`; the rest of the text after a last
    `<answer>` left open (a completion cut by max_new_tokens); else the last number in the text (thousands
    commas removed: `1,234` -> `1234`), since most tasks have numeric answers and a model that skipped the
    format often ends with the number; else the last non-empty line; "" for empty text. The fallbacks can
    only help the verifier: a completion without the format still earns nothing from `format_ok`.
    """
    closed = _ANSWER.findall(text)
    if closed:
        return closed[-1].strip()
    if "<answer>" in text:
        return text[text.rfind("<answer>") + len("<answer>"):].strip()
    numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
    if numbers:
        return numbers[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def format_ok(text: str) -> bool:
    """The completion is exactly `<think>...</think>` then `<answer>...</answer>` (whitespace around and between
    allowed, nothing else), with one tag of each kind and a non-empty answer."""
    m = _FORMAT.match(text)
    if not m or not m.group(2).strip():
        return False
    return all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


def format_answer(reasoning: str, answer: str) -> str:
    """`reasoning` and `answer` in the think-then-answer format (`format_ok` holds for any non-empty answer)."""
    reasoning = reasoning.strip()
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer.strip()}</answer>" if reasoning else \
        f"<think>\n</think>\n<answer>{answer.strip()}</answer>"


@dataclass(frozen=True)
class TaskItem:
    question: str
    answer: str
    """The reference answer as text."""
    raw: Mapping[str, Any] = field(repr=False)
    """The item as the task made it: reasoning-gym's entry (question, answer, metadata), which its verifier
    needs, or the user's dict."""


def worked_answer(item: TaskItem) -> str:
    """An SFT target for `item` in the think-then-answer format.

    The reasoning comes from the item's metadata when it carries some: a worked solution (`answer_cot`, as
    gsm_symbolic gives; `cot`, `solution`), or the expression the answer evaluates (basic_arithmetic,
    chain_sum: `expr = answer`). Otherwise the think block is left empty: an invented "reasoning" would teach
    the model to write filler; the format (and the answer) is what SFT is for here, GRPO does the rest.
    """
    meta = item.raw.get("metadata") if isinstance(item.raw, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    for key in ("answer_cot", "cot", "solution"):
        text = meta.get(key)
        if isinstance(text, str) and text.strip():
            # gsm_symbolic's worked solution ends with GSM8K's "#### 42" line: the answer tag says it instead
            return format_answer(re.sub(r"\n?####.*\Z", "", text.strip(), flags=re.DOTALL), item.answer)
    expression = meta.get("expression")
    if isinstance(expression, str) and expression.strip():
        return format_answer(f"{expression.strip()} = {item.answer}", item.answer)
    return format_answer("", item.answer)


class Task:
    """Problems of one kind and their verifier. `score(completion, item)` is in [0, 1] for reasoning-gym tasks
    (some give partial credit), 0 or 1 for user tasks."""

    def __init__(self, name: str, items: list[TaskItem], verify: Callable[[str, TaskItem], float]):
        self.name = name
        self.items = items
        self._verify = verify

    def score(self, completion: str, item: TaskItem) -> float:
        """The verifier's score of the answer extracted from `completion` (see `extract_answer`)."""
        return self._verify(extract_answer(completion), item)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {len(self.items)} items)"


def make_task(name: str, config: Mapping[str, Any] | None = None, seed: int = 0, size: int = 100) -> Task:
    """`size` problems of task `name`, generated from `seed`.

    name: a reasoning-gym dataset (`basic_arithmetic`, `chain_sum`, `gsm_symbolic`, ...; `config` holds its
    keyword arguments), or `path.py:function` / `module:function`: a function called with `config` as keyword
    arguments, returning a list of {"question", "answer"} dicts, scored by exact match of the extracted answer
    (at most `size` of them, a sample chosen by `seed` when there are more).
    """
    config = dict(config or {})
    if size <= 0:
        raise ValueError(f"task {name!r}: size={size} must be > 0")
    if ":" in name:
        return _user_task(name, config, seed, size)
    return _gym_task(name, config, seed, size)


def _gym_task(name: str, config: dict, seed: int, size: int) -> Task:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ValueError(f"task {name!r} is a reasoning-gym dataset, and reasoning-gym is not installed: "
                         f"{INSTALL}") from None
    if name not in DATASETS:
        close = [n for n in sorted(DATASETS) if name.split("_")[0] in n][:8] or sorted(DATASETS)[:12]
        raise ValueError(f"unknown reasoning-gym task {name!r}; some known ones: {', '.join(close)} "
                         f"({len(DATASETS)} in all: `python -c \"import reasoning_gym.factory as f; "
                         "print(sorted(f.DATASETS))\"`), or give `path.py:function` for your own")
    try:
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as e:   # an unknown key, a value its validate() refuses
        raise ValueError(f"reasoning-gym task {name!r} refuses config {config}: {type(e).__name__}: {e}") from None
    items = [TaskItem(str(entry["question"]), str(entry["answer"]), entry) for entry in dataset]

    def verify(answer: str, item: TaskItem) -> float:
        try:
            return float(dataset.score_answer(answer, item.raw))
        except Exception:   # noqa: BLE001 - model output the verifier cannot parse is a wrong answer, not a crash
            return 0.0

    return Task(name, items, verify)


def _user_task(name: str, config: dict, seed: int, size: int) -> Task:
    fn = load_function(name, what="task")
    try:
        raw = fn(**config)
    except TypeError as e:
        raise ValueError(f"task {name!r}: calling it with config {config} failed: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"task {name!r} returned {type(raw).__name__}{' (empty)' if raw == [] else ''}; it must "
                         'return a non-empty list of {"question": ..., "answer": ...} dicts')
    items = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not {"question", "answer"} <= set(entry):
            raise ValueError(f"task {name!r}: item {i} is {str(entry)[:80]!r}; every item needs \"question\" "
                             'and "answer"')
        items.append(TaskItem(str(entry["question"]), str(entry["answer"]).strip(), entry))
    if len(items) > size:
        items = random.Random(seed).sample(items, size)

    def verify(answer: str, item: TaskItem) -> float:
        return float(_squash(answer) == _squash(item.answer))

    return Task(name, items, verify)


def _squash(text: str) -> str:
    """Exact match up to surrounding and repeated whitespace."""
    return " ".join(text.split())


def load_function(spec: str, what: str = "function") -> Callable:
    """The function named by `path.py:function` (a file, loaded as a module) or `module:function` (imported)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"{what} {spec!r}: expected `path.py:function` or `module:function`")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: {path} does not exist (cwd: {Path.cwd()})")
        module_spec = importlib.util.spec_from_file_location(f"kiln_user_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import {target!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ValueError(f"{what} {spec!r}: {target} has no function {attr!r}; it has: {', '.join(names[:12])}")
    return fn
