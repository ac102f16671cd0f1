"""Train/validation divergence: validation loss rising while training loss still falls (overfitting).

The watch sees the training loss at log steps and the validation loss at evaluation steps. Between
two evaluations it keeps the mean training loss; it fires when the validation loss has risen at
`patience` evaluations in a row (each by more than `tolerance`, relative) while the mean training loss
fell over the same span. It fires once per onset: a new warning needs the validation loss to have
stopped rising first. Noise is why one rise is not enough: a single validation batch set moves by a
fraction of a percent between evaluations even when nothing is wrong.

The training loop feeds it as it goes (and replays `metrics.jsonl` on resume); `kiln eval` and the
report replay the whole file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path


class DivergenceWatch:
    def __init__(self, patience: int = 2, tolerance: float = 0.002):
        self.patience, self.tolerance = patience, tolerance
        self._train: list[float] = []                      # training losses since the last evaluation
        self._evals: list[tuple[int, float, float]] = []   # (step, val loss, mean train loss before it)
        self._rises = 0
        self.fired: list[dict] = []

    def observe_train(self, loss: float) -> None:
        if math.isfinite(loss):
            self._train.append(loss)

    def observe_val(self, step: int, val_loss: float) -> dict | None:
        """Record an evaluation; returns the warning (a dict with `message`) when divergence starts here."""
        if not math.isfinite(val_loss):
            return None
        train = sum(self._train) / len(self._train) if self._train else (self._evals[-1][2] if self._evals else math.nan)
        self._train = []
        prev = self._evals[-1] if self._evals else None
        self._evals.append((step, val_loss, train))
        if prev is None:
            return None
        rose = val_loss > prev[1] * (1 + self.tolerance)
        self._rises = self._rises + 1 if rose else 0
        if self._rises != self.patience:
            return None
        first = self._evals[-1 - self.patience]
        if not (math.isfinite(train) and math.isfinite(first[2]) and train < first[2]):
            return None
        warning = {"from_step": first[0], "step": step, "val_loss": [first[1], val_loss], "train_loss": [first[2], train],
                   "message": (f"validation loss rose from {first[1]:.4f} to {val_loss:.4f} over steps {first[0]}-{step} "
                               f"while training loss fell from {first[2]:.4f} to {train:.4f}: the model is starting to "
                               "memorise its training data (more data, fewer epochs, more regularisation, or the "
                               "best checkpoint: train.keep_best / eval.checkpoint=best)")}
        self.fired.append(warning)
        return warning

    def replay(self, records: Iterable[dict]) -> DivergenceWatch:
        """Feed logged records (`loss` at log steps, `val_loss` at evaluations) in order."""
        for r in records:
            if isinstance(r.get("loss"), (int, float)):
                self.observe_train(float(r["loss"]))
            if isinstance(r.get("val_loss"), (int, float)):
                self.observe_val(int(r.get("step", 0)), float(r["val_loss"]))
        return self


def read_metrics(path: Path, upto_step: int | None = None) -> list[dict]:
    """The records of a `metrics.jsonl` (a line cut short by a crash is skipped), up to a step."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and (upto_step is None or int(r.get("step", 0)) <= upto_step):
            out.append(r)
    return out


def divergence_of(metrics: Path) -> dict:
    """What `kiln eval` and the report say about a finished run's curves."""
    records = read_metrics(metrics)
    watch = DivergenceWatch().replay(records)
    return {"evaluations": len(watch._evals), "warnings": watch.fired}
