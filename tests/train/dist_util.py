"""Helpers for the tests that run `kiln pretrain` in subprocesses (torchrun, kill, signal tests)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kiln.config import dump_yaml
from faults import ENV as faults_ENV
from micro import micro_config
from subprocess_util import run_child

VENV_BIN = Path(sys.executable).parent


def recipe(run_dir: Path, **train) -> Path:
    """The micro recipe for `run_dir` (with train overrides) as a YAML file beside it."""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    dump_yaml(micro_config(run_dir, train=train), path)
    return path


FAULTY_KILN = Path(__file__).resolve().parent / "faulty_kiln.py"   # `-m kiln` with test faults (faults.py)


def kiln_cmd(run_dir: Path, nproc: int = 1, args: tuple[str, ...] = (), faulty: bool = False, **train) -> list[str]:
    yaml_path = recipe(run_dir, **train)
    entry = [str(FAULTY_KILN)] if faulty else ["-m", "kiln"]
    if nproc == 1:
        return [sys.executable, *entry, "pretrain", str(yaml_path), *args]
    torchrun = str(VENV_BIN / "torchrun")
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", *entry, "pretrain", str(yaml_path), *args]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2] / "src"),
                                                    e.get("PYTHONPATH")]))
    return e


def fault_env(**faults) -> dict[str, str]:
    """Environment for faulty_kiln.py: faults.install's keyword arguments as JSON."""
    return {faults_ENV: json.dumps(faults)}


def run_kiln(run_dir: Path, nproc: int = 1, args: tuple[str, ...] = (), extra_env: dict | None = None,
             faults: dict | None = None, **train) -> subprocess.CompletedProcess:
    extra = {**(extra_env or {}), **(fault_env(**faults) if faults else {})}
    p = run_child(kiln_cmd(run_dir, nproc, args, faulty=bool(faults), **train), timeout=300, env=env(**extra))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def metrics(run_dir: Path, keys=("step", "loss", "grad_norm", "lr", "val_loss", "tokens")) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys if k in r} for r in rows]


def interrupted_copy(refs, name, tmp_path):
    """A copy of a reference run as if it had crashed after the checkpoint at step 3."""
    run = tmp_path / f"from_{name}"
    shutil.copytree(refs[name][0], run)
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    return run


def close(a, b, rel=1e-5):
    """Same steps, lr and tokens; loss and grad norm within `rel`."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("lr") == rb.get("lr") and ra.get("tokens") == rb.get("tokens")
        for k in ("loss", "grad_norm"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=rel), (ra, rb)


def weights(run, step=6):
    return load_file(str(run / f"checkpoints/step_{step:07d}/model.safetensors"))
