"""A small trained tokenizer shared by the tokenizer and tokenize tests."""

from __future__ import annotations

import pytest
from tokdata import make_config, make_run

from kiln.config import Config
from kiln.tokenizer.train import run_tokenizer


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Config, dict]:
    """A run with synthetic data splits and a trained 512-token tokenizer (do not modify)."""
    run = make_run(tmp_path_factory.mktemp("run"))
    cfg = make_config(run)
    return cfg, run_tokenizer(cfg)
