"""The report's post-training part: for each stage a run wrote (sft, dpo, grpo), its data, training curve
end points, before/after figures and the chat model's replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

POST_STAGES = ("sft", "dpo", "grpo")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _losses(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def post_section(root: Path, stage_dirs: dict[str, Path] | None = None) -> list[str]:
    """Markdown lines for every post-training stage found under `root` (or at the given directories)."""
    out: list[str] = []
    for name in POST_STAGES:
        d = (stage_dirs or {}).get(name, root / name)
        summary = _read(d / "summary.json")
        if summary is None:
            continue
        out += [f"## Post-training: {name}", "", f"Run directory: `{d}`", ""]
        data = _read(d / "data_report.json")
        if data:
            out.append(f"- data: {data.get('train_conversations', 0):,} training and {data.get('val_conversations', 0):,} "
                       f"validation conversations, {data.get('train_assistant_tokens', 0):,} assistant tokens trained on")
        steps = [r for r in _losses(d / "metrics.jsonl") if "loss" in r]
        vals = [r for r in _losses(d / "metrics.jsonl") if "val_loss" in r]
        if steps:
            out.append(f"- training loss {steps[0]['loss']:.4f} (step {steps[0]['step']}) -> {steps[-1]['loss']:.4f} "
                       f"(step {steps[-1]['step']})")
            extra = {k: v for k, v in steps[-1].items() if k not in ("step", "loss", "lr", "grad_norm", "tokens",
                                                                        "tok_per_s", "elapsed_s", "mfu")}
            if extra:
                out.append("- last logged step: " + ", ".join(f"{k} {_fmt(v)}" for k, v in extra.items()
                                                               if isinstance(v, (int, float))))
        if vals:
            out.append(f"- validation loss {vals[-1]['val_loss']:.4f} at step {vals[-1]['step']}")
        if summary.get("adapter"):
            out.append(f"- LoRA adapter (PEFT format): `{summary['adapter']}`")
        for fname in (f"{name}_eval.json",):
            ev = _read(d / fname)
            if isinstance(ev, dict) and "before" in ev and "after" in ev:
                keys = [k for k in ev["after"] if isinstance(ev["after"][k], (int, float))]
                out += ["", "| held out | before | after |", "|---|---:|---:|"]
                out += [f"| {k} | {_fmt(ev['before'].get(k))} | {_fmt(ev['after'][k])} |" for k in keys]
        samples = _read(d / "samples.json")
        if samples:
            out += ["", "Replies (greedy, through the chat template):", ""]
            for s in samples:
                end = "" if s.get("stopped") else " *(no end-of-turn token)*"
                out += [f"- **{s['prompt']}** -> {s['reply'].strip()[:300]!r}{end}"]
        out.append("")
    return out
