import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from micro import micro_config
from kiln.pipeline import run_stage
from kiln.formats.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("val_loss")) for r in rows]


def _weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_pretrain_writes_metrics_and_checkpoints(micro_run):
    summary = run_stage(micro_config(micro_run), "pretrain")
    ckpts = complete_checkpoints(micro_run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_0000003", "step_0000006"]
    assert all((c / f).exists() for c in ckpts for f in ("model.safetensors", "optimizer.pt", "state.json", "config.yaml"))
    rows = _losses(micro_run)
    assert [r[0] for r in rows if r[1] is not None] == [1, 2, 3, 4, 5, 6]
    assert [r[0] for r in rows if r[4] is not None] == [3, 6]
    assert summary["final_val_loss"] is not None


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_identical(micro_run, tmp_path, optimizer):
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    run_stage(micro_config(micro_run, train={"optimizer": optimizer}), "pretrain")  # uninterrupted: 6 steps

    # Interrupted after step 3: the checkpoint at 3 is the last thing that survived.
    run_stage(micro_config(other, train={"max_steps": 6, "optimizer": optimizer}), "pretrain")
    shutil.rmtree(other / "checkpoints" / "step_0000006")
    run_stage(micro_config(other, train={"resume": True, "optimizer": optimizer}), "pretrain")

    assert _losses(micro_run) == _losses(other)
    a, b = _weights(micro_run / "checkpoints/step_0000006"), _weights(other / "checkpoints/step_0000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(micro_run / "checkpoints/step_0000006/optimizer.pt", weights_only=True)
    opt_b = torch.load(other / "checkpoints/step_0000006/optimizer.pt", weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if optimizer == "muon":  # hidden matrices carry Muon momentum, the rest Adam moments
        kinds = {frozenset(st) for st in opt_a["state"].values()}
        assert frozenset({"momentum_buffer"}) in kinds and frozenset({"step", "exp_avg", "exp_avg_sq"}) in kinds


def test_half_written_checkpoint_is_skipped(micro_run):
    run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    good = latest_checkpoint(micro_run / "checkpoints")
    # A crash mid-write: a later step directory with weights but no COMPLETE marker, and a temp dir.
    broken = micro_run / "checkpoints" / "step_0000005"
    shutil.copytree(good, broken)
    (broken / COMPLETE).unlink()
    (broken / "optimizer.pt").write_bytes(b"truncated")
    (micro_run / "checkpoints" / ".tmp-step_0000006-99999").mkdir()
    assert latest_checkpoint(micro_run / "checkpoints") == good
    run_stage(micro_config(micro_run, train={"max_steps": 6, "resume": True}), "pretrain")
    assert latest_checkpoint(micro_run / "checkpoints").name == "step_0000006"
    assert not (micro_run / "checkpoints" / ".tmp-step_0000006-99999").exists()
    steps = [r[0] for r in _losses(micro_run) if r[1] is not None]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_matches_large_batch(micro_run, tmp_path):
    """Two micro-batches of 2 accumulate to the same update as one micro-batch of 4 (fp32 tolerance)."""
    other = tmp_path / "other"
    shutil.copytree(micro_run, other)
    run_stage(micro_config(micro_run, train={"max_steps": 2, "micro_batch_size": 4}), "pretrain")
    run_stage(micro_config(other, train={"max_steps": 2, "micro_batch_size": 2, "batch_tokens": 4 * 32}), "pretrain")
    a, b = _losses(micro_run), _losses(other)
    assert [r[1] for r in a if r[1]] == __import__("pytest").approx([r[1] for r in b if r[1]], rel=1e-5)


def test_summary_counts_epochs_and_heavy_repetition_is_warned(micro_run, capsys):
    from kiln.tokenizer.loader import PackedLoader
    from kiln.train.pretrain import repetition_warning
    from kiln.config.rundir import RunDir
    from kiln.tokenizer import Tokenizer
    cfg = micro_config(micro_run, train={"max_steps": 2})
    summary = run_stage(cfg, "pretrain")
    rd = RunDir(micro_run)
    tok = Tokenizer.from_file(rd.tokenizer_file())
    loader = PackedLoader(rd.token_files("train"), cfg.model.max_seq_len, cfg.train.micro_batch_size, tok.eos_id)
    batch_tokens = summary["tokens_seen"] / 2
    assert summary["epochs"] == pytest.approx(2 * batch_tokens / loader.tokens_per_epoch, abs=1e-3)
    assert f"2 steps are {summary['epochs']:.2f} epochs" in capsys.readouterr().out
    assert repetition_warning(4.0) is None
    assert "4.5 passes over the training data" in repetition_warning(4.5)


def _scripted_val_losses(monkeypatch, values):
    """Make the periodic validation return `values` in order (the training itself is real)."""
    import kiln.train.pretrain as pretrain
    it = iter(values)
    monkeypatch.setattr(pretrain, "validation_loss", lambda *a, **k: next(it))


def test_best_checkpoint_is_the_lowest_validation_loss_and_survives_resume(micro_run, monkeypatch, capsys):
    from kiln.formats.checkpoint import resolve_checkpoint
    train = {"max_steps": 6, "eval_every": 1, "checkpoint_every": 1, "keep_checkpoints": 20}
    _scripted_val_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.2, 3.1])   # overfits after step 3
    run_stage(micro_config(micro_run, train=train), "pretrain")
    best = resolve_checkpoint(micro_run / "checkpoints", "best")
    assert best == micro_run / "checkpoints" / "best" / "step_0000003"
    assert [c.name for c in complete_checkpoints(micro_run / "checkpoints" / "best")] == ["step_0000003"]
    assert json.loads((best / "state.json").read_text())["val_loss"] == 3.0
    assert latest_checkpoint(micro_run / "checkpoints").name == "step_0000006"   # `latest` is unchanged
    # It holds the weights trained up to its step: those of that step's own checkpoint.
    want = _weights(micro_run / "checkpoints" / "step_0000003")
    got = _weights(best)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # Step 3 had its own checkpoint: the best shares its files (hard links) instead of a second copy.
    assert (best / "model.safetensors").stat().st_ino == (micro_run / "checkpoints" / "step_0000003" /
                                                          "model.safetensors").stat().st_ino
    assert "val_loss" not in json.loads((micro_run / "checkpoints" / "step_0000003" / "state.json").read_text())
    out = capsys.readouterr().out
    assert out.count("best so far") == 3 and "step 3: val loss 3.0000 (ppl 20.1), best so far" in out
    # The eval stage scores the checkpoint it is told to, and says which.
    ev = run_stage(micro_config(micro_run, train=train, eval={"checkpoint": "best"}), "eval")
    assert ev["step"] == 3 and ev["checkpoint"] == str(best)

    # A resumed run compares with the kept best's loss, not with its own first evaluation.
    # (From here on a best falls between step checkpoints: it is written on its own.)
    train["checkpoint_every"] = 4
    _scripted_val_losses(monkeypatch, [3.05, 3.01])
    run_stage(micro_config(micro_run, train={**train, "max_steps": 8, "resume": True}), "pretrain")
    assert resolve_checkpoint(micro_run / "checkpoints", "best").name == "step_0000003"
    _scripted_val_losses(monkeypatch, [2.5, 2.9])
    run_stage(micro_config(micro_run, train={**train, "max_steps": 10, "resume": True}), "pretrain")
    assert resolve_checkpoint(micro_run / "checkpoints", "best").name == "step_0000009"
    assert [c.name for c in complete_checkpoints(micro_run / "checkpoints" / "best")] == ["step_0000009"]
    assert json.loads((micro_run / "checkpoints" / "best" / "step_0000009" / "state.json").read_text())["val_loss"] == 2.5
    assert not (micro_run / "checkpoints" / "step_0000009").exists()


def test_no_best_checkpoint_when_turned_off_and_a_clear_error_when_asked_for(micro_run):
    from kiln.formats.checkpoint import resolve_checkpoint
    run_stage(micro_config(micro_run, train={"max_steps": 3, "keep_best": False}), "pretrain")
    assert not (micro_run / "checkpoints" / "best").exists()
    with pytest.raises(FileNotFoundError, match="no best checkpoint.*train.keep_best"):
        resolve_checkpoint(micro_run / "checkpoints", "best")


def test_compile_by_block_trains_like_eager_with_unchanged_names(micro_run, tmp_path, capsys):
    """train.compile_scope=blocks: each block compiled in place (one graph for the identical blocks), the rest
    eager; the same losses as the eager run and the same checkpoint names (no torch.compile prefix)."""
    from torch._dynamo.utils import counters
    eager = tmp_path / "eager"
    shutil.copytree(micro_run, eager)
    train = {"max_steps": 2, "checkpoint_every": 2, "eval_every": 100}
    run_stage(micro_config(eager, model={"depth": 3}, train=train), "pretrain")
    torch._dynamo.reset()
    counters.clear()
    run_stage(micro_config(micro_run, model={"depth": 3}, train={**train, "compile": True,
                                                                  "compile_scope": "blocks"}), "pretrain")
    assert "compiled by block" in capsys.readouterr().out
    assert 1 <= counters["stats"]["unique_graphs"] <= 2   # the blocks share their graph: not one per block
    for (s, loss, norm, *_), (s_e, loss_e, norm_e, *_) in zip(_losses(micro_run), _losses(eager)):
        assert s == s_e and loss == pytest.approx(loss_e, rel=1e-4) and norm == pytest.approx(norm_e, rel=1e-3)
    got = _weights(latest_checkpoint(micro_run / "checkpoints"))
    want = _weights(latest_checkpoint(eager / "checkpoints"))
    assert got.keys() == want.keys()
