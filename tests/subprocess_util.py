"""Subprocesses that cannot outlive their test: a deadline on every wait and every line read, and the whole
process tree killed when the deadline passes or the test ends.

Killing the child alone is not enough: `torchrun` starts each worker in a session of its own (to kill it as a
group), and `kiln run`'s data pool outlives a SIGKILLed parent; so the tree is collected while the child
still lives, and the child's own session (`start_new_session`) catches what it started that outlived it.
"""

import os
import queue
import shlex
import signal
import subprocess
import threading
import time

import psutil
import pytest


def run_child(cmd: list[str], timeout: float, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)`, but a child still running after `timeout` seconds
    fails the test (with its output) and is killed with everything it started."""
    with Child(cmd, timeout, **popen) as child:
        child.wait()
    return subprocess.CompletedProcess(cmd, child.returncode, child.stdout, child.stderr)


class Child:
    """A subprocess with a deadline, `timeout` seconds from its start. Threads read its stdout and stderr as it
    writes them, so a full pipe never blocks it; `lines()` hands out stdout lines as they come. Leaving the
    `with` block (or the `spawn` fixture's test) kills whatever is left of its process tree."""

    def __init__(self, cmd: list[str], timeout: float, **popen):
        self.cmd, self.timeout = cmd, timeout
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **popen)
        self.pid = self.proc.pid
        self._out, self._err, self._lines = [], [], queue.SimpleQueue()
        self._readers = [threading.Thread(target=_read, args=(self.proc.stdout, self._out, self._lines), daemon=True),
                         threading.Thread(target=_read, args=(self.proc.stderr, self._err, None), daemon=True)]
        for t in self._readers:
            t.start()

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def lines(self):
        """stdout, line by line, until the child closes it; fails the test at the deadline."""
        while True:
            try:
                line = self._lines.get(timeout=self._left())
            except queue.Empty:
                self._fail("printed no further line")
            if line is None:
                return
            yield line

    def wait(self) -> int:
        """The exit status, once the child has exited and its output is read; fails the test at the deadline."""
        try:
            self.proc.wait(timeout=self._left())
        except subprocess.TimeoutExpired:
            self._fail("is still running")
        for t in self._readers:
            t.join(timeout=self._left())
            if t.is_alive():
                self._fail("exited, but a process it started still holds its stdout or stderr open")
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL the child and every process it started; the number of processes killed. A no-op once all
        have exited."""
        victims = []
        if self.proc.returncode is None:   # not reaped yet, so the pid is still ours
            try:
                root = psutil.Process(self.pid)
                victims = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in victims:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)   # the child's session: what outlived it
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        psutil.wait_procs(victims, timeout=10)
        return len(victims)

    def _left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _fail(self, what: str):
        n = self.kill()
        for t in self._readers:
            t.join(timeout=2)
        cmd = shlex.join(map(str, self.cmd))
        pytest.fail(f"{cmd if len(cmd) < 300 else cmd[:300] + ' ...'}\n{what} after {self.timeout:g} s: killed it "
                    f"({n} process{'es' if n != 1 else ''} in its tree)\n"
                    f"--- stdout (end)\n{self.stdout[-3000:]}\n--- stderr (end)\n{self.stderr[-5000:]}",
                    pytrace=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        for t in self._readers:
            t.join(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()


def _read(pipe, into: list[str], lines: queue.SimpleQueue | None) -> None:
    try:
        for line in pipe:
            into.append(line)
            if lines is not None:
                lines.put(line)
    except (OSError, ValueError):   # the pipe was closed under us: the test is over
        pass
    finally:
        if lines is not None:
            lines.put(None)
