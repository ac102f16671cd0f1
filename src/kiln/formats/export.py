"""`kiln export --format hf|gguf|peft`: a checkpoint as a Hugging Face model folder (or GGUF, or adapter).

    config.json               LlamaForCausalLM, or Qwen3ForCausalLM when the model has QK-norm
    model.safetensors         or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    generation_config.json    bos, eos ids: EOS and the end-of-turn token, so chat generation stops
    tokenizer.json, tokenizer_config.json (chat template), special_tokens_map.json
    README.md                 a model card: architecture, training, the run's metrics

The folder loads offline with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` (and
so in vLLM and SGLang). It is written beside its destination and renamed into place; an existing destination
is replaced only with `--overwrite true`. The GGUF side is kiln/formats/gguf.py.

A LoRA run's checkpoint exports merged (W + (alpha / r) B A) as hf or gguf; `--format peft` writes its adapter
alone (kiln/formats/peft.py), for PEFT on top of the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from kiln.config import Config, ModelConfig
from kiln.config.rundir import RunDir, read_json, write_json_atomic, write_text_atomic
from kiln.formats.checkpoint import (adapter_tensors, checkpoint_config, iter_merged_weights, load_merged_state,
                                    lora_of, read_state, resolve_checkpoint, step_of)
from kiln.formats.hf import hf_architecture, iter_weights, save_sharded, to_hf_config, weight_files
from kiln.formats.peft import is_adapter_key
from kiln.tokenizer import Tokenizer

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def run_export(cfg: Config) -> Path:
    e = cfg.export
    rd = RunDir(cfg.run_path)
    ckpt = resolve_checkpoint(rd.checkpoints, e.checkpoint)
    if e.format == "peft":
        return export_peft(ckpt, Path(e.out) if e.out else rd.root / "export" / "adapter", cfg.overwrite)
    rd.require(rd.tokenizer, "kiln tokenizer")
    if e.format == "gguf":
        out = Path(e.out) if e.out else rd.root / "export" / f"model-{e.quant or 'f16'}.gguf"
        return export_gguf(ckpt, rd, out, e.quant or "f16", cfg.overwrite)
    out = Path(e.out) if e.out else rd.root / "export" / "hf"
    return export_hf(ckpt, rd, out, HF_DTYPES.get(e.quant) if e.quant else None, int(e.max_shard_gb * 1e9),
                     cfg.overwrite)


def export_hf(ckpt: Path, rd: RunDir, out: Path, dtype: torch.dtype | None, max_shard_bytes: int,
              overwrite: bool = False) -> Path:
    """Write checkpoint `ckpt` of run `rd` as a Hugging Face folder at `out`; weights in `dtype` (default: as
    stored). Returns `out`."""
    _refuse_to_replace(out, overwrite)
    model_cfg = checkpoint_config(ckpt).model.resolved()
    tok = Tokenizer.from_file(rd.tokenizer_file())
    stored = _stored_dtype(ckpt)
    dtype = dtype or stored
    stage = out.parent / f".{out.name}.tmp"
    shutil.rmtree(stage, ignore_errors=True)   # our own leftover from a failed export
    try:
        save_sharded(iter_merged_weights(ckpt, dtype), stage, max_shard_bytes)
        write_json_atomic(stage / "config.json", to_hf_config(model_cfg, DTYPE_NAMES[dtype], tok.bos_id, tok.eos_id))
        write_json_atomic(stage / "generation_config.json", generation_config(tok))
        _write_tokenizer(rd.tokenizer, tok, model_cfg, stage)
        write_text_atomic(stage / "README.md", model_card(ckpt, rd, model_cfg, dtype))
        if out.exists():
            shutil.rmtree(out)                 # --overwrite given (checked above)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage.replace(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = sum(p.stat().st_size for p in weight_files(out))
    print(f"exported {ckpt} as a Hugging Face folder: {out} ({size / 1e6:.1f} MB of {DTYPE_NAMES[dtype]} weights)")
    return out


def export_gguf(ckpt: Path, rd: RunDir, out: Path, quant: str, overwrite: bool = False) -> Path:
    """Write checkpoint `ckpt` of run `rd` as one GGUF file of weight type `quant`."""
    from kiln.formats.gguf import write_gguf
    _refuse_to_replace(out, overwrite)
    model_cfg = checkpoint_config(ckpt).model.resolved()
    tok = Tokenizer.from_file(rd.tokenizer_file())
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = write_gguf(out, model_cfg, load_merged_state(ckpt, torch.float32), rd.tokenizer, quant=quant,
                         generation=generation_config(tok), metadata={"general.name": rd.root.name},
                         overwrite=overwrite)
    print(f"exported {ckpt} as GGUF {quant}: {out} ({summary})")
    return out


def export_peft(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the LoRA adapter of checkpoint `ckpt` (a `--lora` / `--qlora` run's) as a PEFT adapter directory."""
    from kiln.config import LoRAConfig
    from kiln.formats.peft import adapter_targets, write_adapter
    lora = lora_of(ckpt)
    if lora is None:
        raise ValueError(f"{ckpt} holds no LoRA adapters (every weight was trained): --format peft is for runs "
                         "trained with --lora or --qlora; export this one with --format hf or gguf")
    _refuse_to_replace(out, overwrite)
    tensors = adapter_tensors(ckpt)
    cfg = LoRAConfig(enabled=True, rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                     dropout=float(lora.get("dropout", 0.0)), targets=adapter_targets(tensors, ckpt))
    base = str(read_state(ckpt).get("base") or lora.get("base") or "")   # the checkpoint the run started from
    stage = out.parent / f".{out.name}.tmp"
    shutil.rmtree(stage, ignore_errors=True)   # our own leftover from a failed export
    try:
        write_adapter(stage, tensors, cfg, base)
        if out.exists():
            shutil.rmtree(out)                 # --overwrite given (checked above)
        stage.replace(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"exported the LoRA adapter of {ckpt} (rank {cfg.rank}, alpha {cfg.alpha:g}, {', '.join(cfg.targets)}) "
          f"in the PEFT format: {out}")
    return out


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    """generation_config.json: every stop id as eos_token_id, so `generate` ends a chat turn where the model
    was taught to."""
    stops = list(tok.stop_ids)
    cfg: dict[str, Any] = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tok.pad_id}
    if tok.bos_id is not None:
        cfg["bos_token_id"] = tok.bos_id
    return {**tok.generation, **cfg}


def _write_tokenizer(src: Path, tok: Tokenizer, model_cfg: ModelConfig, dest: Path) -> None:
    shutil.copyfile(src / "tokenizer.json", dest / "tokenizer.json")
    config = dict(read_json(src / "tokenizer_config.json") or {})
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("model_max_length", model_cfg.max_seq_len)
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    write_json_atomic(dest / "tokenizer_config.json", config)
    if (src / "special_tokens_map.json").is_file():
        shutil.copyfile(src / "special_tokens_map.json", dest / "special_tokens_map.json")


def model_card(ckpt: Path, rd: RunDir, c: ModelConfig, dtype: torch.dtype) -> str:
    """README.md with the Hugging Face card header: what the model is, how it was made, how it scored."""
    state = read_state(ckpt) if (ckpt / "state.json").is_file() else {}
    metrics = read_json(rd.eval / "metrics.json") or {}
    arch = hf_architecture(c)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [kiln]", "---", "",
             f"# {rd.root.name}", "",
             f"A {arch} model exported by kiln from `{ckpt.name}` of run `{rd.root.name}`"
             + (f", imported from `{state['imported_from']}`." if state.get("imported_from") else "."), "",
             "| | |", "|---|---|",
             f"| parameters | {c.num_params() / 1e6:.1f}M |",
             f"| layers × width | {c.depth} × {c.d_model} |",
             f"| heads | {c.n_heads} of {c.head_dim} ({c.n_kv_heads} key/value) |",
             f"| feed-forward | SwiGLU {c.ffn_hidden} |", f"| vocabulary | {c.vocab_size} |",
             f"| context | {c.max_seq_len} |", f"| weights | {DTYPE_NAMES[dtype]} |",
             f"| step | {step_of(ckpt) if ckpt.name.startswith('step_') else '?'} |"]
    if state.get("lora"):
        lines.append(f"| LoRA | rank {state['lora'].get('rank')}, alpha {state['lora'].get('alpha')}, merged |")
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in metrics.items() if isinstance(v, (int, float, str))]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "```", ""]
    return "\n".join(lines)


def _stored_dtype(ckpt: Path) -> torch.dtype:
    for name, t in iter_weights(ckpt):
        if t.is_floating_point() and not is_adapter_key(name):   # a LoRA run's adapters are fp32 over any base
            return t.dtype
    return torch.float32


def _refuse_to_replace(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite true to replace it")
