"""The decode path's Triton kernels alone, in CUDA graphs: launch settings of `matvec` for each of a layer's four
matmuls, the attention's merge in the kernel or as a launch of its own, and the whole stack of layers
(`kiln.infer.fused_step.fused_hidden`) under each `matvec` setting. What a decode step at a few rows costs
is mostly these kernels' latency, so each is timed as a graph of `--chain` launches in a row (the gaps between
kernels included), per launch.

    PYTHONPATH=src python bench/decode_kernels.py --shape smollm2-135m --rows 1

Prints a table per part and writes JSON (`--out`). CUDA with Triton only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from serve_engine import SHAPES, build, peak_bandwidth  # noqa: E402

from kiln.infer import attention, matvec  # noqa: E402
from kiln.infer.fuse import fuse_projections  # noqa: E402
from kiln.infer.fused_step import fused_hidden  # noqa: E402
from kiln.infer.slots import SlotCache  # noqa: E402

DOT = [dict(BLOCK_N=n, BLOCK_K=k, DOT=True, num_warps=w) for n, k, w in itertools.product((16, 32), (64, 128, 256),
                                                                                            (2, 4))]
DEVICE = "cuda"   # a module variable so that a CPU dry run (Triton's interpreter) can change it
CORES = [dict(BLOCK_N=n, BLOCK_K=k, DOT=False, num_warps=w) for n, k, w in itertools.product((2, 4, 8),
                                                                                              (128, 256, 512), (2, 4))]


def graph_us(fn, chain: int, reps: int = 20) -> float:
    """Microseconds per call of `fn` replayed as a CUDA graph of `chain` calls, median of `reps` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(chain):
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / chain)
    return sorted(times)[len(times) // 2]


def layer_matmuls(model, B: int):
    """(name, x, w, gain, residual, glu) for a layer's four matmuls at B rows."""
    layer = model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    D, F_ = model.cfg.d_model, m.down_proj.weight.size(1)
    x = torch.randn(B, D, device=DEVICE, dtype=torch.bfloat16)
    h = torch.randn(B, F_, device=DEVICE, dtype=torch.bfloat16)
    y = torch.randn(B, a.o_proj.weight.size(1), device=DEVICE, dtype=torch.bfloat16)
    return [("norm+qkv", x, a.qkv_weight, layer.input_layernorm.weight, None, False),
            ("o_proj+res", y, a.o_proj.weight, None, x, False),
            ("norm+gate_up+swiglu", x, m.gate_up_weight, layer.post_attention_layernorm.weight, None, True),
            ("down+res", h, m.down_proj.weight, None, x, False)]


def sweep_matmuls(model, B: int, chain: int, configs: list[dict], bw: float | None) -> list[dict]:
    rows = []
    for name, x, w, gain, res, glu in layer_matmuls(model, B):
        base = graph_us(lambda: F.linear(x, w), chain)
        N = w.size(0) // 2 if glu else w.size(0)
        default = matvec.matvec_config(B, N, x.size(1))
        for cfg in [default] + [c for c in configs if c != default]:
            try:
                us = graph_us(lambda: matvec.matvec_triton(x, w, gain, 1e-5, res, glu, config=cfg), chain)
            except Exception as e:   # a setting Triton cannot build (registers, shared memory) is reported, not fatal
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append(dict(part="matvec", rows=B, matmul=name, cublas_us=round(base, 2), us=round(us, 2),
                             bound_us=round(w.numel() * 2 / bw * 1e6, 2) if bw else None, default=cfg is default,
                             **cfg))
    return rows


def attention_rows(model, B: int, S: int, chain: int) -> list[dict]:
    a = model.model.layers[0].self_attn
    H, K, E = a.n_heads, a.n_kv_heads, a.head_dim
    cache = SlotCache.for_model(model, B, S)
    q = torch.randn(B, H, E, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(B, K, E, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(B, K, E, device=DEVICE, dtype=torch.bfloat16)
    pos = torch.full((B,), S - 1, device=DEVICE, dtype=torch.long)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    out = []
    for merge in (False, True):
        us = graph_us(lambda: attention.decode_attention_triton(q, k, v, cos, sin, cache.k_NKME[0], cache.v_NKME[0],
                                                                pos, S, merge=merge), chain)
        out.append(dict(part="attention", rows=B, keys=S, merge="in kernel" if merge else "own launch",
                        us=round(us, 2)))
    return out


def stack_rows(model, B: int, S: int, configs: list) -> list[dict]:
    """fused_hidden over every layer (one graph = one decode step's layers), per matvec setting and merge; a
    setting is None (matvec_config's), one dict for every matmul, or a dict (N, K) -> dict per matmul."""
    cache = SlotCache.for_model(model, B, S)
    tokens = torch.randint(0, model.cfg.vocab_size, (B,), device=DEVICE)
    pos = torch.full((B,), S // 2, device=DEVICE, dtype=torch.long)
    view = cache.decode(pos, S, fused=True)
    out = []
    default, merge_default = matvec.matvec_config, attention.MERGE_IN_KERNEL
    try:
        for cfg, merge in itertools.product(configs, (False, True)):
            if cfg is None:
                matvec.matvec_config, label = default, {"config": "matvec_config"}
            elif "DOT" in cfg:
                matvec.matvec_config, label = (lambda *_a, _c=cfg: _c), cfg
            else:
                matvec.matvec_config = lambda _B, N, K, _c=cfg: _c[(N, K)]
                label = {"config": {f"{n}x{k}": c for (n, k), c in cfg.items()}}
            attention.MERGE_IN_KERNEL = merge
            with torch.no_grad():
                us = graph_us(lambda: fused_hidden(model, tokens, pos, view), 1)
            out.append(dict(part="layers", rows=B, keys=S, merge=merge, us=round(us, 1), **label))
    finally:
        matvec.matvec_config = default
        attention.MERGE_IN_KERNEL = merge_default
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1", help="comma-separated decode batch sizes")
    ap.add_argument("--keys", type=int, default=512, help="the length bucket (keys read per row)")
    ap.add_argument("--chain", type=int, default=30, help="launches per graph in the per-kernel timings")
    ap.add_argument("--stack_top", type=int, default=4, help="fastest matvec settings (per matmul) tried in the stack")
    ap.add_argument("--out", default="bench/results/decode_kernels.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    bw = peak_bandwidth()
    model = build(a.shape, a.keys, DEVICE)
    fuse_projections(model)
    rows = []
    t0 = time.time()
    for B in (int(b) for b in a.rows.split(",")):
        configs = DOT + (CORES if B <= 8 else [])
        mm = sweep_matmuls(model, B, a.chain, configs, bw)
        rows += mm
        print(f"\nrows {B}: us per launch in a graph of {a.chain} ({time.time() - t0:.0f} s)")
        print(f"{'matmul':<22}{'cuBLAS':>8}{'bound':>7}{'default':>9}  best 3 (BLOCK_N, BLOCK_K, DOT, warps: us)")
        best: list[dict] = []
        for name in dict.fromkeys(r["matmul"] for r in mm):
            rs = sorted((r for r in mm if r["matmul"] == name), key=lambda r: r["us"])
            d = next((r["us"] for r in rs if r["default"]), None)
            top = ", ".join(f"{r['BLOCK_N']}/{r['BLOCK_K']}/{'dot' if r['DOT'] else 'fma'}/{r['num_warps']}: "
                            f"{r['us']}" for r in rs[:3])
            print(f"{name:<22}{rs[0]['cublas_us']:>8}{rs[0]['bound_us'] or 0:>7}{d or 0:>9}  {top}")
            best += rs[:a.stack_top]
        attn = attention_rows(model, B, a.keys, a.chain)
        rows += attn
        for r in attn:
            print(f"attention, {a.keys} keys, merge {r['merge']}: {r['us']} us")
        cands = [None] + [dict(BLOCK_N=r["BLOCK_N"], BLOCK_K=r["BLOCK_K"], DOT=r["DOT"], num_warps=r["num_warps"])
                          for r in best]
        cands = [c for i, c in enumerate(cands) if c not in cands[:i]]
        per_matmul = {}
        for name, x, w, gain, res, glu in layer_matmuls(model, B):
            r = min((r for r in mm if r["matmul"] == name), key=lambda r: r["us"])
            per_matmul[(w.size(0) // 2 if glu else w.size(0), x.size(1))] = {
                k: r[k] for k in ("BLOCK_N", "BLOCK_K", "DOT", "num_warps")}
        cands.append(per_matmul)
        stack = stack_rows(model, B, a.keys, cands)
        rows += stack
        print(f"all {model.cfg.depth} layers (fused_hidden), us per step:")
        for r in sorted(stack, key=lambda r: r["us"])[:8]:
            print(f"  {r['us']:>8}  merge in kernel {r['merge']}  "
                  f"{ {k: v for k, v in r.items() if k not in ('part', 'rows', 'keys', 'us', 'merge')} }")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=a.shape, keys=a.keys,
                       chain=a.chain, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
