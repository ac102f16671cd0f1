"""DDP and FSDP2 under torchrun on CPU (gloo, 2 processes) against one process with the same global batch.

Tolerance: losses and gradient norms within rel 1e-5 of one process (fp32; the ranks' partial sums
are added in another order; observed differences ~1e-7); weights within rtol 1e-4 / atol 1e-5 after 6
steps (1e-5 is 0.3% of one Adam step at lr 3e-3: Adam turns last-bit gradient differences on entries
with tiny second moments into update differences of that size). Same layout and rank count: bitwise.

Three reference runs are made once per module (6 steps, checkpoints at 3 and 6); every resume test
copies one, deletes its step-6 checkpoint and resumes from step 3 in another layout.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dist_util import close as _close, interrupted_copy as _interrupted_copy, metrics, run_kiln, weights as _weights
from kiln.formats.checkpoint import checkpoint_config
from kiln.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# One process: micro-batches of 2, accumulating 2. Two ranks: micro-batches of 1, accumulating 2 (so the
# no_sync / set_requires_gradient_sync path runs). Both: 4 sequences (128 tokens) per optimizer step.
LAYOUTS = {"single": (1, "none", {"micro_batch_size": 2, "batch_tokens": 128}),
           "ddp": (2, "ddp", {"micro_batch_size": 1, "batch_tokens": 128}),
           "fsdp": (2, "fsdp", {"micro_batch_size": 1, "batch_tokens": 128})}


def _run(run_dir, layout, *extra):
    nproc, parallel, train = LAYOUTS[layout]
    return run_kiln(run_dir, nproc=nproc, args=("--train.parallel", parallel, *extra), **train)


@pytest.fixture(scope="module")
def refs(prepared_run, tmp_path_factory):
    """Uninterrupted 6-step runs in each layout: {layout: (run_dir, stdout)}."""
    root = tmp_path_factory.mktemp("dist_refs")
    out = {}
    for layout in LAYOUTS:
        run = root / layout
        shutil.copytree(prepared_run, run)
        out[layout] = (run, _run(run, layout).stdout)
    return out


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(refs, layout):
    run, stdout = refs[layout]
    assert stdout.count("training done") == 1 and stdout.count("model: ") == 1   # only rank 0 prints
    single = refs["single"][0]
    _close(metrics(run), metrics(single))
    a, b = _weights(run), _weights(single)        # fsdp: the consolidated HF-named copy
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_fsdp_checkpoint_resumes_bitwise(refs, tmp_path):
    ck = refs["fsdp"][0] / "checkpoints/step_0000003"
    assert (ck / "dcp" / ".metadata").exists() and not (ck / "optimizer.pt").exists()
    run = _interrupted_copy(refs, "fsdp", tmp_path)
    _run(run, "fsdp", "--resume")
    assert metrics(run) == metrics(refs["fsdp"][0])
    a, b = _weights(run), _weights(refs["fsdp"][0])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")   # DCP's note that it loads in one process
def test_fsdp_checkpoint_loads_into_one_plain_process(refs):
    """DCP reshards 2 ranks' shards into one unsharded model + optimizer: the weights equal the
    consolidated copy and every parameter has 3 steps of Adam state."""
    from kiln.model.llama import Transformer
    from kiln.train.optim import build_optimizer
    ck = refs["fsdp"][0] / "checkpoints/step_0000003"
    cfg = checkpoint_config(ck)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    state = load_checkpoint(ck, model, opt, torch.device("cpu"))
    assert state["step"] == 3
    full = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items() if k in full)
    assert len(opt.state) == len(list(model.parameters()))
    assert all(float(s["step"]) == 3 and s["exp_avg"].abs().sum() > 0 for s in opt.state.values())


def test_ddp_checkpoint_resumes_under_fsdp(refs, tmp_path):
    """A single-file (ddp) checkpoint continues under fsdp on the same ranks: the full state is sharded."""
    run = _interrupted_copy(refs, "ddp", tmp_path)
    _run(run, "fsdp", "--resume")
    _close(metrics(run), metrics(refs["ddp"][0]))


@pytest.mark.parametrize("first, second", [("fsdp", "single"), ("single", "fsdp")])
def test_resume_on_another_rank_count(refs, tmp_path, first, second):
    run = _interrupted_copy(refs, first, tmp_path)
    _run(run, second, "--resume")
    _close(metrics(run), metrics(refs["single"][0]))


def test_fsdp_with_muon_matches_one_process_and_resumes_bitwise(prepared_run, tmp_path):
    """Muon under FSDP2: each sharded update is gathered, orthogonalised whole and re-sharded, so 2 ranks
    follow one process; its DTensor state (momentum buffers) checkpoints and resumes exactly."""
    runs = {}
    for layout in ("single", "fsdp"):
        runs[layout] = tmp_path / layout
        shutil.copytree(prepared_run, runs[layout])
        _run(runs[layout], layout, "--train.optimizer", "muon")
    _close(metrics(runs["fsdp"]), metrics(runs["single"]))
    a, b = _weights(runs["fsdp"]), _weights(runs["single"])
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in b)
    run = _interrupted_copy({"fsdp": (runs["fsdp"], "")}, "fsdp", tmp_path)
    _run(run, "fsdp", "--train.optimizer", "muon", "--resume")
    assert metrics(run) == metrics(runs["fsdp"])


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_fused_head_under_two_ranks_matches_one_plain_process(refs, layout, tmp_path):
    """The fused head reads `lm_head.weight` inside the root module's forward: under FSDP2 that is the
    gathered weight, under DDP the replica's; both train as one process with the plain head does."""
    run = tmp_path / layout
    shutil.copytree(refs["single"][0], run)
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    assert "fused cross-entropy" in _run(run, layout, "--train.fused_cross_entropy", "on").stdout
    _close(metrics(run), metrics(refs["single"][0]))
    a, b = _weights(run), _weights(refs["single"][0])
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in b)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_blocks_compiled_in_place_under_two_ranks_match_one_process(refs, prepared_run, layout, tmp_path):
    """train.compile_scope=blocks under DDP and FSDP2 (each block compiled before it is wrapped or sharded):
    the uncompiled single-process run's losses and gradient norms (compiled arithmetic: rel 1e-4)."""
    run = tmp_path / layout
    shutil.copytree(prepared_run, run)
    out = _run(run, layout, "--train.compile", "true", "--train.compile_scope", "blocks").stdout
    assert "compiled by block" in out
    _close(metrics(run), metrics(refs["single"][0]), rel=1e-4)
