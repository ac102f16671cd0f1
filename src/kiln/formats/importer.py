"""`kiln import SRC`: a published model (a Hugging Face folder or a .gguf file) made into a kiln run directory.

    <run_dir>/tokenizer/                 tokenizer.json, tokenizer_config.json, generation_config.json, _SUCCESS
    <run_dir>/checkpoints/step_0000000/  model.safetensors (or shards + index), config.yaml, state.json, COMPLETE
    <run_dir>/config.yaml                the run's config: the imported model section, defaults elsewhere

After it, the run is like one kiln trained: `generate`, `eval`, `export`, `serve` and fine-tuning read it the
same way. Everything is checked before anything is written (architecture, every tensor's shape, the
tokenizer), and written into a staging directory that is renamed into place, so a failed import leaves
nothing behind; an existing run is never replaced without `--overwrite true`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import tokenizers
import torch
import yaml

from kiln.config import Config, ConfigError, ModelConfig
from kiln.config.rundir import RunDir, mark_done, read_json, write_json_atomic, write_text_atomic
from kiln.formats.checkpoint import COMPLETE, complete_checkpoints, step_dir
from kiln.formats.hf import check_weights, from_hf_config, iter_weights, save_sharded
from kiln.formats.imported import ImportedModel
from kiln.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def run_import(cfg: Config) -> Path:
    """Import `cfg.importing.source` into `cfg.run_path`; returns the checkpoint directory."""
    imp = cfg.importing
    if not imp.source:
        raise ConfigError("kiln import needs a source: `kiln import PATH --run_dir DIR` (a Hugging Face folder "
                          "or a .gguf file)")
    src = Path(imp.source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (give a local Hugging Face folder or a .gguf file; "
                                "nothing is downloaded)")
    rd = RunDir(cfg.run_path)
    _refuse_to_replace(rd, cfg.overwrite)
    dtype = None if imp.dtype == "auto" else DTYPES[imp.dtype]
    if src.is_dir():
        imported = read_hf_folder(src, dtype)
    elif src.suffix.lower() == ".gguf":
        from kiln.formats.gguf import read_gguf
        imported = read_gguf(src, dtype or torch.float32)
    else:
        raise ValueError(f"{src}: neither a folder nor a .gguf file; kiln imports Hugging Face folders and GGUF")
    return write_run(imported, rd, cfg, int(imp.max_shard_gb * 1e9))


def read_hf_folder(folder: Path, dtype: torch.dtype | None = None) -> ImportedModel:
    """A Hugging Face model folder as an ImportedModel (weights in `dtype`, default the folder's own)."""
    hf = read_json(folder / "config.json", True, ": a Hugging Face model folder needs it")
    model = from_hf_config(hf, folder / "config.json")
    if dtype is None:
        dtype = DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), torch.float32)
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        hint = " (only a SentencePiece tokenizer.model: save it as tokenizer.json first with transformers, " \
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))" if (folder / "tokenizer.model").is_file() else ""
        raise FileNotFoundError(f"{folder}: no tokenizer.json{hint}")
    tok_cfg = read_json(folder / "tokenizer_config.json", True, ": a Hugging Face model folder needs it")
    if "chat_template" not in tok_cfg:
        for name in ("chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():      # transformers >= 4.50 saves the template beside the config
                text = (folder / name).read_text(encoding="utf-8")
                tok_cfg["chat_template"] = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
    generation = read_json(folder / "generation_config.json") or \
        {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    arch = (hf.get("architectures") or [hf["model_type"]])[0]
    return ImportedModel(model=model, state_dict=dict(iter_weights(folder, dtype)),
                         tokenizer_json=tok_json.read_text(encoding="utf-8"), tokenizer_config=tok_cfg,
                         generation=generation, source=str(folder), architecture=arch)


def write_run(imported: ImportedModel, rd: RunDir, cfg: Config, max_shard_bytes: int) -> Path:
    """Check an ImportedModel whole, then write it as `rd`'s tokenizer and step-0 checkpoint."""
    try:
        model_cfg = ModelConfig(**imported.model)
        model_cfg.validate()
    except (TypeError, ConfigError) as e:
        raise ValueError(f"{imported.source}: its config does not map onto kiln's model: {e}") from e
    check_weights({k: tuple(v.shape) for k, v in imported.state_dict.items()}, model_cfg, imported.source)
    _check_tokenizer(imported, model_cfg)
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    run_cfg.train = dataclasses.replace(cfg.train, resume=False)

    rd.root.mkdir(parents=True, exist_ok=True)
    stage = rd.root / ".import.tmp"
    shutil.rmtree(stage, ignore_errors=True)    # our own leftover from a failed import, never user data
    try:
        tok_dir, ckpt = stage / "tokenizer", stage / "checkpoint"
        tok_dir.mkdir(parents=True)
        (tok_dir / "tokenizer.json").write_text(imported.tokenizer_json, encoding="utf-8")
        write_json_atomic(tok_dir / "tokenizer_config.json", imported.tokenizer_config)
        write_json_atomic(tok_dir / "generation_config.json", imported.generation)
        mark_done(tok_dir, {"imported_from": imported.source})
        save_sharded(imported.state_dict.items(), ckpt, max_shard_bytes,
                     metadata={"step": "0", "imported_from": imported.source})
        write_text_atomic(ckpt / "config.yaml", yaml.safe_dump(run_cfg.to_dict(), sort_keys=False))
        write_json_atomic(ckpt / "state.json", {"step": 0, "imported_from": imported.source,
                                                "architecture": imported.architecture})
        write_text_atomic(ckpt / COMPLETE, "")
        for sub in ("tokenizer", "checkpoints", "tokens"):      # replaced only with --overwrite (checked above)
            shutil.rmtree(rd.root / sub, ignore_errors=True)
        tok_dir.replace(rd.tokenizer)
        rd.checkpoints.mkdir()
        target = step_dir(rd.checkpoints, 0)
        ckpt.replace(target)
        write_text_atomic(rd.root / "config.yaml", yaml.safe_dump(run_cfg.to_dict(), sort_keys=False))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n = sum(v.numel() for v in imported.state_dict.values())
    print(f"imported {imported.architecture} from {imported.source}: {n / 1e6:.1f}M parameters "
          f"({model_cfg.depth} layers, d_model {model_cfg.d_model}, {model_cfg.n_heads} heads of "
          f"{model_cfg.head_dim}, {model_cfg.n_kv_heads} kv heads) -> {target}")
    return target


def _check_tokenizer(imported: ImportedModel, model_cfg: ModelConfig) -> None:
    """The tokenizer loads, fits the embedding, maps every token to bytes and renders its chat template."""
    where = f"{imported.source} (tokenizer)"
    try:
        tok = Tokenizer(tokenizers.Tokenizer.from_str(imported.tokenizer_json), Path(where),
                        imported.tokenizer_config, imported.generation)
        tok.token_bytes()
        if tok.chat_template is not None:
            tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception as e:      # noqa: BLE001 - any failure here means kiln cannot represent the tokenizer
        raise ValueError(f"{where}: kiln cannot use this tokenizer: {e}") from e
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{where}: {tok.vocab_size} tokens but the embedding has {model_cfg.vocab_size} rows")


def _refuse_to_replace(rd: RunDir, overwrite: bool) -> None:
    found = [str(p.relative_to(rd.root)) for p in (rd.tokenizer, rd.tokens) if p.exists()]
    found += [str(c.relative_to(rd.root)) for c in complete_checkpoints(rd.checkpoints)]
    if found and not overwrite:
        raise FileExistsError(f"{rd.root} already holds {', '.join(found)}; import into a new --run_dir, or "
                              "pass --overwrite true to replace them (they are deleted)")
