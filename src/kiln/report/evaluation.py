"""The report's evaluation sections, from `eval/*.json`: scores, divergence, benchmarks, memorisation, suites."""

from __future__ import annotations

from kiln.eval.report_card import render_table


def eval_section(ev: dict | None, card: list | None, mem: dict | None, suites: dict | None) -> list[str]:
    if not ev:
        return []
    out = ["## Evaluation", "", f"Checkpoint `{ev['checkpoint']}` (step {ev['step']})"
           + (", prompted through its chat template." if ev.get("chat") else "."), ""]
    rows = [(name, ev[name]) for name in ("val", "train") if name in ev] + list(ev.get("files", {}).items())
    if rows:
        out += ["| text | loss | perplexity | bits/byte | tokens |", "|---|---:|---:|---:|---:|"]
        out += [f"| {name} | {s['loss']:.4f} | {s['perplexity']:.2f} | {s['bits_per_byte']:.4f} | {s['tokens']:,} |"
                for name, s in rows]
        out.append("")
    if "train_val_gap" in ev:
        out += [f"Train/val gap {ev['train_val_gap']:+.4f}; unigram baseline {ev['unigram_baseline_loss']:.4f}; "
                f"uniform baseline {ev['uniform_baseline_loss']:.4f}.", ""]
    for w in (ev.get("divergence") or {}).get("warnings", []):
        out += [f"> **Warning (step {w['step']}):** {w['message']}", ""]
    for what, why in ev.get("skipped", {}).items():
        out += [f"Not measured: {what} ({why}).", ""]
    if card:
        out += ["### Benchmarks", "", render_table(card), "",
                "Each row's prompt format, shots, batch size and harness version are in `eval/report_card.json`; "
                "per-item outcomes in `eval/benchmarks.json`.", ""]
    out += memorisation_section(mem)
    out += suites_section(suites)
    return out


def memorisation_section(mem: dict | None) -> list[str]:
    if not mem:
        return []
    out = ["### Memorisation", "",
           f"Greedy continuations of {mem['new_tokens']} tokens after {mem['prefix_tokens']}-token prefixes, "
           f"matched against {mem['index_tokens']:,} training tokens: the share whose longest verbatim overlap with "
           f"the training data reaches {mem['threshold']} tokens.", "",
           "| prefixes from | n | ≥ threshold | mean longest overlap | max | extractable |", "|---|---:|---:|---:|---:|---:|"]
    for group, g in mem["groups"].items():
        extract = f"{g['extractable']:.1%}" if g.get("extractable") is not None else "—"
        out.append(f"| {group} | {g['n']} | {g['share_at_threshold']:.1%} | {g['mean_longest']:.1f} | {g['max_longest']} "
                   f"| {extract} |")
    out.append("")
    for ex in mem.get("examples", [])[:3]:
        out += [f"{ex['group']} prefix, {ex['match_tokens']} tokens in common with the training data:", "", "```",
                ex["prompt"] + ex["generation"], "```", ""]
    return out


def suites_section(suites: dict | None) -> list[str]:
    if not suites or not suites.get("rows"):
        return []
    ckpts = suites["checkpoints"]
    out = ["### Prompt suites", "", "Greedy answers, one column per checkpoint.", "",
           "| suite / group | prompt | " + " | ".join(ckpts) + " |", "|---|---|" + "---|" * len(ckpts)]
    for r in suites["rows"]:
        cells = [_cell(r["answers"].get(c, "")) for c in ckpts]
        out.append(f"| {r['suite']} / {r['group']} | {_cell(r['prompt'])} | " + " | ".join(cells) + " |")
    return out + [""]


def _cell(text: str, limit: int = 160) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "↵ ").strip() or "(empty)"
