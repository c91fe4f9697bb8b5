"""The whole synthetic world from one config: generate_world, its manifest, and ensure_world (reuse on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from qanchor_lab.sources.common import ensure_saved, saved_matches
from qanchor_lab.metrics import ks
from qanchor_lab.schema import SCHEMA_VERSION, SEQUENCE_MODALITIES, SYNTHETIC_MODALITY_SPECS, World
from qanchor_lab.sources.synthetic.config import _F, PERSONAS, TRAITS, WorldConfig
from qanchor_lab.sources.synthetic.interests import interest_profiles, interest_qa, side_interests
from qanchor_lab.sources.synthetic.qa import _synthesise_qa, build_evidence, verify_answers
from qanchor_lab.sources.synthetic.simulation import _events_frame, _profiles, _sample_latents, _simulate
from qanchor_lab.sources.synthetic.tasks import TASK_IDS, TASK_SPECS, _tasks_frame, calibrate_tasks, oracle_probabilities

# Bump when the generator's output changes for a given config, so ensure_world regenerates old data.
# 2: shared-device users' future window reuses their history's other person; "few" counts are salient QA claims.
# 3: no shared-device user is their own other person; credit limits of exactly 20,000 and utilisation of exactly 0.7
#    take the level whose wording includes them ("5,000 to 20,000", "30% to 70%").
GENERATOR_VERSION = 3


# ----------------------------------------------------------------------------------------------
# the world


def _task_metrics(labels: pd.DataFrame, users: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    ids = users.loc[users["split"] == split, "user_id"]
    sub = labels[labels["user_id"].isin(ids)]
    rows = []
    for task_id, g in sub.groupby("task_id", sort=False):
        y = g["label"].to_numpy()
        s = g["oracle_prob"].to_numpy()
        both = 0 < y.sum() < len(y)
        rows.append({"task_id": task_id, "positive_rate": float(y.mean()) if len(y) else float("nan"),
                     "oracle_auc": float(roc_auc_score(y, s)) if both else float("nan"),
                     "oracle_ks": ks(y, s) if both else float("nan"), "n_test": int(len(y))})
    return pd.DataFrame(rows, columns=["task_id", "positive_rate", "oracle_auc", "oracle_ks", "n_test"])


def world_summary(world: World) -> pd.DataFrame:
    """One row per task: task_id, domain, positive_rate, oracle_auc, oracle_ks and n_test on the test split."""
    m = _task_metrics(world.labels, world.users)
    m = world.tasks[["task_id", "domain"]].merge(m, on="task_id", how="left")
    return m[["task_id", "domain", "positive_rate", "oracle_auc", "oracle_ks", "n_test"]]


def _round(x: float) -> float | None:
    """x to 6 decimals for the manifest; None (JSON null) where it is not finite: a small world's test split can
    hold one label class only, leaving oracle_auc undefined, and NaN is not JSON."""
    x = float(x)
    return float(round(x, 6)) if np.isfinite(x) else None


def generate_world(config: WorldConfig, *, show_progress: bool = False) -> World:
    """Simulate the whole world for `config`: users, events, profiles, QA (after self-reflection),
    tasks and labels, plus a manifest. Deterministic in `config` (seed included)."""
    if not isinstance(config, WorldConfig):
        raise TypeError(f"generate_world: config must be a WorldConfig, got {type(config).__name__}")
    steps = ("latents", "history events", "profiles", "future window", "QA + self-reflection", "labels")
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(steps), desc="UserU world", unit="step")

    def tick(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)

    # Each part draws from its own child of the seed; a child added later (side interests) leaves the others as they were.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(8)]
    rng_lat, rng_split, rng_hist, rng_prof, rng_fut, rng_qa, rng_lab, rng_side = streams
    n = config.n_users
    start = pd.Timestamp(config.start_date)
    width = max(6, len(str(n - 1)))
    user_ids = np.array([f"u{i:0{width}d}" for i in range(n)], dtype=object)

    lat = _sample_latents(rng_lat, n, config)
    perm = rng_split.permutation(n)
    sizes = config.split_sizes()  # every split non-empty: WorldConfig checked it
    n_val, n_test = sizes["pretrain_val"], sizes["test"]
    n_pre = sizes["pretrain"] + n_val
    split = np.empty(n, dtype=object)
    split[perm[:n_val]] = "pretrain_val"
    split[perm[n_val:n_pre]] = "pretrain"
    split[perm[n_pre:n_pre + n_test]] = "test"
    split[perm[n_pre + n_test:]] = "tune"
    pretrain = np.isin(split, ("pretrain", "pretrain_val"))
    tick(steps[0])

    history, other = _simulate(rng_hist, lat, config.history_days, config, future=False)
    events = _events_frame(history, user_ids, start)
    tick(steps[1])
    profiles = _profiles(rng_prof, lat, user_ids)
    tick(steps[2])
    # The same person behind a shared device's search/click views next month as in the history (`other`).
    future, _ = _simulate(rng_fut, lat, config.future_days, config, future=True, user_mask=pretrain, other=other)
    future = _events_frame(future, user_ids, start + pd.Timedelta(days=config.history_days))
    tick(steps[3])

    pre_ids = pd.Index(user_ids[pretrain])
    evidence = build_evidence(events[events["user_id"].isin(pre_ids)], profiles[profiles["user_id"].isin(pre_ids)],
                              start_date=config.start_date, history_days=config.history_days,
                              future_events=future, future_days=config.future_days)
    generated = _synthesise_qa(rng_qa, evidence, config)
    kept = verify_answers(generated, evidence)
    qa = generated.loc[kept, ["user_id", "source", "intent", "query", "answer"]].reset_index(drop=True)
    n_side_qa = 0
    if config.side_interests:  # after the core QA, whose evidence must not see the new profile columns
        values, shown = side_interests(rng_side, n, config.side_interests)
        profiles = interest_profiles(profiles, shown)
        side_qa = interest_qa(rng_side, values, user_ids, pretrain)
        qa, n_side_qa = pd.concat([qa, side_qa], ignore_index=True), len(side_qa)
    tick(steps[4])

    down = np.flatnonzero(~pretrain)
    probs = oracle_probabilities(lat.feats[down], config)
    draws = (rng_lab.random(probs.shape) < probs).astype(np.int64)
    labels = pd.DataFrame({
        "user_id": pd.array(np.repeat(user_ids[down], len(TASK_SPECS)), dtype="str"),
        "task_id": pd.array(np.tile(np.array(TASK_IDS, dtype=object), down.size), dtype="str"),
        "label": draws.ravel(),
        "oracle_prob": probs.ravel(),
    })
    tasks = _tasks_frame()

    users = pd.DataFrame({
        "user_id": pd.array(user_ids, dtype="str"),
        "population": pd.array(np.where(pretrain, "pretrain", "downstream").astype(object), dtype="str"),
        "split": pd.array(split, dtype="str"),
        "persona": pd.array(np.array(PERSONAS, dtype=object)[lat.persona], dtype="str"),
    })
    for name in TRAITS:
        users[f"trait_{name}"] = lat.feats[:, _F[name]]
    for name in ("trend_liquidity", "trend_engagement", "log_activity"):
        users[name] = lat.feats[:, _F[name]]
    users["shared_device"] = lat.shared_device
    for m in SEQUENCE_MODALITIES:
        users[f"missing_{m}"] = lat.missing[m]
    tick(steps[5])
    if bar is not None:
        bar.close()

    world = World(events=events, profiles=profiles, users=users, qa=qa, tasks=tasks, labels=labels)
    metrics = _task_metrics(labels, users).set_index("task_id")
    cal = calibrate_tasks(config)
    n_gen, n_kept = len(generated), int(kept.sum())
    world.manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": int(config.seed),
        "config": config.to_dict(),
        # the dataset's declarations (data/README.md): its modalities and its history window
        "modalities": [spec.to_dict() for spec in SYNTHETIC_MODALITY_SPECS],
        "history_window": {"start": start.isoformat(), "end": (start + pd.Timedelta(days=config.history_days)).isoformat()},
        "counts": {
            "users": {s: int((split == s).sum()) for s in ("pretrain", "pretrain_val", "tune", "test")},
            "events": {m: int((events["modality"] == m).sum()) for m in SEQUENCE_MODALITIES},
            "events_total": int(len(events)),
            "distinct_event_texts": int(events["text"].nunique()),
            "qa": {s: int((qa["source"] == s).sum()) for s in ("future", "uqa")},
            **({"side_interest_qa": n_side_qa} if config.side_interests else {}),
            "labels": int(len(labels)),
        },
        "tasks": {t: {"domain": spec.domain,
                      "positive_rate": _round(metrics.loc[t, "positive_rate"]),
                      "oracle_auc": _round(metrics.loc[t, "oracle_auc"]),
                      "oracle_ks": _round(metrics.loc[t, "oracle_ks"]),
                      "n_test": int(metrics.loc[t, "n_test"]),
                      "intercept": _round(cal[t][2]), "scale": _round(cal[t][3])}
                  for t, spec in zip(TASK_IDS, TASK_SPECS)},
        "self_reflection": {"generated": n_gen, "kept": n_kept, "dropped": n_gen - n_kept,
                            "drop_share": _round((n_gen - n_kept) / max(n_gen, 1))},
    }
    return world


def ensure_world(out_dir: str | Path, config: WorldConfig, *, show_progress: bool = False) -> World:
    """Reuse the world in `out_dir` when its manifest records this config (and this generator and
    schema version); otherwise generate it, save it there and return it."""
    return ensure_saved(out_dir, _saved_key(config), lambda: generate_world(config, show_progress=show_progress))


def world_is_saved(out_dir: str | Path, config: WorldConfig) -> bool:
    """Whether `out_dir` holds the world of `config` from this generator and schema version."""
    return saved_matches(out_dir, _saved_key(config))


def _saved_key(config: WorldConfig) -> dict:
    """What a saved world's manifest must record to be reused for `config` (with the schema version)."""
    return {"config": config.to_dict(), "generator_version": GENERATOR_VERSION}
