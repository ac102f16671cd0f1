"""Time to a target loss: kiln's GPU recipe against the plain GPT-2 reference, same data and tokenizer.

    # CPU machine, once (needs Debian's dict-gcide python3.11-doc perl-doc linux-doc):
    python bench/time_to_loss.py prepare --mb 150 --run_dir .gpurun/ttl
    # GPU (each trains --steps optimizer steps of --batch-tokens and logs validation loss against time):
    python bench/time_to_loss.py reference --run_dir .gpurun/ttl --steps 400
    python bench/time_to_loss.py kiln --run_dir .gpurun/ttl --steps 400 [--set train.optimizer=muon ...]
    python bench/time_to_loss.py compare bench/results/ttl_reference.json bench/results/ttl_kiln.json

Both trainers read the same token shards through the same loader (same rows, same order), use
sequences of 1024, micro-batches of 32, the same tokens per step, warmup and cosine decay to 10%,
bf16 autocast, torch.compile, and score the same validation rows every --eval-every steps. Time is
wall-clock from the start of training (compilation and evaluations included, for both). `compare`
reports when kiln's validation loss first reaches the reference's final one, over the reference's
total time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).parent / "results"
SEQ, MICRO = 1024, 32


def prepare(args) -> None:
    from data_pipeline import build_corpus

    from kiln.config import load_recipe
    from kiln.pipeline import run_stage
    corpus = Path(args.run_dir).parent / "ttl_corpus"
    docs, n_bytes = build_corpus(corpus, args.mb)
    print(f"corpus: {docs} documents, {n_bytes / 1e6:.1f} MB -> {corpus}")
    # Documentation and a dictionary, not web text: the web-crawl filters would drop most of it.
    cfg = load_recipe("gpt2-small", {"run_dir": args.run_dir, "data": {
        "sources": [str(corpus)], "steps": ["fix_unicode", "normalize", "length_filter"], "val_fraction": 0.01},
        "tokenizer": {"vocab_size": 32768}})
    for stage in ("data", "tokenizer", "tokenize"):
        run_stage(cfg, stage)


def _loaders(run_dir: Path, seed: int):
    from kiln.config.rundir import RunDir
    from kiln.tokenizer import Tokenizer
    from kiln.tokenizer.loader import PackedLoader
    rd = RunDir(run_dir)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    train = PackedLoader(rd.token_files("train"), SEQ, MICRO, tok.eos_id, seed=seed, bos_id=tok.bos_id)
    val = PackedLoader(rd.token_files("val"), SEQ, MICRO, tok.eos_id, shuffle=False, bos_id=tok.bos_id)
    return tok, train, val


def reference(args) -> None:
    """The GPT-2 reference with AdamW at GPT-2's learning rate, in its own plain loop."""
    from reference_gpt2 import GPT2, GPT2Config, optimizer
    torch.manual_seed(0)
    tok, train, val = _loaders(Path(args.run_dir), seed=1337)
    vocab = 64 * math.ceil(tok.vocab_size / 64)
    model = GPT2(GPT2Config(vocab_size=vocab, block_size=SEQ)).cuda()
    opt = optimizer(model, lr=args.lr)
    fwd = torch.compile(model)
    accum = args.batch_tokens // (SEQ * MICRO)
    warmup = int(args.steps * args.warmup_frac)
    batches, curve, val_start = iter(train), [], val.state_dict()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = _lr(step, args.steps, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(accum):
            x, y = (t.cuda(non_blocking=True) for t in next(batches))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(x, y) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "elapsed_s": time.perf_counter() - t0,
                          "val_loss": _val(fwd, val, val_start, args.eval_batches)})
            print(curve[-1], flush=True)
    _write("reference", args, curve, {"params": sum(p.numel() for p in model.parameters())})


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _val(model, loader, start: dict, batches: int) -> float:
    """Mean loss over the first `batches` validation batches: the rows kiln's own validation scores."""
    loader.load_state_dict(start)
    it, total = iter(loader), 0.0
    for _ in range(batches):
        x, y = (t.cuda() for t in next(it))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total += model(x, y).float().item()
    return total / batches


def kiln(args) -> None:
    """kiln's own `pretrain` stage on the gpt2-small recipe, with only the run length set here."""
    from kiln.config import load_recipe
    from kiln.pipeline import run_stage
    over = {"run_dir": args.run_dir, "overwrite": True, "train": {   # the bench's own scratch run: rerun freely
        "max_steps": args.steps, "warmup_steps": int(args.steps * args.warmup_frac), "micro_batch_size": MICRO,
        "batch_tokens": args.batch_tokens, "eval_every": args.eval_every, "eval_batches": args.eval_batches,
        "log_every": args.eval_every, "checkpoint_every": 10 ** 9, "seed": 1337}}
    for pair in args.set:
        key, value = pair.split("=", 1)
        node = over
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    run_stage(load_recipe("gpt2-small", over), "pretrain")
    rows = [json.loads(x) for x in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "elapsed_s": r["elapsed_s"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
    _write(args.name or "kiln", args, curve, {"overrides": over})


def _write(name: str, args, curve: list[dict], extra: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ttl_{name}.json"
    out.write_text(json.dumps({"name": name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
                               "batch_tokens": args.batch_tokens, "curve": curve, **extra}, indent=2) + "\n")
    print(f"wrote {out}")


def crossing_time(curve: list[dict], target: float) -> float | None:
    """First time the validation loss reaches `target`, interpolating linearly between evaluations."""
    prev = None
    for point in curve:
        if point["val_loss"] <= target:
            if prev is None:
                return point["elapsed_s"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
            return prev["elapsed_s"] + frac * (point["elapsed_s"] - prev["elapsed_s"])
        prev = point
    return None


def compare(args) -> None:
    ref = json.loads(Path(args.reference).read_text())
    print("| trainer | final val loss | best val loss (step) | total time s | time to the reference's final loss s "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    target, ref_time = ref["curve"][-1]["val_loss"], ref["curve"][-1]["elapsed_s"]
    for run in [ref] + [json.loads(Path(path).read_text()) for path in args.others]:
        t = crossing_time(run["curve"], target)
        ratio = "not reached" if t is None else f"{t / ref_time:.2f}"
        t_s = "-" if t is None else f"{t:.0f}"
        best = min(run["curve"], key=lambda p: p["val_loss"])   # a long run on a small corpus can overfit
        print(f"| {run['name']} | {run['curve'][-1]['val_loss']:.4f} | {best['val_loss']:.4f} ({best['step']}) | "
              f"{run['curve'][-1]['elapsed_s']:.0f} | {t_s} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--mb", type=int, default=150)
    p.add_argument("--run_dir", default=".gpurun/ttl")
    for name in ("reference", "kiln"):
        p = sub.add_parser(name)
        p.add_argument("--run_dir", default=".gpurun/ttl")
        p.add_argument("--steps", type=int, default=400)
        p.add_argument("--batch-tokens", type=int, default=262144)
        p.add_argument("--warmup-frac", type=float, default=0.05)
        p.add_argument("--eval-every", type=int, default=25)
        p.add_argument("--eval-batches", type=int, default=8)
        if name == "reference":
            p.add_argument("--lr", type=float, default=6e-4)
        else:
            p.add_argument("--set", nargs="*", default=[])
            p.add_argument("--name", default=None)
    p = sub.add_parser("compare")
    p.add_argument("reference")
    p.add_argument("others", nargs="+")
    args = ap.parse_args()
    {"prepare": prepare, "reference": reference, "kiln": kiln, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
