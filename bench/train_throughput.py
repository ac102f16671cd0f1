"""Training throughput: kiln's gpt2-small against the plain GPT-2 reference, same GPU, same run.

    python bench/train_throughput.py [--steps 30] [--warmup 8] [--micro-batch 32] [--depth 12]
                                     [--no-reference] [--variants base,fused,liger,autotune,fp8,...]

Every configuration trains on the same random token batches (32 x 1024 by default), one
optimizer step per micro-batch, bf16 autocast, torch.compile, fused AdamW. Reports tokens/s,
MFU against the datasheet peak and against a bf16 8192^3 matmul measured in this run, peak
memory, and the ratio to the reference; the first losses of each kiln variant are compared with
the base variant so that no speed is bought with a numerics change. Each row is printed and
bench/results/train_throughput.json rewritten as soon as its variant finishes.

Variants: base; flash / cudnn (SDPA backend forced); mb2x (micro-batch x2); fused (one q/k/v
and one gate/up matmul per layer from the same parameters); liger (Liger-Kernel's fused linear +
cross-entropy); fused_ce (kiln's fused head + cross-entropy, train.fused_cross_entropy); autotune (compile mode max-autotune-no-cudagraphs); cudagraphs (compile mode reduce-overhead);
fp8 / fp8_rowwise (torchao float8 training, lm_head kept in bf16); hd128 / hd64 (heads of 128 / 64; the
recipe's own are 128 since it was measured here);
vocab32k (a 32,768-token vocabulary); domain (both: heads of 128 and a 32k vocabulary); domain_fused_ce (and the fused head);
compiled_step (gradient clipping and a foreach AdamW step under torch.compile); muon / muon_serial (Muon + AdamW, Newton-Schulz batched
per shape / one matrix at a time; one optimizer step per micro-batch, the worst case). `--depth 28 --no-reference --micro-batch 8` measures the
~1.2B configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from reference_gpt2 import GPT2, GPT2Config, optimizer as ref_optimizer  # noqa: E402

from kiln.config import TrainConfig, load_recipe  # noqa: E402
from kiln.model.llama import Transformer  # noqa: E402
from kiln.train import muon  # noqa: E402
from kiln.train.cross_entropy import apply_fused_cross_entropy  # noqa: E402
from kiln.train.optim import build_optimizer, param_groups  # noqa: E402
from kiln.runtime.device import sdpa_backend  # noqa: E402
from kiln.runtime.peaks import measure_matmul_peak, peak_flops  # noqa: E402

VOCAB = 50304


class ClippedStep:
    """Gradient clipping to 1.0 and the optimizer step, as one call; `compiled` runs both under
    torch.compile (the optimizer then uses its foreach implementation, which Inductor fuses)."""

    def __init__(self, params, opt, compiled: bool = False):
        self.params, self.opt = list(params), opt
        self.step = torch.compile(self._step) if compiled else self._step

    def _step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def zero_grad(self, set_to_none: bool = True):
        self.opt.zero_grad(set_to_none=set_to_none)


def run(name: str, model, opt, loss_fn, batches, warmup: int, steps: int, attention: str) -> dict:
    torch.cuda.reset_peak_memory_stats()
    losses = []
    with sdpa_backend(attention):
        for i, (x, y) in enumerate(batches[:warmup + steps]):
            if i == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().clone())  # clone: a CUDA-graph replay reuses the output buffer
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = steps * batches[0][0].numel()
    return {"name": name, "tokens_per_s": tokens / dt, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "losses": [float(v) for v in torch.stack(losses[:warmup]).cpu()]}


def kiln_model(seq: int, vocab: int = VOCAB, **overrides) -> Transformer:
    cfg = load_recipe("gpt2-small").model
    model = Transformer(dataclasses.replace(cfg, vocab_size=vocab, max_seq_len=seq, **overrides)).cuda()
    model.group_projections(True)   # as training's setup does (q/k/v and gate/up as one matmul each)
    return model


def fused_projections(model: Transformer) -> Transformer:
    """One (D, 3D) matmul for q/k/v and one (D, 2F) for gate/up per layer, from the same parameters."""
    from kiln.model.llama import apply_rope

    def attn_forward(self, x_BTD, cos_TE, sin_TE, cache, mask_TS):
        B, T, _ = x_BTD.shape
        w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        q, k, v = F.linear(x_BTD, w).split([self.q_proj.out_features, self.k_proj.out_features,
                                            self.v_proj.out_features], dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos_TE, sin_TE)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos_TE, sin_TE)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def mlp_forward(self, x_BTD):
        gate, up = F.linear(x_BTD, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(attn_forward, layer.self_attn)
        layer.mlp.forward = types.MethodType(mlp_forward, layer.mlp)
    return model


def float8(recipe: str):
    def convert(model: Transformer) -> Transformer:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        config = Float8LinearConfig.from_recipe_name(recipe)
        # lm_head stays bf16: its fp8 error lands directly on the logits (the usual practice).
        return convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn != "lm_head")
    return convert


def fused_ce(model: Transformer) -> Transformer:
    apply_fused_cross_entropy(model)
    return model


def liger_loss(model, x, y):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    m = model._orig_mod if hasattr(model, "_orig_mod") else model
    T = x.size(1)
    h = m.model(x, m.rope_cos[:T], m.rope_sin[:T])
    return LigerFusedLinearCrossEntropyLoss()(m.lm_head.weight, h.flatten(0, 1), y.flatten())


batched_orthogonalize = muon.orthogonalize_all


def serial_orthogonalize(updates, steps):
    return [muon.orthogonalize(u, steps) for u in updates]


@dataclasses.dataclass
class Variant:
    attention: str = "auto"
    loss: object = None  # None: the model's own forward(x, y)
    mult: int = 1  # micro-batch multiplier
    transform: object = None  # model -> model, applied before compile
    compile_mode: str | None = None
    vocab: int = VOCAB
    overrides: dict = dataclasses.field(default_factory=dict)
    compile_loss: bool = True  # liger's kernels run outside the compiled graph
    optimizer: str = "adamw"
    serial_muon: bool = False  # Newton-Schulz one matrix at a time (kiln's first Muon), for comparison
    compile_step: bool = False  # clip + AdamW step under torch.compile (foreach AdamW instead of fused)


VARIANTS = {
    "base": Variant(),
    "flash": Variant(attention="flash"),
    "cudnn": Variant(attention="cudnn"),
    "mb2x": Variant(mult=2),
    "fused": Variant(transform=fused_projections),
    "liger": Variant(loss=liger_loss, compile_loss=False),
    "fused_ce": Variant(transform=fused_ce),
    "autotune": Variant(compile_mode="max-autotune-no-cudagraphs"),
    "cudagraphs": Variant(compile_mode="reduce-overhead"),
    "fp8": Variant(transform=float8("tensorwise")),
    "fp8_rowwise": Variant(transform=float8("rowwise")),
    "hd128": Variant(overrides={"head_dim": 128}),
    "hd64": Variant(overrides={"head_dim": 64}),
    "vocab32k": Variant(vocab=32768),
    "compiled_step": Variant(compile_step=True),
    "domain": Variant(vocab=32768, overrides={"head_dim": 128}),
    "domain_fused_ce": Variant(vocab=32768, overrides={"head_dim": 128}, transform=fused_ce),
    "muon": Variant(optimizer="muon"),
    "muon_serial": Variant(optimizer="muon", serial_muon=True),
}


def run_reference(args, batches) -> dict:
    torch.manual_seed(0)
    ref = GPT2(GPT2Config(vocab_size=VOCAB, block_size=args.seq)).cuda()
    step = ClippedStep(ref.parameters(), ref_optimizer(ref))
    r = run("reference GPT-2", torch.compile(ref), step, lambda m, x, y: m(x, y), batches, args.warmup, args.steps, "auto")
    r["flops_per_token"] = ref.flops_per_token(args.seq)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=12, help="kiln model depth (12 = gpt2-small; 28 = ~1.2B)")
    ap.add_argument("--no-reference", action="store_true", help="skip the GPT-2 reference (other sizes)")
    ap.add_argument("--variants", default="base,fused,liger,autotune,fp8,fp8_rowwise,hd128,vocab32k")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).to(device),
                torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=g).to(device))
               for _ in range(args.warmup + args.steps)]
    measured_peak = measure_matmul_peak(device, torch.bfloat16)
    sheet_peak = peak_flops(device)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, measured bf16 matmul peak "
          f"{measured_peak / 1e12:.0f} TFLOP/s, datasheet {sheet_peak / 1e12 if sheet_peak else float('nan'):.0f}")
    print("| config | tokens/s | x first row | MFU (datasheet) | MFU (measured peak) | peak mem GB | max |dloss| vs kiln base |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    results: list[dict] = []
    report = Report(args, measured_peak, sheet_peak, results)
    if not args.no_reference:
        report.add(run_reference(args, batches))
    for v in args.variants.split(","):
        try:  # one failing variant (a missing package, a compile error) must not lose the others' rows
            report.add(run_variant(v, VARIANTS[v], args, batches, device))
        except Exception as e:  # noqa: BLE001
            print(f"| kiln {v} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |", flush=True)
            results.append({"name": f"kiln {v}", "error": f"{type(e).__name__}: {e}"})
            report.write()
    print(f"wrote {report.out}")


def run_variant(v: str, var: Variant, args, batches, device) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = kiln_model(args.seq, var.vocab, depth=args.depth, **var.overrides)
    flops_per_token = model.flops_per_token(args.seq)
    if var.transform is not None:
        model = var.transform(model)
    data = batches if var.vocab == VOCAB else [(x % var.vocab, y % var.vocab) for x, y in batches]
    if var.mult > 1:
        data = [(torch.cat([a[0] for a in data[i:i + var.mult]]), torch.cat([a[1] for a in data[i:i + var.mult]]))
                for i in range(0, len(data) - var.mult + 1, var.mult)]
    opt = build_optimizer(model, dataclasses.replace(TrainConfig(), lr=6e-4, optimizer=var.optimizer), device)
    if var.compile_step:  # Inductor fuses the foreach implementation; the fused kernel is opaque to it
        t = TrainConfig()
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=6e-4, betas=(t.beta1, t.beta2), eps=t.eps,
                                foreach=True)
    opt = ClippedStep(model.parameters(), opt, compiled=var.compile_step)
    muon.orthogonalize_all = serial_orthogonalize if var.serial_muon else batched_orthogonalize
    if var.loss is None:
        compiled, loss_fn = torch.compile(model, mode=var.compile_mode), (lambda m, x, y: m(x, y))
    elif var.compile_loss:
        compiled, loss_fn = torch.compile(model, mode=var.compile_mode), var.loss
    else:  # compile the backbone only: the loss runs its own kernels
        model.model = torch.compile(model.model, mode=var.compile_mode)
        compiled, loss_fn = model, var.loss
    t0 = time.perf_counter()
    r = run(f"kiln {v}", compiled, opt, loss_fn, data, args.warmup // var.mult or 1, args.steps // var.mult,
            var.attention)
    r["wall_s_incl_compile"] = time.perf_counter() - t0
    r["flops_per_token"] = flops_per_token
    r["same_numerics_as_base"] = var.mult == 1 and var.vocab == VOCAB and not var.overrides
    return r


@dataclasses.dataclass
class Report:
    args: argparse.Namespace
    measured_peak: float
    sheet_peak: float | None
    results: list[dict]
    out: Path = Path(__file__).parent / "results" / "train_throughput.json"

    def add(self, r: dict) -> None:
        """Derive the ratios, print the row and rewrite the JSON at once (a later crash keeps it)."""
        ok = [x for x in self.results if "error" not in x]
        first = ok[0] if ok else r
        kiln_base = next((x for x in ok + [r] if x["name"] == "kiln base"), None)
        flops = r["flops_per_token"] * r["tokens_per_s"]
        r["mfu_datasheet"] = flops / self.sheet_peak if self.sheet_peak else None
        r["mfu_measured"] = flops / self.measured_peak
        r["ratio_to_first_row"] = r["tokens_per_s"] / first["tokens_per_s"]
        comparable = kiln_base is not None and r.get("same_numerics_as_base", False)
        dloss = max(abs(a - b) for a, b in zip(r["losses"], kiln_base["losses"])) if comparable else None
        r["max_loss_diff_vs_kiln_base"] = dloss
        mfu_d = "-" if r["mfu_datasheet"] is None else f"{100 * r['mfu_datasheet']:.1f}%"
        dl = "-" if dloss is None else f"{dloss:.4f}"
        print(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['ratio_to_first_row']:.2f} | {mfu_d} | "
              f"{100 * r['mfu_measured']:.1f}% | {r['peak_mem_gb']:.1f} | {dl} |", flush=True)
        self.results.append(r)
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(exist_ok=True)
        self.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "date": time.strftime("%Y-%m-%d"), "args": vars(self.args),
                                        "measured_peak_flops": self.measured_peak,
                                        "datasheet_peak_flops": self.sheet_peak, "results": self.results},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
