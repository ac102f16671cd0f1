"""What `kiln serve` and `kiln chat` serve: a run directory's checkpoint (trained or imported) and its tokenizer,
behind one batched engine."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.config import Config
from kiln.config.rundir import RunDir
from kiln.formats.checkpoint import load_model, resolve_checkpoint
from kiln.formats.peft import apply_adapter
from kiln.infer.adapters import AdapterBank
from kiln.infer.engine import Engine
from kiln.infer.fuse import fuse_projections
from kiln.infer.quant import describe, quantize_int8, weight_bytes
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

    @property
    def names(self) -> list[str]:
        """Every model name the API answers to: the base's, then each LoRA adapter's (`serve.lora_modules`)."""
        bank = self.engine.adapters
        return [self.name, *(bank.names if bank is not None else [])]

    def adapter_of(self, model: str) -> int:
        """The engine's adapter index for one of `names` (0: the base)."""
        return 0 if model == self.name else self.engine.adapters.index(model)


def load_served(cfg: Config, start: bool = True) -> Served:
    """The run's checkpoint (with `serve.adapter` merged in) in the engine (on `serve.device`, in `serve.dtype`,
    int8 weight-only with `serve.quantize=int8`), with its tokenizer."""
    s = cfg.serve
    rd = RunDir(cfg.run_path)
    ckpt = resolve_checkpoint(rd.checkpoints, s.checkpoint)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    device = pick_device(s.device)
    dtype = DTYPES.get(s.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, _ = load_model(ckpt, device, dtype)
    adapter = ""
    if s.adapter:   # merged before int8 and the stacked projections, which take the weights as they then are
        lora = apply_adapter(model, s.adapter)
        adapter = f" + LoRA adapter {s.adapter} (rank {lora.rank}, alpha {lora.alpha:g}, {', '.join(lora.targets)})"
    bank = None
    if s.lora_modules:   # before int8, which would leave the adapted layers unplain
        if s.compile or s.quantize != "none":
            raise ValueError(f"serve.lora_modules with serve.{'compile' if s.compile else 'quantize'}: not supported "
                             "yet (a compiled step cannot choose adapters per row; int8 takes plain linears only); "
                             "serve the adapters without it, or merge one adapter (serve.adapter)")
        served = s.model_name or cfg.run_path.resolve().name
        dirs = s.lora_dirs()
        if served in dirs:   # its requests would reach the base: the adapter could never be asked for
            raise ValueError(f"serve.lora_modules: {served!r} is the base model's name (the run directory's; "
                             "--serve.model_name renames it); give the adapter another name")
        bank = AdapterBank(model, dirs)
        adapter += f"; LoRA adapters by model name: {bank.describe()}"
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{rd.tokenizer_file()} has {tok.vocab_size} tokens but the model at {ckpt} embeds "
                         f"{model.cfg.vocab_size}: they are not from the same run")
    n_params = sum(p.numel() for p in model.parameters())
    before = weight_bytes(model)
    if s.quantize == "int8":   # before the engine: it captures CUDA graphs of the model as it is
        quantize_int8(model)
    fuse_projections(model)    # q/k/v and gate/up as one matmul each (int8 and LoRA layers stay as they are)
    if s.compile:
        print(f"compiling the decode step for {s.max_batch} slots (minutes; `--serve.compile false` starts at once)",
              flush=True)
    engine = Engine(model, tok, max_slots=s.max_batch, max_len=s.max_len, max_queue=s.max_queue,
                    cuda_graphs=s.cuda_graphs and device.type == "cuda", compile=s.compile, adapters=bank)
    if s.max_len and s.max_len > engine.max_len:
        print(f"warning: serve.max_len={s.max_len} is beyond the model's context of {model.cfg.max_seq_len} "
              f"positions: sequences get {engine.max_len}", flush=True)
    if start:
        engine.start()
    print(f"serving {ckpt}{adapter} ({n_params / 1e6:.1f}M parameters, {dtype}, {device}): {s.max_batch} slots of "
          f"{engine.max_len} positions", flush=True)
    if s.quantize != "none":
        print(f"{describe(model, device, dtype)}; weights {before / 2**20:.1f} MiB -> "
              f"{weight_bytes(model) / 2**20:.1f} MiB", flush=True)
    return Served(s.model_name or cfg.run_path.resolve().name, engine, tok,
                  s.api_key or os.environ.get("KILN_API_KEY") or None)
