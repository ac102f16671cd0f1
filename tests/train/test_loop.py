"""The one loop: loss weighting over valid tokens (uneven micro-batches, 2 ranks), no silent deletion, the ETA."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dist_util import env
from faults import install
from kiln.config import ConfigError, ModelConfig, load_recipe
from kiln.config.rundir import RunDir
from kiln.model.llama import Transformer
from kiln.pipeline import run_stage
from kiln.train import loop
from kiln.train.distributed import Dist
from kiln.train.pretrain import count_targets, token_loss
from micro import micro_config
from subprocess_util import run_child

CFG = ModelConfig(depth=2, d_model=32, head_dim=16, n_kv_heads=1, vocab_size=64, max_seq_len=12)


class Recorder(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of every gradient and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def masked_batch(seed=0, rows=6):
    """(inputs, targets) with very uneven masking: row r keeps only its last r + 1 targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (rows, CFG.max_seq_len), generator=g)
    y = torch.randint(0, CFG.vocab_size, (rows, CFG.max_seq_len), generator=g)
    for r in range(rows):
        y[r, : CFG.max_seq_len - (r + 1)] = -100
    return x, y


def loop_grads(model, x, y, micro, d=Dist()):
    """Gradients of one loop step over `x, y` cut into micro-batches of `micro` rows."""
    opt = Recorder(model.parameters())
    chunks = iter([{"input_ids": x[i:i + micro], "targets": y[i:i + micro]} for i in range(0, len(x), micro)])
    tr = loop.Trainer(cfg=None, rd=None, d=d, device=torch.device("cpu"), model=model, step_model=model,
                      holder=model, optimizer=opt, amp=False, accum=len(x) // micro, fingerprint={},
                      flops_per_token=0.0, peak=None)
    task = loop.Task(batches=chunks, loss=token_loss, count=count_targets, source=None)
    loss, _, count = loop.train_step(tr, task, grad_clip=0.0)
    return opt.grads, loss, count


def reference_grads(model, x, y):
    """One big batch, mean over its valid targets: what any split must reproduce."""
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], loss.detach()


def test_uneven_micro_batches_give_the_gradient_of_one_masked_batch():
    torch.manual_seed(0)
    model = Transformer(CFG)
    x, y = masked_batch()
    ref, ref_loss = reference_grads(model, x, y)
    model.zero_grad()
    grads, loss, count = loop_grads(model, x, y, micro=2)   # micro-batches with 3, 7 and 11 valid targets
    assert int(count) == int((y != -100).sum()) == 21
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The old rule (each micro-batch's own mean / accum) weighs a token of a sparse micro-batch more.
    model.zero_grad()
    for i in range(0, 6, 2):
        (model(x[i:i + 2], y[i:i + 2]) / 3).backward()
    assert not all(torch.allclose(p.grad, b, rtol=1e-3) for p, b in zip(model.parameters(), ref))


RANKS_SCRIPT = r"""
import sys, torch
sys.path[:0] = [{tests!r}, {tests_root!r}]
from test_loop import CFG, Recorder, masked_batch
from kiln.model.llama import Transformer
from kiln.train import loop
from kiln.train.distributed import init_distributed, parallelize, shutdown
from kiln.train.pretrain import count_targets, token_loss
d, device = init_distributed("ddp", "cpu")
torch.manual_seed(0)
model = Transformer(CFG)
x, y = masked_batch()
# Two micro-batches per rank: rank 0 holds rows 0-1 (3 valid targets), rank 1 rows 2-5 (18).
rows, micro = (slice(0, 2), 1) if d.rank == 0 else (slice(2, 6), 2)
xs, ys = x[rows], y[rows]
chunks = iter([{{"input_ids": xs[i:i + micro], "targets": ys[i:i + micro]}} for i in range(0, len(xs), micro)])
opt = Recorder(model.parameters())
tr = loop.Trainer(cfg=None, rd=None, d=d, device=device, model=model, step_model=parallelize(model, d, device, False),
                  holder=model, optimizer=opt, amp=False, accum=2, fingerprint={{}}, flops_per_token=0.0, peak=None)
loss, _, count = loop.train_step(tr, loop.Task(batches=chunks, loss=token_loss, count=count_targets, source=None), 0.0)
if d.rank == 0:
    torch.save({{"grads": opt.grads, "loss": loss, "count": count}}, {out!r})
shutdown()
"""


@pytest.mark.slow
def test_two_ranks_with_uneven_valid_tokens_give_the_gradient_of_one_masked_batch(tmp_path):
    out = tmp_path / "grads.pt"
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(tests=str(Path(__file__).parent), tests_root=str(Path(__file__).parents[1]), out=str(out)))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    p = run_child([torchrun, "--standalone", "--nproc_per_node=2", str(script)], timeout=120, env=env())
    assert p.returncode == 0, p.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = Transformer(CFG)
    x, y = masked_batch()
    ref, ref_loss = reference_grads(model, x, y)
    assert int(got["count"]) == 21 and torch.allclose(got["loss"], ref_loss, rtol=1e-5)
    for a, b in zip(got["grads"], ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_fresh_start_refuses_to_delete_checkpoints_and_names_the_ways_on(micro_run):
    run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    before = sorted(p.name for p in (micro_run / "checkpoints").iterdir())
    with pytest.raises(ConfigError) as e:
        run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    msg = str(e.value)
    assert "step_0000003" in msg and "checkpoints/best/step_0000003" in msg
    assert "--resume" in msg and "--overwrite true" in msg
    assert sorted(p.name for p in (micro_run / "checkpoints").iterdir()) == before   # nothing deleted
    assert (micro_run / "metrics.jsonl").exists()
    # The explicit flag starts over; --resume continues.
    cfg = micro_config(micro_run, train={"max_steps": 3})
    cfg.overwrite = True
    assert run_stage(cfg, "pretrain")["steps"] == 3
    assert run_stage(micro_config(micro_run, train={"max_steps": 4, "resume": True}), "pretrain")["steps"] == 4


def test_a_finished_stage_made_with_another_config_is_not_replaced_without_overwrite(micro_run):
    before = (micro_run / "tokenizer" / "tokenizer.json").read_bytes()
    cfg = micro_config(micro_run, tokenizer={"vocab_size": 400})
    with pytest.raises(ConfigError, match=r"finished tokenizer stage made with another config "
                                          r"\(tokenizer.vocab_size: 384 -> 400\).*--overwrite true"):
        run_stage(cfg, "tokenizer")
    assert (micro_run / "tokenizer" / "tokenizer.json").read_bytes() == before
    cfg.overwrite = True
    run_stage(cfg, "tokenizer")
    assert (micro_run / "tokenizer" / "tokenizer.json").read_bytes() != before


def test_kiln_run_with_a_changed_model_refuses_instead_of_deleting(micro_run):
    from kiln.pipeline import run_all
    run_all(micro_config(micro_run, train={"max_steps": 2, "eval_every": 0}))
    with pytest.raises(ConfigError, match="already holds checkpoints step_0000002"):
        run_all(micro_config(micro_run, train={"max_steps": 2, "eval_every": 0}, model={"depth": 2}))
    assert [c.name for c in (micro_run / "checkpoints").glob("step_*")] == ["step_0000002"]


def test_eta_after_a_rollback_before_the_resume_step(micro_run, monkeypatch, capsys):
    """A rollback can land before the step a run resumed at; the ETA must not divide by the steps since it."""
    train = {"checkpoint_every": 2, "keep_checkpoints": 5, "eval_every": 0, "spike_factor": 3.0,
             "spike_patience": 3}
    with monkeypatch.context() as m:     # spikes at steps 3 and 4: the run ends mid-streak (2 of 3)
        install(m.setattr, spike=[2, 3])
        run_stage(micro_config(micro_run, train={**train, "max_steps": 4}), "pretrain")
    state = json.loads((micro_run / "checkpoints/step_0000004/state.json").read_text())
    assert state["spike"]["streak"] == 2 and state["spike"]["first_spike_step"] == 3
    with monkeypatch.context() as m:     # a third spike at step 5 -> back to step 2, before the resume at 4
        install(m.setattr, spike=[4])
        summary = run_stage(micro_config(micro_run, train={**train, "max_steps": 7, "resume": True}), "pretrain")
    assert summary["rollbacks"] == 1 and summary["steps"] == 7
    out = capsys.readouterr().out
    assert "rolled back to step_0000002" in out
    assert all("eta -" not in line for line in out.splitlines())


def test_tokens_count_real_targets_not_padding(micro_run):
    """Best-fit packing pads rows; tokens (and so tokens/s and MFU) count only the targets the loss sees."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from kiln.tokenizer import Tokenizer
    from kiln.tokenizer.loader import PackedLoader
    shards = RunDir(micro_run).tokens / "train"
    for f in shards.glob("*.parquet"):   # short documents: best-fit rows end in padding
        f.unlink()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 384, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (400,), generator=g)]
    pq.write_table(pa.table({"ids": pa.array(docs, type=pa.list_(pa.int32()))}), shards / "00000.parquet")
    summary = run_stage(micro_config(micro_run, train={"packing": "bestfit", "max_steps": 3, "eval_every": 0}),
                        "pretrain")
    tok = Tokenizer.from_file(RunDir(micro_run).tokenizer_file())
    ld = PackedLoader(sorted(shards.glob("*.parquet")), 32, 4, tok.eos_id, seed=1337, packing="bestfit",
                      bos_id=tok.bos_id, pad_id=tok.pad_id, prefetch=0)
    real = sum(int((next(ld)[1] != -100).sum()) for _ in range(3))
    assert real < 3 * 4 * 32   # there is padding to leave out
    rows = [json.loads(r) for r in (micro_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert summary["tokens_seen"] == rows[-1]["tokens"] == real


def test_validation_rising_while_training_falls_warns_in_the_log_and_metrics(micro_run, monkeypatch, capsys):
    """The loop's divergence watch, fed by real training losses and a validation loss made to rise."""
    import kiln.train.pretrain as pretrain
    vals = iter([6.0, 5.9, 6.0, 6.1, 6.2, 6.3])
    monkeypatch.setattr(pretrain, "loss_sums", lambda *a, **k: {"nats": torch.tensor(next(vals)),
                                                                "tokens": torch.tensor(1.0)})
    run_stage(micro_config(micro_run, train={"max_steps": 6, "eval_every": 1, "lr": 3e-3}), "pretrain")
    out = capsys.readouterr().out
    assert "WARNING step 4: validation loss rose from 5.9000 to 6.1000 over steps 2-4 while training loss fell" in out
    records = [json.loads(x) for x in (micro_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "divergence" in r] == [4]
