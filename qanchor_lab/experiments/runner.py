"""Run one RunConfig end to end, cached under runs/experiments/ by a hash of the full config.

world -> model -> pre-training -> (prompt tuning) -> scores of the test users, as the demo does, through
the same library calls (world.ensure_world, QAnchorModel.from_data, pretrain.pretrain,
pipeline.qanchor_scores, metrics.task_metrics). Two cache levels, so a sweep over prompt-tuning settings
pre-trains once:

    runs/experiments/models/<model_key>/   the pre-trained model (+ pretrain_summary.json, config.json)
    runs/experiments/<key>/                config.json, scores.parquet (test users), tasks.parquet, run.json

A run whose directory holds run.json is loaded, never recomputed. Nothing is chosen on test users:
probes and prompts are fitted (and early-stopped) on the tune split; test users are only scored.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from qanchor_lab import metrics as M
from qanchor_lab.experiments.config import RunConfig
from qanchor_lab.model import QAnchorModel
from qanchor_lab.pipeline import DATA_ROOT, RUNS_ROOT, qanchor_scores, restrict_tasks
from qanchor_lab.pretrain import pretrain
from qanchor_lab.world import WorldConfig, ensure_world, save_world, world_is_saved

EXPERIMENTS_ROOT = Path(os.environ.get("QANCHOR_EXPERIMENTS", RUNS_ROOT / "experiments"))
DEVICES = ("cpu", "cuda")
RUN_FILE = "run.json"


@dataclass
class RunResult:
    """What a run produced: test scores per method (long user_id, task_id, score, method), per-task metrics
    (method, task_id, domain, auc, ks, n, positive_rate) and its record (timings, pre-training summary)."""

    config: RunConfig
    directory: Path
    scores: pd.DataFrame
    tasks: pd.DataFrame
    record: dict
    cached: bool


def world_dir(world: WorldConfig, root: Path | None = None) -> Path:
    """The demo's world directory name when only size and seed differ from the defaults, else a hashed one."""
    root = Path(root or DATA_ROOT)
    default = WorldConfig(n_users=world.n_users, seed=world.seed)
    if world.to_dict() == default.to_dict():
        return root / f"world-{world.n_users}-seed{world.seed}"
    from qanchor_lab.experiments.config import _hash

    return root / f"world-{world.n_users}-seed{world.seed}-{_hash(world.to_dict())}"


def load_world_for(cfg: RunConfig):
    return ensure_world(world_dir(cfg.world), cfg.world)


def saved_world_for(world, cfg: RunConfig) -> Path:
    """The directory load_world_for(cfg) reads, holding `world` (a world of cfg's config, already in memory):
    saved there when it is missing or holds another config, so that worker processes load the same world
    rather than each generating it."""
    out = world_dir(cfg.world)
    if not world_is_saved(out, cfg.world):
        save_world(world, out)
    return out


def pretrain_user_ids(world, cfg: RunConfig) -> list[str]:
    """The pre-training users this run trains on: a seeded share of the split (all of it at 1.0)."""
    users = world.users_in("pretrain")
    if cfg.pretrain_users >= 1.0:
        return users
    n = max(2 * cfg.pretrain.batch_size, int(round(cfg.pretrain_users * len(users))))
    if n > len(users):
        raise ValueError(f"pretrain_users={cfg.pretrain_users} keeps {n} users; the world has {len(users)} pre-training users")
    keep = np.random.default_rng([cfg.seed, 1]).choice(len(users), n, replace=False)
    return [users[i] for i in sorted(keep)]


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device={device!r}; valid choices: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU; use --device cpu")


def ensure_model(cfg: RunConfig, world=None, *, root: Path | None = None, device: str = "cpu",
                 show_progress: bool = False) -> tuple[QAnchorModel, dict]:
    """(model, pre-training summary) for this config: loaded from runs/experiments/models/<model_key>/ when
    it exists there, else built (and pre-trained unless `cfg.pretrained` is False) and saved."""
    _check_device(device)
    world = world if world is not None else load_world_for(cfg)
    users = pretrain_user_ids(world, cfg)
    if not cfg.pretrained:  # no pre-training: the initialised model, rebuilt deterministically from its seed
        return QAnchorModel.from_data(cfg.model, world.events, world.profiles, users), {"steps": 0, "seconds": 0.0}
    out = Path(root or EXPERIMENTS_ROOT) / "models" / cfg.model_key()
    done = out / "pretrain_summary.json"
    if done.exists() and (out / "model").exists():
        return QAnchorModel.from_pretrained(out / "model"), json.loads(done.read_text())
    from accelerate import Accelerator

    model = QAnchorModel.from_data(cfg.model, world.events, world.profiles, users)
    store = model.behaviour(world.events, world.profiles, users)
    summary = pretrain(model, world, cfg.pretrain, out / "model", store=store, show_progress=show_progress,
                       accelerator=Accelerator(cpu=device == "cpu"))
    summary["pretrain_users"] = len(users)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    done.write_text(json.dumps(summary, indent=2))  # written last: its presence marks a complete model
    return model.to("cpu"), summary


def run(cfg: RunConfig, *, root: Path | None = None, device: str = "cpu", show_progress: bool = False,
        world=None) -> RunResult:
    """Scores of `cfg`'s methods on the test users, from runs/experiments/<key>/ when cached."""
    root = Path(root or EXPERIMENTS_ROOT)
    out = root / cfg.key()
    if (out / RUN_FILE).exists():
        return _load(cfg, out)
    t0 = time.perf_counter()
    world = world if world is not None else load_world_for(cfg)
    torch.manual_seed(cfg.seed)
    model, summary = ensure_model(cfg, world, root=root, device=device, show_progress=show_progress)
    t_model = time.perf_counter() - t0
    world = restrict_tasks(world, cfg.eval.task_ids)
    # scoring runs on the CPU: the probes and prompt tuning work on cached prefixes, cheap next to pre-training
    tuning = cfg.tuning if "qanchor_prompt_tuned" in cfg.eval.methods else None
    scores, tuning_info = qanchor_scores(model.eval(), world, tuning=tuning, show_progress=show_progress,
                                         with_features=False, with_probes="qanchor_base" in cfg.eval.methods,
                                         seed=cfg.seed)
    names = {"qanchor_base": "base", "qanchor_prompt_tuned": "prompt_tuned"}
    test = set(world.users_in("test"))
    long = pd.concat([scores[names[m]].assign(method=m) for m in cfg.eval.methods], ignore_index=True)
    long = long[long["user_id"].isin(test)].reset_index(drop=True)
    tasks = per_task_metrics(long, world)
    record = {"key": cfg.key(), "model_key": cfg.model_key(), "device": device, "pretrain": summary,
              "seconds": time.perf_counter() - t0, "model_seconds": t_model,
              "prompt_tuning": {t: {k: v for k, v in i.items() if k != "history"} for t, i in tuning_info.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    long.to_parquet(out / "scores.parquet", index=False)
    tasks.to_parquet(out / "tasks.parquet", index=False)
    (out / RUN_FILE).write_text(json.dumps(record, indent=2, default=float))  # last: marks a complete run
    return RunResult(cfg, out, long, tasks, record, cached=False)


def per_task_metrics(scores: pd.DataFrame, world) -> pd.DataFrame:
    """AUC/KS per (method, task) on the test users (metrics.task_metrics for each method)."""
    test = set(world.users_in("test"))
    labels = world.labels[world.labels["user_id"].isin(test)]
    return pd.concat([M.task_metrics(labels, g[["user_id", "task_id", "score"]], world.tasks).assign(method=m)
                      for m, g in scores.groupby("method", sort=False)], ignore_index=True)


def _load(cfg: RunConfig, out: Path) -> RunResult:
    record = json.loads((out / RUN_FILE).read_text())
    return RunResult(cfg, out, pd.read_parquet(out / "scores.parquet"), pd.read_parquet(out / "tasks.parquet"),
                     record, cached=True)
