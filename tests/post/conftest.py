"""A tiny pretrained base for the post-training tests: the micro recipe with room for a conversation."""

import shutil

import pytest

from micro import micro_config
from postkit import BASE_MODEL, BASE_TRAIN


@pytest.fixture(scope="session")
def pretrained_base(prepared_run, tmp_path_factory):
    """A micro run pretrained for a few steps at context 128 (shared: copy it, or post-train into another
    directory with --<stage>.out)."""
    from kiln.pipeline import run_stage
    root = tmp_path_factory.mktemp("base") / "run"
    shutil.copytree(prepared_run, root)
    run_stage(micro_config(root, model=BASE_MODEL, train=BASE_TRAIN), "pretrain")
    return root


@pytest.fixture
def base_run(pretrained_base, tmp_path):
    """A private copy of the pretrained base."""
    dst = tmp_path / "base"
    shutil.copytree(pretrained_base, dst)
    return dst
