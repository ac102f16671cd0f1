"""The micro recipe used across tests: a few dozen stdlib files, a 384-token BPE, a 1-layer model."""

from kiln.config import load_recipe

MICRO = {
    "name": "micro",
    "data": {"sources": ["python-stdlib"], "max_docs": 80, "val_fraction": 0.1, "test_fraction": 0.05,
             "workers": 1},
    "tokenizer": {"vocab_size": 384, "n_reserved": 4},
    "tokenize": {"workers": 1},
    "model": {"depth": 1, "head_dim": 32, "n_kv_heads": 1, "max_seq_len": 32},
    "train": {"optimizer": "adamw", "precision": "fp32", "max_steps": 6, "micro_batch_size": 4, "warmup_steps": 2, "lr": 3e-3, "eval_every": 3,
              "eval_batches": 2, "checkpoint_every": 3, "keep_checkpoints": 3, "log_every": 1, "threads": 1},
    "eval": {"max_batches": 2, "batch_size": 4, "prompts": ["def "], "max_new_tokens": 8, "benchmarks": [],
             "memorisation": {"documents": 4, "prefix_tokens": 8, "new_tokens": 16, "threshold": 12}},
}


def micro_config(run_dir, **sections):
    """The micro recipe in `run_dir`, with per-section overrides: micro_config(p, train={"max_steps": 3})."""
    over = {k: dict(v) for k, v in MICRO.items() if isinstance(v, dict)}
    for section, values in sections.items():
        over.setdefault(section, {}).update(values)
    return load_recipe("tiny", {**over, "name": "micro", "run_dir": str(run_dir)})
