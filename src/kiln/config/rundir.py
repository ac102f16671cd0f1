"""The run directory: where every stage reads and writes, and how a finished stage is recognised.

    runs/<name>/
      config.yaml                 the whole resolved config of the last `kiln run`
      data/{train,val,test}/      Parquet shards (id, text, source, meta)   + report.json
      tokenizer/                  tokenizer.json, tokenizer_config.json     + report.json
      tokens/{train,val}/         Parquet token shards                      + meta.json
      checkpoints/step_NNNNNNN/   model.safetensors, optimizer.pt, state.json, config.yaml, COMPLETE
      metrics.jsonl               one JSON line per logged step / eval
      eval/                       metrics.json, samples.json
      report.md, loss.png

Each stage directory gets `config.yaml` (the config it ran with) and, written
last, `_SUCCESS`. A stage whose `_SUCCESS` exists and whose saved config equals
the current one is not run again; one made with another config is replaced only
with `--overwrite true` (kiln/pipeline.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

SUCCESS = "_SUCCESS"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def split_files(self, split: str) -> list[Path]:
        """Parquet shards of a data split, in order."""
        return sorted((self.data / split).glob("*.parquet"))

    def token_files(self, split: str) -> list[Path]:
        return sorted((self.tokens / split).glob("*.parquet"))

    def tokenizer_file(self) -> Path:
        return self.tokenizer / "tokenizer.json"

    def require(self, stage_dir: Path, command: str) -> None:
        """Fail with what to run when an upstream stage has not finished."""
        if not is_done(stage_dir):
            raise FileNotFoundError(
                f"{stage_dir} is missing or unfinished (no {SUCCESS}); run `{command}` first")


def is_done(stage_dir: Path, config: dict[str, Any] | None = None) -> bool:
    """True when the stage finished; with `config`, only if it finished with that same config."""
    if not (stage_dir / SUCCESS).exists():
        return False
    if config is None:
        return True
    saved = stage_dir / "config.yaml"
    return saved.exists() and yaml.safe_load(saved.read_text()) == _plain(config)


def config_diff(stage_dir: Path, config: dict[str, Any]) -> list[str]:
    """Keys whose value differs between the saved stage config and `config`."""
    saved = yaml.safe_load((stage_dir / "config.yaml").read_text()) or {}
    return _diff(saved, _plain(config))


def mark_done(stage_dir: Path, config: dict[str, Any]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stage_dir / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False))
    write_text_atomic(stage_dir / SUCCESS, "")


def clear_done(stage_dir: Path) -> None:
    (stage_dir / SUCCESS).unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, required: bool = False, hint: str = "") -> Any:
    """A JSON file's content; None when absent and not `required`. Errors name the file (and `hint`)."""
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} does not exist{hint}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(obj: Any) -> Any:
    """Round-trip through YAML types so comparisons with a saved file are exact."""
    return yaml.safe_load(yaml.safe_dump(obj))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]
