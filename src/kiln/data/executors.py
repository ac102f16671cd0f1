"""Where file tasks run: a local process pool (default) or a Ray cluster; the same tasks, the same order.

Both executors yield `(index, task, sidecar)` in file order whatever finishes first, so the parent's
accounting, dedup and output are byte-identical between them (tests/data/test_data_ray.py).

Ray: `ray.init()` joins the cluster named by `RAY_ADDRESS` (or an instance the caller already started),
else starts a local one. Workers write their task results to the run directory and the parent reads them
back, so on a multi-node cluster the inputs and the run directory must be on a filesystem every node
mounts at the same path (as with datatrove's and NeMo Curator's Ray executors).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator

from tqdm import tqdm

from kiln.config import ConfigError
from kiln.data.readers import FileTask
from kiln.data.tasks import TaskSpec, run_task

EXECUTORS = ("local", "ray")


def task_results(tasks: list[FileTask], spec: TaskSpec, workers: int,
                 executor: str = "local") -> Iterator[tuple[int, FileTask, dict]]:
    """Run every task (skipping finished ones); yield results in file order. Closing the generator stops
    outstanding work (the parent does so once `max_docs` is reached)."""
    items = list(enumerate(tasks))
    results = _ray(items, spec, workers) if executor == "ray" else _local(items, spec, workers)
    with contextlib.closing(results), \
            tqdm(total=len(tasks), unit="file", desc="data: files", disable=None, leave=False) as bar:
        for (index, task), side in zip(items, results):
            bar.update()
            yield index, task, {**side, "work_dir": spec.work_dir}


def _local(items: list[tuple[int, FileTask]], spec: TaskSpec, workers: int) -> Iterator[dict]:
    work = functools.partial(run_task, spec=spec)
    if workers == 1:
        yield from map(work, items)   # in-process: same function, same order, easier to debug
        return
    # spawn, not fork: forking a process that has threads (tqdm's monitor, a caller's) can deadlock.
    with _single_threaded_blas():
        pool = multiprocessing.get_context("spawn").Pool(workers)   # starts every worker now, with this env
    with pool:
        yield from pool.imap(work, items, chunksize=_chunksize(len(items), workers))


BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_blas():
    """Workers inherit one BLAS thread (unless the caller chose a number): each worker is one core's worth
    of work already, and language ID's small matrix-vector products (~1000 x 142) got ~3x slower in CPU time
    with OpenBLAS's default thread per core, whose idle threads spin on the cores the other workers need.
    Ray sets OMP_NUM_THREADS=1 in its workers the same way. Set only while the pool starts: the parent's
    environment (later stages, subprocesses) is left as it was."""
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARS}
    for k in BLAS_THREAD_VARS:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _chunksize(n_tasks: int, workers: int) -> int:
    # Small enough to keep both the workers and the progress bar busy, big enough to amortise IPC.
    return max(1, min(16, n_tasks // (workers * 16)))


def ray_module():
    """`ray`, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("data.executor='ray' needs Ray: pip install 'llmkiln[ray]' "
                          "(or set data.executor='local')") from e
    return ray


def _ray(items: list[tuple[int, FileTask]], spec: TaskSpec, workers: int) -> Iterator[dict]:
    """At most `in_flight` tasks submitted at a time (memory stays flat for any number of files);
    results are taken in submission order."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init()   # RAY_ADDRESS if set (a cluster started with `ray start --head`), else a local instance
    remote = ray.remote(num_cpus=1)(run_task)
    spec_ref = ray.put(spec)   # once, not once per task
    in_flight = max(2 * workers, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    todo = iter(items)
    try:
        for item in todo:
            pending.append(remote.remote(item, spec_ref))
            if len(pending) >= in_flight:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())
    finally:
        for ref in pending:   # closed early (max_docs reached) or failed: stop the rest
            ray.cancel(ref)
