"""Pretraining: the linear loop. Eval / sample / checkpoint blocks, one optimizer step, one log line.

All state needed to resume lives in `resume_state()` and the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kiln.config import Config, grad_accum_steps, resolve_train, round_up
from kiln.rundir import RunDir
from kiln.train import checkpoint as ckpt_io
from kiln.train.loader import PackedLoader
from kiln.train.optim import build_optimizer, lr_at, set_lr
from kiln.train.runtime import autocast, configure_torch, peak_flops, pick_device, use_bf16

Batch = tuple[torch.Tensor, torch.Tensor]


def resolved_config(cfg: Config, vocab_size: int, world_size: int = 1) -> Config:
    """The run's config with the model and training values derived from the size dial filled in.

    The embedding gets the tokenizer's vocabulary rounded up to a multiple of 64: matmuls with a
    ragged dimension run markedly slower on tensor cores, and the spare rows are never targets."""
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or round_up(vocab_size, 64)).resolved()
    return dataclasses.replace(cfg, model=model, train=resolve_train(cfg.train, model, world_size))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
               accum: int, grad_clip: float, device: torch.device, bf16: bool,
               loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches. Returns (mean loss, grad norm) as device tensors:
    reading them is left to the caller, since `.item()` is a host sync."""
    loss_fn = loss_fn or (lambda m, b: m(b[0], b[1]))
    total = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = next(batches)
        batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        with autocast(device, bf16):
            loss = loss_fn(model, batch) / accum
        loss.backward()
        total += loss.detach()
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: PackedLoader, start: dict, batches: int,
                    device: torch.device, bf16: bool) -> float:
    """Mean loss over `batches` batches of the fixed (unshuffled) validation order from `start`."""
    model.eval()
    loader.load_state_dict(start)  # the same batches every time
    it = iter(loader)
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = next(it)
        with autocast(device, bf16):
            total += model(x.to(device), y.to(device)).float()
    model.train()
    return (total / batches).item()


def run_pretrain(cfg: Config) -> dict:
    from kiln.model.llama import Transformer
    from kiln.tokenizer import Tokenizer

    rd = RunDir(cfg.run_path)
    rd.require(rd.tokens, "kiln tokenize")
    tok = Tokenizer.from_file(rd.tokenizer_file())
    cfg = resolved_config(cfg, tok.vocab_size)
    m, t = cfg.model, cfg.train
    device = pick_device(t.device)
    bf16 = use_bf16(t.precision, device)
    configure_torch(device, t.threads)
    accum = grad_accum_steps(t, m)

    torch.manual_seed(t.seed)
    model = Transformer(m).to(device)
    optimizer = build_optimizer(model, t, device)
    train_loader = PackedLoader(rd.token_files("train"), m.max_seq_len, t.micro_batch_size, tok.eos_id, seed=t.seed)
    val_loader = PackedLoader(rd.token_files("val"), m.max_seq_len, t.micro_batch_size, tok.eos_id, shuffle=False)
    val_start = val_loader.state_dict()
    val_batches = max(1, min(t.eval_batches, val_loader.rows_per_epoch // t.micro_batch_size))

    start_step, tokens_seen, elapsed_before = 0, 0, 0.0
    last = ckpt_io.latest_checkpoint(rd.checkpoints) if t.resume else None
    if last is not None:
        _check_same_model(last, cfg)
        state = ckpt_io.load_checkpoint(last, model, optimizer, device)
        train_loader.load_state_dict(state["loader"])
        start_step, tokens_seen, elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
        _truncate_metrics(rd.metrics, start_step)
        print(f"resumed from {last} at step {start_step}")
    else:
        _start_fresh(rd)

    n_params = model.num_params()
    flops_per_token = model.flops_per_token(m.max_seq_len)
    peak = peak_flops(device)
    print(f"model: {n_params / 1e6:.2f}M params ({model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding), "
          f"d_model {m.d_model}, {m.depth} layers, {m.n_heads} heads ({m.n_kv_heads} kv), ffn {m.ffn_hidden}, "
          f"vocab {m.vocab_size}, context {m.max_seq_len}")
    print(f"train: {t.max_steps} steps x {t.batch_tokens} tokens (micro-batch {t.micro_batch_size} x accum {accum}), "
          f"lr {t.lr:.2e} {t.schedule}, warmup {t.warmup_steps}, device {device}, {'bf16' if bf16 else 'fp32'}"
          f"{', compiled' if t.compile else ''}")

    fwd = torch.compile(model) if t.compile else model
    batches = iter(train_loader)
    tokens_per_step = t.batch_tokens
    t0 = time.perf_counter()
    window_t0, window_steps = t0, 0
    metrics = open(rd.metrics, "a", encoding="utf-8")
    final_val = None
    try:
        for step in range(start_step, t.max_steps):
            done = step + 1
            lr = lr_at(step, t)
            set_lr(optimizer, lr)
            loss, gnorm = train_step(fwd, optimizer, batches, accum, t.grad_clip, device, bf16)
            tokens_seen += tokens_per_step
            window_steps += 1
            record: dict = {}
            if done % t.log_every == 0 or done == t.max_steps:
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / (now - window_t0)
                window_t0, window_steps = now, 0
                elapsed = elapsed_before + now - t0
                record = {"step": done, "loss": loss.item(), "lr": lr, "grad_norm": gnorm.item(),
                          "tokens": tokens_seen, "tok_per_s": tok_s, "elapsed_s": elapsed}
                if peak:
                    record["mfu"] = flops_per_token * tok_s / peak
                if device.type == "cuda":  # allocator bookkeeping on the host: no sync
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
                eta = (now - t0) / (done - start_step) * (t.max_steps - done)
                print(_log_line(record, t.max_steps, eta), flush=True)
            if (t.eval_every and done % t.eval_every == 0) or done == t.max_steps:
                final_val = validation_loss(fwd, val_loader, val_start, val_batches, device, bf16)
                record = {**record, "step": done, "val_loss": final_val}
                print(f"step {done}: val loss {final_val:.4f} (ppl {math.exp(min(final_val, 50)):.1f})", flush=True)
            if t.sample_every and done % t.sample_every == 0:
                _print_samples(model, tok, t.sample_prompts, t.seed + done)
            if record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if done % t.checkpoint_every == 0 or done == t.max_steps:
                state = {"step": done, "tokens_seen": tokens_seen, "loader": train_loader.state_dict(),
                         "elapsed_s": elapsed_before + time.perf_counter() - t0}
                ckpt_io.save_checkpoint(rd.checkpoints, done, model, optimizer, state, cfg, t.keep_checkpoints)
    finally:
        metrics.close()
    wall = time.perf_counter() - t0
    summary = {"steps": t.max_steps, "tokens_seen": tokens_seen, "final_val_loss": final_val,
               "params": n_params, "train_seconds": wall,
               "checkpoint": str(ckpt_io.latest_checkpoint(rd.checkpoints))}
    print(f"pretrain done: {t.max_steps - start_step} steps in {wall:.0f}s, val loss {final_val}")
    return summary


def _log_line(r: dict, max_steps: int, eta_s: float) -> str:
    line = (f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tok_per_s'] / 1e3:.1f}k tok/s")
    if "mfu" in r:
        line += f" | mfu {100 * r['mfu']:.1f}%"
    return line + f" | eta {_fmt_time(eta_s)}"


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _print_samples(model, tok, prompts: list[str], seed: int) -> None:
    from kiln.infer.generate import generate
    model.eval()
    for prompt in prompts:
        ids = generate(model, tok.encode(prompt, add_bos=True), max_new_tokens=64, temperature=0.8,
                       top_k=50, stop_ids=(tok.eos_id,), seed=seed)
        print(f"--- sample: {prompt!r}\n{prompt}{tok.decode(ids)}", flush=True)
    model.train()


def _check_same_model(ckpt: Path, cfg: Config) -> None:
    saved = ckpt_io.model_config_of(ckpt)
    if saved != cfg.model:
        diff = {k: (getattr(saved, k), getattr(cfg.model, k)) for k in vars(saved) if getattr(saved, k) != getattr(cfg.model, k)}
        raise ValueError(f"cannot resume from {ckpt}: it was trained with a different model config {diff}; "
                         "use a new --run_dir or drop --resume")


def _start_fresh(rd: RunDir) -> None:
    """A run that does not resume starts from nothing: stale checkpoints and metrics would mislead."""
    import shutil
    if rd.checkpoints.exists():
        if ckpt_io.complete_checkpoints(rd.checkpoints):
            print(f"note: starting fresh; removing old checkpoints in {rd.checkpoints} (use --resume to continue)",
                  file=sys.stderr)
        shutil.rmtree(rd.checkpoints)
    rd.metrics.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    lines = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                lines.append(ln)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
