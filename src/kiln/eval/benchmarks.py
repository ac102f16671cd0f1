"""`eval.benchmarks`: each configured benchmark scored with one Scorer, as report-card rows plus details.

A base model gets the field's base-model prompts (MMLU's letter and cloze formats by log-likelihood,
HumanEval's code completion, GSM8K-style k-shot maths). A chat scorer (`Scorer.chat`) puts each prompt in
a user turn of the chat template; multiple choice in the letter format is then answered by generation
and the letter extracted from the reply (how chat models are scored), cloze stays a log-likelihood.

A benchmark that fails (a missing package, a malformed file) does not stop the others: its row says
why, and `kiln eval` lists it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from kiln.eval.report_card import card_entry, harness_version
from kiln.eval.scoring import Scorer


def run_benchmarks(scorer: Scorer, specs: Sequence) -> tuple[list[dict], dict[str, dict]]:
    """(report card rows, per-benchmark details keyed by row name) for `eval.benchmarks`."""
    card: list[dict] = []
    details: dict[str, dict] = {}
    for spec in specs:
        t0 = time.perf_counter()
        label = spec.name + (f":{spec.path}" if spec.path else "")
        print(f"benchmark {label}{f' (first {spec.limit} items)' if spec.limit else ''} ...", flush=True)
        try:
            rows = RUNNERS[spec.name](scorer, spec)
        except (ValueError, FileNotFoundError, ImportError) as e:
            print(f"benchmark {label} not scored: {e}")
            card.append({"benchmark": label, "format": "-", "n": 0, "harness": "kiln", "error": str(e)})
            continue
        seconds = time.perf_counter() - t0
        print(f"benchmark {label}: {len(rows)} score(s) in {seconds:.1f}s", flush=True)
        for row, detail in rows:
            row["seconds"] = seconds / len(rows)
            row["chat"] = scorer.chat
            card.append(row)
            details[f"{row['benchmark']}/{row['format']}/{row.get('shots', 0)}-shot"] = detail
    return card, details


def _limited(items: list, limit: int) -> list:
    return items[:limit] if limit else items


def _mmlu(scorer: Scorer, spec) -> list[tuple[dict, dict]]:
    from kiln.data.benchmarks import get

    items = _limited(get("mmlu").records(), spec.limit)
    return [_choice_rows("mmlu", scorer, items, fmt, spec) for fmt in spec.formats]


def _choice_rows(name: str, scorer: Scorer, items: list[dict], fmt: str, spec) -> tuple[dict, dict]:
    from kiln.eval.choice import evaluate_choices
    from kiln.eval.choice_chat import evaluate_choices_generative

    if scorer.chat and fmt == "letter":
        r = evaluate_choices_generative(scorer, items, spec.shots or 0)
        return {**r.summary(), **card_entry(name, r, scorer, spec.seed), "unparsed": r.unparsed}, {"per_item": r.per_item}
    r = evaluate_choices(scorer, items, fmt, spec.shots or 0)
    return card_entry(name, r, scorer, spec.seed), {"per_item": r.per_item}


def _mc(scorer: Scorer, spec) -> list[tuple[dict, dict]]:
    from kiln.eval.mc_file import evaluate_mc_file

    out = []
    for fmt in spec.formats:
        use = "letter_generative" if scorer.chat and fmt == "letter" else fmt
        r = evaluate_mc_file(scorer, spec.path, use, spec.shots or 0)
        if spec.limit:
            print(f"benchmark mc:{spec.path}: limit is ignored for a user's file (all {r.n} items scored)")
        row = {**r.summary(), **card_entry(f"mc:{spec.path}", r, scorer, spec.seed)}
        out.append((row, {"per_item": r.per_item, "quarantine": r.quarantine}))
    return out


def _maths(scorer: Scorer, spec) -> list[tuple[dict, dict]]:
    from kiln.eval.maths import evaluate_maths

    size = min(spec.items, spec.limit) if spec.limit else spec.items
    r = evaluate_maths(scorer, task=spec.task, size=size, seed=spec.seed, k=spec.shots,
                       max_new_tokens=spec.max_new_tokens)
    row = r.summary()
    row.update(batch_size=scorer.batch_size, bf16=scorer.bf16, seed=spec.seed)
    return [(row, {"per_item": r.per_item})]


def _bigbench(scorer: Scorer, spec) -> list[tuple[dict, dict]]:
    from kiln.eval.bigbench import evaluate_bigbench

    r = evaluate_bigbench(scorer, spec.path, k=spec.shots or 0, max_new_tokens=min(spec.max_new_tokens, 128))
    row = r.summary()
    row.update(batch_size=scorer.batch_size, bf16=scorer.bf16)
    return [(row, {"per_item": r.per_item})]


def _humaneval(scorer: Scorer, spec) -> list[tuple[dict, dict]]:
    from kiln.data.benchmarks import get
    from kiln.eval.humaneval import evaluate_humaneval

    problems = _limited(get("humaneval").records(), spec.limit)
    ks = tuple(k for k in (1, 10, 100) if k <= spec.samples)
    r = evaluate_humaneval(scorer, problems, n=spec.samples, ks=ks, temperature=spec.temperature,
                           max_new_tokens=spec.max_new_tokens, seed=spec.seed)
    row = {"benchmark": "humaneval", "harness": "kiln", "harness_version": harness_version(), **r.summary(),
           "seed": spec.seed,
           "batch_size": scorer.batch_size, "bf16": scorer.bf16}
    return [(row, {"per_problem": [dataclasses.asdict(x) for x in r.problems]})]


RUNNERS = {"mmlu": _mmlu, "mc": _mc, "maths": _maths, "bigbench": _bigbench, "humaneval": _humaneval}
