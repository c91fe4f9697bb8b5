"""parallel.fit_map and parallel.torch_jobs: fits in worker processes and torch jobs in threads give the numbers of one
process, one job after the other."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest

from qanchor_lab import baselines as B
from qanchor_lab import diagnostics as D
from qanchor_lab.data import DataValidationError
from qanchor_lab.parallel import fit_map, resolve_n_jobs, torch_jobs
from qanchor_lab.pipeline import restrict_tasks


def test_fit_map_keeps_order_and_runs_in_worker_processes():
    pids = fit_map(os.getpid, [()] * 4, n_jobs=2)
    assert os.getpid() not in pids and len(set(pids)) >= 1        # every call ran in a worker
    assert fit_map(os.getpid, [()] * 3, n_jobs=1) == [os.getpid()] * 3
    assert fit_map(os.getpid, [()], n_jobs=2) == [os.getpid()]    # one job: no pool
    assert fit_map(divmod, [(7, 2), (9, 4), (5, 5)], n_jobs=2) == [(3, 1), (2, 1), (1, 0)]
    assert fit_map(divmod, [], n_jobs=2) == []


def test_resolve_n_jobs_follows_scikit_learn_and_rejects_the_rest():
    assert resolve_n_jobs(None) == 1 and resolve_n_jobs(3) == 3
    assert resolve_n_jobs(-1) == (os.cpu_count() or 1)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"n_jobs must be None, -1 \(every core\) or an integer >= 1; got"):
            resolve_n_jobs(bad)


def test_the_demo_rejects_a_bad_n_jobs_before_it_starts(tmp_path):
    from qanchor_lab.pipeline import DemoConfig, run_demo

    with pytest.raises(ValueError, match="n_jobs must be None, -1 .every core. or an integer >= 1; got 0"):
        run_demo(tmp_path / "run", DemoConfig.fast(), n_jobs=0)
    assert not (tmp_path / "run").exists()                       # nothing generated, nothing trained


def test_a_failing_fit_in_a_worker_names_its_task():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), np.tile([0, 1], 20)
    bad = X.copy()
    bad[5, 1] = np.nan
    jobs = [("ok_task", " (logreg)", B.probe_scores, (X, y, X, B.ProbeConfig()), {}),
            ("broken_task", " (logreg)", B.probe_scores, (bad, y, X, B.ProbeConfig()), {})]
    with pytest.raises(DataValidationError, match=r"task 'broken_task' \(logreg\): probe train_X: 1 row\(s\) hold NaN"):
        fit_map(B._fit_task, jobs, n_jobs=2)
    with pytest.raises(ValueError, match="unknown claim classifier 'svm'; valid choices: logreg, gbdt, probe"):
        fit_map(B.claim_predictions, [("svm", X, y, X)] * 2, n_jobs=2)


@pytest.mark.slow
def test_evaluation_and_diagnostics_fits_give_the_same_numbers_in_two_processes(small_world, tiny_model, tiny_store):
    """Every per-task and per-intent fit the demo runs through fit_map: the same scores, to the last bit, with
    n_jobs=2 as in this process."""
    w = restrict_tasks(small_world, small_world.tasks["task_id"][:3])
    w = dataclasses.replace(w, qa=w.qa[w.qa["intent"].isin(sorted(set(w.qa["intent"]))[::8])])  # 7 of the 49 intents
    tune, test = w.users_in("tune")[:300], w.users_in("test")[:200]
    rng = np.random.default_rng(0)
    emb = {u: rng.normal(size=8) for u in tune + test}

    def embed(ids, query):  # a query-dependent stand-in embedding: its own scale per task query
        return np.stack([emb[u] for u in ids]) * (1 + (len(query) % 3 if query else 0))

    for n_jobs in (1, 2):
        got = {
            "gbdt": B.feature_scores(w, tune, test, model="gbdt", n_jobs=n_jobs),
            "logreg": B.feature_scores(w, tune, test, model="logreg", n_jobs=n_jobs),
            "tfidf": B.tfidf_feature_scores(w, tune, test, n_jobs=n_jobs),
            "probe": B.embedding_probe_scores(embed, tune, test, w.labels, w.tasks, n_jobs=n_jobs),
            "blend": B.combined_probe_scores(embed, w, tune, test, n_jobs=n_jobs),
            "yardstick": D.claim_baselines(w, tiny_store, max_pairs=60, n_jobs=n_jobs),
            "selectivity": D.query_selectivity(tiny_model, w, max_pairs=60, store=tiny_store, n_jobs=n_jobs),
            "tune selectivity": D.tune_selectivity(tiny_model, w, max_users=40, folds=3, store=tiny_store,
                                                   n_jobs=n_jobs),
        }
        if n_jobs == 1:
            serial = got
    for name, table in got.items():
        assert table.equals(serial[name]), name
    assert len(serial["blend"]) == len(test) * len(w.tasks)
    assert serial["yardstick"]["intent"].nunique() > 3 and (serial["yardstick"]["gbdt"] == serial["yardstick"]["claim"]).any()


def _thread_and_torch_threads(tag):
    import torch

    return tag, threading.get_ident(), torch.get_num_threads()


def _fails():
    raise KeyError("job failed")


def test_torch_jobs_run_in_threads_of_one_torch_thread_and_restore_the_count():
    import torch

    before, here = torch.get_num_threads(), threading.get_ident()
    torch.set_num_threads(2)
    try:
        with torch_jobs(2) as jobs:
            assert torch.get_num_threads() == 1                      # this thread's stages too, for the block
            handles = [jobs.submit(_thread_and_torch_threads, k) for k in range(4)]
            got = [h.result() for h in reversed(handles)][::-1]      # read in any order, each its own value
            failed = jobs.submit(_fails)
            with pytest.raises(KeyError, match="job failed"):
                failed.result()
        assert [g[0] for g in got] == [0, 1, 2, 3] and all(g[2] == 1 for g in got)
        assert here not in {g[1] for g in got}                       # pool threads, not the caller
        assert torch.get_num_threads() == 2                          # restored on leaving

        ran = []
        with torch_jobs(None) as jobs:                               # the library default: lazily, in this thread
            handle = jobs.submit(lambda: ran.append(threading.get_ident()) or torch.get_num_threads())
            assert ran == []
            assert handle.result() == 2 and ran == [here]
            assert handle.result() == 2 and ran == [here]            # once
        with torch_jobs(1) as jobs:                                  # one job at a time, in this thread, one torch thread
            assert jobs.submit(_thread_and_torch_threads, "a").result() == ("a", here, 1)
        with pytest.raises(ValueError, match="n_jobs must be None, -1 .every core. or an integer >= 1; got 0"):
            with torch_jobs(0):
                pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _set_torch_threads(n):
    import torch

    torch.set_num_threads(n)   # as the batch-invariant MiniLM does for its forward passes
    return os.getpid(), torch.get_num_threads()


def test_a_job_that_sets_its_own_torch_threads_runs_apart_and_leaves_the_others_one_thread():
    """torch's thread count is process-wide: set in a pool thread it reaches every other job (and may change their
    rounding), so submit_process runs such a job in a process of its own."""
    import torch

    before = torch.get_num_threads()
    try:
        with torch_jobs(2) as jobs:
            pid, threads = jobs.submit_process(_set_torch_threads, 2).result()
            assert pid != os.getpid() and threads == 2              # it ran, elsewhere, at its own count
            assert torch.get_num_threads() == 1                     # the block's one thread, here and for every job
            assert jobs.submit(_thread_and_torch_threads, "a").result()[2] == 1
            with pytest.raises(KeyError, match="job failed"):       # its exception is raised by result(), as itself
                jobs.submit_process(_fails).result()
        with torch_jobs(1) as jobs:                                 # nothing beside it: in this process, when asked
            assert jobs.submit_process(_set_torch_threads, 1).result() == (os.getpid(), 1)
    finally:
        torch.set_num_threads(before)


_OPENMP_IN_A_JOB = """
import json, sklearn.cluster, torch   # scikit-learn first, as the CLI imports them: its k-means binds its own OpenMP
from threadpoolctl import threadpool_info
from qanchor_lab.parallel import torch_jobs
with torch_jobs(2) as jobs:
    job = jobs.submit(lambda: [(i["internal_api"], i["filepath"], i["num_threads"]) for i in threadpool_info()])
    info = job.result()
print(json.dumps(info))
"""


def test_every_openmp_runtime_runs_one_thread_in_a_torch_job_whatever_was_imported_first():
    """torch.set_num_threads reaches only torch's OpenMP; scikit-learn's own runtime, which its k-means binds when it is
    imported before torch, stayed at its default in a job's thread, and the CLI's prompt tunings moved in their last
    digits (docs/design.md §7.53). A fresh interpreter whose default is three threads, so that this fails on any
    machine."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", _OPENMP_IN_A_JOB], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    openmp = {path: n for api, path, n in info if api == "openmp"}
    assert any("scikit_learn" in path or "sklearn" in path for path in openmp), openmp   # both runtimes are loaded
    assert set(openmp.values()) == {1}, openmp


@pytest.mark.slow
def test_prompt_tuning_gives_the_same_scores_for_any_number_of_torch_jobs(small_world, tiny_model):
    """Tasks tuned side by side in threads: each task's adapter and scores are those of one-thread, one-task-at-a-time
    tuning, in the task's own column."""
    import torch

    from qanchor_lab.pipeline import qanchor_scores
    from qanchor_lab.prompt_tuning import PromptTuningConfig

    w = restrict_tasks(small_world, small_world.tasks["task_id"][:3])
    tuning = PromptTuningConfig(n_prompt=2, epochs=2, patience=2, head_epochs=3, seed=1)
    before = torch.get_num_threads()
    got = {}
    try:
        torch.set_num_threads(1)
        got[None] = qanchor_scores(tiny_model.eval(), w, tuning=tuning, with_probes=False, show_progress=False)
        torch.set_num_threads(2)
        for n_jobs in (1, 2):
            got[n_jobs] = qanchor_scores(tiny_model, w, tuning=tuning, with_probes=False, show_progress=False,
                                         n_jobs=n_jobs)
    finally:
        torch.set_num_threads(before)
    serial = got[None][0]["prompt_tuned"]
    assert serial["task_id"].nunique() == 3 and serial.groupby("task_id")["score"].std().gt(0).all()
    assert not serial[serial.task_id == w.tasks.task_id[0]]["score"].reset_index(drop=True).equals(
        serial[serial.task_id == w.tasks.task_id[1]]["score"].reset_index(drop=True))
    for n_jobs in (1, 2):
        assert got[n_jobs][0]["prompt_tuned"].equals(serial), n_jobs
        assert {t: i["best_epoch"] for t, i in got[n_jobs][1].items()} == {t: i["best_epoch"] for t, i in got[None][1].items()}


def test_text_baseline_from_given_vectors_matches_and_checks_their_count(small_world):
    from qanchor_lab.event_encoder import HashingEncoder

    w = restrict_tasks(small_world, small_world.tasks["task_id"][:2])
    tune, test = w.users_in("tune")[:120], w.users_in("test")[:80]
    kw = dict(serialize_kw={"max_chars": 100})
    vectors = B.text_embedding_vectors(w, tune + test, encoder=HashingEncoder(dim=16), show_progress=False, **kw)
    assert vectors.shape == (200, 16)
    direct = B.text_embedding_scores(w, tune, test, encoder=HashingEncoder(dim=16), show_progress=False, **kw)
    assert B.text_embedding_scores(w, tune, test, vectors=vectors).equals(direct)
    with pytest.raises(ValueError, match="text embedding: 199 vectors given for 200 tune . test users"):
        B.text_embedding_scores(w, tune, test, vectors=vectors[:-1])
