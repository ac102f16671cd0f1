"""A DPO step against an SFT step on the same preference pairs: what preference training costs over SFT.

    python bench/dpo_step.py [--device auto|cpu|cuda] [--shape tiny|smollm2-135m] [--pairs 8]
                             [--prompt-len 192] [--answer-len 64] [--steps 10] [--warmup 3]
                             [--threads N] [--out PATH]

B random pairs (a prompt of about --prompt-len tokens, two answers of about --answer-len), one optimizer step
per micro-batch (AdamW, gradient clipping), bf16 autocast on CUDA, fp32 on CPU, the default head (kiln's fused
head + cross-entropy where training would use it: CUDA with Triton). Each step is kiln's own code: the batch
sources (kiln.post.sft.ChatBatches, kiln.post.dpo.PairBatches) and losses (sft.chat_loss, dpo.Objective). Rows:

    sft chosen         SFT on the B prompt + chosen conversations (B rows): what SFT on this data costs
    sft both           SFT on the 2B prompt + chosen / rejected rows: the very tokens a DPO step runs
    dpo precomputed    DPO, reference log-probs in the batch (dpo.reference=precomputed): one forward and
                       backward over 2B rows
    dpo frozen         DPO with a frozen copy scoring each batch (dpo.reference=frozen): one more forward
    dpo all positions  `dpo precomputed` with the head at every position (PairBatches before `rows`): the
                       answers' tokens only is what DPO runs

A DPO step must run both answers of every pair, so against `sft chosen` the floor is 2x; the target is at most
2.2x (the loss itself, the per-sequence sums and the plain head's fp32 logits within 10%). Against `sft both`
(same tokens) the ratio is DPO's own overhead. The variants run interleaved, one step each per round (a
busy machine slows all alike); median of --steps after --warmup, CUDA-synchronised; peak memory
on CUDA. Prints a table and writes bench/results/dpo_step_<shape>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.post.dpo import Objective, PairBatches, Reference, count_pairs, reference_table, sequence_logps
from kiln.post.pairs import EncodedPair
from kiln.post.sft import ChatBatches, chat_loss, count_targets, example_of
from kiln.runtime.device import autocast, pick_device
from kiln.train.cross_entropy import fuse_for_run
from kiln.train.distributed import Dist

SHAPES = {
    "tiny": ModelConfig(depth=4, d_model=256, head_dim=64, n_heads=4, n_kv_heads=4, ffn_hidden=704, vocab_size=8192,
                        max_seq_len=512),
    # HuggingFaceTB/SmolLM2-135M's config.json
    "smollm2-135m": ModelConfig(depth=30, d_model=576, head_dim=64, n_heads=9, n_kv_heads=3, ffn_hidden=1536,
                                vocab_size=49152, max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True),
}


def make_pairs(n: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0) -> list[EncodedPair]:
    """Pairs of random tokens, lengths within +-25% of the given ones (padding as real data has it)."""
    rng = np.random.default_rng(seed)
    jitter = lambda k: int(rng.integers(max(1, k * 3 // 4), k * 5 // 4 + 1))   # noqa: E731
    out = []
    for i in range(n):
        prompt = rng.integers(10, vocab, jitter(prompt_len)).tolist()
        sides = []
        for _ in range(2):
            answer = rng.integers(10, vocab, jitter(answer_len)).tolist()
            sides.append(example_of(prompt + answer, [False] * len(prompt) + [True] * len(answer)))
        out.append(EncodedPair(sides[0], sides[1], f"bench:{i}", i))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One kind of step (a loss over fixed micro-batches) with its own optimizer on the shared model."""

    def __init__(self, name: str, model, loss_fn, count_fn, batches, device: torch.device):
        self.name, self.model, self.loss_fn, self.count_fn, self.device = name, model, loss_fn, count_fn, device
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                     fused=device.type == "cuda")
        self.times: list[float] = []
        self.peak_gb = 0.0

    def step(self, i: int, bf16: bool, record: bool) -> None:
        """One optimizer step (loss / count, backward, clip, AdamW), timed when `record`."""
        b = self.batches[i % len(self.batches)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(self.device)
        t0 = time.perf_counter()
        with autocast(self.device, bf16):
            loss = self.loss_fn(self.model, b).float()
        (loss / self.count_fn(b).clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append((time.perf_counter() - t0) * 1e3)
            if self.device.type == "cuda":
                self.peak_gb = max(self.peak_gb, torch.cuda.max_memory_allocated() / 1e9)

    def row(self) -> dict:
        b = self.batches[0]["input_ids"]
        out = {"name": self.name, "ms": statistics.median(self.times), "ms_min": min(self.times),
               "steps": len(self.times), "rows": int(b.shape[0]), "T": int(b.shape[1])}
        if self.device.type == "cuda":
            out["peak_gb"] = self.peak_gb
        return out


def interleaved(variants: list[Variant], bf16: bool, steps: int, warmup: int) -> list[dict]:
    """Rounds of one step of each variant: a busy machine (a shared CPU) slows every variant alike."""
    for i in range(warmup + steps):
        for v in variants:
            v.step(i, bf16, record=i >= warmup)
    return [v.row() for v in variants]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (B)")
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); 1 steadies timings "
                    "on a CPU that other work shares")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    cfg = SHAPES[args.shape]
    model = Transformer.from_config(cfg, device)
    model.group_projections(True)   # as training's setup does
    model.train()
    fused, _ = fuse_for_run(model, "auto", device)
    B, seq_len = args.pairs, cfg.max_seq_len
    n_batches = 4
    pairs = make_pairs(B * n_batches, args.prompt_len, args.answer_len, cfg.vocab_size)
    if max(len(p.chosen[0]) for p in pairs) > seq_len:
        raise SystemExit(f"--prompt-len + --answer-len exceed the shape's context {seq_len}")

    src = PairBatches(pairs, B, seq_len, pad_id=0, shuffle=False)
    dpo_batches = [src.collate(list(range(i * B, (i + 1) * B))) for i in range(n_batches)]
    chosen = ChatBatches([p.chosen for p in pairs], seq_len, B, "pad", pad_id=0, shuffle=False)
    both = ChatBatches([s for p in pairs for s in (p.chosen, p.rejected)], seq_len, 2 * B, "pad", pad_id=0,
                       shuffle=False)
    sft_chosen = [next(chosen) for _ in range(n_batches)]
    sft_both = [next(both) for _ in range(n_batches)]

    # precomputed: the reference pass runs once before training; its cost per pair is reported separately
    model.eval()
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, bf16):
        src.ref = reference_table(lambda b: sequence_logps(model, b["input_ids"], b["targets"], b.get("rows")), src,
                                  device, Dist())
    sync(device)
    ref_ms_per_pair = (time.perf_counter() - t0) * 1e3 / len(pairs)
    model.train()
    with_ref = [src.collate(list(range(i * B, (i + 1) * B))) for i in range(n_batches)]
    every_position = [{k: v for k, v in b.items() if k != "rows"} for b in with_ref]   # the head at every position
    frozen = Transformer.from_config(cfg, device).eval().requires_grad_(False)
    frozen.load_state_dict(model.state_dict())

    variants = [Variant("sft chosen", model, chat_loss, count_targets, sft_chosen, device),
                Variant("sft both", model, chat_loss, count_targets, sft_both, device),
                Variant("dpo precomputed", model, Objective(0.1, "sigmoid", Reference(), 1, device).loss, count_pairs,
                        with_ref, device),
                Variant("dpo all positions", model, Objective(0.1, "sigmoid", Reference(), 1, device).loss,
                        count_pairs, every_position, device),
                Variant("dpo frozen", model, Objective(0.1, "sigmoid", Reference(frozen), 1, device).loss, count_pairs,
                        dpo_batches, device)]
    rows = interleaved(variants, bf16, args.steps, args.warmup)

    base = {r["name"]: r["ms"] for r in rows}
    fastest = {r["name"]: r["ms_min"] for r in rows}
    for r in rows:
        r["x_sft_chosen"] = r["ms"] / base["sft chosen"]
        r["x_sft_both"] = r["ms"] / base["sft both"]
        r["x_sft_chosen_min"] = r["ms_min"] / fastest["sft chosen"]
    ratio = base["dpo precomputed"] / base["sft chosen"]
    print(f"\n{args.shape} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"{'bf16' if bf16 else 'fp32'}, fused head {'on' if fused else 'off'}, B={B} pairs, prompt ~{args.prompt_len}, "
          f"answers ~{args.answer_len} tokens")
    print(f"{'step':<18}{'rows x T':>10}{'ms':>10}{'min ms':>10}{'x sft chosen':>14}{'x sft both':>12}" +
          (f"{'peak GB':>10}" if device.type == "cuda" else ""))
    for r in rows:
        print(f"{r['name']:<18}{str(r['rows']) + ' x ' + str(r['T']):>10}{r['ms']:>10.1f}{r['ms_min']:>10.1f}"
              f"{r['x_sft_chosen']:>14.2f}"
              f"{r['x_sft_both']:>12.2f}" + (f"{r['peak_gb']:>10.2f}" if 'peak_gb' in r else ""))
    print(f"reference pass (precomputed, once before training): {ref_ms_per_pair:.2f} ms per pair")
    print(f"DPO step / SFT step on the pairs' chosen conversations: {ratio:.2f}x by medians, "
          f"{fastest['dpo precomputed'] / fastest['sft chosen']:.2f}x by fastest steps (target <= 2.2x: {'met' if ratio <= 2.2 else 'NOT met'})")

    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"dpo_step_{args.shape}_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shape": args.shape,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "bf16": bf16, "fused_head": fused, "pairs": B, "prompt_len": args.prompt_len,
              "answer_len": args.answer_len, "rows": rows, "reference_ms_per_pair": ref_ms_per_pair,
              "dpo_over_sft_chosen": ratio, "target": 2.2}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
