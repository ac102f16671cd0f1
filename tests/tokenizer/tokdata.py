"""Synthetic data splits (the data stage's Parquet layout) for the tokenizer and tokenize tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.config import Config, TokenizeConfig, TokenizerConfig
from kiln.config.rundir import RunDir

WORDS = ["value", "count", "index", "result", "data", "name", "item", "total", "buffer", "offset",
         "width", "height", "self", "path", "config", "token", "line", "text"]
TAILS = ["ok", "日本語", "😀", "naïve café", "x", "TODO: fix", "—", "ß"]


def make_doc(rng: random.Random) -> str:
    """A small Python-like document: functions, docstrings, numbers, comments, some non-ASCII."""
    lines = []
    for _ in range(rng.randint(1, 4)):
        args = ", ".join(rng.sample(WORDS, rng.randint(0, 3)))
        lines.append(f"def {'_'.join(rng.sample(WORDS, 2))}({args}):")
        lines.append(f'    """Return the {rng.choice(WORDS)} of {rng.choice(WORDS)}."""')
        for _ in range(rng.randint(1, 5)):
            op = rng.choice(["+", "-", "*", "//", "%"])
            number = rng.randint(0, 10 ** rng.randint(1, 7))
            lines.append(f"    {rng.choice(WORDS)} = {rng.choice(WORDS)} {op} {number}")
        if rng.random() < 0.5:
            lines.append(f"    for {rng.choice(WORDS)} in range({rng.randint(1, 99)}):")
            lines.append(f"        print(f'{{{rng.choice(WORDS)}!r}}', end='\\t')")
        lines.append(f"    return {rng.choice(WORDS)}  # {rng.choice(TAILS)}")
        lines.append("")
    return "\n".join(lines)


def write_split(run: Path, split: str, docs: list[str], shard_docs: int, prefix: str = "") -> list[Path]:
    """data/{split}/part-NNNNN.parquet with the data stage's columns (id, text, source, meta)."""
    out = RunDir(run).data / split
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, i in enumerate(range(0, len(docs), shard_docs)):
        chunk = docs[i:i + shard_docs]
        table = pa.table({
            "id": [f"{prefix}{split}-{i + j}" for j in range(len(chunk))],
            "text": chunk,
            "source": ["synthetic"] * len(chunk),
            "meta": [json.dumps({"n": i + j}) for j in range(len(chunk))],
        })
        path = out / f"part-{k:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def make_run(root: Path, n_train: int = 400, n_val: int = 40, n_test: int = 20, shard_docs: int = 100,
             seed: int = 0) -> Path:
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        write_split(root, split, [make_doc(rng) for _ in range(n)], shard_docs)
    return root


def make_config(run: Path, vocab_size: int = 512, **tokenizer) -> Config:
    return Config(run_dir=str(run), tokenizer=TokenizerConfig(vocab_size=vocab_size, **tokenizer),
                  tokenize=TokenizeConfig(workers=1, batch_docs=32))
