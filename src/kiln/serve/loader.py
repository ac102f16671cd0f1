"""What `kiln serve` and `kiln chat` serve: a run directory's checkpoint (trained or imported) and its tokenizer,
behind one batched engine."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.config import Config
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import load_model, resolve_checkpoint
from kiln.infer.engine import Engine
from kiln.runtime.device import pick_device
from kiln.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Served:
    """One model as the API sees it."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    api_key: str | None

    @property
    def max_len(self) -> int:
        return self.engine.max_len


def load_served(cfg: Config, start: bool = True) -> Served:
    """The run's checkpoint in the engine (on `serve.device`, in `serve.dtype`), with its tokenizer."""
    s = cfg.serve
    rd = RunDir(cfg.run_path)
    ckpt = resolve_checkpoint(rd.checkpoints, s.checkpoint)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    device = pick_device(s.device)
    dtype = DTYPES.get(s.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, _ = load_model(ckpt, device, dtype)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{rd.tokenizer_file()} has {tok.vocab_size} tokens but the model at {ckpt} embeds "
                         f"{model.cfg.vocab_size}: they are not from the same run")
    engine = Engine(model, tok, max_slots=s.max_batch, max_len=s.max_len, max_queue=s.max_queue,
                    cuda_graphs=s.cuda_graphs and device.type == "cuda")
    if start:
        engine.start()
    print(f"serving {ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"{device}): {s.max_batch} slots of {engine.max_len} positions", flush=True)
    return Served(s.model_name or cfg.run_path.resolve().name, engine, tok,
                  s.api_key or os.environ.get("KILN_API_KEY") or None)
