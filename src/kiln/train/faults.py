"""Fault injection for the recovery tests: off unless a KILN_FAULT_* environment variable is set.

    KILN_FAULT_NAN_BATCHES="3,7"     the loss of data steps 3 and 7 becomes NaN (a bad batch)
    KILN_FAULT_SPIKE_BATCHES="5-40"  the loss of data steps 5..40 is multiplied by KILN_FAULT_SPIKE_SCALE
    KILN_FAULT_SPIKE_SCALE="20"      (default 20)
    KILN_FAULT_CKPT_SLEEP="0.05"     seconds to sleep between the files of a checkpoint write, so that a
                                     kill test's SIGKILLs land inside writes

A data step counts the optimizer steps' worth of batches drawn from the loader (0-based); it equals the
step until a spike rollback skips batches. Faults are keyed by it so that skipped batches stay skipped.
Read once per process; the training loop asks `loss_fn(data_step)`, which is None (the normal loss) when
no fault applies, so an unset environment costs one dict lookup per step.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable


@functools.cache
def _faults() -> tuple[dict[int, float], float]:
    scale: dict[int, float] = {}
    spike = float(os.environ.get("KILN_FAULT_SPIKE_SCALE", "20"))
    for part in filter(None, os.environ.get("KILN_FAULT_SPIKE_BATCHES", "").split(",")):
        lo, _, hi = part.partition("-")
        for s in range(int(lo), int(hi or lo) + 1):
            scale[s] = spike
    for part in filter(None, os.environ.get("KILN_FAULT_NAN_BATCHES", "").split(",")):
        scale[int(part)] = float("nan")
    return scale, float(os.environ.get("KILN_FAULT_CKPT_SLEEP", "0"))


def loss_fn(data_step: int) -> Callable | None:
    """A loss function with the fault of `data_step` applied, or None for the normal loss."""
    factor = _faults()[0].get(data_step)
    if factor is None:
        return None
    return lambda m, b: m(b[0], b[1]) * factor


def checkpoint_pause() -> None:
    """Called between the files of a checkpoint write."""
    pause = _faults()[1]
    if pause:
        time.sleep(pause)
