"""Helpers of the post-training tests."""

from micro import micro_config

BASE_MODEL = {"max_seq_len": 128}
BASE_TRAIN = {"max_steps": 4, "eval_every": 4, "checkpoint_every": 4}


def post_config(run_dir, stage: str, **section):
    """The micro recipe pointed at `run_dir` with one post-training section overridden (nested dicts merge)."""
    return micro_config(run_dir, model=BASE_MODEL, train=BASE_TRAIN, **{stage: section})
