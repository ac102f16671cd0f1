"""BIG-bench JSON tasks a user brings: `task.json` (or a directory holding one), scored as BIG-bench scores them.

The prompt of an example is BIG-bench's `default_format_fn` (bigbench/api/json_task.py), with its defaults:

    {task_prefix}                                            once, at the start (default "")
    [{example_input_prefix}{shot input}[{choice_prefix}{choice}...]{example_output_prefix}{shot answer}
     {few_shot_example_separator}] x k                        (separator default "\\n")
    {example_input_prefix}{input}[{choice_prefix}{choice}...]{example_output_prefix}

example_input_prefix defaults to "\\nQ: ", example_output_prefix to "\\nA: ", choice_prefix to
"\\n  choice: "; choices are appended (append_choices_to_input, default true) in a permutation of their
sorted texts drawn from `numpy.random.RandomState(seed)` made afresh per example, seed 42: the 0-shot
prompt is then the one lm-evaluation-harness's BIG-bench JSON task (v0.3, `BigBenchJsonTask`) builds.

Metrics (the task's `metrics`; inferred per example when the file has none):
- multiple_choice_grade, for examples with `target_scores`: every choice text is scored as a
  continuation by log-likelihood; the grade is the target score of the highest one (ties: the first in
  file order, as choice.py; BIG-bench breaks ties by a hash), averaged over examples;
- exact_str_match, for examples with `target` (a string or a list of accepted strings; an example with
  only target_scores uses its best-scoring choice, as BIG-bench does): a greedy generation of up to
  `max_new_tokens`, post-processed as BIG-bench's `postprocess_output` does (cut after the first
  `stop_string`, then the first match of `output_regex`; when the task sets neither, BIG-bench's default
  regex `[^.?!;\\n]+`: the text up to the first sentence end or line end), stripped of surrounding
  whitespace, equal to a stripped target (BIG-bench compares without stripping; a BPE model's reply to
  "A: " usually starts with a space).
Other metrics (bleu, rouge, ...) are not computed; the result lists them. `preferred_score` picks the
`score` the report shows (default: the first computed metric in the task's order).

Shots: k other examples of the same kind (multiple choice or not) with a different input, drawn per
example from `random.Random(f"{seed}:{index}")`; a shot's answer is its best-scoring choice (first on
ties) or its first target. Generation stops early at `{few_shot_example_separator}{example_input_prefix}`
(the start of a next example), which the default regex cuts anyway.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.eval.report_card import harness_version

DEFAULT_REGEX = r"[^\.\?\!\;\n]+"
"""BIG-bench's `_DEFAULT_REGEX`: the output up to its first sentence end or line end."""
SUPPORTED = ("multiple_choice_grade", "exact_str_match")
DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "choice_prefix": "\n  choice: ", "few_shot_example_separator": "\n"}


@dataclasses.dataclass
class BigBenchTask:
    name: str
    path: Path
    description: str
    metrics: list[str]
    """The metrics kiln computes for this task, in the file's order."""
    unsupported: list[str]
    """Metrics the file names that kiln does not compute."""
    preferred_score: str
    examples: list[dict]
    """Distinct examples: input, target_scores (dict) and/or targets (list of str)."""
    duplicates: int
    """Examples dropped as exact duplicates of an earlier one (BIG-bench drops them too)."""
    task_prefix: str
    input_prefix: str
    output_prefix: str
    choice_prefix: str
    separator: str
    append_choices: bool
    stop_string: str | None
    output_regex: str | None


def _fail(path: Path, where: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {where}: {msg}")


def load_task(path: str | Path) -> BigBenchTask:
    """Read and check a BIG-bench `task.json` (or the directory holding it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        inner = path / "task.json"
        if not inner.is_file():
            raise ValueError(f"{path} is a directory without a task.json")
        path = inner
    if not path.is_file():
        raise ValueError(f"BIG-bench task {path} does not exist")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise _fail(path, "top level", f"a JSON object is needed, not {type(data).__name__}")
    if "examples" not in data:
        subtasks = sorted(p.parent.name for p in path.parent.glob("*/task.json"))
        if subtasks:
            raise _fail(path, "examples", f"missing: this task has subtasks; pass one of their directories "
                                          f"({', '.join(subtasks[:10])})")
        raise _fail(path, "examples", "missing (a list of {\"input\": ..., \"target\" or \"target_scores\": ...})")
    fields = {}
    for key, default in DEFAULTS.items():
        value = data.get(key, default)
        if not isinstance(value, str):
            raise _fail(path, key, f"must be a string, not {type(value).__name__}")
        fields[key] = value
    append = data.get("append_choices_to_input", True)
    if not isinstance(append, bool):
        raise _fail(path, "append_choices_to_input", f"must be true or false, not {append!r}")
    for key in ("stop_string", "output_regex"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _fail(path, key, f"must be a string, not {type(data[key]).__name__}")
    if data.get("output_regex") is not None:
        try:
            groups = re.compile(data["output_regex"]).groups
        except re.error as e:
            raise _fail(path, "output_regex", f"invalid regular expression: {e}") from None
        if groups > 1:   # re.findall would give tuples; BIG-bench asserts the same
            raise _fail(path, "output_regex", f"has {groups} groups; use non-capturing ones, (?:...)")
    named = data.get("metrics")
    if named is not None and (not isinstance(named, list) or not all(isinstance(m, str) for m in named)):
        raise _fail(path, "metrics", "must be a list of metric names")
    examples, duplicates = _examples(path, data["examples"], named)
    if named is None:
        metrics = [m for m, used in (("multiple_choice_grade", any("target_scores" in e for e in examples)),
                                     ("exact_str_match", any("target_scores" not in e for e in examples))) if used]
    else:
        metrics = [m for m in named if m in SUPPORTED]
        if not metrics:
            raise _fail(path, "metrics", f"{named} names none that kiln computes ({', '.join(SUPPORTED)})")
    preferred = data.get("preferred_score", metrics[0])
    if preferred not in metrics:
        preferred = metrics[0]   # a metric kiln does not compute (bleu, ...): the report says which it shows
    return BigBenchTask(
        name=str(data.get("name") or path.parent.name), path=path, description=str(data.get("description", "")),
        metrics=metrics, unsupported=[m for m in (named or []) if m not in SUPPORTED], preferred_score=preferred,
        examples=examples, duplicates=duplicates, task_prefix=fields["task_prefix"],
        input_prefix=fields["example_input_prefix"], output_prefix=fields["example_output_prefix"],
        choice_prefix=fields["choice_prefix"], separator=fields["few_shot_example_separator"], append_choices=append,
        stop_string=data.get("stop_string"), output_regex=data.get("output_regex"))


def _examples(path: Path, raw: Any, metrics: list[str] | None) -> tuple[list[dict], int]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "examples", "must be a non-empty list")
    seen: set[str] = set()
    out = []
    for i, ex in enumerate(raw):
        where = f"examples[{i}]"
        if not isinstance(ex, dict):
            raise _fail(path, where, f"must be an object, not {type(ex).__name__}")
        if not isinstance(ex.get("input"), str):
            raise _fail(path, f"{where}.input", "missing" if "input" not in ex else "must be a string")
        clean: dict[str, Any] = {"input": ex["input"], "index": i}
        if "target_scores" in ex:
            ts = ex["target_scores"]
            if not isinstance(ts, dict) or len(ts) < 2:
                raise _fail(path, f"{where}.target_scores", "must map at least 2 choice texts to scores")
            for choice, score in ts.items():
                if isinstance(score, bool) or not isinstance(score, (int, float)):
                    raise _fail(path, f"{where}.target_scores[{choice!r}]", f"score must be a number, not {score!r}")
            clean["target_scores"] = {str(c): float(s) for c, s in ts.items()}
        if "target" in ex:
            t = ex["target"]
            targets = [t] if isinstance(t, str) else t
            if not isinstance(targets, list) or not targets or not all(isinstance(x, str) for x in targets):
                raise _fail(path, f"{where}.target", "must be a string or a non-empty list of strings")
            clean["targets"] = targets
        if "target_scores" not in clean and "targets" not in clean:
            raise _fail(path, where, "has neither \"target\" nor \"target_scores\"")
        if metrics is not None and "multiple_choice_grade" in metrics and "exact_str_match" not in metrics \
                and "target_scores" not in clean:
            raise _fail(path, f"{where}.target_scores",
                        "missing: multiple_choice_grade is the only metric of the task kiln computes")
        if metrics is not None and "exact_str_match" in metrics and "targets" not in clean:
            clean["targets"] = [best_choice(clean["target_scores"])]   # BIG-bench's default_format_fn does the same
        key = json.dumps(ex, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(clean)
    return out, len(raw) - len(out)


def best_choice(target_scores: dict[str, float]) -> str:
    """The first choice with the highest score (BIG-bench's target for a multiple-choice example)."""
    top = max(target_scores.values())
    return next(c for c, s in target_scores.items() if s == top)


# ------------------------------------------------------------------ prompts


def choice_order(example: dict, seed: int) -> list[str]:
    """The order choices are listed in the input: a permutation of the sorted texts (lm-eval's port of BIG-bench)."""
    return [str(c) for c in np.random.RandomState(seed).permutation(sorted(example["target_scores"]))]


def example_input(task: BigBenchTask, example: dict, seed: int) -> str:
    """BIG-bench's formatted input: prefixes, the input, the appended choices."""
    text = example["input"]
    if "target_scores" in example and task.append_choices:
        text += task.choice_prefix + task.choice_prefix.join(choice_order(example, seed))
    return task.input_prefix + text + task.output_prefix


def shot_answer(example: dict) -> str:
    return best_choice(example["target_scores"]) if "target_scores" in example else example["targets"][0]


def pick_shots(task: BigBenchTask, k: int, seed: int) -> list[list[dict]]:
    """Per example, k others of its kind (multiple choice or not) with a different input."""
    if k == 0:
        return [[] for _ in task.examples]
    out = []
    for ex in task.examples:
        mc = "target_scores" in ex
        pool = [o for o in task.examples if ("target_scores" in o) == mc and o["input"] != ex["input"]]
        if len(pool) < k:
            raise ValueError(f"{task.path}: examples[{ex['index']}]: {k} shots need {k} other examples of its kind "
                             f"({'multiple choice' if mc else 'generative'}) with another input; there are {len(pool)}")
        out.append(random.Random(f"{seed}:{ex['index']}").sample(pool, k))
    return out


def prompt(task: BigBenchTask, example: dict, shots: Sequence[dict], seed: int) -> str:
    parts = [example_input(task, s, seed) + shot_answer(s) for s in shots] + [example_input(task, example, seed)]
    return task.task_prefix + task.separator.join(parts)


def postprocess(text: str, stop_string: str | None, output_regex: str | None) -> str:
    """BIG-bench's `postprocess_output`: cut after the first stop string (kept), then the first regex match
    ("" when none)."""
    if stop_string:
        i = text.find(stop_string)
        if i > 0:
            text = text[:i + len(stop_string)]
    if output_regex:
        text = next(iter(re.findall(output_regex, text)), "")
    return text


# ------------------------------------------------------------------ scoring


@dataclasses.dataclass
class BigBenchResult:
    name: str
    path: str
    shots: int
    seed: int
    n: int
    """Distinct examples scored (by either metric)."""
    metrics: dict[str, float]
    """multiple_choice_grade and/or exact_str_match, each a mean over the examples it applies to."""
    counts: dict[str, int]
    """Examples each metric was computed on."""
    preferred_score: str
    score: float
    unsupported_metrics: list[str]
    duplicates: int
    max_new_tokens: int
    per_item: list[dict]
    """Per example: index, prompt, and choices/logprobs/pred/grade and/or generation/response/targets/match."""

    def summary(self) -> dict:
        """A report-card row (the keys `report_card.render_table` reads, and how to reproduce the score)."""
        row = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("per_item", "metrics")}
        row.update(self.metrics)
        row.update(benchmark=f"bigbench/{self.name}", format="bigbench", harness="kiln",
                   harness_version=harness_version(),
                   shots_from=f"other examples of the task, random.Random('{self.seed}:index')" if self.shots else None)
        return row


def evaluate_bigbench(scorer, path: str | Path, k: int = 0, seed: int = 42, max_new_tokens: int = 64) -> BigBenchResult:
    """Score a BIG-bench JSON task: multiple-choice examples by log-likelihood, generative ones by exact match."""
    task = load_task(path)
    if k < 0:
        raise ValueError(f"bigbench: k={k} shots must be >= 0")
    shots = pick_shots(task, k, seed)
    prompts = [prompt(task, ex, s, seed) for ex, s in zip(task.examples, shots)]
    per_item = [{"index": ex["index"], "prompt": p} for ex, p in zip(task.examples, prompts)]
    metrics, counts = {}, {}

    if "multiple_choice_grade" in task.metrics:
        mc = [i for i, ex in enumerate(task.examples) if "target_scores" in ex]
        pairs = [(prompts[i], c) for i in mc for c in task.examples[i]["target_scores"]]
        scored = iter(scorer.loglikelihood(pairs))
        grades = []
        for i in mc:
            ts = task.examples[i]["target_scores"]
            lps = [next(scored).logprob for _ in ts]
            pred = max(range(len(lps)), key=lambda j: lps[j])
            choices = list(ts)
            grades.append(ts[choices[pred]])
            per_item[i].update(choices=choices, logprobs=lps, pred=pred, grade=grades[-1])
        if mc:
            metrics["multiple_choice_grade"], counts["multiple_choice_grade"] = sum(grades) / len(mc), len(mc)

    if "exact_str_match" in task.metrics:
        gen = [i for i, ex in enumerate(task.examples) if "targets" in ex]
        stop_at = task.separator + task.input_prefix
        stop = (stop_at,) if stop_at.strip() else ()
        outputs = scorer.generate_many([prompts[i] for i in gen], max_new_tokens, stop=stop) if gen else []
        regex = task.output_regex if task.output_regex or task.stop_string else DEFAULT_REGEX
        hits = []
        for i, out in zip(gen, outputs):
            response = postprocess(out[0], task.stop_string, regex).strip()
            targets = task.examples[i]["targets"]
            hits.append(response in [t.strip() for t in targets])
            per_item[i].update(generation=out[0], response=response, targets=targets, match=hits[-1])
        if gen:
            metrics["exact_str_match"], counts["exact_str_match"] = sum(hits) / len(gen), len(gen)

    if not metrics:
        raise ValueError(f"{task.path}: no example can be scored by {task.metrics}")
    preferred = task.preferred_score if task.preferred_score in metrics else next(iter(metrics))
    return BigBenchResult(
        name=task.name, path=str(task.path), shots=k, seed=seed, n=len(task.examples), metrics=metrics, counts=counts,
        preferred_score=preferred, score=metrics[preferred], unsupported_metrics=task.unsupported,
        duplicates=task.duplicates, max_new_tokens=max_new_tokens, per_item=per_item)
