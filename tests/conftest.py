"""Shared fixtures: a micro run prepared once per session; subprocesses killed when their test ends."""

import contextlib
import shutil

import pytest

from micro import micro_config
from subprocess_util import Child


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory):
    """A run directory with data, tokenizer and tokens done (shared; copy it before writing)."""
    from kiln.pipeline import run_stage
    root = tmp_path_factory.mktemp("prepared") / "run"
    cfg = micro_config(root)
    for stage in ("data", "tokenizer", "tokenize"):
        run_stage(cfg, stage)
    return root


@pytest.fixture
def micro_run(prepared_run, tmp_path):
    """A private copy of the prepared run directory, ready for `pretrain`."""
    dst = tmp_path / "run"
    shutil.copytree(prepared_run, dst)
    return dst


@pytest.fixture
def spawn():
    """`spawn(cmd, timeout, **popen)` starts a `subprocess_util.Child`: a deadline on its waits and line reads,
    and whatever is left of its process tree killed when the test ends, however it ends."""
    with contextlib.ExitStack() as children:
        yield lambda cmd, timeout, **popen: children.enter_context(Child(cmd, timeout, **popen))
