"""Scaling: pre-training data size x model size x pre-training steps (docs/design.md §1.8: the paper
finds gains from pre-training data larger than from model size, which plateaus).

Data size is the share of pre-training users (`pretrain_users`, their QA pairs with them); model size
is the tiny backbone's named size (backbone.TINY_SIZES; SmolLM2-135M is added on a GPU); steps cap
pre-training (`pretrain.max_steps`). Every cell is scored on the same test users.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from qanchor_lab.experiments import ablations
from qanchor_lab.experiments.config import RunConfig, get_config
from qanchor_lab.experiments.core import Experiment, run_experiment, seeds_for

FULL_GRID = {"pretrain_users": (0.25, 0.5, 1.0), "size": ("xs", "s", "m"), "steps": (150, 400, 750)}
FAST_GRID = {"pretrain_users": (0.25, 1.0), "size": ("xs", "s"), "steps": (ablations.FAST_STEPS,)}


def base_config(fast: bool) -> RunConfig:
    """Scored by the task query + probe (prompt tuning off: the probe isolates the pre-trained model).
    Full mode: epochs high enough that max_steps, not the data, ends pre-training. Fast mode: the ablations'
    fast reference, whose few steps even the smallest share outlasts, so the grid's reference cell is that
    run (cached when notebook 06 ran first)."""
    if fast:
        return ablations.base_config(True)
    return get_config(False).override({"eval.methods": ["qanchor_base"], "pretrain.epochs": 50.0})


def grid_variants(base: RunConfig, grid: dict[str, Sequence]) -> tuple[dict[str, RunConfig], str, dict[str, dict]]:
    bad = set(grid) - set(FULL_GRID)
    if bad:
        raise ValueError(f"unknown grid axis {sorted(bad)}; valid axes: {', '.join(FULL_GRID)}")
    vs, params = {}, {}
    for users, size, steps in itertools.product(grid["pretrain_users"], grid["size"], grid["steps"]):
        name = f"data={users}|size={size}|steps={steps}"
        backbone = {"model.backbone.name": "smollm2"} if size == "smollm2" else {"model.backbone.tiny_size": size}
        vs[name] = base.override({"pretrain_users": users, "pretrain.max_steps": steps, **backbone})
        params[name] = {"pretrain_users": users, "size": size, "steps": steps}
    ref = f"data={max(grid['pretrain_users'])}|size={grid['size'][0]}|steps={max(grid['steps'])}"
    return vs, ref, params


def run_scaling(*, fast: bool = False, seeds: int | None = None, grid: dict | None = None, base: RunConfig | None = None,
                out: Path | None = None, root: Path | None = None, device: str = "cpu", jobs: int = 1,
                show_progress: bool = True, world=None) -> Experiment:
    grid = dict(grid or (FAST_GRID if fast else FULL_GRID))
    if device == "cuda" and "smollm2" not in grid["size"]:
        grid["size"] = tuple(grid["size"]) + ("smollm2",)
    vs, ref, params = grid_variants(base or base_config(fast), grid)
    return run_experiment("scaling" + ("-fast" if fast else ""), vs, reference=ref, seeds=seeds_for(fast, seeds),
                          out=out, root=root, device=device, jobs=jobs, show_progress=show_progress, params=params, world=world)


def scaling_table(exp: Experiment) -> pd.DataFrame:
    """The summary with the grid axes as columns."""
    axes = exp.table.drop_duplicates("variant").set_index("variant")[["pretrain_users", "size", "steps"]]
    return exp.summary.join(axes, on="variant")


def heatmap_values(exp: Experiment, *, steps=None, method: str = "qanchor_base") -> pd.DataFrame:
    """Mean AUC over seeds as a (model size x data share) grid at one step budget (default: the largest)."""
    t = scaling_table(exp)
    t = t[(t["method"] == method) & (t["steps"] == (steps if steps is not None else t["steps"].max()))]
    return t.pivot(index="size", columns="pretrain_users", values="auc").reindex(
        [s for s in ("xs", "s", "m", "smollm2") if s in set(t["size"])])


def what_matters(exp: Experiment, method: str = "qanchor_base") -> pd.DataFrame:
    """For each axis, the AUC range its levels span (mean over the other axes): which matters most here."""
    t = scaling_table(exp)
    t = t[t["method"] == method]
    rows = []
    for axis in ("pretrain_users", "size", "steps"):
        means = t.groupby(axis)["auc"].mean()
        if len(means) < 2:
            continue
        rows.append({"axis": axis, "lowest": means.idxmin(), "highest": means.idxmax(),
                     "auc_range": float(means.max() - means.min()),
                     "auc_by_level": ", ".join(f"{k}: {v:.4f}" for k, v in means.items())})
    return pd.DataFrame(rows).sort_values("auc_range", ascending=False).reset_index(drop=True)


def largest_noise(exp: Experiment, method: str = "qanchor_base") -> float:
    """Typical half-width of the paired CIs against the reference: differences below it are noise."""
    s = exp.summary[(exp.summary["method"] == method) & (exp.summary["verdict"] != "reference")]
    return float(np.nanmedian((s["auc_diff_high"] - s["auc_diff_low"]) / 2)) if len(s) else float("nan")
