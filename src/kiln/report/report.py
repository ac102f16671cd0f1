"""`report.md` and `loss.png`: what a run made, from the artifacts each stage wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.config import Config
from kiln.config.rundir import RunDir, write_text_atomic
from kiln.report.evaluation import eval_section
from kiln.report.post import POST_STAGES, post_section


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(metrics: list[dict[str, Any]], out: Path, baseline: float | None = None) -> bool:
    """Train and validation loss against step; False when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    if not train and not val:
        return False
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=3)
    if baseline is not None:
        ax.axhline(baseline, ls="--", c="gray", lw=1, label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def write_report(cfg: Config) -> Path:
    rd = RunDir(cfg.run_path)
    data = _read_json(rd.data / "report.json")
    tokenizer = _read_json(rd.tokenizer / "report.json")
    tokens = _read_json(rd.tokens / "meta.json")
    tok_eval = _read_json(rd.tokenizer / "eval.json")
    ev = _read_json(rd.eval / "metrics.json")
    samples = _read_json(rd.eval / "samples.json") or []
    timings = _read_json(rd.root / "timings.json") or {}
    metrics = read_metrics(rd.metrics)
    has_plot = plot_loss(metrics, rd.root / "loss.png", ev.get("unigram_baseline_loss") if ev else None)

    out = [f"# kiln run `{cfg.name}`", "", f"Run directory: `{rd.root}`", ""]
    out += _summary(ev, timings)
    out += _data_section(data)
    out += _tokenizer_section(tokenizer, tokens, tok_eval)
    out += _model_section(cfg, metrics)
    out += ["## Training", ""]
    if has_plot:
        out += ["![loss](loss.png)", ""]
    out += _training_table(metrics, cfg.train.keep_best)
    out += eval_section(ev, _read_json(rd.eval / "report_card.json"), _read_json(rd.eval / "memorisation.json"),
                        _read_json(rd.eval / "suites.json"))
    if samples:
        out += ["## Samples", ""]
        for s in samples:
            out += [f"Prompt `{s['prompt']!r}`:", "", "```", s["prompt"] + s["completion"], "```", ""]
    out += post_section(rd.root, {n: Path(getattr(cfg, n).out) for n in POST_STAGES if getattr(cfg, n).out})
    write_text_atomic(rd.report, "\n".join(out) + "\n")
    print(f"report: {rd.report}")
    return rd.report


def _summary(ev: dict | None, timings: dict) -> list[str]:
    out = ["## Summary", ""]
    if ev and "val" in ev:
        v = ev["val"]
        out += [f"- validation loss **{v['loss']:.4f}** nats/token (perplexity {v['perplexity']:.2f}, "
                f"{v['bits_per_byte']:.3f} bits/byte) against a unigram baseline of "
                f"{ev['unigram_baseline_loss']:.4f} and a uniform baseline of {ev['uniform_baseline_loss']:.4f}"]
    if timings:
        total = sum(timings.values())
        per = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        out += [f"- time: {total:.0f}s in all ({per})"]
    return out + [""]


def _data_section(data: dict | None) -> list[str]:
    if not data:
        return []
    out = ["## Data", ""]
    for key in ("records_in", "kept", "quarantined"):
        if key in data:
            out.append(f"- {key.replace('_', ' ')}: {data[key]:,}")
    dropped = data.get("dropped") or {}
    if dropped:
        out.append("- dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()))
    splits = data.get("splits") or {}
    if splits:
        out += ["", "| split | documents | bytes |", "|---|---:|---:|"]
        out += [f"| {k} | {v.get('docs', 0):,} | {v.get('bytes', 0):,} |" for k, v in splits.items()]
    return out + [""]


def _tokenizer_section(tok: dict | None, tokens: dict | None, tok_eval: dict | None = None) -> list[str]:
    out = ["## Tokenizer", ""]
    if tok:
        for key in ("vocab_size", "bytes_per_token", "tokens_per_word", "train_bytes", "train_seconds", "roundtrip_ok"):
            if key in tok:
                val = tok[key]
                out.append(f"- {key.replace('_', ' ')}: {val:.3f}" if isinstance(val, float) else f"- {key.replace('_', ' ')}: {val}")
    if tokens:
        splits = {k: v for k, v in tokens.items() if isinstance(v, dict) and "tokens" in v}
        if splits:
            out += ["", "| split | documents | tokens | bytes/token |", "|---|---:|---:|---:|"]
            out += [f"| {k} | {v.get('docs', 0):,} | {v['tokens']:,} | {v.get('bytes', 0) / max(v['tokens'], 1):.2f} |"
                    for k, v in splits.items()]
    if tok_eval:
        out += ["", f"Compared on {tok_eval['bytes']:,} bytes of the {tok_eval['split']} split (`kiln tokenizer eval`):", "",
                "| tokenizer | bytes/token | tokens/word | tokens vs kiln | round-trip |", "|---|---:|---:|---:|---|"]
        out += [f"| {name} | {r.get('bytes_per_token', 0):.3f} | {r.get('tokens_per_word', 0):.3f} | "
                f"{r.get('tokens_vs_kiln') or 0:.3f} | {'exact' if r.get('roundtrip_failures') == 0 else r.get('roundtrip_failures')} |"
                for name, r in tok_eval["tokenizers"].items()]
    return out + [""]


def _model_section(cfg: Config, metrics: list[dict]) -> list[str]:
    m = cfg.model.resolved()
    return ["## Model", "",
            f"Llama-style decoder: {m.depth} layers, d_model {m.d_model}, {m.n_heads} heads of {m.head_dim} "
            f"({m.n_kv_heads} key/value heads), SwiGLU {m.ffn_hidden}, context {m.max_seq_len}, "
            f"RoPE theta {m.rope_theta:g}, tied embeddings {m.tie_embeddings}, QK-norm {m.qk_norm}"
            + (", q/k/v biases" if m.qkv_bias else "") + ".", ""]


def _training_table(metrics: list[dict], keep_best: bool = True) -> list[str]:
    steps = [r for r in metrics if "loss" in r]
    if not steps:
        return ["No training metrics yet.", ""]
    last = steps[-1]
    tok_s = sum(r["tok_per_s"] for r in steps) / len(steps)
    out = [f"- steps: {last['step']:,}, tokens seen: {last['tokens']:,}, mean throughput {tok_s:,.0f} tokens/s, "
           f"final train loss {last['loss']:.4f}"]
    if "mfu" in last:
        out.append(f"- MFU: {100 * last['mfu']:.1f}%")
    vals = [r for r in metrics if "val_loss" in r]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        line = (f"- validation loss during training: last {vals[-1]['val_loss']:.4f} (step {vals[-1]['step']:,}), "
                f"best {best['val_loss']:.4f} (step {best['step']:,})")
        if best["val_loss"] < vals[-1]["val_loss"]:   # it went back up: overfitting, or a late instability
            line += (": the best is kept in `checkpoints/best`, `kiln eval --eval.checkpoint best` scores it"
                     if keep_best else ": `train.keep_best` would have kept that checkpoint")
        out.append(line)
    return out + [""]
