"""The report card: every benchmark score with what it takes to reproduce it.

Each entry names the benchmark, its format (letter / cloze / exact_match / pass@k ...), the shots and
where they come from, the number of items, the harness and its version, the seed, the batch size and
padding side (which, tested, change no score), and the prompt template. `eval/report_card.json` holds
the list; the report renders it as a table.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence


def harness_version(name: str = "kiln") -> str:
    try:
        return importlib.metadata.version({"kiln": "llmkiln", "lm-eval": "lm_eval"}.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


PROMPTS = {
    "letter": "[The following are multiple choice questions (with answers) about {subject}.\\n\\n]"
              "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: -> ' A' | ' B' | ' C' | ' D'",
    "cloze": "[The following are questions (with answers) about {subject}.\\n\\n]"
             "Question: {question}\\nAnswer: -> ' {choice}' (acc: sum of log-probs; acc_norm: per character)",
}


def card_entry(benchmark: str, result, scorer=None, seed: int = 0, harness: str = "kiln",
               shots_from: str = "first k other items of the same subject") -> dict:
    """One report-card row from a ChoiceResult-like object (format, shots, n, acc[, acc_norm])."""
    row = {"benchmark": benchmark, "format": result.format, "shots": result.shots,
           "shots_from": shots_from if result.shots else None, "n": result.n, "acc": result.acc,
           "harness": harness, "harness_version": harness_version(harness), "seed": seed,
           "prompt": PROMPTS.get(result.format)}
    if getattr(result, "acc_norm", None) is not None:
        row["acc_norm"] = result.acc_norm
    if scorer is not None:
        row.update(batch_size=scorer.batch_size, padding="right", bf16=scorer.bf16, max_len=scorer.max_len)
    return row


SCORES = ("acc", "acc_norm", "exact_match", "verifier_acc", "multiple_choice_grade", "exact_str_match", "pass@1",
          "pass@10", "pass@100", "bits_per_byte")
"""The scores a row may carry, in the order the table shows them."""


def render_table(card: Sequence[dict]) -> str:
    """Markdown table of a report card."""
    lines = ["| benchmark | format | shots | n | score | harness | seed |", "|---|---|---|---|---|---|---|"]
    for r in card:
        if r.get("error"):
            lines.append(f"| {r['benchmark']} | - | - | - | not scored: {r['error']} | {r['harness']} | - |")
            continue
        metrics = [f"{k} {r[k]:.4f}" for k in SCORES if isinstance(r.get(k), float)]
        lines.append(f"| {r['benchmark']} | {r['format']} | {r.get('shots', 0)} | {r['n']} | {', '.join(metrics)} "
                     f"| {r['harness']} {r.get('harness_version', '')} | {r.get('seed', '')} |")
    return "\n".join(lines)
