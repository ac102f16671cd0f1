"""Decode throughput of kiln's batched engine against `transformers` generate, same weights, same run.

    python bench/serve_engine.py [--shapes gpt2-small,smollm2-135m] [--batches 1,32,128]
                                 [--peers kiln,hf,hf-static] [--prompt 128] [--new 256]

Greedy decoding of random weights (stop tokens ignored, so every row makes `--new` tokens), bf16,
a `--prompt`-token random prompt per row. Decode tokens/s is aggregate over the batch and excludes
the prefill: kiln's is timed from after the step that prefilled every row to the last step; a
peer's is (generate(new) - generate(1)) over new - 1 steps. The memory-bandwidth bound counts the
bytes a decode step must read: every weight once (the embedding table once, it is the tied head)
plus the keys and values of the mean context (prompt + new / 2), over the card's peak bandwidth.
Each kiln peer is one engine with slots for the largest batch, built once (its build time, graph capture and
compilation, is reported apart); "graph us" is one replay of the step's CUDA graph alone, the device's share
of the engine's whole step. Imports only torch and kiln's model and engine (no server dependencies), so it
runs on a bare GPU box. Writes bench/results/serve_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.config import ModelConfig  # noqa: E402
from kiln.infer.decode_step import DecodeStep  # noqa: E402
from kiln.infer.engine import Engine  # noqa: E402
from kiln.infer.sampling import SamplingParams  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402

SHAPES = {   # the two shapes
    "gpt2-small": dict(depth=12, d_model=768, n_heads=6, head_dim=128, n_kv_heads=6, ffn_hidden=2048,
                       vocab_size=50304, rope_theta=10000.0),
    "smollm2-135m": dict(depth=30, d_model=576, n_heads=9, head_dim=64, n_kv_heads=3, ffn_hidden=1536,
                         vocab_size=49152, rope_theta=100000.0),
}
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12}   # bytes/s, SXM datasheets


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((bw for k, bw in PEAK_BW.items() if k in name), None)


def build(shape: str, max_len: int, device: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=max_len, tie_embeddings=True, **SHAPES[shape])
    return Transformer.from_config(cfg, device=device).to(torch.bfloat16).eval()


def step_bytes(model: Transformer, batch: int, context: float) -> float:
    c = model.cfg
    weights = sum(p.numel() for p in model.parameters()) * 2
    kv = 2 * c.depth * c.n_kv_heads * c.head_dim * 2 * context * batch
    return weights + kv


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lora_bank(model: Transformer, n: int, rank: int = 16):
    """`n` random rank-`rank` PEFT adapters on every linear of `model`, as an AdapterBank applied to it."""
    import tempfile

    from kiln.config.post import LORA_TARGETS, LoRAConfig
    from kiln.formats.peft import write_adapter
    from kiln.infer.adapters import AdapterBank
    dirs, tmp = {}, Path(tempfile.mkdtemp(prefix="kiln_lora_bench_"))
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in LORA_TARGETS:
                tensors[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
                tensors[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
        cfg = LoRAConfig(enabled=True, rank=rank, alpha=2.0 * rank, targets=list(LORA_TARGETS))
        dirs[f"a{i}"] = write_adapter(tmp / f"a{i}", tensors, cfg, "bench")
    return AdapterBank(model, dirs)


def kiln_model(model: Transformer, peer: str) -> Transformer:
    """The model a kiln peer runs: `-int8` in its name quantises a copy (weight-only int8), `-fused` stacks a
    copy's q/k/v and gate/up projections (kiln/infer/fuse.py), `-loraN` gives a copy N LoRA adapters (rank 16, every
    linear; kiln/infer/adapters.py) that the rows take in turn."""
    if "int8" not in peer and "fused" not in peer and "-lora" not in peer:
        return model
    import copy

    from kiln.infer.fuse import fuse_projections
    from kiln.infer.quant import quantize_int8
    model = copy.deepcopy(model)
    if "-lora" in peer:   # before stacking: the adapted layers stay unstacked
        model.bank = lora_bank(model, int(peer.split("-lora")[1].split("-")[0]))
    if "int8" in peer:
        quantize_int8(model)
    if "fused" in peer:
        fuse_projections(model)
    return model


def kiln_engine(model, batch: int, max_len: int, peer: str, device: str) -> tuple[Engine, float]:
    """One engine per shape and peer, as a server has one, with slots for the largest batch; and the seconds
    its construction took (graph capture, and compilation for `-compile`)."""
    compile = "compile" in peer
    if compile:
        torch._dynamo.reset()   # each engine compiles its own step; earlier ones must not fill dynamo's cache
    t0 = time.perf_counter()
    # `-math`: the decode step traced and captured with SDPA's math backend (two batched matmuls and a masked
    # softmax, which compilation fuses) instead of the kernel SDPA picks for a one-query masked attention.
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = DecodeStep.fused_attention_rows
    DecodeStep.fused_attention_rows = batch if "triton" in peer else rows   # -triton: every bucket through the kernel
    from kiln.infer import attention
    merge = attention.MERGE_IN_KERNEL
    if "-merge" in peer or "-combine" in peer:   # the attention's merge in its kernel, or as a launch of its own
        attention.MERGE_IN_KERNEL = "-merge" in peer
    pdl = os.environ.get("KILN_PDL")
    if peer.endswith("-pdl") or "-pdl-" in peer:   # -pdl: kiln's Triton kernels with programmatic dependent launch
        os.environ["KILN_PDL"] = "1"
    try:
        with sdpa_kernel([SDPBackend.MATH]) if "math" in peer else nullcontext():
            engine = Engine(model, max_slots=batch, max_len=max_len, prefill_tokens=batch * max_len,
                            max_queue=batch, cuda_graphs="eager" not in peer and device == "cuda", compile=compile,
                            overlap="sync" not in peer, fused_attention=False if "sdpa" in peer else None,
                            fused_layers="layers" in peer, adapters=getattr(model, "bank", None))
    finally:
        DecodeStep.fused_attention_rows = rows
        attention.MERGE_IN_KERNEL = merge
        if pdl is None:
            os.environ.pop("KILN_PDL", None)
        else:
            os.environ["KILN_PDL"] = pdl
    engine.decoder.fused_attention_rows = batch if "triton" in peer else rows   # for any step the graphs do not hold
    return engine, time.perf_counter() - t0


def time_kiln(engine: Engine, prompts, new: int) -> tuple[float, float | None]:
    """(decode tokens/s, microseconds of one graph replay alone: the device's share of a step, the rest of the
    step being the host's)."""
    B = len(prompts)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_stop_ids=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_stop_ids=True))  # warm-up
    done = [0]
    kinds = len(engine.adapters.names) + 1 if engine.adapters is not None else 1   # the base and each adapter
    for i, p in enumerate(prompts):
        engine.submit(p, params, lambda o: done.__setitem__(0, done[0] + (o.finish_reason is not None)),
                      adapter=(i + 1) % kinds)   # row 0 an adapter: batch 1 times one adapter alone
    engine.step()   # prefill of every row (+ its first decode step)
    sync()
    steps0, t0 = engine.stats["decode_steps"], time.perf_counter()
    while done[0] < B:
        engine.step()
    sync()
    tps = B * (engine.stats["decode_steps"] - steps0) / (time.perf_counter() - t0)
    replay_us = None
    key = engine.decoder.bucket(B), engine.decoder.length(len(prompts[0]) + new // 2)   # the mean step's
    if key in engine.decoder.graphs:
        graph = engine.decoder.graphs[key][0]
        sync()
        t0 = time.perf_counter()
        for _ in range(50):
            graph.replay()
        sync()
        replay_us = (time.perf_counter() - t0) / 50 * 1e6
    return tps, replay_us


def hf_model(model: Transformer, static: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
                         num_hidden_layers=c.depth, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                         rms_norm_eps=c.norm_eps, tie_word_embeddings=True, torch_dtype="bfloat16")
    hf = LlamaForCausalLM(hf_cfg).to(device=model.lm_head.weight.device, dtype=torch.bfloat16).eval()
    hf.load_state_dict(model.state_dict())   # the same names: strict
    if static:
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    return hf


def time_hf(hf, prompts, new: int) -> float:
    ids = torch.tensor(prompts, device=hf.device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        return time.perf_counter() - t

    run(new), run(1)   # warm-up (and, with the static cache, compilation at this batch size)
    t_new, t_one = run(new), run(1)
    return len(prompts) * (new - 1) / (t_new - t_one)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="gpt2-small,smollm2-135m")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--peers", default="kiln,kiln-compile-fused,kiln-eager,hf,hf-static",
                    help="kiln (CUDA graphs), kiln-eager, kiln-compile (torch.compile, then graphs), kiln-int8, "
                         "kiln-int8-compile, kiln-compile-fused (q/k/v and gate/up stacked), kiln-sync (no overlap: "
                         "the host reads each step before the next), kiln-compile-math (SDPA's math backend), "
                         "-sdpa in a kiln peer's name: the model's RoPE + SDPA instead of the one-kernel attention, "
                         "-triton: the kernel at every batch (by default only up to DecodeStep.fused_attention_rows), "
                         "-layers (with -fused): whole layers through kiln/infer/fused_step.py's kernels, "
                         "-merge / -combine: the decode attention's merge in its kernel / as a launch of its own, "
                         "-pdl: kiln's Triton kernels with programmatic dependent launch (KILN_PDL=1; Hopper), "
                         "-loraN: N LoRA adapters served beside the base (rank 16, every linear), rows in turn from adapter 1, "
                         "hf (default cache), hf-static (static cache, compiled)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_engine.json"))
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bw = peak_bandwidth()
    rows = []
    print(f"{'shape':<14} {'peer':<17} {'batch':>5} {'tok/s':>10} {'bw bound':>9} {'graph us':>9} {'step us':>8}"
          f" {'build s':>8}", flush=True)
    for shape in a.shapes.split(","):
        model = build(shape, a.prompt + a.new, device)
        for peer in a.peers.split(","):
            hf = hf_model(model, peer == "hf-static") if peer.startswith("hf") else None
            engine, build_s = None, None
            if hf is None:
                try:
                    engine, build_s = kiln_engine(kiln_model(model, peer), max(map(int, a.batches.split(","))),
                                                  a.prompt + a.new, peer, device)
                except Exception as e:
                    print(f"{shape:<14} {peer:<17} engine failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
            for B in map(int, a.batches.split(",")):
                g = torch.Generator().manual_seed(B)
                prompts = torch.randint(0, model.cfg.vocab_size, (B, a.prompt), generator=g).tolist()
                replay_us = None
                try:
                    t0 = time.perf_counter()
                    if engine is not None:
                        tps, replay_us = time_kiln(engine, prompts, a.new)
                    else:
                        tps = time_hf(hf, prompts, a.new)
                    err = None
                except Exception as e:   # one peer failing must not lose the others' rows
                    tps, err = None, f"{type(e).__name__}: {e}"[:300]
                frac = None
                if tps and bw:
                    frac = tps / B * step_bytes(model, B, a.prompt + a.new / 2) / bw
                step_us = B / tps * 1e6 if tps else None
                rows.append(dict(shape=shape, peer=peer, batch=B, tokens_per_s=tps, bandwidth_fraction=frac,
                                 graph_replay_us=replay_us, step_us=step_us, build_s=build_s,
                                 seconds=time.perf_counter() - t0, error=err))
                shown = f"{tps:10.0f}" if tps else f"{'failed':>10}"
                print(f"{shape:<14} {peer:<17} {B:>5} {shown} {frac if frac else 0:9.1%} {replay_us or 0:9.0f} "
                      f"{step_us or 0:8.0f} {build_s or 0:8.1f}" + (f"  {err}" if err else ""), flush=True)
                write(a.out, rows, a)   # after every row: a run cut short keeps what it measured
            del hf, engine
            torch.cuda.empty_cache() if device == "cuda" else None
    return 0


def write(out: str, rows: list[dict], a) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = dict(date=time.strftime("%Y-%m-%d"), device=torch.cuda.get_device_name() if device == "cuda" else
                platform.processor(), torch=torch.__version__, prompt=a.prompt, new=a.new, argv=sys.argv[1:])
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    sys.exit(main())
