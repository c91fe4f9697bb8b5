"""Run named variants over seeds and compare them: the machinery every experiment family shares.

`run_experiment` runs each variant's RunConfig at each pre-training seed (cached, see runner.py),
optionally in parallel processes, and returns an `Experiment` holding

- `table`: tidy rows, one per variant x seed x method x task (auc, ks, plus the variant's parameters);
- `summary`: one row per variant x method: AUC/KS averaged over tasks then over seeds, the seed spread,
  a user-bootstrap CI of that mean, the paired difference to the reference variant with its CI, and a
  `verdict` saying in words whether the difference is within noise.

The paired bootstrap is metrics.paired_bootstrap itself: every seed's copy of a task enters as one more
"task", so the average over tasks is the mean over seeds and one resample of test users is shared by
all seeds and both variants (all variants are scored on the same users of the same world).
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qanchor_lab import metrics as M
from qanchor_lab.data import load_world
from qanchor_lab.experiments.config import RunConfig, flatten
from qanchor_lab.experiments.runner import EXPERIMENTS_ROOT, RunResult, ensure_model, load_world_for, run, saved_world_for
from qanchor_lab.pipeline import restrict_tasks

SUMMARY_COLUMNS = ("variant", "method", "n_seeds", "auc", "auc_seed_sd", "auc_low", "auc_high", "ks", "ks_low",
                   "ks_high", "auc_diff", "auc_diff_low", "auc_diff_high", "auc_p", "ks_diff", "ks_diff_low",
                   "ks_diff_high", "verdict", "sentence")


@dataclass
class Experiment:
    """Results of one experiment: tidy table, summary, where they were written, and the runs."""

    name: str
    reference: str
    table: pd.DataFrame
    summary: pd.DataFrame
    runs: dict[tuple[str, int], RunResult] = field(repr=False)
    variants: dict[str, RunConfig] = field(repr=False)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    world: object = field(default=None, repr=False)

    def compare_to(self, reference: str) -> pd.DataFrame:
        """The summary recomputed against another variant (e.g. the best one, to see where gains saturate)."""
        if reference not in self.variants:
            raise ValueError(f"reference {reference!r} is not a variant; variants: {', '.join(self.variants)}")
        return summarize(self.runs, self.variants, reference, self.variants[reference], world=self.world)


def seeds_for(fast: bool, n: int | None = None) -> list[int]:
    """Pre-training seeds: `n` given, else 1 in fast mode and 3 in full mode."""
    n = n if n is not None else (1 if fast else 3)
    if n < 1:
        raise ValueError(f"seeds must be >= 1, got {n}")
    return list(range(n))


@functools.lru_cache(maxsize=2)
def _worker_world(path: str):
    """A worker process loads each world once, from the directory the parent saved it in."""
    return load_world(path)


def _pretrain_job(cfg_dict: dict, world_path: str, root: str, device: str, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    ensure_model(cfg, _worker_world(world_path), root=Path(root), device=device)
    return cfg.model_key()


def _run_job(cfg_dict: dict, world_path: str, root: str, device: str, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    return run(RunConfig.from_dict(cfg_dict), root=Path(root), device=device, world=_worker_world(world_path)).record["key"]


def run_experiment(name: str, variants: Mapping[str, RunConfig], *, reference: str, seeds: Sequence[int],
                   out: Path | None = None, root: Path | None = None, device: str = "cpu", jobs: int = 1,
                   show_progress: bool = True, params: Mapping[str, Mapping[str, object]] | None = None,
                   world=None) -> Experiment:
    """Run every variant at every seed (cached), then tabulate and compare against `reference`.

    `params` maps a variant to columns added to its table rows (e.g. {"n_prompt": 4}); `out` is where the
    tables go (default runs/experiments/tables/<name>/); `world` is the variants' world when already loaded
    (every variant must then use that world's config)."""
    if reference not in variants:
        raise ValueError(f"reference {reference!r} is not a variant; variants: {', '.join(variants)}")
    if not seeds:
        raise ValueError("seeds is empty; give at least one pre-training seed")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    root = Path(root or EXPERIMENTS_ROOT)
    t0 = time.perf_counter()
    cfgs = {(v, s): c.with_seed(s) for v, c in variants.items() for s in seeds}
    if world is not None:
        bad = [v for (v, _), c in cfgs.items() if not _same_world(world, c)]
        if bad:
            raise ValueError(f"variant(s) {sorted(set(bad))} use another world config than the `world` given")
    if jobs > 1:
        # Workers load each world from the directory the parent saved it in (generated here once, not by every
        # worker; passed in memory it would be pickled once per job), and use cpu_count / jobs threads each.
        paths: dict[str, str] = {}  # world config -> the directory its workers load it from
        for c in cfgs.values():
            if _world_key(c) not in paths:
                world = world if world is not None and _same_world(world, c) else load_world_for(c)
                paths[_world_key(c)] = str(saved_world_for(world, c))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        todo = {c.model_key(): c for c in cfgs.values() if c.pretrained and not (root / c.key() / "run.json").exists()}
        with ProcessPoolExecutor(jobs, mp_context=_spawn()) as pool:  # distinct models first: runs sharing one wait for it
            for job, cs, what in ((_pretrain_job, list(todo.values()), "pre-training"), (_run_job, list(cfgs.values()), "runs")):
                where = [paths[_world_key(c)] for c in cs]
                list(tqdm(pool.map(job, [c.to_dict() for c in cs], where, *_rep(len(cs), str(root), device, threads)),
                          total=len(cs), desc=f"{name}: {what}", disable=not show_progress))
    runs: dict[tuple[str, int], RunResult] = {}
    for (v, s), c in tqdm(cfgs.items(), desc=name, disable=not show_progress or jobs > 1):
        world = world if world is not None and _same_world(world, c) else load_world_for(c)
        runs[(v, s)] = run(c, root=root, device=device, world=world)
    table = tidy_table(runs, params)
    summary = summarize(runs, cfgs_by_variant(cfgs), reference, variants[reference], world=world)
    exp = Experiment(name, reference, table, summary, runs, dict(variants), seconds=time.perf_counter() - t0, world=world)
    exp.paths = save_experiment(exp, out or root / "tables" / name)
    return exp


def _world_key(cfg: RunConfig) -> str:
    return repr(cfg.world.to_dict())


def _same_world(world, cfg: RunConfig) -> bool:
    return world.manifest.get("config") == cfg.world.to_dict()


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _rep(n: int, *values):
    return [[v] * n for v in values]


def cfgs_by_variant(cfgs: Mapping[tuple[str, int], RunConfig]) -> dict[str, RunConfig]:
    return {v: c for (v, _), c in cfgs.items()}


def tidy_table(runs: Mapping[tuple[str, int], RunResult], params: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """One row per variant x seed x method x task: auc, ks, n, positive_rate, the run key and parameters."""
    rows = []
    for (v, s), r in runs.items():
        t = r.tasks.assign(variant=v, seed=s, key=r.record["key"], run_seconds=r.record["seconds"],
                           pretrain_steps=r.record["pretrain"].get("steps", 0))
        for k, val in (params or {}).get(v, {}).items():
            t[k] = val
        rows.append(t)
    front = ["variant", "seed", "method", "task_id", "domain", "auc", "ks"]
    out = pd.concat(rows, ignore_index=True)
    return out[front + [c for c in out.columns if c not in front]]


def _stacked(runs: Mapping[tuple[str, int], RunResult], variant: str, method: str, seeds: Sequence[int]) -> pd.DataFrame:
    parts = []
    for s in seeds:
        sc = runs[(variant, s)].scores
        sc = sc[sc["method"] == method]
        parts.append(sc.assign(task_id=sc["task_id"] + f"@seed{s}")[["user_id", "task_id", "score"]])
    return pd.concat(parts, ignore_index=True)


def _stacked_truth(world, seeds: Sequence[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test labels and tasks with one copy of each task per seed (task_id@seedN)."""
    test = set(world.users_in("test"))
    labels = world.labels[world.labels["user_id"].isin(test)]
    lab = pd.concat([labels.assign(task_id=labels["task_id"] + f"@seed{s}") for s in seeds], ignore_index=True)
    tasks = pd.concat([world.tasks.assign(task_id=world.tasks["task_id"] + f"@seed{s}") for s in seeds], ignore_index=True)
    return lab, tasks


def summarize(runs: Mapping[tuple[str, int], RunResult], variants: Mapping[str, RunConfig], reference: str,
              ref_cfg: RunConfig, *, world=None) -> pd.DataFrame:
    """Per variant x method: means over seeds, CIs, paired differences to `reference` and a verdict."""
    world = world if world is not None and _same_world(world, ref_cfg) else load_world_for(ref_cfg)
    world = restrict_tasks(world, ref_cfg.eval.task_ids)
    boot = dict(n_boot=ref_cfg.eval.n_boot, seed=ref_cfg.eval.boot_seed, ci=ref_cfg.eval.ci)
    seeds_of: dict[str, list[int]] = {}
    for v, s in runs:
        seeds_of.setdefault(v, []).append(s)
    methods = list(dict.fromkeys(m for r in runs.values() for m in r.scores["method"].unique()))
    rows = []
    for method in methods:
        for v in variants:
            if method not in runs[(v, seeds_of[v][0])].scores["method"].unique():
                continue
            seeds = sorted(seeds_of[v])
            labels, tasks = _stacked_truth(world, seeds)
            mine = _stacked(runs, v, method, seeds)
            per_seed = [_avg_auc(runs[(v, s)], method) for s in seeds]
            row = {"variant": v, "method": method, "n_seeds": len(seeds), "auc_seed_sd": _sd(per_seed)}
            for metric in M.METRICS:
                ci = M.bootstrap_ci(labels, mine, tasks, metric=metric, **boot)
                row.update({metric: ci["value"], f"{metric}_low": ci["low"], f"{metric}_high": ci["high"]})
            common = sorted(set(seeds) & set(seeds_of.get(reference, [])))
            has_ref = method in runs[(reference, seeds_of[reference][0])].scores["method"].unique()
            if v != reference and common and has_ref:
                labels_c, tasks_c = _stacked_truth(world, common)
                a, b = _stacked(runs, v, method, common), _stacked(runs, reference, method, common)
                for metric in M.METRICS:
                    p = M.paired_bootstrap(labels_c, a, b, tasks_c, metric=metric, alternative="two-sided", **boot)
                    row.update({f"{metric}_diff": p["diff"], f"{metric}_diff_low": p["low"], f"{metric}_diff_high": p["high"]})
                    if metric == "auc":
                        row["auc_p"] = p["p_value"]
                seed_diffs = [_avg_auc(runs[(v, s)], method) - _avg_auc(runs[(reference, s)], method) for s in common]
                row["verdict"] = verdict(row["auc_diff"], row["auc_diff_low"], row["auc_diff_high"], _sd(seed_diffs))
                row["sentence"] = (f"{v}: {row['auc_diff']:+.4f} AUC vs {reference} "
                                   f"[{row['auc_diff_low']:+.4f}, {row['auc_diff_high']:+.4f}] over {len(common)} seed(s): "
                                   f"{row['verdict']}")
            elif v == reference:
                row.update({k: 0.0 for k in ("auc_diff", "auc_diff_low", "auc_diff_high", "ks_diff", "ks_diff_low", "ks_diff_high")})
                row.update(auc_p=1.0, verdict="reference", sentence=f"{v}: the reference ({row['auc']:.4f} AUC)")
            rows.append(row)
    out = pd.DataFrame(rows).reindex(columns=list(SUMMARY_COLUMNS))
    out.attrs["ci"] = ref_cfg.eval.ci   # the figures' titles name it (filtering keeps attrs, so does Parquet)
    return out


def _avg_auc(r: RunResult, method: str) -> float:
    """One run's AUC of one method, averaged over tasks."""
    return float(r.tasks.loc[r.tasks["method"] == method, "auc"].mean())


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else float("nan")


def verdict(diff: float, low: float, high: float, seed_sd: float = float("nan")) -> str:
    """In words: "better" / "worse" than the reference only when the paired CI excludes 0 and the
    difference is larger than its seed-to-seed spread; otherwise "within noise" with the reason."""
    if low <= 0 <= high:
        return "within noise (CI includes 0)"
    if np.isfinite(seed_sd) and abs(diff) <= seed_sd:
        return "within seed noise (|diff| <= seed sd)"
    return "better than reference" if diff > 0 else "worse than reference"


def save_experiment(exp: Experiment, out: Path) -> dict[str, Path]:
    """results.parquet/.csv (tidy) and summary.parquet/.csv in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in (("results", exp.table), ("summary", exp.summary)):
        frame.to_parquet(out / f"{name}.parquet", index=False)
        frame.to_csv(out / f"{name}.csv", index=False)
        paths[name] = out / f"{name}.csv"
    return paths


def variant_params(variants: Mapping[str, RunConfig], reference: str) -> dict[str, dict]:
    """{variant: {dotted key: value}} for every leaf where some variant differs from the reference
    (each variant gets its own value of each such key, the reference's included)."""
    ref = variants[reference]
    keys = sorted({k for c in variants.values() for k in c.diff(ref)})
    flat = {v: flatten(c.to_dict()) for v, c in variants.items()}
    return {v: {k: flat[v].get(k) for k in keys} for v in variants}


def describe(variants: Mapping[str, RunConfig], reference: str) -> pd.DataFrame:
    """One row per variant: what it changes relative to the reference (dotted key = value)."""
    ref = variants[reference]
    rows = [{"variant": v, "changes": ", ".join(f"{k}={a!r}" for k, (a, _) in c.diff(ref).items()) or "(reference)"}
            for v, c in variants.items()]
    return pd.DataFrame(rows)


__all__ = ["Experiment", "run_experiment", "summarize", "tidy_table", "verdict", "seeds_for", "describe",
           "variant_params"]
