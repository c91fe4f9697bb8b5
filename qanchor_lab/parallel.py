"""Independent fits (a probe per task, a yardstick per intent) in worker processes, with the numbers of one.

The evaluation and the diagnostics fit many small scikit-learn models that do not depend on each other. Each fit
is single-threaded, Python-bound work (lbfgs steps, tree growing), so on the demo's 2 cores the second core sits
idle through about three minutes of them; threads do not help, since the GIL serialises them (the demo's ten
blended probes: 45 s in one thread, 57 s in two). `fit_map` runs such calls in joblib's loky worker processes
(the same ten probes: 35 s in one process, 19 s in two; docs/design.md §7.19).

Every call runs with one BLAS/OpenMP thread unless it sets its own limit (as the probes do, `ProbeConfig.n_threads`),
here and in a worker alike, so `n_jobs` changes the wall time and not one number (tests/test_parallel.py).

A worker imports the module of the function it is given: give `fit_map` functions of torch-free modules
(`baselines`), or each worker pays ~11 s to import torch before its first fit.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm


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
