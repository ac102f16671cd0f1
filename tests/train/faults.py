"""Fault injection for the recovery tests, from outside the production code: patches the pretraining loss and
the checkpoint writer. In-process: `install(monkeypatch.setattr, nan={2})`; in a subprocess (kill, torchrun):
run `faulty_kiln.py` instead of `-m kiln`, with the faults in KILN_TEST_FAULTS (JSON).

A data step counts the optimizer steps' worth of batches drawn (0-based); it equals the step until a spike
rollback skips batches. Faults are keyed by it, so skipped batches stay skipped. `spike` multiplies the loss of
its data steps by `scale`; `nan` makes it NaN; `ckpt_sleep` sleeps before each file of a checkpoint is
fsynced, so that a kill test's SIGKILLs land inside writes.
"""

import json
import os
import time

ENV = "KILN_TEST_FAULTS"


def install(setattr_, nan=(), spike=(), scale=20.0, ckpt_sleep=0.0):
    from kiln.train import checkpoint, loop, pretrain

    factors = {int(s): scale for s in spike} | {int(s): float("nan") for s in nan}
    pos = {"offset": 0, "accum": 1, "calls": 0}
    real_start, real_loss, real_fsync = loop.start, pretrain.token_loss, checkpoint._fsync_file

    def start(tr, task, say=print):
        ts = real_start(tr, task, say)
        pos.update(offset=ts.data_step, accum=tr.accum, calls=0)
        return ts

    def loss(model, batch):
        step = pos["offset"] + pos["calls"] // pos["accum"]
        pos["calls"] += 1
        out = real_loss(model, batch)
        return out if step not in factors else out * factors[step]

    def fsync(path):
        time.sleep(ckpt_sleep)
        real_fsync(path)

    setattr_(loop, "start", start)
    setattr_(pretrain, "token_loss", loss)
    if ckpt_sleep:
        setattr_(checkpoint, "_fsync_file", fsync)


def install_from_env():
    spec = os.environ.get(ENV)
    if spec:
        install(setattr, **json.loads(spec))
