"""Pretraining: the first task of the one loop (kiln/train/loop.py). Packed token shards in, next-token loss
over every real target, a validation hook on the fixed validation order, samples from the prompts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kiln.config import Config, ConfigError, resolve_train, round_up
from kiln.config.rundir import RunDir
from kiln.eval.evaluate import loss_sums
from kiln.formats.checkpoint import latest_checkpoint
from kiln.plan.estimate import startup_estimate
from kiln.tokenizer.loader import IGNORE, PackedLoader
from kiln.train import loop
from kiln.train.checkpoint import data_fingerprint
from kiln.train.distributed import Dist, init_distributed, shutdown, sum_over_ranks
from kiln.train.setup import eval_model, full_weights_here, prepare


def resolved_config(cfg: Config, vocab_size: int, world_size: int = 1) -> Config:
    """The run's config with the model and training values derived from the size dial filled in.

    The embedding gets the tokenizer's vocabulary rounded up to tokenizer.vocab_multiple (the tokenizer
    rounds its own target the same way; this pads when it learned fewer tokens): matmuls with a ragged
    dimension run markedly slower on tensor cores, and the spare rows are never targets."""
    vocab = cfg.model.vocab_size or round_up(vocab_size, cfg.tokenizer.vocab_multiple)
    model = dataclasses.replace(cfg.model, vocab_size=vocab).resolved()
    if cfg.train.seq_len not in (None, model.max_seq_len):
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: pretraining rows are model.max_seq_len="
                          f"{model.max_seq_len} tokens; set model.max_seq_len instead")
    return dataclasses.replace(cfg, model=model, train=resolve_train(cfg.train, model, world_size))


# Repeating data up to ~4 epochs is nearly as good as fresh tokens; beyond that returns fall off fast
# (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
MAX_USEFUL_EPOCHS = 4


def repetition_warning(epochs: float) -> str | None:
    """What to tell a run that will repeat its data more than is useful, or None."""
    if epochs <= MAX_USEFUL_EPOCHS:
        return None
    return (f"warning: {epochs:.1f} passes over the training data. Beyond ~{MAX_USEFUL_EPOCHS} epochs repeated "
            "tokens are worth less and less and validation loss can turn up (overfitting): watch val_loss, add "
            "data, lower --train.max_steps or --train.tokens_per_param")


def token_loss(model: nn.Module, batch: loop.Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the real targets (-100 = padding, ignored)."""
    return model(batch["input_ids"], batch["targets"], reduction="sum")


def count_targets(batch: loop.Batch) -> torch.Tensor:
    return (batch["targets"] != IGNORE).sum()


def as_dicts(loader: PackedLoader):
    """The loader's (inputs, targets) batches as the loop's dicts."""
    for x, y in loader:
        yield {"input_ids": x, "targets": y}


@torch.no_grad()
def validation_loss(model: nn.Module, loader: PackedLoader, start: dict, batches: int, device: torch.device,
                    bf16: bool, d: Dist = Dist()) -> float:
    """Loss per real target over `batches` batches of the fixed (unshuffled) validation order from `start`,
    pooled over ranks (each rank scores its own rows) -- the same scorer as `kiln eval`."""
    model.eval()
    loader.load_state_dict(start)  # the same batches every time
    s = loss_sums(model, loader, batches, device, bf16)
    model.train()
    return (sum_over_ranks(s["nats"], d) / sum_over_ranks(s["tokens"], d).clamp(min=1)).item()


def check_start(cfg: Config) -> None:
    """ConfigError when this run would start fresh over checkpoints without --overwrite (see loop.start)."""
    rd = RunDir(cfg.run_path)
    if not (cfg.train.resume and latest_checkpoint(rd.checkpoints)):
        loop.refuse_to_overwrite(rd, cfg.overwrite)


def run_pretrain(cfg: Config) -> dict:
    t = cfg.train
    d, device = init_distributed(t.parallel, t.device, t.cpu_offload)
    try:
        return _pretrain(cfg, d, device)
    finally:
        shutdown()


def _pretrain(cfg: Config, d: Dist, device: torch.device) -> dict:
    from kiln.model.llama import Transformer
    from kiln.tokenizer import Tokenizer

    say = print if d.is_main else _quiet
    rd = RunDir(cfg.run_path)
    rd.require(rd.tokens, "kiln tokenize")
    derived_horizon = cfg.train.max_steps is None
    check_start(cfg)   # before building anything
    tok = Tokenizer.from_file(rd.tokenizer_file())
    cfg = resolved_config(cfg, tok.vocab_size, d.world_size)
    m, t = cfg.model, cfg.train
    fingerprint = data_fingerprint(rd.tokens / "meta.json", rd.tokenizer_file())

    if device.type == "cuda":   # the plan's figures for this very run, and a warning before one that cannot fit
        for line in startup_estimate(cfg, torch.cuda.mem_get_info(device)[0], torch.cuda.get_device_name(device),
                                     d.world_size):
            say(line)
    torch.manual_seed(t.seed)
    model = Transformer(m).to("cpu" if t.cpu_offload else device)
    n_params = model.num_params()   # counted before sharding (ZeRO-3 empties the parameters it partitions)
    say(f"model: {n_params / 1e6:.2f}M params, d_model {m.d_model}, {m.depth} layers, {m.n_heads} heads "
        f"({m.n_kv_heads} kv), ffn {m.ffn_hidden}, vocab {m.vocab_size}, context {m.max_seq_len}")
    if derived_horizon:
        say(f"horizon: {t.max_steps} steps = {t.tokens_per_param:g} tokens per parameter x {n_params / 1e6:.2f}M "
            f"parameters / {t.batch_tokens} tokens per step (train.tokens_per_param)")
    tr = prepare(cfg, model, d, device, fingerprint, say)

    train_loader = PackedLoader(rd.token_files("train"), m.max_seq_len, t.micro_batch_size, tok.eos_id, seed=t.seed,
                                rank=d.rank, world_size=d.world_size, packing=t.packing, bos_id=tok.bos_id,
                                pad_id=tok.pad_id, prefetch=t.prefetch, pin_memory=t.pin_memory and device.type == "cuda")
    val_loader = PackedLoader(rd.token_files("val"), m.max_seq_len, t.micro_batch_size, tok.eos_id, shuffle=False,
                              rank=d.rank, world_size=d.world_size, bos_id=tok.bos_id)
    val_start = val_loader.state_dict()
    # Each rank scores its share of the eval_batches; with micro-batches of the same size that is the
    # same set of rows as one process.
    val_batches = max(1, min(t.eval_batches // d.world_size, val_loader.rows_per_epoch // t.micro_batch_size))
    val_model = eval_model(tr)
    sample_here = full_weights_here(tr)

    def sample(step: int) -> None:
        if sample_here:
            _print_samples(model, tok, t.sample_prompts, t.seed + step)

    task = loop.Task(batches=as_dicts(train_loader), loss=token_loss, count=count_targets, source=train_loader,
                     evaluate=lambda: validation_loss(val_model, val_loader, val_start, val_batches, device, tr.amp, d),
                     sample=sample)
    ts = loop.start(tr, task, say)
    epoch_tokens = train_loader.tokens_per_epoch * d.world_size
    epochs = t.max_steps * t.batch_tokens / epoch_tokens
    say(f"data: {epoch_tokens / 1e6:.1f}M training positions per epoch; {t.max_steps} steps are {epochs:.2f} epochs")
    if (warning := repetition_warning(epochs)) is not None:
        say(warning)
    summary = loop.run(tr, task, ts, say)
    return {**summary, "epochs": round(epochs, 3), "params": n_params}


def _quiet(*args, **kwargs) -> None:
    """`print` on ranks other than 0."""


def _print_samples(model, tok, prompts: list[str], seed: int) -> None:
    from kiln.infer.generate import generate
    model.eval()
    for prompt in prompts:
        ids = generate(model, tok.encode(prompt, add_bos=True), max_new_tokens=64, temperature=0.8,
                       top_k=50, stop_ids=(tok.eos_id,), seed=seed)
        print(f"--- sample: {prompt!r}\n{prompt}{tok.decode(ids)}", flush=True)
    model.train()
