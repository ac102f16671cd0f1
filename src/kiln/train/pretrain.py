"""Pretraining: the linear loop. Eval / sample / checkpoint blocks, one optimizer step, one log line.

All state needed to resume lives in `resume_state()` and the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kiln.config import Config, ConfigError, grad_accum_steps, resolve_train, round_up
from kiln.rundir import RunDir
from kiln.train import checkpoint as ckpt_io
from kiln.train import faults, zero
from kiln.train.cross_entropy import fuse_for_run
from kiln.train.distributed import (Dist, any_rank, barrier, broadcast_object, full_tensor, grad_sync, init_distributed,
                                    mean_over_ranks, parallelize, shutdown, uses_autocast)
from kiln.train.fp8 import apply_fp8, check_fp8
from kiln.train.guard import SpikeGuard, step_if_finite
from kiln.train.loader import PackedLoader
from kiln.train.memory import apply_activation_checkpointing
from kiln.train.optim import build_optimizer, lr_at, set_lr
from kiln.train.runtime import (autocast, check_sdpa_backend, configure_torch, cuda_memory_stats, mfu, mfu_peak,
                                oom_advice, sdpa_backend, use_bf16)

Batch = tuple[torch.Tensor, torch.Tensor]


def resolved_config(cfg: Config, vocab_size: int, world_size: int = 1) -> Config:
    """The run's config with the model and training values derived from the size dial filled in.

    The embedding gets the tokenizer's vocabulary rounded up to a multiple of 64: matmuls with a
    ragged dimension run markedly slower on tensor cores, and the spare rows are never targets."""
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or round_up(vocab_size, 64)).resolved()
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
            "data, or lower --train.max_steps")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
               accum: int, grad_clip: float, device: torch.device, bf16: bool,
               loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] | None = None,
               skip_nonfinite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `accum` micro-batches. Returns (mean loss, grad norm) as device tensors:
    reading them is left to the caller, since `.item()` is a host sync.

    Under DDP/FSDP (`model` the wrapper) only the last micro-batch's backward communicates; the loss is
    this rank's and the norm the global one. A non-finite norm skips the update (see guard.py).
    A DeepSpeed engine accumulates, clips and skips by itself (zero.train_step)."""
    if zero.is_engine(model):
        return zero.train_step(model, batches, accum, device, loss_fn)
    loss_fn = loss_fn or (lambda m, b: m(b[0], b[1]))
    total = torch.zeros((), device=device)
    for i in range(accum):
        x, y = next(batches)
        batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        with grad_sync(model, enabled=i == accum - 1):
            with autocast(device, bf16):
                loss = loss_fn(model, batch) / accum
            loss.backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = full_tensor(norm)  # FSDP: a DTensor; full_tensor() all-reduces the shards' norms
    if skip_nonfinite:
        # The norm is global (gradients are reduced before it), so every rank takes the same decision;
        # a NaN/Inf loss always reaches it through its gradient. The local loss joins in one process.
        finite = torch.isfinite(norm) if _distributed() else torch.isfinite(norm) & torch.isfinite(total)
        step_if_finite(optimizer, finite)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: PackedLoader, start: dict, batches: int,
                    device: torch.device, bf16: bool, d: Dist = Dist()) -> float:
    """Mean loss over `batches` batches of the fixed (unshuffled) validation order from `start`,
    averaged over ranks (each rank scores its own rows)."""
    model.eval()
    loader.load_state_dict(start)  # the same batches every time
    it = iter(loader)
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = next(it)
        with autocast(device, bf16):
            total += model(x.to(device), y.to(device)).float()
    model.train()
    return mean_over_ranks(total / batches, d).item()


@dataclasses.dataclass
class TrainState:
    """Every counter a resume needs besides weights, optimizer, RNGs and the loader (all in one place)."""

    step: int = 0            # optimizer steps taken (the LR schedule position)
    data_step: int = 0       # optimizer steps' worth of batches drawn (> step after a rollback skipped some)
    tokens_seen: int = 0     # tokens trained on (skipped batches excluded)
    elapsed_s: float = 0.0
    skipped_steps: int = 0   # updates skipped for a non-finite loss / gradient norm
    rollbacks: int = 0
    spike: dict = dataclasses.field(default_factory=dict)   # SpikeGuard.state_dict()

    @classmethod
    def from_checkpoint(cls, state: dict) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        ts = cls(**{k: v for k, v in state.items() if k in names})
        if "data_step" not in state:   # a checkpoint from before rollbacks existed
            ts.data_step = ts.step
        return ts


def run_pretrain(cfg: Config) -> dict:
    t = cfg.train
    d, device = init_distributed(t.parallel, t.device, t.cpu_offload)
    try:
        summary = _pretrain(cfg, d, device)
    finally:
        shutdown()
    return summary


def _pretrain(cfg: Config, d: Dist, device: torch.device) -> dict:
    from kiln.model.llama import Transformer
    from kiln.tokenizer import Tokenizer

    say = print if d.is_main else _quiet
    rd = RunDir(cfg.run_path)
    rd.require(rd.tokens, "kiln tokenize")
    tok = Tokenizer.from_file(rd.tokenizer_file())
    cfg = resolved_config(cfg, tok.vocab_size, d.world_size)
    m, t = cfg.model, cfg.train
    bf16 = use_bf16(t.precision, device)
    amp = bf16 and uses_autocast(d)
    configure_torch(device, t.threads)
    check_sdpa_backend(t.attention_backend, m.n_heads, m.n_kv_heads, m.head_dim, device, bf16)
    accum = grad_accum_steps(t, m, d.world_size)
    fingerprint = ckpt_io.data_fingerprint(rd.tokens / "meta.json", rd.tokenizer_file())

    torch.manual_seed(t.seed)
    model = Transformer(m).to("cpu" if t.cpu_offload else device)
    n_params = model.num_params()   # counted before sharding (ZeRO-3 empties the parameters it partitions)
    flops_per_token = model.flops_per_token(m.max_seq_len)
    if t.fp8 != "off":   # before compile and sharding (torchao's order); names and checkpoints unchanged
        check_fp8(t.fp8, device)
        apply_fp8(model, t.fp8)
    fused_ce, warning = fuse_for_run(model, t.fused_cross_entropy, device, d.parallel, t.zero_stage)
    if warning is not None:
        say(warning, file=sys.stderr)
    apply_activation_checkpointing(model, t.activation_checkpointing)   # before sharding, as torchtitan does
    wrapped = parallelize(model, d, device, bf16, t.cpu_offload)   # DDP wrapper, or `model` sharded in place
    optimizer = build_optimizer(model, t, device)
    if d.parallel == "deepspeed":   # the engine wraps model and optimizer together (kiln/train/zero.py)
        wrapped, optimizer = zero.initialize(model, optimizer, t, t.micro_batch_size, accum, d.world_size, bf16)
    # What a checkpoint saves and restores: the engine under DeepSpeed (it owns the sharded state).
    holder = wrapped if d.parallel == "deepspeed" else model
    train_loader = PackedLoader(rd.token_files("train"), m.max_seq_len, t.micro_batch_size, tok.eos_id, seed=t.seed,
                                rank=d.rank, world_size=d.world_size, packing=t.packing, bos_id=tok.bos_id,
                                pad_id=tok.pad_id, prefetch=t.prefetch, pin_memory=t.pin_memory and device.type == "cuda")
    val_loader = PackedLoader(rd.token_files("val"), m.max_seq_len, t.micro_batch_size, tok.eos_id, shuffle=False,
                              rank=d.rank, world_size=d.world_size, bos_id=tok.bos_id)
    val_start = val_loader.state_dict()
    # Each rank scores its share of the eval_batches; with micro-batches of the same size that is the
    # same set of rows as one process.
    val_batches = max(1, min(t.eval_batches // d.world_size, val_loader.rows_per_epoch // t.micro_batch_size))
    guard = SpikeGuard(t.spike_factor, t.spike_patience)

    ts = TrainState()
    last = ckpt_io.latest_checkpoint(rd.checkpoints) if t.resume else None
    if last is not None:
        _check_resumable(last, cfg, fingerprint)
        state = ckpt_io.load_checkpoint(last, holder, optimizer, device, d)
        ts = TrainState.from_checkpoint(state)
        _load_loader(train_loader, state["loader"], t.force_resume, say)
        if d.is_main:
            _truncate_metrics(rd.metrics, ts.step)
        say(f"resumed from {last} at step {ts.step}")
    elif d.is_main:
        _start_fresh(rd)
    if ts.spike:
        guard.load_state_dict(ts.spike)
    barrier(d)

    peak, peak_source = mfu_peak(t.mfu_peak, device, bf16)
    say(f"model: {n_params / 1e6:.2f}M params, d_model {m.d_model}, {m.depth} layers, {m.n_heads} heads "
        f"({m.n_kv_heads} kv), ffn {m.ffn_hidden}, vocab {m.vocab_size}, context {m.max_seq_len}")
    say(f"train: {t.max_steps} steps x {t.batch_tokens} tokens (micro-batch {t.micro_batch_size} x accum {accum}"
        f"{f' x {d.world_size} ranks' if d.world_size > 1 else ''}), lr {t.lr:.2e} {t.schedule}, warmup "
        f"{t.warmup_steps}, device {device}, {'bf16' if bf16 else 'fp32'}"
        f"{f', {d.parallel}' if d.parallel != 'none' else ''}"
        f"{f' ZeRO-{t.zero_stage}' if d.parallel == 'deepspeed' else ''}{', compiled' if t.compile else ''}"
        f"{f', activation checkpointing {t.activation_checkpointing}' if t.activation_checkpointing != 'off' else ''}"
        f"{f', attention {t.attention_backend}' if t.attention_backend != 'auto' else ''}"
        f"{', fused cross-entropy' if fused_ce else ''}")
    epoch_tokens = train_loader.tokens_per_epoch * d.world_size
    epochs = t.max_steps * t.batch_tokens / epoch_tokens
    say(f"data: {epoch_tokens / 1e6:.1f}M training positions per epoch; {t.max_steps} steps are {epochs:.2f} epochs")
    if (warning := repetition_warning(epochs)) is not None:
        say(warning)
    if peak:
        say(f"MFU against {peak / 1e12:.4g} TFLOP/s per device ({peak_source}), {flops_per_token / 1e6:.0f} MFLOP/token")

    fwd = torch.compile(wrapped) if t.compile else wrapped
    # DDP's forward hooks are for training: validate on the module inside. FSDP must run its own forward.
    val_model = (torch.compile(model) if t.compile else model) if d.parallel == "ddp" else fwd
    batches = iter(train_loader)
    full_weights_here = d.parallel != "fsdp" and not (d.parallel == "deepspeed" and t.zero_stage == 3)  # samples
    tokens_per_step = t.batch_tokens
    start_step = ts.step
    skipped = torch.tensor(ts.skipped_steps, device=device)   # counted on the device: no sync per step
    t0 = time.perf_counter()
    window_t0, window_steps = t0, 0
    metrics = open(rd.metrics, "a", encoding="utf-8") if d.is_main else None
    final_val = None
    stop = StopRequest()

    def save(milestone_ok: bool = True, best_val: float | None = None) -> Path:
        """A step checkpoint, or with `best_val` the one checkpoint under checkpoints/best/."""
        ts.elapsed_s = elapsed_before + time.perf_counter() - t0
        ts.skipped_steps, ts.spike = int(skipped.item()), guard.state_dict()
        state = {**dataclasses.asdict(ts), "loader": train_loader.state_dict(), "fingerprint": fingerprint}
        if best_val is not None:
            return ckpt_io.save_checkpoint(rd.checkpoints / ckpt_io.BEST, ts.step, holder, optimizer,
                                           {**state, "val_loss": best_val}, cfg, 1, d)
        milestone = milestone_ok and t.milestone_every > 0 and ts.step % t.milestone_every == 0
        return ckpt_io.save_checkpoint(rd.checkpoints, ts.step, holder, optimizer, state, cfg, t.keep_checkpoints,
                                       d, milestone)

    best_val = _best_val_so_far(rd.checkpoints / ckpt_io.BEST, d) if t.keep_best else None

    elapsed_before = ts.elapsed_s
    saved_at = ts.step
    try:
        while ts.step < t.max_steps:
            lr = lr_at(ts.step, t)
            set_lr(optimizer, lr)
            with sdpa_backend(t.attention_backend):
                loss, gnorm = train_step(fwd, optimizer, batches, accum, t.grad_clip, device, amp,
                                         faults.loss_fn(ts.data_step), t.skip_nonfinite)
            if t.skip_nonfinite:
                skipped += ~torch.isfinite(gnorm)
            ts.step += 1
            ts.data_step += 1
            ts.tokens_seen += tokens_per_step
            done = ts.step
            window_steps += 1
            record: dict = {}
            logging = done % t.log_every == 0 or done == t.max_steps
            if logging:
                now = time.perf_counter()
                tok_s = window_steps * tokens_per_step / (now - window_t0)
                window_t0, window_steps = now, 0
                record = {"step": done, "loss": mean_over_ranks(loss, d).item(), "lr": lr,
                          "grad_norm": gnorm.item(), "tokens": ts.tokens_seen, "tok_per_s": tok_s,
                          "elapsed_s": elapsed_before + now - t0}
                if peak:
                    record["mfu"] = mfu(flops_per_token, tok_s, peak, d.world_size)
                record.update(cuda_memory_stats(device))  # allocator counters on the host: no sync
                if t.skip_nonfinite and not math.isfinite(record["grad_norm"]):
                    record["skipped"] = True
                eta = (now - t0) / (done - start_step) * (t.max_steps - done)
                say(_log_line(record, t.max_steps, eta), flush=True)
                if guard.observe(done, record["loss"]):
                    # Every rank saw the same (rank-averaged) loss, so every rank rolls back together.
                    ts = _rollback(rd, ts, guard, t, holder, optimizer, device, d, metrics, say)
                    skipped.fill_(ts.skipped_steps)
                    save(milestone_ok=False)   # records the new loader position: the skip survives a crash
                    saved_at = ts.step
                    continue
            improved = False   # this step's evaluation beat the kept best
            if (t.eval_every and done % t.eval_every == 0) or done == t.max_steps:
                with sdpa_backend(t.attention_backend):
                    final_val = validation_loss(val_model, val_loader, val_start, val_batches, device, amp, d)
                record = {**record, "step": done, "val_loss": final_val}
                improved = t.keep_best and math.isfinite(final_val) and (best_val is None or final_val < best_val)
                say(f"step {done}: val loss {final_val:.4f} (ppl {math.exp(min(final_val, 50)):.1f})"
                    f"{', best so far: saved to checkpoints/best' if improved else ''}", flush=True)
                if improved:
                    best_val = final_val
            if t.sample_every and done % t.sample_every == 0 and full_weights_here and d.is_main:
                _print_samples(model, tok, t.sample_prompts, t.seed + done)
            if record and metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            step_ckpt = None
            if done % t.checkpoint_every == 0 or done == t.max_steps:
                step_ckpt = save()
                saved_at = done
            if improved:   # the step's own checkpoint, linked, when there is one; else written
                if step_ckpt is not None:
                    ckpt_io.link_checkpoint(step_ckpt, rd.checkpoints / ckpt_io.BEST, {"val_loss": best_val}, 1, d)
                else:
                    save(best_val=best_val)
            # A signal is acted on at a step boundary; under torchrun the ranks agree at log steps
            # (a collective, so not every step) and every rank stops at the same step.
            if (d.world_size == 1 or logging) and any_rank(stop.signum is not None, d, device):
                if saved_at != done:
                    save()
                break
    except torch.OutOfMemoryError as e:   # say which knobs fit the run; the last checkpoint is intact
        raise RuntimeError(oom_advice(device, t.micro_batch_size, t.activation_checkpointing)) from e
    finally:
        if metrics:
            metrics.close()
        stop.restore()
    if ts.step < t.max_steps:   # left the loop early: a stop was requested
        name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
        say(f"stopped by {name} at step {ts.step}: checkpoint {ckpt_io.latest_checkpoint(rd.checkpoints)}; "
            "continue with --resume", flush=True)
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    wall = time.perf_counter() - t0
    summary = {"steps": t.max_steps, "tokens_seen": ts.tokens_seen, "epochs": round(epochs, 3), "final_val_loss": final_val,
               "params": n_params, "train_seconds": wall, "skipped_steps": int(skipped.item()),
               "rollbacks": ts.rollbacks, "checkpoint": str(ckpt_io.latest_checkpoint(rd.checkpoints))}
    say(f"pretrain done: {t.max_steps - start_step} steps in {wall:.0f}s, val loss {final_val}")
    return summary


def _quiet(*args, **kwargs) -> None:
    """`print` on ranks other than 0."""


class StopRequest:
    """SIGTERM / SIGINT (a cluster's pre-emption, Ctrl-C) ask for a checkpoint at the next step boundary;
    a second signal of either kind stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: checkpointing at the end of this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _rollback(rd: RunDir, ts: TrainState, guard: SpikeGuard, t, model, optimizer, device, d: Dist,
              metrics, say) -> TrainState:
    """Restore the newest checkpoint from before the spikes; keep the loader where it is, so the
    batches drawn since that checkpoint are skipped."""
    first = guard.first_spike_step
    target = ckpt_io.latest_before(rd.checkpoints, first)
    if target is None or ts.rollbacks >= t.max_rollbacks:
        why = (f"no checkpoint from before step {first} to roll back to (checkpoint more often)"
               if target is None else f"train.max_rollbacks={t.max_rollbacks} rollbacks already")
        raise RuntimeError(f"loss spiked above {t.spike_factor} x its running mean for {guard.streak} logged "
                           f"steps from step {first}, and {why}")
    state = ckpt_io.load_checkpoint(target, model, optimizer, device, d)
    back = TrainState.from_checkpoint(state)
    skipped_batches = ts.data_step - back.data_step
    event = {"step": back.step, "event": "rollback", "from_step": ts.step, "first_spike_step": first,
             "skipped_batches": skipped_batches, "data_step": ts.data_step, "checkpoint": target.name}
    say(f"loss spike: {guard.streak} logged losses above {t.spike_factor} x the running mean from step {first}; "
        f"rolled back to {target.name} and skipping the {skipped_batches} batches drawn since", flush=True)
    if d.is_main:
        gone = ckpt_io.remove_after(rd.checkpoints, back.step)
        if gone:
            say(f"removed {len(gone)} checkpoint(s) of the abandoned trajectory: {', '.join(g.name for g in gone)}")
        metrics.flush()
        _truncate_metrics(rd.metrics, back.step)
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()
    barrier(d)
    back.data_step, back.rollbacks = ts.data_step, ts.rollbacks + 1
    back.elapsed_s = ts.elapsed_s
    if back.spike:
        guard.load_state_dict(back.spike)
    guard.streak, guard.first_spike_step = 0, None
    return back


def _check_resumable(last: Path, cfg: Config, fingerprint: dict) -> None:
    _check_same_model(last, cfg)
    ckpt_io.check_layout(last, cfg.train.parallel, cfg.train.zero_stage)
    saved = ckpt_io.checkpoint_config(last).train
    if saved.batch_tokens != cfg.train.batch_tokens:
        raise ConfigError(f"cannot resume from {last}: it was trained with train.batch_tokens={saved.batch_tokens}, "
                          f"this run has {cfg.train.batch_tokens} (the default follows the process count); "
                          f"pass --train.batch_tokens {saved.batch_tokens}")
    ckpt_io.check_fingerprint(last, ckpt_io.read_state(last).get("fingerprint"), fingerprint, cfg.train.force_resume)


def _load_loader(loader: PackedLoader, state: dict, force: bool, say) -> None:
    try:
        loader.load_state_dict(state)
    except ValueError as e:
        if not force:
            raise ConfigError(str(e)) from e
        say(f"warning: {e}; --train.force_resume: the loader starts at the beginning of the current data",
            file=sys.stderr)


def _log_line(r: dict, max_steps: int, eta_s: float) -> str:
    line = (f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tok_per_s'] / 1e3:.1f}k tok/s")
    if "mfu" in r:
        line += f" | mfu {100 * r['mfu']:.1f}%"
    if "peak_mem_gb" in r:
        line += f" | mem {r['peak_mem_gb']:.1f}GB"
        if r["alloc_retries"]:  # the allocator emptied its cache to fit: slow, and near an OOM
            line += f" ({r['alloc_retries']} alloc retries)"
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


def _best_val_so_far(best_root: Path, d: Dist) -> float | None:
    """The validation loss of the kept best checkpoint (a resumed run continues to compare with it)."""
    value = None
    if d.is_main and (best := ckpt_io.latest_checkpoint(best_root)) is not None:
        value = json.loads((best / "state.json").read_text(encoding="utf-8")).get("val_loss")
    return broadcast_object(value, d)


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
