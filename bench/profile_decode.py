"""Where one decode step's GPU time goes, kernel by kernel: kiln's engine at a given batch and length bucket.

    python bench/profile_decode.py [--shapes gpt2-small,smollm2-135m] [--batch 1] [--length 384]
                                   [--peers kiln-compile-fused] [--replays 20]

Builds the engine as `serve_engine.py` does (one engine per shape and peer, slots for `--batch`, a context of
`--length`), captures its graphs, then records `--replays` replays of the (batch, length-bucket) step's CUDA
graph with torch.profiler and prints, per kernel name, how many launches and device microseconds one step
spends there. A tool for deciding what to fuse next, not a throughput figure. Writes
bench/results/profile_decode.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_engine import build, kiln_engine, kiln_model  # noqa: E402


def profile_step(engine, B: int, S: int, replays: int) -> list[dict]:
    graph = engine.decoder.graphs[B, S][0]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name].append(ev.device_time)
    rows = [{"kernel": k, "launches_per_step": len(v) / replays, "us_per_step": sum(v) / replays}
            for k, v in per.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="gpt2-small,smollm2-135m")
    ap.add_argument("--peers", default="kiln-compile-fused")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=384, help="the context the profiled step attends over")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_decode.json"))
    a = ap.parse_args(argv)
    results = []
    for shape in a.shapes.split(","):
        base = build(shape, max(512, a.length), "cuda")
        for peer in a.peers.split(","):
            engine, build_s = kiln_engine(kiln_model(base, peer), a.batch, base.cfg.max_seq_len, peer, "cuda")
            S = engine.decoder.length(a.length)
            rows = profile_step(engine, engine.decoder.bucket(a.batch), S, a.replays)
            total = sum(r["us_per_step"] for r in rows)
            launches = sum(r["launches_per_step"] for r in rows)
            print(f"\n{shape} {peer} batch {a.batch} length bucket {S}: {launches:.0f} kernels, {total:.0f} us "
                  f"of kernels per step ({launches / base.cfg.depth:.1f} per layer), build {build_s:.0f} s",
                  flush=True)
            print(f"{'us/step':>8} {'n/step':>6}  kernel")
            for r in rows[:a.top]:
                print(f"{r['us_per_step']:8.1f} {r['launches_per_step']:6.1f}  {r['kernel'][:110]}")
            results.append({"shape": shape, "peer": peer, "batch": a.batch, "length": S, "kernels": launches,
                            "kernel_us": total, "build_s": build_s, "rows": rows})
            del engine
            torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
