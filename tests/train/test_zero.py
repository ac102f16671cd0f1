"""DeepSpeed ZeRO-1/2/3 under torchrun on CPU (gloo, 2 processes) against one plain process, same global batch.

Tolerance, as for DDP/FSDP (test_distributed.py): losses and gradient norms within rel 1e-5 of one
process (fp32; ZeRO reduces the ranks' partial sums in another order, observed differences ~1e-7);
weights within rtol 1e-4 / atol 1e-5 after 6 steps. Resume on the same ranks and stage: bitwise.
DeepSpeed's bf16 mode (bf16 weights and gradients) is checked against fp32 at rel 2e-2.

The first DeepSpeed process on a machine JIT-compiles its CPU shared-memory communication op
(~15 s, cached under ~/.cache/torch_extensions); every run after that starts in ~5 s.
"""

import shutil

import pytest
import torch

from dist_util import close as _close, interrupted_copy as _interrupted_copy, metrics, run_kiln, weights as _weights
from kiln.config import ConfigError
from kiln.formats.checkpoint import checkpoint_config, load_model
from kiln.train.checkpoint import check_layout

pytest.importorskip("deepspeed")
# 360 s: the reference runs (a fixture, so timed with the first test) take ~110 s on 2 cores with the JIT above
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]

# One process: micro-batches of 2, accumulating 2. Two ranks: micro-batches of 1, accumulating 2 (so the
# engine's accumulation boundary is exercised). Both: 4 sequences (128 tokens) per optimizer step.
SINGLE = (1, ("--train.parallel", "none"), {"micro_batch_size": 2, "batch_tokens": 128})


def _zero(stage: int, nproc: int = 2):
    return nproc, ("--train.parallel", "deepspeed", "--train.zero_stage", str(stage)), \
        {"micro_batch_size": 2 // nproc, "batch_tokens": 128}


LAYOUTS = {"single": SINGLE, "zero1": _zero(1), "zero2": _zero(2), "zero3": _zero(3)}


def _run(run_dir, layout, *extra, faults=None):
    nproc, args, train = layout
    return run_kiln(run_dir, nproc=nproc, args=(*args, *extra), faults=faults, **train)


@pytest.fixture(scope="module")
def refs(prepared_run, tmp_path_factory):
    """Uninterrupted 6-step runs (checkpoints at 3 and 6): {name: (run_dir, stdout)}."""
    root = tmp_path_factory.mktemp("zero_refs")
    out = {}
    for name, layout in LAYOUTS.items():
        run = root / name
        shutil.copytree(prepared_run, run)
        out[name] = (run, _run(run, layout).stdout)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_one_process(refs, stage):
    run, stdout = refs[f"zero{stage}"]
    assert stdout.count("training done") == 1 and f"deepspeed ZeRO-{stage}" in stdout   # only rank 0 prints
    single = refs["single"][0]
    _close(metrics(run), metrics(single))
    a, b = _weights(run), _weights(single)     # the consolidated fp32 master weights, HF names
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    ck = run / "checkpoints/step_0000003/deepspeed/state"
    assert len(list(ck.glob("zero_pp_rank_*_optim_states.pt"))) == 2    # one optimizer shard per rank


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_resumes_bitwise(refs, tmp_path, stage):
    name = f"zero{stage}"
    run = _interrupted_copy(refs, name, tmp_path)
    _run(run, LAYOUTS[name], "--resume")
    assert metrics(run) == metrics(refs[name][0])
    a, b = _weights(run), _weights(refs[name][0])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first, second", [("zero2", _zero(1, nproc=1)), ("zero3", _zero(3, nproc=1))],
                         ids=["zero2-2-ranks-to-zero1-1-rank", "zero3-2-ranks-to-1"])
def test_resume_on_another_rank_count_or_stage(refs, tmp_path, first, second):
    """Through DeepSpeed's universal checkpoint (converted on the fly, then removed)."""
    run = _interrupted_copy(refs, first, tmp_path)
    out = _run(run, second, "--resume").stdout
    assert "universal checkpoint" in out
    _close(metrics(run), metrics(refs["single"][0]))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_refused_resumes_say_why(refs):
    ck = refs["zero2"][0] / "checkpoints/step_0000003"
    with pytest.raises(ConfigError, match="written by train.parallel=deepspeed"):
        check_layout(ck, "none")
    with pytest.raises(ConfigError, match="does not cross between ZeRO-3 and ZeRO-1/2"):
        check_layout(ck, "deepspeed", 3)
    check_layout(ck, "deepspeed", 1)
    with pytest.raises(ConfigError, match="kiln does not convert optimizer state into DeepSpeed's"):
        check_layout(refs["single"][0] / "checkpoints/step_0000003", "deepspeed", 2)
    cfg = checkpoint_config(ck)    # eval / generate / export read the consolidated weights, no DeepSpeed
    model, _ = load_model(ck, torch.device("cpu"))
    assert cfg.train.parallel == "deepspeed" and model.num_params() > 0


def test_nan_batch_is_skipped_like_one_process(prepared_run, refs, tmp_path):
    """DeepSpeed skips the non-finite step itself; kiln logs and counts it the same way."""
    runs = {}
    for name in ("single", "zero2"):
        runs[name] = tmp_path / name
        shutil.copytree(prepared_run, runs[name])
        _run(runs[name], LAYOUTS[name], faults={"nan": [2]})
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "skipped")
    for run in runs.values():
        assert [r["step"] for r in metrics(run, keys) if r.get("skipped")] == [3]
    _close(*[[r for r in metrics(run) if r["step"] != 3] for run in runs.values()])


def test_bf16_is_close_to_fp32(prepared_run, refs, tmp_path):
    run = tmp_path / "bf16"
    shutil.copytree(prepared_run, run)
    _run(run, LAYOUTS["zero2"], "--train.precision", "bf16")
    _close(metrics(run), metrics(refs["single"][0]), rel=2e-2)
    assert all(v.dtype == torch.float32 for v in _weights(run).values())   # the fp32 master weights
