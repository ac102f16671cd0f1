"""Prompt suites: a user's own in-domain and out-of-domain prompts, answered by several checkpoints.

A suite is a YAML file:

    in_domain:                # prompts like the training data
      - "Patient presents with"
    out_of_domain:            # prompts unlike it (does the model still make sense?)
      - "The capital of France is"

Any other top-level key of lists is a group of its own; a plain list is one group, `prompts`. Each
prompt is a string, or a mapping with `prompt` and optionally `max_new_tokens`. Generation is greedy,
so two runs of the same checkpoint answer alike and checkpoints differ only by what they learned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import yaml


def load_suite(path: Path) -> dict[str, list[dict]]:
    """{group: [{"prompt": str, "max_new_tokens": int | None}, ...]}; errors name the file and key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"prompt suite {path} does not exist (eval.suites)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt suite {path}: not valid YAML ({e})") from e
    if isinstance(data, list):
        data = {"prompts": data}
    if not isinstance(data, dict) or not data:
        raise ValueError(f"prompt suite {path}: expected `in_domain:` / `out_of_domain:` lists of prompts")
    groups: dict[str, list[dict]] = {}
    for group, prompts in data.items():
        if not isinstance(prompts, list):
            raise ValueError(f"prompt suite {path}: `{group}` must be a list of prompts, got {type(prompts).__name__}")
        items = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                text, budget = p.get("prompt"), p.get("max_new_tokens")
                if budget is not None and (not isinstance(budget, int) or budget < 1):
                    raise ValueError(f"prompt suite {path}: {group}[{i}].max_new_tokens must be a positive integer")
            else:
                text, budget = p, None
            if not isinstance(text, str) or not text:
                raise ValueError(f"prompt suite {path}: {group}[{i}] must be a non-empty string or have `prompt:`")
            items.append({"prompt": text, "max_new_tokens": budget})
        groups[str(group)] = items
    return groups


def spaced(items: Sequence, k: int) -> list:
    """`k` of `items`, evenly spaced, the last always included (all of them when there are fewer)."""
    n = len(items)
    if n <= k:
        return list(items)
    picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]
    return [items[i] for i in picks]


def answer_suites(suites: dict[str, dict[str, list[dict]]], generate: Callable[[list[str], int], list[str]],
                  max_new_tokens: int) -> dict[str, dict[str, list[str]]]:
    """One checkpoint's greedy answers: {suite: {group: [answer, ...]}}; `generate(prompts, budget)`
    answers a batch of prompts sharing a budget."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, groups in suites.items():
        out[name] = {}
        for group, items in groups.items():
            answers: list[str] = [""] * len(items)
            by_budget: dict[int, list[int]] = {}
            for i, it in enumerate(items):
                by_budget.setdefault(it["max_new_tokens"] or max_new_tokens, []).append(i)
            for budget, idx in by_budget.items():
                for i, a in zip(idx, generate([items[i]["prompt"] for i in idx], budget)):
                    answers[i] = a
            out[name][group] = answers
    return out


def side_by_side(suites: dict[str, dict[str, list[dict]]], answers: dict[str, dict]) -> list[dict]:
    """Rows for the report: suite, group, prompt and each checkpoint's answer (keyed by checkpoint name)."""
    rows = []
    for name, groups in suites.items():
        for group, items in groups.items():
            for i, it in enumerate(items):
                rows.append({"suite": name, "group": group, "prompt": it["prompt"],
                             "answers": {ckpt: a[name][group][i] for ckpt, a in answers.items()}})
    return rows
