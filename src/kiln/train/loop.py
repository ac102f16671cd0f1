"""The one training loop: training tasks (pretraining first) differ in their batch source and loss, not in a
copy of the loop.

A `Task` supplies:
    batches  endless dicts of CPU tensors, each moved to the device whole
    count    (batch) -> how many items the loss sums over (valid target tokens; for a loss over pairs, the
             pairs), a device tensor
    loss     (model, batch) -> the SUM of the per-item losses over those items
    source   the batch source's state_dict / load_state_dict, saved in every checkpoint
    evaluate, sample   optional hooks: validation loss (every rank calls it), printed samples (rank 0)
    metrics  optional: the task's own figures of the step just taken (DPO's rewards, GRPO's reward), read
             at log steps only and written with the loss

The loop divides each step's summed loss by the count summed over the step's micro-batches and every rank:
each valid token weighs the same wherever it falls, so padded or masked micro-batches of any size give the
gradient of one big masked batch. The divisor is known before any backward (counting needs only the
targets), so each micro-batch's backward already carries the final scale: one all-reduce of a scalar per
step, no host sync, and it works unchanged under DeepSpeed, whose engine accumulates gradients itself.

Everything else is the loop's, so every task gets it: resume (weights, optimizer, RNGs, source position,
counters), atomic checkpoints and the best one, the NaN guard, spike rollback, SIGTERM/SIGINT at a step
boundary, DDP/FSDP2/DeepSpeed, logging with tokens/s and MFU over real (non-padding) tokens.
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
from typing import Any, Protocol

import torch
from torch import nn

from kiln.config import Config, ConfigError, model_diff
from kiln.config.rundir import RunDir
from kiln.eval.divergence import DivergenceWatch, read_metrics
from kiln.formats.checkpoint import BEST, checkpoint_config, latest_before, latest_checkpoint, read_state
from kiln.runtime.device import autocast, cuda_memory_stats, oom_advice, sdpa_backend
from kiln.runtime.peaks import mfu
from kiln.train import checkpoint as ckpt_io
from kiln.train import zero
from kiln.train.distributed import Dist, any_rank, barrier, broadcast_object, full_tensor, grad_sync, sum_over_ranks
from kiln.train.guard import SpikeGuard, step_if_finite
from kiln.train.optim import lr_at, set_lr

Batch = dict[str, torch.Tensor]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class Task:
    """What a training task gives the loop (see the module docstring)."""

    batches: Iterator[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    count: Callable[[Batch], torch.Tensor]
    source: Stateful
    evaluate: Callable[[], float] | None = None
    sample: Callable[[int], None] | None = None
    metrics: Callable[[], dict[str, float]] | None = None
    unit: str = "tok"           # what `count` counts, for the log's rate (DPO: pairs)
    eval_is_loss: bool = True   # `evaluate` returns a per-token loss (its perplexity is printed), not a score


@dataclasses.dataclass
class Trainer:
    """What setup built, in one place: the model as the loop trains it, its optimizer, where output goes."""

    cfg: Config               # resolved: every derived value filled in
    rd: RunDir
    d: Dist
    device: torch.device
    model: nn.Module          # the Transformer (sharded in place under FSDP / ZeRO-3)
    step_model: nn.Module     # what a step runs: the DDP wrapper or DeepSpeed engine, compiled with train.compile
    holder: nn.Module         # what a checkpoint saves and restores: the engine under DeepSpeed, else `model`
    optimizer: torch.optim.Optimizer
    amp: bool                 # bf16 autocast around the forward (off where FSDP / DeepSpeed cast themselves)
    accum: int                # micro-batches per optimizer step on each rank
    fingerprint: dict         # identifies the data a resume must continue on
    flops_per_token: float
    peak: float | None        # per-device FLOP/s that MFU is measured against
    meta: dict = dataclasses.field(default_factory=dict)   # written into every checkpoint's state.json (LoRA's shape)


@dataclasses.dataclass
class TrainState:
    """Every counter a resume needs besides weights, optimizer, RNGs and the batch source (all in one place)."""

    step: int = 0            # optimizer steps taken (the LR schedule position)
    data_step: int = 0       # optimizer steps' worth of batches drawn (> step after a rollback skipped some)
    tokens_seen: int = 0     # valid (counted) items trained on: padding and masked targets excluded
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


# ---------------------------------------------------------------- one step

def train_step(tr: Trainer, task: Task, grad_clip: float, skip_nonfinite: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `tr.accum` micro-batches. Returns (mean loss over the step's valid items on
    every rank, global grad norm, global count of valid items) as device tensors: reading them is left to
    the caller, since `.item()` is a host sync.

    Under DDP/FSDP only the last micro-batch's backward communicates. A non-finite norm skips the update
    (guard.py); a DeepSpeed engine accumulates, clips and skips by itself."""
    model, d, device = tr.step_model, tr.d, tr.device
    micro = [{k: v.to(device, non_blocking=True) for k, v in next(task.batches).items()} for _ in range(tr.accum)]
    count = sum_over_ranks(sum(task.count(b) for b in micro).float(), d)   # one collective, no host sync
    # DDP, FSDP and DeepSpeed average gradients over ranks and DeepSpeed also over its accumulation
    # steps: undo both, so the step's gradient is d(sum of all ranks' losses) / count.
    engine = zero.is_engine(model)
    scale = d.world_size * (tr.accum if engine else 1) / count.clamp(min=1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        with grad_sync(model, enabled=i == tr.accum - 1), autocast(device, tr.amp):
            loss_sum = task.loss(model, batch).float()
        if engine:
            model.backward(loss_sum * scale)   # divides by accum itself
            model.step()                       # updates only at the accumulation boundary
        else:
            (loss_sum * scale).backward()
        total += loss_sum.detach()
    if engine:
        norm = model.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32, device=device)
    else:
        norm = _clip_and_step(tr, grad_clip, skip_nonfinite, total)
    return sum_over_ranks(total, d) / count.clamp(min=1), norm, count


def _clip_and_step(tr: Trainer, grad_clip: float, skip_nonfinite: bool, local_loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in tr.step_model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    norm = full_tensor(norm)  # FSDP: a DTensor; full_tensor() all-reduces the shards' norms
    if skip_nonfinite:
        # The norm is global (gradients are reduced before it), so every rank takes the same decision;
        # a NaN/Inf loss always reaches it through its gradient. The local loss joins in one process.
        finite = torch.isfinite(norm) if tr.d.world_size > 1 else torch.isfinite(norm) & torch.isfinite(local_loss)
        step_if_finite(tr.optimizer, finite)
    else:
        tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return norm


# ---------------------------------------------------------------- start: resume, or refuse to overwrite

def start(tr: Trainer, task: Task, say=print) -> TrainState:
    """The state to train from: the newest checkpoint with train.resume, else a fresh start, which refuses
    to replace a run directory's checkpoints unless `overwrite` says so (they are the user's work)."""
    t, rd = tr.cfg.train, tr.rd
    last = latest_checkpoint(rd.checkpoints) if t.resume else None
    ts = TrainState()
    if last is not None:
        check_resumable(last, tr.cfg, tr.fingerprint)
        state = ckpt_io.load_checkpoint(last, tr.holder, tr.optimizer, tr.device, tr.d)
        ts = TrainState.from_checkpoint(state)
        _load_source(task.source, state["loader"], t.force_resume, say)
        if tr.d.is_main:
            truncate_metrics(rd.metrics, ts.step)
        say(f"resumed from {last} at step {ts.step}")
    else:
        refuse_to_overwrite(rd, tr.cfg.overwrite)   # every rank: all must stop, not only rank 0
        if tr.d.is_main:
            _start_fresh(rd)
    barrier(tr.d)
    return ts


def existing_work(rd: RunDir) -> str | None:
    """What a fresh start would replace in `rd` (steps of the complete checkpoints, the best one), or None."""
    steps = [c.name for c in ckpt_io.complete_checkpoints(rd.checkpoints)]
    best = latest_checkpoint(rd.checkpoints / BEST)
    if not steps and best is None:
        return None
    held = f"checkpoints {', '.join(steps)}" if steps else "no step checkpoints"
    if best is not None:
        held += f" and checkpoints/best/{best.name} (val loss {read_state(best).get('val_loss')})"
    return held


def refuse_to_overwrite(rd: RunDir, overwrite: bool) -> None:
    held = existing_work(rd)
    if held is not None and not overwrite:
        raise ConfigError(f"{rd.checkpoints} already holds {held}. Continue that run with --resume, start over "
                          "with --overwrite true (deletes them), or train into a new --run_dir")


def _start_fresh(rd: RunDir) -> None:
    """Only after refuse_to_overwrite: the user asked for a fresh start over the old checkpoints."""
    import shutil
    if rd.checkpoints.exists():
        if existing_work(rd) is not None:
            print(f"note: --overwrite: deleting the checkpoints in {rd.checkpoints}", file=sys.stderr)
        shutil.rmtree(rd.checkpoints)
    rd.metrics.unlink(missing_ok=True)


def check_resumable(last: Path, cfg: Config, fingerprint: dict) -> None:
    saved = checkpoint_config(last)
    diff = model_diff(saved.model, cfg.model)
    if diff:
        raise ConfigError(f"cannot resume from {last}: it was trained with a different model config ({'; '.join(diff)}); "
                          "use a new --run_dir, or drop --resume and pass --overwrite true to start over")
    ckpt_io.check_layout(last, cfg.train.parallel, cfg.train.zero_stage)
    if saved.train.batch_tokens != cfg.train.batch_tokens:
        raise ConfigError(f"cannot resume from {last}: it was trained with train.batch_tokens={saved.train.batch_tokens}, "
                          f"this run has {cfg.train.batch_tokens} (the default follows the process count); "
                          f"pass --train.batch_tokens {saved.train.batch_tokens}")
    ckpt_io.check_fingerprint(last, read_state(last).get("fingerprint"), fingerprint, cfg.train.force_resume)


def _load_source(source: Stateful, state: dict, force: bool, say) -> None:
    try:
        source.load_state_dict(state)
    except ValueError as e:
        if not force:
            raise ConfigError(str(e)) from e
        say(f"warning: {e}; --train.force_resume: the loader starts at the beginning of the current data",
            file=sys.stderr)


# ---------------------------------------------------------------- the loop

def run(tr: Trainer, task: Task, ts: TrainState, say=print) -> dict:
    """Train from `ts` to train.max_steps. Linear: occasional eval / sample / checkpoint blocks, then one
    optimizer step, then one log line. Returns the summary; a stop signal checkpoints and exits 128 + signum."""
    t, rd, d = tr.cfg.train, tr.rd, tr.d
    guard = SpikeGuard(t.spike_factor, t.spike_patience)
    if ts.spike:
        guard.load_state_dict(ts.spike)
    skipped = torch.tensor(ts.skipped_steps, device=tr.device)   # counted on the device: no sync per step
    tokens = torch.tensor(ts.tokens_seen, dtype=torch.float64, device=tr.device)
    best_val = _best_val_so_far(rd.checkpoints / BEST, d) if t.keep_best else None
    start_step, elapsed_before, t0 = ts.step, ts.elapsed_s, time.perf_counter()
    window = _Window(t0, tokens)
    steps_run = 0            # steps this process took: never rewound by a rollback, so the ETA's divisor is > 0
    saved_at, final_val = ts.step, None
    # every rank sees the same global losses, so every rank could warn; rank 0 says it
    watch = DivergenceWatch().replay(read_metrics(rd.metrics, ts.step) if d.is_main else [])
    metrics = open(rd.metrics, "a", encoding="utf-8") if d.is_main else None
    stop = StopRequest()

    def save(best: float | None = None, milestone_ok: bool = True) -> Path:
        """A step checkpoint, or with `best` the one checkpoint under checkpoints/best/."""
        ts.elapsed_s = elapsed_before + time.perf_counter() - t0
        ts.skipped_steps, ts.tokens_seen, ts.spike = int(skipped.item()), int(tokens.item()), guard.state_dict()
        state = {**dataclasses.asdict(ts), "loader": task.source.state_dict(), "fingerprint": tr.fingerprint,
                 **tr.meta}
        if best is not None:
            return ckpt_io.save_checkpoint(rd.checkpoints / BEST, ts.step, tr.holder, tr.optimizer,
                                           {**state, "val_loss": best}, tr.cfg, 1, d)
        milestone = milestone_ok and t.milestone_every > 0 and ts.step % t.milestone_every == 0
        return ckpt_io.save_checkpoint(rd.checkpoints, ts.step, tr.holder, tr.optimizer, state, tr.cfg,
                                       t.keep_checkpoints, d, milestone)

    try:
        while ts.step < t.max_steps:
            lr = lr_at(ts.step, t)
            set_lr(tr.optimizer, lr)
            with sdpa_backend(t.attention_backend):
                loss, gnorm, count = train_step(tr, task, t.grad_clip, t.skip_nonfinite)
            finite = torch.isfinite(gnorm)
            if t.skip_nonfinite:
                skipped += ~finite
                tokens += torch.where(finite, count.double(), 0.0)   # a skipped step trained on nothing
            else:
                tokens += count.double()
            ts.step += 1
            ts.data_step += 1
            steps_run += 1
            done = ts.step
            record: dict = {}
            logging = done % t.log_every == 0 or done == t.max_steps
            if logging:
                now = time.perf_counter()
                record = {"step": done, "loss": loss.item(), "lr": lr, "grad_norm": gnorm.item(),
                          "tokens": int(tokens.item()), "tok_per_s": window.rate(now, tokens),
                          "elapsed_s": elapsed_before + now - t0}
                if tr.peak and task.unit == "tok":   # FLOPs are per token
                    record["mfu"] = mfu(tr.flops_per_token, record["tok_per_s"], tr.peak, d.world_size)
                if task.metrics is not None:
                    extra = task.metrics()
                    record.update(extra)
                record.update(cuda_memory_stats(tr.device))  # allocator counters on the host: no sync
                if t.skip_nonfinite and not math.isfinite(record["grad_norm"]):
                    record["skipped"] = True
                eta = (now - t0) / steps_run * (t.max_steps - done)
                say(log_line({**record, "task_keys": list(extra) if task.metrics is not None else []},
                             t.max_steps, eta, task.unit), flush=True)
                watch.observe_train(record["loss"])
                if guard.observe(done, record["loss"]):
                    # Every rank saw the same (global) loss, so every rank rolls back together.
                    ts = _rollback(tr, ts, guard, metrics, say)
                    skipped.fill_(ts.skipped_steps)
                    tokens.fill_(ts.tokens_seen)
                    window.reset(time.perf_counter(), tokens)
                    save(milestone_ok=False)   # records the new source position: the skip survives a crash
                    saved_at = ts.step
                    continue
            improved = False   # this step's evaluation beat the kept best
            if task.evaluate is not None and ((t.eval_every and done % t.eval_every == 0) or done == t.max_steps):
                with sdpa_backend(t.attention_backend):
                    final_val = task.evaluate()
                record = {**record, "step": done, "val_loss": final_val}
                improved = t.keep_best and math.isfinite(final_val) and (best_val is None or final_val < best_val)
                ppl = f" (ppl {math.exp(min(final_val, 50)):.1f})" if task.eval_is_loss else ""
                say(f"step {done}: val loss {final_val:.4f}{ppl}"
                    f"{', best so far: saved to checkpoints/best' if improved else ''}", flush=True)
                if improved:
                    best_val = final_val
                if task.eval_is_loss and (warning := watch.observe_val(done, final_val)):
                    record["divergence"] = warning["message"]
                    say(f"WARNING step {done}: {warning['message']}", flush=True)
            if task.sample is not None and t.sample_every and done % t.sample_every == 0:
                task.sample(done)
            if record and metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            step_ckpt = None
            if done % t.checkpoint_every == 0 or done == t.max_steps:
                step_ckpt = save()
                saved_at = done
            if improved:   # the step's own checkpoint, linked, when there is one; else written
                if step_ckpt is not None:
                    ckpt_io.link_checkpoint(step_ckpt, rd.checkpoints / BEST, {"val_loss": best_val}, 1, d)
                else:
                    save(best=best_val)
            # A signal is acted on at a step boundary; under torchrun the ranks agree at log steps
            # (a collective, so not every step) and every rank stops at the same step.
            if (d.world_size == 1 or logging) and any_rank(stop.signum is not None, d, tr.device):
                if saved_at != done:
                    save()
                break
    except torch.OutOfMemoryError as e:   # say which knobs fit the run; the last checkpoint is intact
        raise RuntimeError(oom_advice(tr.device, t.micro_batch_size, t.activation_checkpointing)) from e
    finally:
        if metrics:
            metrics.close()
        stop.restore()
    if ts.step < t.max_steps:   # left the loop early: a stop was requested
        name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal on another rank"
        say(f"stopped by {name} at step {ts.step}: checkpoint {latest_checkpoint(rd.checkpoints)}; "
            "continue with --resume", flush=True)
        raise SystemExit(128 + (stop.signum or signal.SIGTERM))
    wall = time.perf_counter() - t0
    say(f"training done: {t.max_steps - start_step} steps in {wall:.0f}s, val loss {final_val}")
    return {"steps": t.max_steps, "tokens_seen": int(tokens.item()), "final_val_loss": final_val,
            "train_seconds": wall, "skipped_steps": int(skipped.item()), "rollbacks": ts.rollbacks,
            "checkpoint": str(latest_checkpoint(rd.checkpoints))}


class _Window:
    """Tokens per second since the last log line, over the counted (real) tokens."""

    def __init__(self, t0: float, tokens: torch.Tensor):
        self.reset(t0, tokens)

    def reset(self, t0: float, tokens: torch.Tensor) -> None:
        self.t0, self.tokens = t0, float(tokens.item())

    def rate(self, now: float, tokens: torch.Tensor) -> float:
        seen = float(tokens.item())   # a host sync, at log steps only
        r = (seen - self.tokens) / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, seen
        return r


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


def _rollback(tr: Trainer, ts: TrainState, guard: SpikeGuard, metrics, say) -> TrainState:
    """Restore the newest checkpoint from before the spikes; keep the batch source where it is, so the
    batches drawn since that checkpoint are skipped."""
    t, rd, d = tr.cfg.train, tr.rd, tr.d
    first = guard.first_spike_step
    target = latest_before(rd.checkpoints, first)
    if target is None or ts.rollbacks >= t.max_rollbacks:
        why = (f"no checkpoint from before step {first} to roll back to (checkpoint more often)"
               if target is None else f"train.max_rollbacks={t.max_rollbacks} rollbacks already")
        raise RuntimeError(f"loss spiked above {t.spike_factor} x its running mean for {guard.streak} logged "
                           f"steps from step {first}, and {why}")
    state = ckpt_io.load_checkpoint(target, tr.holder, tr.optimizer, tr.device, d)
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
        truncate_metrics(rd.metrics, back.step)
        metrics.write(json.dumps(event) + "\n")
        metrics.flush()
    barrier(d)
    back.data_step, back.rollbacks = ts.data_step, ts.rollbacks + 1
    back.elapsed_s = ts.elapsed_s
    if back.spike:
        guard.load_state_dict(back.spike)
    guard.streak, guard.first_spike_step = 0, None
    return back


def _best_val_so_far(best_root: Path, d: Dist) -> float | None:
    """The validation loss of the kept best checkpoint (a resumed run continues to compare with it)."""
    value = None
    if d.is_main and (best := latest_checkpoint(best_root)) is not None:
        value = read_state(best).get("val_loss")
    return broadcast_object(value, d)


def truncate_metrics(path: Path, step: int) -> None:
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


def rate(per_s: float) -> str:
    """A rate with three significant figures: 0.412, 171, 12.3k, 251k (a CPU's 171 tokens/s is not 0.2k)."""
    return f"{per_s / 1e3:.3g}k" if per_s >= 1e3 else f"{per_s:.3g}"


def log_line(r: dict, max_steps: int, eta_s: float, unit: str = "tok") -> str:
    line = (f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | " + (rate(r['tok_per_s']) + " tok/s" if unit == "tok" else
                                                f"{r['tok_per_s']:.1f} {unit}/s"))
    if "mfu" in r:
        line += f" | mfu {100 * r['mfu']:.1f}%"
    for key in r.get("task_keys", ()):
        line += f" | {key} {r[key]:.4g}"
    if "peak_mem_gb" in r:
        line += f" | mem {r['peak_mem_gb']:.1f}GB"
        if r["alloc_retries"]:  # the allocator emptied its cache to fit: slow, and near an OOM
            line += f" ({r['alloc_retries']} alloc retries)"
    return line + f" | eta {fmt_time(eta_s)}"


def fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
