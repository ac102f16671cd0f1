"""A time limit for code kiln calls in-process that it did not write (a GRPO reward function, a DPO scorer):
one that loops forever fails that call, counted like one that raises, instead of stalling the run."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the block after `seconds` (0: no limit). It uses SIGALRM, so it holds in the main
    thread of a Unix process (where training runs, one per rank) and nowhere else: elsewhere, no limit.
    Python code is interrupted between bytecodes; a call stuck inside C code is interrupted when it returns."""
    usable = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"the call took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    outer, interval = signal.setitimer(signal.ITIMER_REAL, seconds)   # an alarm already set (pytest-timeout's)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:   # put the outer alarm back with what is left of it (due now if it fell inside the block)
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3), interval)
