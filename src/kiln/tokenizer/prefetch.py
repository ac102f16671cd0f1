"""The loader's background thread: builds the next batches (numpy only) while the step runs.

Batches are a pure function of the loader position, so prefetching never changes what is yielded.
The thread holds only a weak reference to its loader and stops when the loader is collected; at
interpreter exit every live thread is stopped (torch calls in such a thread made pytest abort at exit).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.tokenizer.loader import PackedLoader


class Prefetcher:
    """A daemon thread computing arrays_at(key), arrays_at(next key), ... into a bounded queue.

    Holds the loader only through a weak reference between batches, so an abandoned loader is
    collected and its thread ends."""

    def __init__(self, loader: PackedLoader, key: tuple[int, int]):
        self.next_key = key
        self._n = loader.batches_per_epoch
        self._q: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(loader), key, self._q, self._stop),
                                        daemon=True, name="kiln-loader-prefetch")
        _LIVE.add((self._thread, self._stop))
        self._thread.start()

    def get(self):
        while True:
            try:
                key, out = self._q.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the loader's prefetch thread died without an error") from None
                continue
            if isinstance(out, BaseException):
                raise out
            assert key == self.next_key, (key, self.next_key)
            e, p = key
            self.next_key = (e + 1, 0) if p + 1 >= self._n else (e, p + 1)
            return out

    def stop(self, join: bool = False) -> None:
        self._stop.set()
        if join:
            self._thread.join(timeout=5)


_LIVE: set[tuple[threading.Thread, threading.Event]] = set()    # running threads, also of collected loaders


@atexit.register
def _stop_all() -> None:
    # A daemon thread still inside torch when the interpreter exits can abort the process
    # ("terminate called without an active exception"): stop and join them first.
    for thread, stop in list(_LIVE):
        stop.set()
    for thread, _ in list(_LIVE):
        thread.join(timeout=5)


def _prefetch_loop(ref: weakref.ref, key: tuple[int, int], q: queue.Queue, stop: threading.Event) -> None:
    try:
        _produce(ref, key, q, stop)
    finally:
        _LIVE.discard((threading.current_thread(), stop))


def _produce(ref: weakref.ref, key: tuple[int, int], q: queue.Queue, stop: threading.Event) -> None:
    epoch, pos = key
    while not stop.is_set():
        loader = ref()
        if loader is None:
            return
        n = loader.batches_per_epoch
        if pos >= n:
            epoch, pos = epoch + 1, 0
        try:
            item = ((epoch, pos), loader.arrays_at(epoch, pos))
        except BaseException as e:   # handed to the consumer, raised there
            item = ((epoch, pos), e)
        del loader
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                break
            except queue.Full:
                if ref() is None:
                    return
        pos += 1
