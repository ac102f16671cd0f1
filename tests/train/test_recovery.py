"""Crash and stop recovery: SIGKILL at random moments, SIGTERM/SIGINT, NaN batches, loss spikes, fingerprints."""

import json
import random
import signal
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from dist_util import env, fault_env, kiln_cmd, metrics, run_kiln
from kiln.config import ConfigError
from kiln.pipeline import run_stage
from faults import install
from kiln.formats.checkpoint import complete_checkpoints, latest_checkpoint
from micro import micro_config

KILL = {"max_steps": 24, "checkpoint_every": 1, "keep_checkpoints": 2, "eval_every": 8}


def _same_final_state(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(a / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "optimizer.pt", weights_only=True)
    for sa, sb in zip(oa["state"].values(), ob["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(micro_run, tmp_path, spawn):
    """12 SIGKILLs, 0-150 ms after a random step's log line; with a 20 ms sleep before each file's fsync every
    checkpoint (one per step) takes >= 100 ms, so most kills land inside a write. Same final weights, optimizer
    state and loss log as an uninterrupted run."""
    ref = tmp_path / "ref"
    shutil.copytree(micro_run, ref)
    run_kiln(ref, **KILL)

    rng = random.Random(6)
    kills, inside_write, restarts = 0, 0, 0
    e = env(**fault_env(ckpt_sleep=0.02))
    while kills < 12:
        args = ("--resume",) if restarts else ()
        p = spawn(kiln_cmd(micro_run, args=args, faulty=True, **KILL), timeout=60, env=e)
        restarts += 1
        wait_lines = rng.randint(1, 3)
        finished = False
        for line in p.lines():
            if line.startswith("step ") and "|" in line:
                wait_lines -= 1
                if wait_lines == 0:
                    break
        else:
            finished = True
        if finished:   # the run ended before the chosen moment: start over from the top
            assert p.wait() == 0, p.stderr[-3000:]
            shutil.rmtree(micro_run / "checkpoints")
            (micro_run / "metrics.jsonl").unlink()
            restarts = 0
            continue
        time.sleep(rng.uniform(0, 0.15))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        inside_write += any((micro_run / "checkpoints").glob(".tmp-step_*"))
    print(f"{kills} kills, {inside_write} inside a checkpoint write, {restarts} starts")
    assert inside_write >= 2, f"only {inside_write} of {kills} kills landed inside a checkpoint write"
    run_kiln(micro_run, args=("--resume",), faults={"ckpt_sleep": 0.02}, **KILL)

    assert metrics(micro_run) == metrics(ref)
    _same_final_state(micro_run / "checkpoints/step_0000024", ref / "checkpoints/step_0000024")
    # The best-validation checkpoint (linked at evaluations 8, 16, 24) came through the kills too.
    best, ref_best = (complete_checkpoints(r / "checkpoints" / "best") for r in (micro_run, ref))
    assert [b.name for b in best] == [b.name for b in ref_best] and len(best) == 1
    _same_final_state(best[0], ref_best[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_step_boundary_and_exits_cleanly(micro_run, tmp_path, sig, spawn):
    ref = tmp_path / "ref"
    shutil.copytree(micro_run, ref)
    train = {"max_steps": 400, "checkpoint_every": 1000, "eval_every": 0}
    p = spawn(kiln_cmd(micro_run, **train), timeout=120, env=env())
    for line in p.lines():
        if line.startswith("step     20/"):
            break
    p.send_signal(sig)
    p.wait()
    out, err = p.stdout, p.stderr
    assert p.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    last = latest_checkpoint(micro_run / "checkpoints")
    assert last is not None and 20 <= int(last.name.split("_")[1]) < 400
    stopped_at = int(last.name.split("_")[1])
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}" in out
    assert [r["step"] for r in metrics(micro_run)] == list(range(1, stopped_at + 1))

    # The stop lost nothing: resuming to the end matches a run that was never stopped.
    run_kiln(micro_run, args=("--resume",), **train)
    run_kiln(ref, **train)
    assert metrics(micro_run) == metrics(ref)


@pytest.fixture
def inject(monkeypatch):
    return lambda **faults: install(monkeypatch.setattr, **faults)


def _rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_batch_is_skipped_and_training_continues(micro_run, tmp_path, inject):
    inject(nan=[2])
    cfg = micro_config(micro_run, train={"checkpoint_every": 1, "keep_checkpoints": 10})
    summary = run_stage(cfg, "pretrain")
    rows = {r["step"]: r for r in _rows(micro_run) if "loss" in r}
    assert rows[3].get("skipped") and rows[3]["loss"] != rows[3]["loss"]      # data step 2 = step 3, NaN
    assert all(not r.get("skipped") and r["loss"] == r["loss"] for s, r in rows.items() if s != 3)
    assert summary["skipped_steps"] == 1
    # The skipped step changed nothing: weights and Adam moments (and its step count) as after step 2.
    ck = micro_run / "checkpoints"
    a, b = load_file(str(ck / "step_0000002/model.safetensors")), load_file(str(ck / "step_0000003/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(ck / "step_0000002/optimizer.pt", weights_only=True)["state"]
    ob = torch.load(ck / "step_0000003/optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in ("step", "exp_avg", "exp_avg_sq"))
    w = load_file(str(ck / "step_0000006/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_persistent_spike_rolls_back_and_skips_the_batches(micro_run, inject):
    # Data steps 5..7 are "bad": their loss reads 20x. Three logged spikes in a row -> rollback to the
    # newest checkpoint before step 6 (the first spike), i.e. step 4; the loader stays past the bad batches.
    inject(spike=range(5, 8))
    cfg = micro_config(micro_run, train={"max_steps": 10, "checkpoint_every": 2, "keep_checkpoints": 5,
                                         "eval_every": 5, "spike_factor": 3.0, "spike_patience": 3})
    summary = run_stage(cfg, "pretrain")
    rows = _rows(micro_run)
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1 and summary["rollbacks"] == 1
    ev = events[0]
    assert (ev["step"], ev["from_step"], ev["first_spike_step"], ev["checkpoint"]) == (4, 8, 6, "step_0000004")
    assert ev["skipped_batches"] == 4       # data steps 4..7 were drawn after the checkpoint at step 4
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 11))   # the log reads as one run
    assert max(r["loss"] for r in losses) < 10                  # no spiked loss survived
    state = json.loads((latest_checkpoint(micro_run / "checkpoints") / "state.json").read_text())
    assert state["step"] == 10 and state["data_step"] == 14 and state["rollbacks"] == 1


def test_resume_refuses_other_data_unless_forced(micro_run):
    run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    meta = micro_run / "tokens" / "meta.json"
    m = json.loads(meta.read_text())
    m["train"]["docs"] += 1   # as if the data stage had kept one more document
    meta.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match=r"different tokens.*force_resume"):
        run_stage(micro_config(micro_run, train={"resume": True}), "pretrain")
    summary = run_stage(micro_config(micro_run, train={"resume": True, "force_resume": True}), "pretrain")
    assert summary["steps"] == 6


def test_keep_last_k_plus_milestones(micro_run):
    run_stage(micro_config(micro_run, train={"max_steps": 7, "checkpoint_every": 1, "keep_checkpoints": 2,
                                             "milestone_every": 3}), "pretrain")
    assert [c.name for c in complete_checkpoints(micro_run / "checkpoints")] == \
        ["step_0000003", "step_0000006", "step_0000007"]
