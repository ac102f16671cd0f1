"""`kiln generate` on a trained micro run, through the command line."""

import sys

from kiln.pipeline import run_stage
from micro import micro_config
from subprocess_util import run_child


def _generate(run, *args):
    return run_child([sys.executable, "-m", "kiln", "generate", "--run_dir", str(run), *args], timeout=120)


def test_generate_greedy_is_deterministic_and_continues_prompt(micro_run):
    run_stage(micro_config(micro_run, train={"max_steps": 3}), "pretrain")
    args = ["--generate.prompt", "def f(", "--generate.temperature", "0", "--generate.max_new_tokens", "12"]
    a, b = _generate(micro_run, *args), _generate(micro_run, *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def f(")


def test_generate_without_checkpoint_says_what_to_run(micro_run):
    out = _generate(micro_run)
    assert out.returncode == 2 and "kiln pretrain" in out.stderr
