"""Prefix cache: time to first token over a multi-turn conversation, with and without the engine's prefix cache.

    python bench/prefix_cache.py [--run_dir RUN] [--system 400] [--turns 8] [--user 40] [--reply 32]

Each turn's prompt is the previous prompt, the model's reply and a new user message (random token ids), after a
`--system`-token system prompt: what a chat client sends. Greedy replies; the engine steps on the calling thread.
TTFT = from submitting the turn to its first token (the prefill, plus one decode step). With the cache, a turn
computes only what is new since the last one. The replies must be identical both ways (checked). RUN is a kiln run
directory (default: /tmp/smolrun, SmolLM2-135M-Instruct imported with `kiln import`); without one, random weights
of SmolLM2's shape. Writes bench/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import ModelConfig  # noqa: E402
from kiln.infer.engine import Engine  # noqa: E402
from kiln.infer.fuse import fuse_projections  # noqa: E402
from kiln.infer.sampling import SamplingParams  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402


def load(run_dir: Path, device: str) -> tuple[Transformer, str]:
    if (run_dir / "checkpoints").is_dir():
        from kiln.formats.checkpoint import load_model, resolve_checkpoint
        model, _ = load_model(resolve_checkpoint(run_dir / "checkpoints", "latest"), device, torch.float32)
        return model, str(run_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(depth=30, d_model=576, n_heads=9, head_dim=64, n_kv_heads=3, ffn_hidden=1536, vocab_size=49152,
                      max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True)
    return Transformer.from_config(cfg, device=device), "random weights, SmolLM2-135M shape"


def conversation(engine: Engine, system: list[int], users: list[list[int]], reply: int) -> tuple[list, list]:
    prompt, ttft, replies = list(system), [], []
    for user in users:
        prompt = prompt + user
        first, done, out = [None], [False], []

        def on_output(o):
            if first[0] is None and o.token_ids:
                first[0] = time.perf_counter()
            out.extend(o.token_ids)
            done[0] = o.finish_reason is not None
        t0 = time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=reply, temperature=0, ignore_stop_ids=True), on_output)
        while not done[0]:
            engine.step()
        ttft.append(first[0] - t0)
        replies.append(out)
        prompt = prompt + out
    return ttft, replies


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", type=Path, default=Path("/tmp/smolrun"))
    ap.add_argument("--system", type=int, default=400)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user", type=int, default=40)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefix_cache.json"))
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, source = load(a.run_dir, device)
    fuse_projections(model)
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    system = torch.randint(0, V, (a.system,), generator=g).tolist()
    users = [torch.randint(0, V, (a.user,), generator=g).tolist() for _ in range(a.turns)]
    max_len = a.system + a.turns * (a.user + a.reply) + 8
    rows = {}
    for cache in (False, True):
        engine = Engine(model, None, max_slots=4, max_len=max_len, prefix_cache=cache)
        engine.generate([[V - 1] * 8], SamplingParams(max_tokens=2, temperature=0))   # warm-up, shares no prefix
        engine.stats["cached_prompt_tokens"] = engine.stats["prompt_tokens"] = 0
        ttft, replies = conversation(engine, system, users, a.reply)
        rows["cache" if cache else "no_cache"] = dict(
            ttft_s=ttft, replies=replies, prompt_tokens=engine.stats["prompt_tokens"],
            cached_prompt_tokens=engine.stats["cached_prompt_tokens"])
    same = rows["cache"]["replies"] == rows["no_cache"]["replies"]
    print(f"{'turn':>4} {'prompt tokens':>13} {'TTFT, no cache':>15} {'TTFT, cache':>12} {'speed-up':>9}")
    n = a.system
    for t in range(a.turns):
        n += a.user
        off, on = rows["no_cache"]["ttft_s"][t], rows["cache"]["ttft_s"][t]
        print(f"{t + 1:>4} {n:>13} {off * 1e3:>13.1f}ms {on * 1e3:>10.1f}ms {off / on:>8.2f}x")
        n += a.reply
    tot_off, tot_on = sum(rows["no_cache"]["ttft_s"]), sum(rows["cache"]["ttft_s"])
    computed = rows["cache"]["prompt_tokens"] - rows["cache"]["cached_prompt_tokens"]
    print(f"all turns: {tot_off:.2f} s -> {tot_on:.2f} s of TTFT ({tot_off / tot_on:.2f}x); prompt tokens computed "
          f"{rows['no_cache']['prompt_tokens']} -> {computed}; replies identical: {same}")
    for r in rows.values():
        del r["replies"]
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), model=source, torch=torch.__version__,
                device=torch.cuda.get_device_name() if device == "cuda" else platform.processor(), argv=sys.argv[1:],
                threads=torch.get_num_threads())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows, replies_identical=same), indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
