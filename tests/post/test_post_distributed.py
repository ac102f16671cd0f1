"""SFT under torchrun on CPU (gloo, 2 processes, DDP and FSDP2) against one process with the same global batch:
the post-training stages are tasks of the one loop, so its parallelism applies to them unchanged."""

import json
import os
import sys
from pathlib import Path

import pytest

from kiln.config import dump_yaml
from postkit import post_config
from subprocess_util import run_child

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
SRC = str(Path(__file__).resolve().parents[2] / "src")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}

CHATS = [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                       {"role": "assistant", "content": f"Answer {i}: " + "word " * (i % 7)}]} for i in range(32)]


def _run(base, tmp_path, name, nproc, parallel, micro):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    cfg = post_config(base, "sft", out=str(tmp_path / name), packing="pad",
                      data={"sources": [str(chats)], "val_fraction": 0.0, "languages": []},
                      train={"max_steps": 4, "micro_batch_size": micro, "batch_tokens": 4 * 128, "lr": 3e-3,
                             "log_every": 1, "eval_every": 100, "checkpoint_every": 100, "warmup_steps": 1,
                             "precision": "fp32", "threads": 1, "parallel": parallel})
    recipe = tmp_path / f"{name}.yaml"
    dump_yaml(cfg, recipe)
    cmd = ([sys.executable, "-m", "kiln", "sft", str(recipe)] if nproc == 1 else
           [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "kiln", "sft", str(recipe)])
    p = run_child(cmd, timeout=240, env=env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sft_on_two_ranks_matches_one_process(base_run, tmp_path, parallel):
    one = _run(base_run, tmp_path, "one", 1, "none", 2)          # micro-batches of 2, accumulating 2
    two = _run(base_run, tmp_path, parallel, 2, parallel, 2)     # 2 ranks x micro-batches of 2
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
