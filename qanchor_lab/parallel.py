"""Independent work in parallel with the numbers of serial work: scikit-learn fits in worker processes (`fit_map`),
torch jobs in threads of one torch thread each (`torch_jobs`), a block at a set torch thread count (`torch_threads`).

The evaluation and the diagnostics fit many small scikit-learn models that do not depend on each other. Each fit
is single-threaded, Python-bound work (lbfgs steps, tree growing), so on the demo's 2 cores the second core sits
idle through about three minutes of them; threads do not help, since the GIL serialises them (the demo's ten
blended probes: 45 s in one thread, 57 s in two). `fit_map` runs such calls in joblib's loky worker processes
(the same ten probes: 35 s in one process, 19 s in two; docs/design.md §7.19).

Every call runs with one BLAS/OpenMP thread unless it sets its own limit (as the probes do, `ProbeConfig.n_threads`),
here and in a worker alike, so `n_jobs` changes the wall time and not one number (tests/test_parallel.py).

A worker imports the module of the function it is given: give `fit_map` functions of torch-free modules
(`baselines`), or each worker pays ~11 s to import torch before its first fit.

The evaluation's torch work (MiniLM over every user for the text baseline, one prompt tuning per task) scales
poorly with torch's own threads on two cores (1.5x for two threads) but well across independent jobs, and torch
releases the GIL inside its kernels: two jobs in two Python threads of one torch thread each take 62 s, the same
work one after the other 109 s on one torch thread and about 73 s on two (docs/design.md §7.21). `torch_jobs`
gives such jobs a pool of threads; each job computes exactly what it computes alone in a one-thread process, so the
numbers do not depend on the number of jobs or on which thread ran what (tests/test_parallel.py). A job that sets
its own torch thread count goes to `submit_process`: that count is process-wide, so it gets a process of its own.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch threads (None: leave torch's setting), restoring the setting after."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_n_jobs(n_jobs: int | None) -> int:
    """scikit-learn's convention: None -> 1 (this process), -1 -> every core, k >= 1 -> k processes."""
    if n_jobs is None:
        return 1
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or (n_jobs < 1 and n_jobs != -1):
        raise ValueError(f"n_jobs must be None, -1 (every core) or an integer >= 1; got {n_jobs!r}")
    return (os.cpu_count() or 1) if n_jobs == -1 else n_jobs


def _one_thread(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    with threadpool_limits(limits=1):
        return fn(*args)


def fit_map(fn: Callable[..., Any], jobs: Iterable[Sequence[Any]], n_jobs: int | None = None, *,
            desc: str | None = None, show_progress: bool = False) -> list[Any]:
    """[fn(*args) for args in jobs], in order: in this process when `n_jobs` resolves to 1 (or there is one
    job), else in that many loky worker processes (at most one per job; the pool is reused by later calls).
    `fn` must be picklable (a module-level function); an exception in a worker is raised here, as itself."""
    jobs = [tuple(args) for args in jobs]
    workers = min(resolve_n_jobs(n_jobs), len(jobs))
    if workers <= 1:
        results = (_one_thread(fn, args) for args in jobs)
    else:
        # max_nbytes=None: arguments are pickled whole, not handed over as read-only memory maps, which fits that
        # scale their inputs in place could not write to
        results = Parallel(n_jobs=workers, backend="loky", return_as="generator", max_nbytes=None)(
            delayed(_one_thread)(fn, args) for args in jobs)
    return list(tqdm(results, total=len(jobs), desc=desc, unit="fit", disable=not show_progress))


class Jobs(Protocol):
    """What `torch_jobs` yields: `submit(fn, *args, **kwargs)` returns a handle whose `result()` is fn's value (or
    raises fn's exception). `submit_process` is for a job that sets its own torch thread count (the batch-invariant
    MiniLM pins two): that count is process-wide (torch passes it to MKL for every thread), so beside other jobs
    such a job runs in a process of its own; fn and its arguments must then pickle."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...

    def submit_process(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any: ...


class _Deferred:
    """A job run in the caller's thread when its result is first asked for (torch_jobs(None))."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self._call, self._done, self._value = (fn, args, kwargs), False, None

    def result(self) -> Any:
        if not self._done:
            fn, args, kwargs = self._call
            self._value, self._done = fn(*args, **kwargs), True
        return self._value


class _InCallerThread:
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _Deferred:
        return _Deferred(fn, args, kwargs)

    submit_process = submit   # nothing runs beside it here, so it needs no process of its own


class _Pool:
    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._processes = None   # a loky executor, started by the first submit_process

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any):
        return self._pool.submit(_one_torch_thread, fn, args, kwargs)

    def submit_process(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any):
        # In a thread, a job that sets two torch threads sets them for every job beside it (the count is
        # process-wide), which may change their rounding (docs/design.md §7.52; a hazard of its own, not the demo's
        # last-digit difference, §7.53). loky (as fit_map) pickles with cloudpickle and never re-imports the caller's
        # __main__.
        if self._processes is None:
            from joblib.externals.loky import ProcessPoolExecutor

            self._processes = ProcessPoolExecutor(max_workers=1)
        return self._processes.submit(fn, *args, **kwargs)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=True)


def _one_torch_thread(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    import torch

    # OpenMP's thread count is per thread: a new thread starts at the default (every core) until torch's lazy
    # initialisation catches up (a job's first matmul here ran at two threads' speed), so set it now. torch's call
    # reaches only the OpenMP runtime torch's symbols bind to; scikit-learn ships its own, which its k-means (prompt
    # tuning's prototypes) uses whenever scikit-learn was imported before torch (the CLI's order), and which stayed at
    # every core in this thread: threadpool_limits sets every runtime loaded (docs/design.md §7.53)
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        return fn(*args, **kwargs)


@contextmanager
def torch_jobs(n_jobs: int | None) -> Iterator[Jobs]:
    """A place to run independent torch jobs: `with torch_jobs(n_jobs) as jobs: handle = jobs.submit(fn, *args)`.

    None: each job runs in this thread when its `result()` is first asked for, with torch's threads as they are (the
    library's default, and the fastest for one job at a time). An integer (scikit-learn's convention; -1 = every core):
    torch, BLAS and OpenMP run one thread each for the block's duration, jobs run in that many threads as soon as they
    are submitted (1: in this thread, when asked for), and every job gives the same numbers for any such value, equal
    to a one-thread run. Read the results inside the block, in any order; a job's exception is raised by its
    `result()`. Leaving the block waits for running jobs and cancels those not started."""
    if n_jobs is None:
        yield _InCallerThread()
        return
    workers = resolve_n_jobs(n_jobs)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):   # BLAS is process-wide: the jobs' own one-thread limits then nest cleanly
            if workers == 1:
                yield _InCallerThread()
                return
            pool = _Pool(ThreadPoolExecutor(workers, thread_name_prefix="qanchor-torch"))
            try:
                yield pool
            finally:
                pool.shutdown()
    finally:
        torch.set_num_threads(before)

