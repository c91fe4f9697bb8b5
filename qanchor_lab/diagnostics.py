"""Representation diagnostics: does the model read the user, and where along the way is it lost?

Pre-training can lower its loss without the embedding carrying much about the user (the query alone, or
a few frequent answers, explain a lot of the contrastive objective). This module measures what each
stage of the model keeps about users: against the truth the synthetic world knows (oracle scores, latent
traits) or, on real data, against the task labels, with the claims of QA derived from the log
(`intent_catalogue`):

- `stage_representations` / `stage_probe_table`: the representation at every stage of the data flow
  (tabular input, raw event means, tabular token, decoder prefix layers, hidden state at <user_emb>,
  final embedding) and a cross-validated ridge probe of each against the *oracle score* of every task
  (logit of the true label probability) and every latent trait. `retention` is a stage's oracle R² over
  the tabular input's: the target is >= 0.85 for the final embedding (`RETENTION_TARGET`).
- `query_geometry`: effective dimensionality of the embeddings per query, and whether one user's
  embeddings under different queries are more alike than different users' under the same query (a
  model that ignores the user has same-query cosines near 1); with a reference query, each query's
  novelty (`linear_novelty`): how much of its embedding no linear map of the reference's predicts.
- `claim_accuracy`: on held-out pre-training users, is the answer the anchor embedding is closest to
  the right claim? Compared with the majority claim and with logistic regression / GBDT on the model's
  own tabular input (the yardstick a model that reads its input should reach).
- `query_selectivity`: does a question make the embedding more informative about its own answer? A claim
  probe on the embedding under the intent's own query against the same probe under the generic query;
  `tune_selectivity` asks it of tune users, every D_uqa question each, cross-validated (a larger sample).
- `perfect_qa_learner_r2`: how much of the oracle score (the task label on real data) the D_uqa claims could
  explain at best, for the synthetic QA or QA derived from any log (derive_qa).

Everything is judged on downstream `tune` users or `pretrain_val` users, never on `test` users, and is
deterministic given `seed`. `diagnose` runs it all (trained and untrained side by side) and returns a
JSON-able dict; `diagnostics_markdown` renders it; `save_diagnostics` writes diagnostics.json/.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from qanchor_lab.baselines import claim_predictions, claim_predictions_oof
from qanchor_lab.parallel import fit_map
from qanchor_lab.sequence import position_ids
from qanchor_lab.world import INTENTS, TRAITS, build_evidence

RETENTION_TARGET = 0.85          # the final embedding should keep >= 85% of its tabular input's probe R²
ALPHAS = np.logspace(-2, 5, 15)  # ridge penalties tried inside each fold
TREND_COLUMNS = ("trend_liquidity", "trend_engagement")
JUDGED_SPLITS = ("tune", "pretrain_val")  # users the diagnostics may be judged on (never "test")
CLAIM_SPLITS = ("pretrain_val", "pretrain")  # splits with QA rows
MIN_FIT_ROWS = 30                # fewer training rows than this for an intent: the yardstick uses 3-fold CV
SELECTIVITY_TRAIN_ROWS = 300     # pretrain rows per intent that query_selectivity's probes are fitted on (bounds its cost)
LOGIT_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# users and targets


def _check_users(world, users: Sequence[str] | str, *, allowed: Sequence[str] = JUDGED_SPLITS) -> list[str]:
    """User ids from a split name or a list; refuses test users, unknown users and an empty list."""
    if isinstance(users, str):
        if users not in allowed:
            raise ValueError(f"users={users!r}: diagnostics are judged on split(s) {', '.join(allowed)} only")
        ids = world.users_in(users)
    else:
        ids = list(users)
    if not ids:
        raise ValueError(f"users is empty: no users to diagnose (given {users!r})")
    split = world.users.set_index("user_id")["split"]
    unknown = [u for u in ids if u not in split.index]
    if unknown:
        raise ValueError(f"{len(unknown)} user id(s) not in the world, e.g. {unknown[:5]}")
    bad = sorted(set(split.loc[ids]) - set(allowed))
    if bad:
        raise ValueError(f"users include split(s) {bad}; diagnostics are judged on {', '.join(allowed)} only "
                         "(test users stay unseen)")
    return ids


def sample_users(world, split: str = "tune", max_users: int | None = None, seed: int = 0) -> list[str]:
    """Up to `max_users` users of `split` (drawn with `seed`, kept in table order)."""
    ids = _check_users(world, split)
    if max_users is not None and len(ids) > max_users:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), max_users, replace=False))
        ids = [ids[i] for i in keep]
    return ids


def oracle_targets(world, users: Sequence[str]) -> pd.DataFrame:
    """(users, tasks) logit of the true label probability; empty columns when the users have no labels."""
    lab = world.labels[world.labels["user_id"].isin(set(users))]
    if lab.empty:
        return pd.DataFrame(index=pd.Index(list(users), name="user_id"))
    p = lab.pivot(index="user_id", columns="task_id", values="oracle_prob").reindex(list(users))
    if p.isna().any().any():
        missing = p.index[p.isna().any(axis=1)].tolist()
        raise ValueError(f"{len(missing)} user(s) lack oracle_prob labels, e.g. {missing[:5]}")
    task_order = [t for t in world.tasks["task_id"] if t in p.columns]
    p = p[task_order].clip(LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p / (1 - p))


def task_targets(world, users: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """(users, tasks) target of the stage and perfect-learner probes and its name: the oracle logit where the
    labels carry oracle_prob, else the 0/1 labels (real data has no known truth)."""
    lab = world.labels[world.labels["user_id"].isin(set(users))]
    if lab.empty:
        return pd.DataFrame(index=pd.Index(list(users), name="user_id")), "oracle_logit"
    if lab["oracle_prob"].notna().all():
        return oracle_targets(world, users), "oracle_logit"
    y = lab.pivot(index="user_id", columns="task_id", values="label").reindex(list(users))
    if y.isna().any().any():
        missing = y.index[y.isna().any(axis=1)].tolist()
        raise ValueError(f"{len(missing)} user(s) lack task labels, e.g. {missing[:5]}")
    return y[[t for t in world.tasks["task_id"] if t in y.columns]].astype(np.float64), "label"


LATENT_COLUMNS: tuple[str, ...] = (*(f"trait_{t}" for t in TRAITS), *TREND_COLUMNS)  # the synthetic users' truth


def has_latent_traits(world) -> bool:
    """Whether the users table carries the synthetic world's latent traits (real data does not)."""
    return all(c in world.users.columns for c in LATENT_COLUMNS)


def trait_targets(world, users: Sequence[str]) -> pd.DataFrame:
    """(users, traits + trends) latent truth from the users table, named without the `trait_` prefix."""
    cols = list(LATENT_COLUMNS)
    missing = [c for c in cols if c not in world.users.columns]
    if missing:
        raise ValueError(f"the users table lacks latent column(s) {missing}")
    t = world.users.set_index("user_id").loc[list(users), cols].astype(np.float64)
    return t.rename(columns=lambda c: c.removeprefix("trait_"))


# ----------------------------------------------------------------------------------------------
# probes


def _oof_ridge(X: np.ndarray, Y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(n, k) out-of-fold ridge predictions of every column of Y (n, k) from X (n, p) (see `probe_r2_many`)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"probe: X {X.shape} and y {Y.shape} must be (n, p) and (n,) or (n, k) with the same n")
    if X.shape[0] < 2 * folds:
        raise ValueError(f"probe: {X.shape[0]} rows are too few for {folds}-fold cross-validation")
    if not np.isfinite(X).all() or not np.isfinite(Y).all():
        raise ValueError("probe: X or y holds non-finite values")
    pred = np.zeros_like(Y)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
        scaler = StandardScaler().fit(X[train])
        ridge = RidgeCV(alphas=ALPHAS, alpha_per_target=Y.shape[1] > 1)
        ridge.fit(scaler.transform(X[train]), Y[train])
        pred[test] = ridge.predict(scaler.transform(X[test])).reshape(len(test), -1)
    return pred


def _r2(Y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(k,) R² of predictions (n, k) against the overall mean of Y (n, k); NaN for a constant column."""
    sst = ((Y - Y.mean(0)) ** 2).sum(0)
    sse = ((Y - pred) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - sse / sst, np.nan)


def probe_r2_many(X: np.ndarray, Y: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold ridge R² of X (n, p) for every column of Y (n, k); (k,) array.

    Inside each fold X is standardised on the training part and RidgeCV picks one penalty per target
    from `ALPHAS` (efficient leave-one-out on the training part only), so no information leaks from the
    held-out part. R² compares the out-of-fold predictions with the overall mean; a constant target
    gives NaN."""
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y[:, None] if Y.ndim == 1 else Y
    return _r2(Y, _oof_ridge(X, Y, folds=folds, seed=seed))


def paired_r2_gain_interval(Y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *, n_boot: int = 1000,
                            ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of mean over columns of R²(pred_a) - R²(pred_b), both against Y (n, k), users resampled.

    Both sets of predictions are scored on the same resampled users (paired), with each resample's own mean and
    variance of Y. The probes are not refitted per resample, so the interval covers which users are scored, not
    which users the probes were fitted on: a lower bound on the read's noise. Basic (pivotal) interval, as
    the evaluation's (`metrics`). As there, a resample in which some task's target is constant (a rare 0/1 label
    on a small log) has no R² and is left out; (NaN, NaN) when fewer than `metrics.MIN_VALID_SHARE` of them
    remain, or when no target varies."""
    from qanchor_lab.metrics import MIN_VALID_SHARE, _interval, _resample_weights

    Y, pa, pb = (np.asarray(a, dtype=np.float64) for a in (Y, pred_a, pred_b))
    if not Y.shape == pa.shape == pb.shape or Y.ndim != 2:
        raise ValueError(f"paired_r2_gain_interval: Y {Y.shape}, pred_a {pa.shape} and pred_b {pb.shape} must be "
                         "the same (n, k) shape")
    per_task = _r2(Y, pa) - _r2(Y, pb)                                         # (k,) NaN where Y is constant
    varies = np.isfinite(per_task)
    if not varies.any():
        return float("nan"), float("nan")
    Y, pa, pb = Y[:, varies], pa[:, varies], pb[:, varies]
    n = Y.shape[0]
    w = _resample_weights(n, n_boot, seed).T                                   # (B, n) multiplicities
    Yc = Y - Y.mean(0)                                                         # (n, k) R² is shift-free; centred,
    square = w @ (Yc ** 2)                                                     # (B, k) a constant resample's sst
    sst = square - (w @ Yc) ** 2 / n                                           # (B, k) cancels to ~0, not to noise
    valid = (sst > 1e-9 * square).all(axis=1)                                  # (B,) every task's target varies
    if valid.sum() < MIN_VALID_SHARE * n_boot:
        return float("nan"), float("nan")
    gain = (w[valid] @ ((Y - pb) ** 2) - w[valid] @ ((Y - pa) ** 2)) / sst[valid]  # (B', k) = R²_a - R²_b
    return _interval(gain.mean(axis=1), ci, float(per_task[varies].mean()))


def probe_r2(X: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ridge R² of one target y (n,) from X (n, p) (see `probe_r2_many`)."""
    return float(probe_r2_many(X, np.asarray(y, dtype=np.float64).reshape(-1, 1), folds=folds, seed=seed)[0])


# ----------------------------------------------------------------------------------------------
# stages


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, D) over positions where mask (B, N) is True; zeros for empty rows."""
    w = mask.to(x.dtype).unsqueeze(-1)                                         # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)                            # (B, D)


@torch.no_grad()
def _stages_of_batch(model, batch, query: str) -> dict[str, torch.Tensor]:
    """Every stage's (B, k) representation for one UserBatch already on the model's device."""
    out: dict[str, torch.Tensor] = {"input_tabular": batch.tabular.float()}    # (B, F)
    # Raw event vectors (text vector + numeric fields) as the store packs them, before any encoder scaling.
    out["input_events"] = torch.cat([_masked_mean(batch.events[m], batch.masks[m])  # (B, D) each
                                     for m in batch.events], 1)                 # (B, M*D) store order
    tab = model.encoder(batch).tabular                                          # (B, S, H) or None
    if tab is not None:
        out["tabular_token"] = tab.reshape(tab.shape[0], -1)                    # (B, S*H)
    prefix = model.encode_prefix(batch)
    # The prefix alone through the decoder: attention is causal, so these states equal the prefix part of
    # any full sequence. The explicit mask matters: padding sits mid-batch and position ids skip it.
    dec = model.decoder(inputs_embeds=prefix.embeds, attention_mask=prefix.mask.long(),
                        position_ids=position_ids(prefix.mask), output_hidden_states=True)
    for layer, h in enumerate(dec.hidden_states):                               # L+1 of (B, P, H)
        # the mean over real tokens, so padding (which depends on the batch's longest prefix) cannot count
        out[f"prefix_layer_{layer}"] = _masked_mean(h, prefix.mask)             # (B, H)
    suffix = model.make_suffix([query] * len(batch))
    hidden = model.run_full(prefix, model.suffix_embeddings(suffix), suffix.mask)  # (B, S, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out["user_emb_hidden"] = hidden[rows, suffix.pool_index.to(hidden.device)]  # (B, H) before the head
    out["embedding"] = model.embed(batch, [query] * len(batch))                 # (B, d) L2-normalised
    return out


def stage_representations(model, world, users: Sequence[str], query: str, *, store=None, batch_size: int = 128,
                          show_progress: bool = False) -> dict[str, np.ndarray]:
    """{stage: (U, k) array} for `users` under `query`, stages in data-flow order.

    Stages: input_tabular, input_events, tabular_token (absent when the model has no tabular tokens),
    prefix_layer_0..L (mean over real prefix positions of each decoder layer's hidden state; layer 0 is
    the input embeddings, layer L is after the final norm), user_emb_hidden (last-layer state at
    <user_emb> before the head) and embedding. `store` (a BehaviourStore holding the users, built with
    this model's `behaviour`) saves rebuilding one."""
    users = list(users)
    if not users:
        raise ValueError("stage_representations: users is empty")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"stage_representations: query must be a non-empty string, got {query!r}")
    store = store if store is not None else model.behaviour(world.events, world.profiles, users)
    idx = store.indices(users)
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(idx), batch_size), desc="stages", disable=not show_progress):
        batch = store.batch(idx[start:start + batch_size]).to(model.device)
        for name, t in _stages_of_batch(model, batch, query).items():
            parts.setdefault(name, []).append(t.float().cpu().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def stage_probe_table(model, world, users: Sequence[str] | str, query: str, *, store=None, folds: int = 5,
                      seed: int = 0, stages: Mapping[str, np.ndarray] | None = None,
                      show_progress: bool = False) -> pd.DataFrame:
    """One row per stage (data-flow order): probe R² against each task's oracle score and each trait.

    Columns: stage, dim, oracle_r2 (mean over tasks), trait_mean_r2, retention (oracle_r2 over the
    input_tabular row's; over trait_mean_r2 when the users have no labels, e.g. pretrain_val), then
    `oracle:<task>` and `trait:<name>` per target. On real data (no oracle_prob, no latent traits) the task
    target is the 0/1 label (`task_targets`) and there are no trait columns. `stages` may pass precomputed
    representations."""
    users = _check_users(world, users)
    reps = stages if stages is not None else stage_representations(model, world, users, query, store=store,
                                                                   show_progress=show_progress)
    oracle = task_targets(world, users)[0]
    traits = trait_targets(world, users) if has_latent_traits(world) else pd.DataFrame(index=oracle.index)
    Y = np.concatenate([oracle.to_numpy(), traits.to_numpy()], 1)              # (U, T + K)
    names = [f"oracle:{t}" for t in oracle.columns] + [f"trait:{t}" for t in traits.columns]
    rows = []
    for stage, X in tqdm(list(reps.items()), desc="probes", disable=not show_progress):
        r2 = probe_r2_many(X, Y, folds=folds, seed=seed)
        row = {"stage": stage, "dim": int(X.shape[1])}
        row.update(dict(zip(names, r2.tolist())))
        row["oracle_r2"] = float(np.mean(r2[: oracle.shape[1]])) if oracle.shape[1] else math.nan
        row["trait_mean_r2"] = float(np.mean(r2[oracle.shape[1]:])) if traits.shape[1] else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    key = "oracle_r2" if oracle.shape[1] else "trait_mean_r2"
    base = table.loc[table["stage"] == "input_tabular", key]
    base = float(base.iloc[0]) if len(base) else math.nan
    table["retention"] = table[key] / base if base > 0 else math.nan
    return table[["stage", "dim", "oracle_r2", "trait_mean_r2", "retention", *names]]


# ----------------------------------------------------------------------------------------------
# geometry


def effective_dimensionality(E: np.ndarray) -> float:
    """Participation ratio (sum λ)² / sum λ² of the covariance eigenvalues of E (n, d).

    d for isotropic data, 1 when all variance lies along one direction, 0 when E has no variance."""
    E = np.asarray(E, dtype=np.float64)
    if E.ndim != 2 or E.shape[0] < 2:
        raise ValueError(f"effective_dimensionality: need an (n >= 2, d) matrix, got shape {E.shape}")
    centred = E - E.mean(0)
    lam = np.linalg.svd(centred, compute_uv=False) ** 2 / (E.shape[0] - 1)     # covariance eigenvalues
    total = lam.sum()
    return float(total ** 2 / (lam ** 2).sum()) if total > 1e-12 * max(1.0, np.abs(E).max() ** 2) else 0.0


# How many leading principal components `lead_share` reads. Chosen on tune users of worlds 7 and 11: the generic
# query's first component already carries a fifth of a task on world 11 (the tasks share latent traits), and a 6-epoch
# model's task query lifts its task into the first two there and into the first on world 7; with two, every 300-user
# slice of either 6-epoch model reads above +0.07 and every slice of the demo's models (three pre-training seeds) below
# +0.04 (docs/design.md §7.43).
LEAD_COMPONENTS = 2


def lead_share(X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
               components: int = LEAD_COMPONENTS) -> float:
    """Share of y's variance (n,) that lies in the span of the leading `components` principal components of X
    (n, d): the R² of y regressed on those components' scores, X's columns standardised first as the evaluation's
    probe standardises them (a constant column is dropped). `weights` (n,): how often each row counts (a bootstrap
    resample's multiplicities); None counts each once. NaN when y or X has no variance.

    Why beside an R²: two embeddings that hold the same task equally well (the same probe R² with ample labels) can
    still differ in *where* they hold it. Where the task lies along the embedding's leading directions, a heavily
    regularised probe (the evaluation's CV picks strong L2 penalties) finds it from few labels; where it lies along
    minor directions, only many labels find it (docs/design.md §7.43)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"lead_share: need X (n, d) and y (n,) over the same rows; got {X.shape} and {y.shape}")
    if isinstance(components, bool) or not isinstance(components, (int, np.integer)) or components < 1:
        raise ValueError(f"lead_share: components must be an int >= 1; got {components!r}")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64)
    return _share_on(_leading_scores(X, w, components), y, w)


def _leading_scores(X: np.ndarray, w: np.ndarray, components: int) -> np.ndarray | None:
    """(n, c) each row's scores on the leading `components` principal directions of X's standardised columns, rows
    weighted by w (uncorrelated under w); None when no column varies."""
    total = w.sum()
    Xc = X - (w @ X) / total                                                   # (n, d)
    var = (w @ Xc ** 2) / total                                                # (d,)
    keep = var > 1e-12 * max(float(var.max(initial=0.0)), 1e-300)
    if not keep.any():
        return None
    Z = Xc[:, keep] / np.sqrt(var[keep])                                       # (n, d') standardised
    corr = (Z * w[:, None]).T @ Z / total                                      # (d', d') correlation matrix
    lam, vec = np.linalg.eigh(corr)                                            # ascending
    top = slice(max(len(lam) - components, 0), None)                           # the leading `components`
    lead = vec[:, top][:, lam[top] > 1e-12 * lam[-1]]                          # (d', c) those with any variance
    return Z @ lead                                                            # (n, c) the leading directions' scores


def _share_on(scores: np.ndarray | None, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted R² of y (n,) on scores (n, c) whose columns are uncorrelated under w: the sum of the squared
    correlations; NaN when y has no variance or no score column is given."""
    if scores is None or scores.shape[1] == 0:
        return math.nan
    total = w.sum()
    sc, yc = scores - (w @ scores) / total, y - (w @ y) / total               # (n, c), (n,)
    s_var, y_var = (w @ sc ** 2) / total, float(w @ yc ** 2) / total           # (c,), ()
    if y_var <= 1e-12 * max(float(w @ y ** 2) / total, 1e-300) or (s_var <= 0).any():
        return math.nan
    return float((((w @ (sc * yc[:, None])) / total) ** 2 / (s_var * y_var)).sum())


def _task_lead_shares(own: np.ndarray, reference: np.ndarray, Y: np.ndarray, w: np.ndarray, components: int,
                      tasks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(len(tasks),) each task's lead share under its own embedding own[:, k] (n, d) and (len(tasks),) under the
    reference (n, d), rows weighted by w: the one computation behind query_geometry's rows and lead_gain_interval.
    The reference's leading directions are found once, for every task."""
    ref_scores = _leading_scores(reference, w, components)                     # (n, c) shared by every task
    shares = [_share_on(_leading_scores(own[:, k], w, components), Y[:, k], w) for k in tasks]
    return np.array(shares, dtype=np.float64), np.array([_share_on(ref_scores, Y[:, k], w) for k in tasks])


def lead_gain_interval(own: np.ndarray, reference: np.ndarray, Y: np.ndarray, *, n_boot: int = 200,
                       ci: float = 0.95, seed: int = 0, components: int = LEAD_COMPONENTS) -> tuple[float, float]:
    """Bootstrap interval of the mean over tasks of lead_share(own[:, k], Y[:, k]) - lead_share(reference, Y[:, k]),
    users resampled and each resample's principal directions found anew: own (n, k, d), one embedding per task;
    reference (n, d); Y (n, k). As in `paired_r2_gain_interval` a task whose target is constant is left out (it has
    no share), a resample where some task's target is constant is left out, and (NaN, NaN) when fewer than
    `metrics.MIN_VALID_SHARE` remain or no target varies.

    The interval is the hull of the basic and the percentile intervals, within [-1, 1]. A share on the *leading*
    directions is not smooth in the data: where a task's direction nearly ties with the next one for a leading
    place, resamples reorder them and the resampled gains can sit wholly to one side of the estimate (on the demo's
    model a gain of +0.059 whose resamples ran from -0.058 to +0.058, docs/design.md §7.48). The basic interval,
    the mirror image, then excludes the estimate on one side and the percentile interval on the other; the hull
    holds the estimate and both readings. Where the resamples straddle the estimate evenly, the two coincide."""
    from qanchor_lab.metrics import MIN_VALID_SHARE, _interval, _resample_weights

    own, reference, Y = (np.asarray(a, dtype=np.float64) for a in (own, reference, Y))
    if own.ndim != 3 or reference.ndim != 2 or Y.ndim != 2 or not own.shape[:2] == Y.shape \
            or reference.shape[0] != Y.shape[0]:
        raise ValueError(f"lead_gain_interval: own {own.shape} must be (n, k, d), reference {reference.shape} (n, d) "
                         f"and Y {Y.shape} (n, k), over the same n users and k tasks")

    def per_task(w: np.ndarray, tasks) -> np.ndarray:
        shares, reference_shares = _task_lead_shares(own, reference, Y, w, components, tasks)
        return shares - reference_shares

    first = per_task(np.ones(Y.shape[0]), range(Y.shape[1]))                   # (k,) NaN where the target is constant
    varies = np.flatnonzero(np.isfinite(first))
    if not len(varies):
        return float("nan"), float("nan")
    observed = float(first[varies].mean())
    weights = _resample_weights(Y.shape[0], n_boot, seed).T                    # (B, n) multiplicities
    samples = np.array([per_task(w, varies).mean() for w in weights])          # (B,) NaN: a task went constant
    samples = samples[np.isfinite(samples)]
    if len(samples) < MIN_VALID_SHARE * n_boot:
        return float("nan"), float("nan")
    low, high = _interval(samples, ci, observed)                               # basic: 2θ - quantiles
    p_low, p_high = np.quantile(samples, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])   # percentile
    return max(min(low, float(p_low)), -1.0), min(max(high, float(p_high)), 1.0)


def _mean_offdiag_cos(V: np.ndarray) -> float:
    """Mean cosine over distinct pairs of the rows of V (n, d) (rows normalised here)."""
    V = V / np.linalg.norm(V, axis=-1, keepdims=True).clip(min=1e-12)
    n = V.shape[0]
    s = V.sum(0)
    return float((s @ s - n) / (n * (n - 1)))                                  # ||sum||² counts the n self-pairs


def task_query_targets(world, users: Sequence[str]) -> dict[int, np.ndarray]:
    """{task position: (U,) target over `users`} for `query_geometry(targets=...)` over the queries
    `world.tasks["query"]` followed by the generic one (as `diagnose` asks them): each task's oracle logit (the 0/1
    labels where the data has no known truth, `task_targets`), keyed by the task's row in world.tasks, which is its
    query's position in that list. By position, not by wording: two tasks may ask the same question (the schema
    allows it), and each is still read against its own target."""
    targets, _ = task_targets(world, users)
    return {k: targets[t].to_numpy(np.float64) for k, t in enumerate(world.tasks["task_id"]) if t in targets.columns}


def _targets_by_position(targets: Mapping[int | str, np.ndarray], queries: Sequence[str],
                         n_users: int) -> dict[int, np.ndarray]:
    """query_geometry's `targets` as {position in `queries`: (n_users,) target}. An int key is that position (as
    task_query_targets keys them); a str key names a query asked once (a repeated wording would not say which
    task's target it is)."""
    out: dict[int, np.ndarray] = {}
    for key, y in targets.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            if not 0 <= key < len(queries):
                raise ValueError(f"query_geometry: a target for position {key}, but the queries hold positions "
                                 f"0..{len(queries) - 1}")
            j = int(key)
        elif isinstance(key, str):
            at = [j for j, q in enumerate(queries) if q == key]
            if not at:
                raise ValueError(f"query_geometry: target for {key!r}, which is not among the queries")
            if len(at) > 1:
                raise ValueError(f"query_geometry: target for {key!r}, which is asked at positions {at}: key the "
                                 "targets by position (task_query_targets) where a query repeats")
            j = at[0]
        else:
            raise ValueError(f"query_geometry: target key {key!r} is neither a query nor a position in the queries")
        if j in out:
            raise ValueError(f"query_geometry: two targets for position {j} ({queries[j]!r})")
        if np.shape(y) != (n_users,):
            raise ValueError(f"query_geometry: the target for {queries[j]!r} (position {j}) has shape {np.shape(y)}; "
                             f"expected ({n_users},), one value per user")
        out[j] = np.asarray(y, dtype=np.float64)
    return out


def _gain(row: Mapping[str, Any], key: str) -> float | None:
    """row[key] - row[key + "_reference"] of one query_geometry row; None for a query without a task, and for a
    task whose target is constant among the users (its NaN R² is None once `diagnose` made the dict JSON-able)."""
    own, reference = row.get(key), row.get(f"{key}_reference")
    return None if own is None or reference is None else own - reference


def _read_gain(row: Mapping[str, Any]) -> float | None:
    """One query_geometry row's task read gain (task_r2 - task_r2_reference); None without a task (`_gain`)."""
    return _gain(row, "task_r2")


def _lead_gain(row: Mapping[str, Any]) -> float | None:
    """One query_geometry row's task lead gain (task_lead_share - task_lead_share_reference); None without a task."""
    return _gain(row, "task_lead_share")


def query_geometry(model, store, user_ids: Sequence[str], queries: Sequence[str], *, reference_query: str | None = None,
                   targets: Mapping[int | str, np.ndarray] | None = None, batch_size: int = 64,
                   show_progress: bool = False) -> dict[str, Any]:
    """How the embeddings spread over users and queries.

    per_query: effective dimensionality over users for each query. same_user_cos: mean cosine between one
    user's embeddings under two different queries; cross_user_cos: mean cosine between two different
    users under the same query. user_share / query_share / interaction_share: shares of the total variance of
    the (U, Q) embeddings explained by user means, by query means, and by neither (a model that ignores the user
    has user_share ~ 0; one that adds a per-query offset to a per-user vector has interaction_share ~ 0).

    With `reference_query` (one of `queries`, e.g. the generic one), per_query also holds `novelty`: the share of
    that query's embedding variance over users that a linear map of the reference query's embedding does not
    predict (1 - out-of-fold ridge R², `probe_r2_many`). A probe refitted per query reads the same from both
    embeddings except through that share, so a question can only add to such a probe where its novelty is well
    above the untrained model's (docs/design.md §7.14); `novelty_mean` averages it over the other queries.

    With `targets` too ({position in `queries`, or a query asked once: (U,) target over `user_ids`}, e.g.
    `task_query_targets`), a task query's row also holds `task_r2` (out-of-fold ridge R² of its task's target from
    the embedding under that query) and `task_r2_reference` (from the reference query's embedding, on the same
    folds); `task_read_gain_mean` averages task_r2 - task_r2_reference: does asking for the task keep more of the
    task in the embedding than the generic question? `task_read_gain_low` / `task_read_gain_high` bound it (95%,
    users resampled, paired;
    `paired_r2_gain_interval`). Novelty says the question changes what the embedding holds; this says whether the change is toward its
    task (docs/design.md §7.39). Each such row also holds `task_lead_share` / `task_lead_share_reference`: how much
    of the task's target lies on the embedding's two leading principal components under the task's query and
    under the reference query (`lead_share`); `task_lead_gain_mean` averages their difference, with `_low` / `_high`
    (95%, users resampled, principal directions refitted per resample, the hull of the basic and percentile
    intervals; `lead_gain_interval`). The read gain says
    whether the question keeps more of its task; the lead gain whether it puts the task first, which is what a
    probe fitted on few labels can use (docs/design.md §7.43). A target at a query worded as the reference gets
    none of these (as that query gets no novelty): its embedding is the reference's, a gain of 0 by construction
    that says nothing of the model, so it is left out of the means."""
    user_ids, queries = list(user_ids), list(queries)
    if len(user_ids) < 2 or len(queries) < 2:
        raise ValueError(f"query_geometry needs >= 2 users and >= 2 queries, got {len(user_ids)} and {len(queries)}")
    if reference_query is not None and reference_query not in queries:
        raise ValueError(f"query_geometry: reference_query {reference_query!r} is not among the queries")
    targets = _targets_by_position(targets or {}, queries, len(user_ids))
    if targets and reference_query is None:
        raise ValueError("query_geometry: targets are read against the reference query's embedding; "
                         "pass reference_query")
    emb = model.encode(store, queries, user_ids=user_ids, batch_size=batch_size,
                       show_progress_bar=show_progress).astype(np.float64)     # (U, Q, d)
    U, Q, _ = emb.shape
    grand = emb.mean((0, 1))                                                   # (d,)
    total = ((emb - grand) ** 2).sum()
    user_ss = Q * ((emb.mean(1) - grand) ** 2).sum()                           # between users
    query_ss = U * ((emb.mean(0) - grand) ** 2).sum()                          # between queries
    per_query = [{"query": q, "effective_dim": effective_dimensionality(emb[:, j])} for j, q in enumerate(queries)]
    out = {
        "n_users": U, "n_queries": Q, "embed_dim": int(emb.shape[2]),
        "per_query": per_query,
        "effective_dim_mean": float(np.mean([r["effective_dim"] for r in per_query])),
        "same_user_cos": float(np.mean([_mean_offdiag_cos(emb[u]) for u in range(U)])),
        "cross_user_cos": float(np.mean([_mean_offdiag_cos(emb[:, j]) for j in range(Q)])),
        "user_share": float(user_ss / total) if total > 0 else math.nan,
        "query_share": float(query_ss / total) if total > 0 else math.nan,
        "interaction_share": float(1.0 - (user_ss + query_ss) / total) if total > 0 else math.nan,
    }
    if reference_query is not None:
        ref = emb[:, queries.index(reference_query)]                               # (U, d)
        for j, row in enumerate(per_query):
            if queries[j] != reference_query:
                row["novelty"] = linear_novelty(ref, emb[:, j])
        out["reference_query"] = reference_query
        out["novelty_mean"] = float(np.nanmean([r["novelty"] for r in per_query if "novelty" in r]))
    asked = [j for j in sorted(targets) if queries[j] != reference_query]
    if asked:
        Y = np.stack([targets[j] for j in asked], axis=1)                         # (U, T)
        from_reference = _oof_ridge(ref, Y)                                       # (U, T) the same folds as below
        own = np.stack([_oof_ridge(emb[:, j], Y[:, k])[:, 0] for k, j in enumerate(asked)], axis=1)  # (U, T)
        by_task = emb[:, asked]                                                   # (U, T, d) each task's own query
        shares, reference_shares = _task_lead_shares(by_task, ref, Y, np.ones(U), LEAD_COMPONENTS,
                                                     range(len(asked)))        # (T,), (T,)
        for j, r2, r2_ref, share, share_ref in zip(asked, _r2(Y, own), _r2(Y, from_reference), shares,
                                                   reference_shares):
            per_query[j]["task_r2"] = float(r2)
            per_query[j]["task_r2_reference"] = float(r2_ref)
            per_query[j]["task_lead_share"] = float(share)
            per_query[j]["task_lead_share_reference"] = float(share_ref)
        out["task_read_gain_mean"] = float(np.nanmean([_read_gain(per_query[j]) for j in asked]))
        out["task_read_gain_low"], out["task_read_gain_high"] = paired_r2_gain_interval(Y, own, from_reference)
        out["task_lead_gain_mean"] = float(np.nanmean([_lead_gain(per_query[j]) for j in asked]))
        out["task_lead_gain_low"], out["task_lead_gain_high"] = lead_gain_interval(by_task, ref, Y)
    return out


def linear_novelty(X: np.ndarray, Y: np.ndarray) -> float:
    """1 - out-of-fold ridge R² of Y (n, d) from X (n, d) over the same n users, pooled over Y's columns by their
    variance: the share of Y's variance no linear map of X predicts. E.g. X the embeddings under the task query
    and Y under a tuned soft prompt: does the prompt change what the embedding holds, or only how?"""
    sst = ((Y - Y.mean(0)) ** 2).sum(0)                                        # (d,)
    if sst.sum() <= 0:
        return math.nan
    r2 = np.nan_to_num(probe_r2_many(X, Y), nan=0.0)                           # (d,) constant columns: no variance
    return float(1.0 - (r2 * sst).sum() / sst.sum())


# ----------------------------------------------------------------------------------------------
# claims


class IntentInfo(NamedTuple):
    """What the claim diagnostics need of one question intent."""

    source: str                          # "uqa" or "future"
    answers: dict[str, tuple[str, ...]]  # claim -> its answer wordings
    query: str                           # the question asked as the intent's own (query_selectivity)


def intent_catalogue(qa: pd.DataFrame) -> dict[str, IntentInfo]:
    """Every intent of a QA table. The synthetic world's INTENTS where they know the intent; otherwise (QA derived
    from a log, or a dataset's own) read from the table: each distinct answer is one claim with one wording, as
    `world.answer_claims` keys it, the source is the intent's most common `source`, and the query the first of its
    questions in sorted order."""
    out: dict[str, IntentInfo] = {}
    for intent, g in qa.groupby("intent", sort=True):
        if intent in INTENTS:
            it = INTENTS[intent]
            # short answers (WorldConfig.terse_answer_share) only where this table uses them: a model is scored
            # against the wordings it was trained on
            used = set(g["answer"].astype(str))
            answers = {c: ws + ((it.terse[c],) if it.terse.get(c) in used else ()) for c, ws in it.answers.items()}
            out[intent] = IntentInfo(it.source, answers, it.queries[0])
        else:
            answers = sorted(g["answer"].astype(str).unique())
            source = g["source"].astype(str).mode().sort_values().iloc[0] if "source" in g.columns else "uqa"
            out[intent] = IntentInfo(source, {a: (a,) for a in answers}, sorted(g["query"].astype(str))[0])
    return out


def _claim_lookup(catalogue: Mapping[str, IntentInfo]) -> dict[tuple[str, str], str]:
    """(intent, answer wording) -> claim; no wording belongs to two claims of one intent."""
    return {(iid, w): claim for iid, it in catalogue.items() for claim, words in it.answers.items() for w in words}


def claim_rows(world, *, split: str = "pretrain_val", max_pairs: int | None = 600,
               seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scored, train) QA rows with their true `claim`: up to `max_pairs` rows of `split` (drawn with
    `seed`) and the `pretrain` rows not among them (what majority and yardstick learn from)."""
    if split not in CLAIM_SPLITS:
        raise ValueError(f"split={split!r}: QA rows exist for {', '.join(CLAIM_SPLITS)} only")
    qa = world.qa.copy()
    if "intent" not in qa.columns:
        raise ValueError("world.qa has no 'intent' column: the claim diagnostics group answers by question intent")
    catalogue = intent_catalogue(qa)
    lookup = _claim_lookup(catalogue)
    qa["claim"] = [lookup.get(k) for k in zip(qa["intent"], qa["answer"])]
    qa = qa[qa["claim"].notna()]                                               # answers of no known wording
    split_of = world.users.set_index("user_id")["split"]
    qa["split"] = split_of.reindex(qa["user_id"]).to_numpy()
    scored = qa[qa["split"] == split]
    if scored.empty:
        raise ValueError(f"split {split!r} has no QA rows to score")
    if max_pairs is not None and len(scored) > max_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(len(scored), max_pairs, replace=False))
        scored = scored.iloc[pick]
    train = qa[(qa["split"] == "pretrain") & ~qa.index.isin(scored.index)]
    scored, train = scored.reset_index(drop=True), train.reset_index(drop=True)
    scored["source"] = [catalogue[i].source for i in scored["intent"]]
    return scored, train


def _majority_claim(claims: Sequence[str]) -> str:
    """The most common of `claims`; a tie goes to the first by name, so the baseline does not hang on row order."""
    counts = pd.Series(claims).value_counts()
    return sorted(counts.index[counts == counts.max()])[0]


def claim_baselines(world, store, *, split: str = "pretrain_val", max_pairs: int | None = 600,
                    seed: int = 0, show_progress: bool = False, n_jobs: int | None = None) -> pd.DataFrame:
    """The scored rows of `claim_rows` with baseline predictions: `majority` (the intent's most common
    claim among the training rows), `logreg` and `gbdt` (classifiers of the claim from the model's tabular
    input, fitted per intent on the training rows; by 3-fold CV over training + scored rows when an
    intent has fewer than MIN_FIT_ROWS training rows). `store` must hold the users of both row sets.
    `n_jobs`: worker processes for the fits (None: this process; -1: every core); the same predictions
    for any value (parallel.fit_map)."""
    scored, train = claim_rows(world, split=split, max_pairs=max_pairs, seed=seed)
    tab_scored = store.batch(store.indices(scored["user_id"].tolist())).tabular.numpy()   # (N, F)
    tab_train = store.batch(store.indices(train["user_id"].tolist())).tabular.numpy()     # (M, F)
    out = scored.copy()
    for col in ("majority", "logreg", "gbdt"):
        out[col] = pd.Series([None] * len(out), dtype=object)
    fits, where = [], []
    for intent in sorted(scored["intent"].unique()):
        s = np.flatnonzero(scored["intent"].to_numpy() == intent)
        t = np.flatnonzero(train["intent"].to_numpy() == intent)
        y_train = train["claim"].to_numpy()[t]
        if len(t):
            out.loc[s, "majority"] = _majority_claim(y_train)
        for kind in ("logreg", "gbdt"):  # out-of-fold over both row sets when the intent has few training rows
            fits.append((kind, tab_train[t], y_train, tab_scored[s], scored["claim"].to_numpy()[s], seed, MIN_FIT_ROWS))
            where.append((s, kind))
    preds = fit_map(claim_predictions_oof, fits, n_jobs, desc="yardstick", show_progress=show_progress)
    for (s, kind), pred in zip(where, preds):
        out.loc[s, kind] = pred
    return out


@torch.no_grad()
def model_claim_predictions(model, scored: pd.DataFrame, store, *, batch_size: int = 64,
                            intents: Mapping[str, IntentInfo] | None = None,
                            show_progress: bool = False) -> pd.DataFrame:
    """`scored` with the model's `pred` claim and `own_answer_margin` per row.

    pred: the claim of the wording (among every wording of every claim of the row's intent) with the
    highest cosine to the anchor embedding. own_answer_margin: cos(anchor, own answer) minus the mean
    cos(anchor, answers other scored users gave to the same intent stating a different claim) (a
    same-claim answer is right too, so it is not a negative); NaN when no such answer exists. `intents`: the
    world's `intent_catalogue(world.qa)`; by default read from `scored`, which is complete only for the synthetic
    world's intents (another QA's claims are the answers its rows happen to give)."""
    model.eval()
    catalogue = intents if intents is not None else intent_catalogue(scored)
    anchors = []
    for i in tqdm(range(0, len(scored), batch_size), desc="anchors", disable=not show_progress):
        chunk = scored.iloc[i:i + batch_size]
        batch = store.batch(store.indices(chunk["user_id"].tolist()))
        anchors.append(model.embed(batch, chunk["query"].tolist()).float().cpu())
    A = torch.cat(anchors).numpy()                                             # (N, d)

    def embed_texts(texts: list[str]) -> np.ndarray:
        return torch.cat([model.embed_answers(texts[i:i + batch_size]).float().cpu()
                          for i in range(0, len(texts), batch_size)]).numpy()  # (n, d)

    pred = np.empty(len(scored), dtype=object)
    for intent in scored["intent"].unique():
        rows = np.flatnonzero(scored["intent"].to_numpy() == intent)
        pairs = [(c, w) for c, words in catalogue[intent].answers.items() for w in words]
        W = embed_texts([w for _, w in pairs])                                 # (n_wordings, d)
        best = (A[rows] @ W.T).argmax(1)                                       # (n_rows,)
        pred[rows] = [pairs[j][0] for j in best]
    own = embed_texts(scored["answer"].tolist())                               # (N, d)
    cos = A @ own.T                                                            # (N, N) anchor i vs answer j
    same_intent = scored["intent"].to_numpy()[:, None] == scored["intent"].to_numpy()[None, :]
    other_claim = scored["claim"].to_numpy()[:, None] != scored["claim"].to_numpy()[None, :]
    neg = same_intent & other_claim                                            # (N, N)
    n_neg = neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        neg_mean = np.where(n_neg > 0, (cos * neg).sum(1) / np.maximum(n_neg, 1), np.nan)
    out = scored.copy()
    out["pred"] = pred
    out["own_answer_margin"] = np.diag(cos) - neg_mean
    return out


def _overall_rows(rows: pd.DataFrame, summarise) -> list[dict[str, Any]]:
    """`overall` rows per source (future / uqa) and for all, from per-row results."""
    out = [{"intent": "overall", "source": source, **summarise(g)} for source, g in rows.groupby("source", sort=True)]
    return out + [{"intent": "overall", "source": "all", **summarise(rows)}]


def _overall_all(table: pd.DataFrame) -> pd.Series:
    """The `overall` row over every source of a claim or selectivity table (`_overall_rows`): its headline."""
    return table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]


def _accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per intent and overall (per source and all) accuracies of the model and the baselines."""
    def summarise(g: pd.DataFrame) -> dict[str, Any]:
        truth = g["claim"].to_numpy()
        return {"n": int(len(g)),
                "model_acc": float((g["pred"].to_numpy() == truth).mean()),
                "majority_acc": float((g["majority"].to_numpy() == truth).mean()),
                "logreg_acc": float((g["logreg"].to_numpy() == truth).mean()),
                "gbdt_acc": float((g["gbdt"].to_numpy() == truth).mean()),
                "own_answer_margin": float(np.nanmean(g["own_answer_margin"]))
                if g["own_answer_margin"].notna().any() else math.nan}

    out = [{"intent": intent, "source": g["source"].iloc[0], **summarise(g)}
           for intent, g in rows.groupby("intent", sort=True)]
    out.sort(key=lambda r: (r["source"], r["intent"]))
    return pd.DataFrame(out + _overall_rows(rows, summarise))


def claim_accuracy(model, world, *, split: str = "pretrain_val", max_pairs: int | None = 600, seed: int = 0,
                   store=None, baselines: pd.DataFrame | None = None, show_progress: bool = False) -> pd.DataFrame:
    """Does the anchor embedding point at the right claim? One row per intent, then `overall` rows per
    source (future / uqa) and for all, weighted by rows.

    Columns: intent, source, n, model_acc, majority_acc, logreg_acc, gbdt_acc, own_answer_margin (see
    `claim_baselines` and `model_claim_predictions`). `baselines` (from `claim_baselines`) is reused
    when given, e.g. for a second model with the same tabular input; `store` must then hold the split's
    users, else it must also hold the `pretrain` users."""
    if baselines is None:
        store = store if store is not None else model.behaviour(world.events, world.profiles,
                                                                world.users_in("pretrain", split))
        baselines = claim_baselines(world, store, split=split, max_pairs=max_pairs, seed=seed,
                                    show_progress=show_progress)
    elif store is None:
        store = model.behaviour(world.events, world.profiles, sorted(set(baselines["user_id"])))
    rows = model_claim_predictions(model, baselines, store, intents=intent_catalogue(world.qa), show_progress=show_progress)
    return _accuracy_table(rows)


class SelectivityUnavailable(ValueError):
    """query_selectivity has no probe to fit or no row to score: too few QA rows per intent (a small world).
    A property of the world, not of the model: `diagnose` records it as `selectivity_skipped` and goes on."""


def query_selectivity(model, world, *, split: str = "pretrain_val", max_pairs: int | None = 600,
                      max_train_per_intent: int | None = SELECTIVITY_TRAIN_ROWS, seed: int = 0, store=None,
                      generic_query: str | None = None, batch_size: int = 64,
                      show_progress: bool = False, n_jobs: int | None = None) -> pd.DataFrame:
    """Does a question make the embedding more informative about its own answer?

    Per intent, a logistic probe of the claim is fitted on pretrain rows and scored on the `claim_rows` of
    `split`, once on each user's embedding under the intent's own (first) query and once under the generic
    query. Q-Anchor's premise is that the first reads better: the question selects what the embedding keeps.
    A linear probe is blind to any invertible linear map of the same information, so `selectivity` (own minus
    generic accuracy) is above zero only when the question changes *which* user information the embedding
    holds, or computes something a linear read of the generic embedding cannot (docs/design.md §7.11).

    One row per intent (intents with fewer than MIN_FIT_ROWS training rows are left out), then `overall`
    rows per source and for all, weighted by rows; overall rows carry a paired 95% CI of the selectivity
    (normal approximation over rows). Columns: intent, source, n, own_acc, generic_acc, majority_acc,
    selectivity, selectivity_low, selectivity_high. `store` must hold the users of both row sets. `n_jobs`:
    worker processes for the probes, as in claim_baselines. Raises SelectivityUnavailable when no intent has
    MIN_FIT_ROWS training rows, or no scored row asks one that has."""
    from qanchor_lab.embedder import CachedEmbedder
    from qanchor_lab.pipeline import GENERIC_QUERY

    generic_query = generic_query if generic_query is not None else GENERIC_QUERY
    scored, train = claim_rows(world, split=split, max_pairs=max_pairs, seed=seed)
    if store is None:
        store = model.behaviour(world.events, world.profiles,
                                sorted(set(scored["user_id"]) | set(train["user_id"])))
    # the rows the probes fit on (at most max_train_per_intent pretrain rows per intent) and score
    fit_rows = []
    for intent, t in train.groupby("intent", sort=True):
        if max_train_per_intent is not None and len(t) > max_train_per_intent:
            t = t.iloc[np.sort(np.random.default_rng(seed).choice(len(t), max_train_per_intent, replace=False))]
        if len(t) >= MIN_FIT_ROWS:
            fit_rows.append(t)
    if not fit_rows:
        raise SelectivityUnavailable(f"query_selectivity: no intent has {MIN_FIT_ROWS} or more pretrain QA rows to fit "
                                     "a probe on")
    train = pd.concat(fit_rows, ignore_index=True)
    scored = scored[scored["intent"].isin(set(train["intent"]))].reset_index(drop=True)
    if scored.empty:
        raise SelectivityUnavailable(f"query_selectivity: no {split} QA row asks an intent with {MIN_FIT_ROWS} or more "
                                     "pretrain rows")
    rows = pd.concat([train, scored], ignore_index=True)
    catalogue = intent_catalogue(world.qa)
    own_query = [catalogue[i].query for i in rows["intent"]]
    # one pass: each user's own rows and one generic row, so every prefix is computed once for both
    users = list(dict.fromkeys(rows["user_id"]))
    both = CachedEmbedder(model.eval(), store).encode_pairs(
        rows["user_id"].tolist() + users, own_query + [generic_query] * len(users), batch_size=batch_size,
        show_progress_bar=show_progress)                                                # (rows + users, d)
    own, generic = both[:len(rows)], both[len(rows):]                                   # (rows, d), (users, d)
    generic = generic[pd.Index(users).get_indexer(rows["user_id"])]                     # (rows, d)
    is_train = np.arange(len(rows)) < len(train)
    results, fits = [], []
    for intent in sorted(scored["intent"].unique()):
        this = (rows["intent"] == intent).to_numpy()
        it, is_ = np.flatnonzero(this & is_train), np.flatnonzero(this & ~is_train)
        y = rows["claim"].to_numpy()[it]
        majority = _majority_claim(y)
        row = rows.iloc[is_][["intent", "claim"]].copy()
        row["source"] = catalogue[intent].source
        row["majority_hit"] = (row["claim"] == majority).to_numpy()
        results.append(row)
        fits += [("probe", emb[it], y, emb[is_]) for emb in (own, generic)]
    preds = iter(fit_map(claim_predictions, fits, n_jobs, desc="selectivity probes", show_progress=show_progress))
    for row in results:
        for name in ("own", "generic"):
            row[f"{name}_hit"] = next(preds) == row["claim"].to_numpy()
    rows = pd.concat(results, ignore_index=True)

    return _selectivity_table(rows)


def _selectivity_summary(g: pd.DataFrame, with_ci: bool = True) -> dict[str, Any]:
    """n, own/generic/majority accuracy and own - generic (with a paired 95% CI over rows) of per-row hits."""
    diff = g["own_hit"].to_numpy(float) - g["generic_hit"].to_numpy(float)
    out = {"n": int(len(g)), "own_acc": float(g["own_hit"].mean()), "generic_acc": float(g["generic_hit"].mean()),
           "majority_acc": float(g["majority_hit"].mean()), "selectivity": float(diff.mean())}
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if with_ci and len(diff) > 1 else math.nan
    out.update(selectivity_low=out["selectivity"] - half, selectivity_high=out["selectivity"] + half)
    return out


def _selectivity_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-row hits (intent, source, own_hit, generic_hit, majority_hit) -> one row per intent, then `overall`."""
    per_intent = [{"intent": i, "source": g["source"].iloc[0], **_selectivity_summary(g, with_ci=False)}
                  for i, g in rows.groupby("intent", sort=True)]
    per_intent.sort(key=lambda r: (r["source"], r["intent"]))
    return pd.DataFrame(per_intent + _overall_rows(rows, _selectivity_summary))


def tune_selectivity(model, world, users: Sequence[str] | str = "tune", *, max_users: int | None = 600,
                     folds: int = 5, generic_query: str | None = None, seed: int = 0, store=None,
                     batch_size: int = 256, show_progress: bool = False, n_jobs: int | None = None) -> pd.DataFrame:
    """query_selectivity on users the model never trained on, with every user answering every question.

    The D_uqa claims of `users` (default: up to `max_users` tune users drawn with `seed`) come from their
    history window as the model reads it (its FeatureSpec's), as perfect_qa_learner_r2 derives them; per intent, a
    logistic probe of the claim is cross-validated over those users (`folds`, shuffled by `seed`), reading each
    user's embedding under the intent's own query or under the generic query. The sample is users x intents rows, where
    query_selectivity scores a few hundred pretrain_val QA rows, whose mean moves by a few hundredths with
    the draw (docs/design.md §7.27). The same columns and `overall` rows as query_selectivity; majority_acc
    is the fit folds' most common claim. Intents with one claim among these users are left out. Costs one
    embedding per user and intent (about a minute per model for 600 users on 2 cores). Needs the synthetic
    world's history window or a derived-QA fit (as perfect_qa_learner_r2). `n_jobs` as in query_selectivity."""
    from qanchor_lab.embedder import CachedEmbedder
    from qanchor_lab.pipeline import GENERIC_QUERY

    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    generic_query = generic_query if generic_query is not None else GENERIC_QUERY
    users = sample_users(world, users, max_users, seed) if isinstance(users, str) else _check_users(world, users)
    if len(users) < folds:
        raise ValueError(f"tune_selectivity: {len(users)} user(s) cannot be split into folds={folds}")
    claims, _ = _uqa_claims(world, users, window=model.feature_spec.window)            # (U, D_uqa intents)
    catalogue = intent_catalogue(world.qa)
    intents = [i for i in claims.columns if i in catalogue and claims[i].nunique() > 1]
    if not intents:
        raise ValueError("tune_selectivity: no D_uqa intent of the QA table has two or more claims among these users")
    queries = [catalogue[i].query for i in intents] + [generic_query]
    if store is None:
        store = model.behaviour(world.events, world.profiles, users)
    # every user under every own query and the generic one: each prefix computed once for all of them
    E = np.asarray(CachedEmbedder(model.eval(), store).encode_pairs(
        [u for u in users for _ in queries], queries * len(users), batch_size=batch_size,
        show_progress_bar=show_progress)).reshape(len(users), len(queries), -1)     # (U, I+1, d)
    splits = list(KFold(folds, shuffle=True, random_state=seed).split(np.arange(len(users))))
    truth = {i: claims[i].astype(str).to_numpy() for i in intents}                   # (U,) each
    fits = [("probe", E[fit, col], truth[i][fit], E[held, col])
            for j, i in enumerate(intents) for fit, held in splits for col in (j, -1)]
    preds = iter(fit_map(claim_predictions, fits, n_jobs, desc="tune selectivity probes", show_progress=show_progress))
    rows = []
    for i in intents:
        y = truth[i]
        own, generic, majority = (np.empty(len(y), dtype=object) for _ in range(3))
        for fit, held in splits:
            own[held], generic[held] = next(preds), next(preds)
            majority[held] = _majority_claim(y[fit])
        rows.append(pd.DataFrame({"intent": i, "source": catalogue[i].source, "own_hit": own == y,
                                  "generic_hit": generic == y, "majority_hit": majority == y}))
    return _selectivity_table(pd.concat(rows, ignore_index=True))


# ----------------------------------------------------------------------------------------------
# what the QA table could teach at best


PERFECT_QA_NOTE = ("D_future intents ({n}) are left out: their claims come from a future window that downstream "
                   "users do not have in the world. The one-hot D_uqa claims are what a model that learned every "
                   "D_uqa answer perfectly would know.")
NO_ORACLE_TARGET = ("the labels carry no oracle_prob (real data), so the target is the 0/1 task label itself: "
                    "R² of a linear probability model, bounded well below 1 by the label noise")


def _uqa_claims(world, users: Sequence[str], *,
                window: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(users, D_uqa intents) claims from the history window, and the D_future intents left out: the
    world's derived-QA fit when its QA was derived from the log (manifest `derived_qa`), else the
    synthetic world's INTENTS over the manifest's history window.

    `window`: the (start, end) history window the model and the feature probe read (`FeatureSpec.window`). A
    derived world gives its downstream users a cutoff at the end of the log, while a window inferred from the
    pre-training users ends at their (earlier) cutoff: the claims are derived from the events inside the window
    only, each cutoff clipped at its end, so that they hold nothing the model never sees. None: each user's own
    cutoff (the synthetic world's claims read its declared window, which the features share)."""
    ids = pd.Index(users)
    derived = (world.manifest or {}).get("derived_qa")
    if derived:
        from qanchor_lab.derive_qa import DeriveQAConfig, claims_for, split_log
        from qanchor_lab.features import events_in_window

        fit = derived["fit"]
        if "cutoff" not in world.users.columns:
            raise ValueError("perfect_qa_learner_r2: the world's QA was derived but its users table lacks the "
                             "'cutoff' column (see derive_qa.derive_world_qa)")
        cutoff = pd.to_datetime(world.users.set_index("user_id").loc[ids, "cutoff"])
        if window is not None:
            cutoff = cutoff.clip(upper=pd.Timestamp(window[1]))
        # D_uqa: the input window only, [cutoff - history_days, cutoff) as the pre-training users' answers read it
        windows = pd.DataFrame({"cutoff": cutoff, "window_start": pd.NaT, "window_end": pd.NaT}, index=ids)
        history_days = DeriveQAConfig.from_dict(fit["config"]).history_days
        inputs, _ = split_log(events_in_window(world.events[world.events["user_id"].isin(ids)], window), windows,
                              history_days)
        claims = claims_for(inputs, windows, fit, profiles=world.profiles)
        future = [i for i in fit["kept"] if i not in claims.columns]
        return claims, future
    cfg = world.manifest.get("config", {}) if world.manifest else {}
    if "start_date" not in cfg or "history_days" not in cfg:
        raise ValueError("perfect_qa_learner_r2: the world's manifest lacks config.start_date/history_days, "
                         "which the evidence window needs, and has no derived_qa fit")
    evidence = build_evidence(world.events[world.events["user_id"].isin(ids)],
                              world.profiles[world.profiles["user_id"].isin(ids)],
                              start_date=cfg["start_date"], history_days=int(cfg["history_days"]))
    evidence = evidence.reindex(ids)
    uqa = [i for i, it in INTENTS.items() if it.source == "uqa"]
    future = [i for i, it in INTENTS.items() if it.source != "uqa"]
    return pd.DataFrame({i: INTENTS[i].claim(evidence) for i in uqa}, index=ids), future


def perfect_qa_learner_r2(world, users: Sequence[str] | str = "tune", *, feature_spec=None, folds: int = 5,
                          seed: int = 0) -> dict[str, Any]:
    """Ridge R² of the one-hot D_uqa claims of `users` against each task's target, next to the R² of the
    FeatureSpec vector (the model's tabular input) for the same users.

    The target is the oracle score (logit of oracle_prob) in the synthetic world and the 0/1 task label
    where the dataset has no oracle. Claims are the synthetic INTENTS' over the history window, or, for a
    world whose QA was derived from its log (`derive_qa`), the derived D_uqa intents under the stored fit, read
    through the FeatureSpec's window as the features are (`_uqa_claims`). `feature_spec` defaults to one fitted on
    the world's `pretrain` users over its declared history window, as the demo's model is. Needs users with labels."""
    from qanchor_lab.features import FeatureSpec

    users = _check_users(world, users)
    target, target_name = task_targets(world, users)
    if target.shape[1] == 0:
        raise ValueError("perfect_qa_learner_r2 needs users with task labels (the tune split), "
                         f"the {len(users)} given have none")
    spec = FeatureSpec.from_dict(feature_spec) if isinstance(feature_spec, dict) else feature_spec
    if spec is None:
        start, end = world.history_window
        spec = FeatureSpec.fit(world.events, world.profiles, user_ids=world.users_in("pretrain"),
                               window_start=start, window_end=end, modalities=world.modality_specs)
    # the claims read the features' window: the two are compared on the same days
    claims, future = _uqa_claims(world, users, window=spec.window)
    onehot = pd.get_dummies(claims.astype(str), prefix_sep="=").to_numpy(np.float64)   # (U, sum of claims)
    feats = spec.transform(world.events, world.profiles, users, standardize=True)     # (U, F)
    Y = target.to_numpy()
    r2_claims = probe_r2_many(onehot, Y, folds=folds, seed=seed)
    r2_feats = probe_r2_many(feats, Y, folds=folds, seed=seed)
    return {
        "n_users": len(users), "n_intents": int(claims.shape[1]), "n_columns": int(onehot.shape[1]),
        "target": target_name,
        "claims_r2": float(r2_claims.mean()), "features_r2": float(r2_feats.mean()),
        "per_task": [{"task_id": t, "claims_r2": float(a), "features_r2": float(b)}
                     for t, a, b in zip(target.columns, r2_claims, r2_feats)],
        "left_out_intents": future,
        "note": PERFECT_QA_NOTE.format(n=len(future)) + ("" if target_name == "oracle_logit" else f" Here {NO_ORACLE_TARGET}."),
    }


# ----------------------------------------------------------------------------------------------
# everything together


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]


def _plain(v: Any) -> Any:
    """JSON-safe scalar: numpy types to Python, NaN/inf to None."""
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, pd.DataFrame):
        return _records(x)
    return _plain(x)


def _store_key(model) -> str:
    c = model.config
    return json.dumps([c.text_encoder, c.feature_spec, list(c.modalities), c.max_events], sort_keys=True, default=str)


def diagnose(model, world, *, untrained=None, query: str | None = None, max_users: int | None = 1500,
             max_pairs: int | None = 600, geometry_users: int | None = 500, selectivity: bool = True,
             tune_selectivity_users: int = 0, seed: int = 0, show_progress: bool = False,
             n_jobs: int | None = None) -> dict[str, Any]:
    """Every diagnostic for `model` (and `untrained`, when given, side by side) as a JSON-able dict.

    Stage probes use up to `max_users` tune users (drawn with `seed`), query geometry the first
    `geometry_users` of them; claim accuracy and query selectivity (`selectivity=False` skips it) use up to
    `max_pairs` pretrain_val QA rows; `tune_selectivity_users` > 0 adds tune_selectivity over that many of the
    probed tune users (every D_uqa question, cross-validated: the steadier read, at about a minute per model and
    600 users). `query`
    defaults to the first task's query; geometry runs over every task query plus the generic query. `n_jobs`:
    worker processes for the claim yardstick's and the selectivity probes' fits (None: this process; -1: every
    core); the same numbers for any value.

    Keys: query, seed, n_users, max_pairs, geometry_users, retention_target, models, stages / geometry /
    claims / selectivity / tune_selectivity ({model name: stage table records / query_geometry dict / claim table
    records / query_selectivity records / tune_selectivity records, when asked for}), summary
    ({model name: headline numbers}), perfect_qa (model-free), seconds; selectivity_skipped (why) where the world has
    too few QA rows for query_selectivity (`SelectivityUnavailable`): the rest is still measured; geometry_note where
    a task asks the generic query itself (left out of the task gains, see query_geometry)."""
    from qanchor_lab.pipeline import GENERIC_QUERY

    if tune_selectivity_users < 0:
        raise ValueError(f"tune_selectivity_users must be >= 0 (0 skips it), got {tune_selectivity_users}")
    t0 = time.perf_counter()
    models = {"trained": model, **({"untrained": untrained} if untrained is not None else {})}
    queries = world.tasks["query"].tolist()
    query = query if query is not None else queries[0]
    users = sample_users(world, "tune", max_users, seed)
    claim_users = world.users_in("pretrain", "pretrain_val")
    stores: dict[str, Any] = {}
    baselines: dict[str, pd.DataFrame] = {}
    out: dict[str, Any] = {"query": query, "seed": seed, "n_users": len(users), "max_pairs": max_pairs,
                           "stage_target": task_targets(world, users)[1],
                           "geometry_users": len(users[:geometry_users]),
                           "retention_target": RETENTION_TARGET, "models": list(models),
                           "stages": {}, "geometry": {}, "claims": {}, "selectivity": {}, "tune_selectivity": {},
                           "summary": {}}
    generic_tasks = world.tasks.loc[world.tasks["query"] == GENERIC_QUERY, "task_id"].astype(str).tolist()
    if generic_tasks:  # query_geometry leaves them out of the task gains; say so beside the numbers
        out["geometry_note"] = (f"task(s) {', '.join(generic_tasks)} ask the generic query itself: the embedding "
                                "under their query is the reference's, a read and lead gain of 0 by construction, "
                                "so they are left out of the task gains' means")
    for name, m in models.items():
        m.eval()
        key = _store_key(m)
        if key not in stores:  # one store per distinct input packing (same config: shared)
            stores[key] = m.behaviour(world.events, world.profiles, list(dict.fromkeys(users + claim_users)))
            baselines[key] = claim_baselines(world, stores[key], max_pairs=max_pairs, seed=seed,
                                             show_progress=show_progress, n_jobs=n_jobs)
        store = stores[key]
        stages = stage_probe_table(m, world, users, query, store=store, seed=seed, show_progress=show_progress)
        geometry = query_geometry(m, store, users[:geometry_users], queries + [GENERIC_QUERY],
                                  reference_query=GENERIC_QUERY, show_progress=show_progress,
                                  targets=task_query_targets(world, users[:geometry_users]))
        claims = claim_accuracy(m, world, store=store, baselines=baselines[key], show_progress=show_progress)
        overall = _overall_all(claims)
        emb = stages[stages["stage"] == "embedding"].iloc[0]
        tab = stages[stages["stage"] == "input_tabular"].iloc[0]
        out["stages"][name] = _records(stages)
        out["geometry"][name] = geometry
        out["claims"][name] = _records(claims)
        out["summary"][name] = {
            "input_tabular_oracle_r2": tab["oracle_r2"], "embedding_oracle_r2": emb["oracle_r2"],
            "embedding_retention": emb["retention"],
            "meets_retention_target": bool(emb["retention"] >= RETENTION_TARGET),
            "embedding_trait_mean_r2": emb["trait_mean_r2"], "effective_dim_mean": geometry["effective_dim_mean"],
            "same_user_cos": geometry["same_user_cos"], "cross_user_cos": geometry["cross_user_cos"],
            "user_share": geometry["user_share"], "query_share": geometry["query_share"],
            "interaction_share": geometry["interaction_share"], "novelty_mean": geometry["novelty_mean"],
            "task_read_gain": geometry["task_read_gain_mean"], "task_read_gain_low": geometry["task_read_gain_low"],
            "task_read_gain_high": geometry["task_read_gain_high"],
            "task_lead_gain": geometry["task_lead_gain_mean"], "task_lead_gain_low": geometry["task_lead_gain_low"],
            "task_lead_gain_high": geometry["task_lead_gain_high"],
            "claim_acc": overall["model_acc"], "majority_acc": overall["majority_acc"],
            "logreg_acc": overall["logreg_acc"], "gbdt_acc": overall["gbdt_acc"],
            "own_answer_margin": overall["own_answer_margin"],
        }
        if selectivity and "selectivity_skipped" not in out:
            try:
                sel = query_selectivity(m, world, max_pairs=max_pairs, seed=seed, store=store,
                                        show_progress=show_progress, n_jobs=n_jobs)
            except SelectivityUnavailable as exc:   # too few QA rows (a small world): every model would fail alike
                out["selectivity_skipped"] = str(exc)
            else:
                top = _overall_all(sel)
                out["selectivity"][name] = _records(sel)
                out["summary"][name].update(own_query_probe_acc=top["own_acc"],
                                            generic_query_probe_acc=top["generic_acc"],
                                            query_selectivity=top["selectivity"],
                                            query_selectivity_low=top["selectivity_low"],
                                            query_selectivity_high=top["selectivity_high"])
        if tune_selectivity_users:
            sel = tune_selectivity(m, world, users[:tune_selectivity_users], seed=seed, store=store,
                                   show_progress=show_progress, n_jobs=n_jobs)
            top = _overall_all(sel)
            out["tune_selectivity"][name] = _records(sel)
            out["summary"][name].update(tune_query_selectivity=top["selectivity"],
                                        tune_query_selectivity_low=top["selectivity_low"],
                                        tune_query_selectivity_high=top["selectivity_high"])
    out["perfect_qa"] = perfect_qa_learner_r2(world, users, feature_spec=model.config.feature_spec, seed=seed)
    out["seconds"] = time.perf_counter() - t0
    return _jsonable(out)


# ----------------------------------------------------------------------------------------------
# rendering


class TargetWords(NamedTuple):
    """How the renderings name the probes' task target (`target_words`)."""

    noun: str    # what the target is: "oracle score" / "0/1 task label"
    r2: str      # what a probe's R² against it is called: "oracle-score R²" / "task-label R²"
    caveat: str  # "" for the oracle; for labels, what the *_oracle_r2 columns then hold and why the R² stays low


def target_words(target: str | None) -> TargetWords:
    """The wording for a probe target as `task_targets` names it ("oracle_logit" or "label"; a diagnose dict's
    `stage_target`, perfect_qa's `target`). The Markdown, the HTML section and the stage figure all read it here, so
    none calls a task label's R² an oracle score's. None (a diagnostics dict older than `stage_target`): the oracle
    score, the only target there was."""
    if target in (None, "oracle_logit"):
        return TargetWords("oracle score", "oracle-score R²", "")
    if target == "label":
        return TargetWords("0/1 task label", "task-label R²", "The *_oracle_r2 columns hold the R² against the 0/1 "
                           f"task labels here: {NO_ORACLE_TARGET}.")
    raise ValueError(f"unknown probe target {target!r}: expected 'oracle_logit' or 'label' (task_targets)")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def _stage_tables(diag: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{model: stage-table records} from a `diagnose` dict or a {model: stage_probe_table frame} mapping."""
    tables = diag["stages"] if "stages" in diag else diag
    return {name: t.to_dict("records") if isinstance(t, pd.DataFrame) else list(t) for name, t in tables.items()}


def stage_comparison(diag: Mapping[str, Any], metric: str = "oracle_r2") -> pd.DataFrame:
    """(stage x model) table of one stage-table column, stages in data-flow order. `diag` is a `diagnose`
    dict or a {model name: stage_probe_table} mapping."""
    tables = _stage_tables(diag)
    cols = {name: {r["stage"]: r.get(metric) for r in rows} for name, rows in tables.items()}
    order = [r["stage"] for r in next(iter(tables.values()))]
    return pd.DataFrame(cols).reindex(order).astype(float)


def claim_comparison(diag: Mapping[str, Any]) -> pd.DataFrame:
    """Claim accuracy of every model side by side: acc_<model> and margin_<model> next to the baselines
    (which do not depend on the model)."""
    merged = None
    for name, rows in diag["claims"].items():
        t = pd.DataFrame(rows).rename(columns={"model_acc": f"acc_{name}", "own_answer_margin": f"margin_{name}"})
        merged = t if merged is None else merged.merge(
            t[["intent", "source", f"acc_{name}", f"margin_{name}"]], on=["intent", "source"], how="left")
    return merged


def diagnostics_markdown(diag: Mapping[str, Any]) -> str:
    """The diagnostics as Markdown: headline, stage probes, geometry, claim accuracy, perfect QA learner."""
    names = list(diag["models"])
    parts = [f"# Representation diagnostics\n\nquery: *{diag['query']}*; {diag['n_users']} tune users; "
             f"seed {diag['seed']}; {diag.get('seconds', 0):.0f} s"]
    head = [{"model": n, **diag["summary"][n]} for n in names]
    parts.append("## Headline\n\n" + _md_table(head, [
        "model", "input_tabular_oracle_r2", "embedding_oracle_r2", "embedding_retention", "meets_retention_target",
        "claim_acc", "majority_acc", "gbdt_acc", "effective_dim_mean", "same_user_cos", "cross_user_cos"]))
    words = target_words(diag.get("stage_target"))
    parts[-1] += (f"\n\nretention target: the embedding keeps >= {diag['retention_target']:.0%} of the tabular input's "
                  f"{words.r2} (ridge probe, 5-fold)." + (f" {words.caveat}" if words.caveat else ""))
    first = names[0]
    trait_cols = [k for k in diag["stages"][first][0] if k.startswith("trait:")]
    for metric, title in (("oracle_r2", f"{words.r2[0].upper()}{words.r2[1:]} per stage (mean over tasks)"),
                          ("retention", f"Retention per stage ({words.r2} / input_tabular's)"),
                          ("trait_mean_r2", "Latent-trait R² per stage (mean over traits and trends)")):
        if metric == "trait_mean_r2" and not trait_cols:
            continue  # real data: no latent traits
        comp = stage_comparison(diag, metric)
        recs = [{"stage": s, **{n: comp.loc[s, n] for n in comp.columns}} for s in comp.index]
        parts.append(f"## {title}\n\n" + _md_table(recs, ["stage", *comp.columns]))
    if trait_cols:
        parts.append(f"## Trait R² per stage ({first})\n\n"
                     + _md_table(diag["stages"][first], ["stage", *trait_cols]).replace("trait:", ""))
    geo = [{"model": n, **{k: v for k, v in diag["geometry"][n].items() if k != "per_query"}} for n in names]
    parts.append("## Query geometry\n\n" + _md_table(geo, [
        "model", "effective_dim_mean", "embed_dim", "same_user_cos", "cross_user_cos", "user_share", "query_share",
        "interaction_share", "novelty_mean", "task_read_gain_mean", "task_read_gain_low", "task_read_gain_high",
        "task_lead_gain_mean", "task_lead_gain_low", "task_lead_gain_high"])
        + "\n\nnovelty: share of a task query's embedding that no linear map of the generic query's embedding predicts "
          "(out-of-fold ridge); a probe refitted per task can gain from the question only through it. "
          f"task_read_gain: {words.r2} of each task from the embedding under its own query minus under the generic "
          "query (same folds), averaged over tasks: above zero, the question keeps more of its task; _low / _high: "
          "its 95% interval, users resampled (the probes fixed, so it understates the noise). "
          "task_lead_gain: the share of each task's target on the embedding's two leading principal components under "
          "its own query minus under the generic query, averaged over tasks: above zero, the question puts its task "
          "first, which a probe fitted on few labels can use (`label-curve`); _low / _high: its 95% interval, users "
          "resampled (the hull of the basic and percentile intervals: resamples can reorder nearly tied leading "
          "directions)." + (f" Note: {diag['geometry_note']}." if diag.get("geometry_note") else ""))
    perq = [{"query": r["query"], **{f"dim_{n}": diag["geometry"][n]["per_query"][i]["effective_dim"] for n in names},
             **{f"novelty_{n}": diag["geometry"][n]["per_query"][i].get("novelty") for n in names},
             **{f"read_gain_{n}": _read_gain(diag["geometry"][n]["per_query"][i]) for n in names},
             **{f"lead_gain_{n}": _lead_gain(diag["geometry"][n]["per_query"][i]) for n in names}}
            for i, r in enumerate(diag["geometry"][first]["per_query"])]
    parts.append("Effective dimensionality, novelty, task read gain and task lead gain per query:\n\n" + _md_table(
        perq, ["query", *[f"dim_{n}" for n in names], *[f"novelty_{n}" for n in names],
               *[f"read_gain_{n}" for n in names], *[f"lead_gain_{n}" for n in names]]))
    parts.append("## Claim accuracy (pretrain_val QA rows)\n\n" + _md_table(claim_comparison(diag).to_dict("records"), [
        "intent", "source", "n", *[f"acc_{n}" for n in names], "majority_acc", "logreg_acc", "gbdt_acc",
        *[f"margin_{n}" for n in names]])
        + "\n\nacc_*: share of rows whose nearest answer wording states the true claim; majority / logreg / gbdt: "
          "the intent's most common claim and classifiers on the tabular input, fitted on pretrain rows; "
          "margin_*: cos(anchor, own answer) - mean cos(anchor, other-claim answers).")
    if diag.get("selectivity"):
        sel = [{"model": n, **r} for n in names for r in diag["selectivity"][n] if r["intent"] == "overall"]
        parts.append("## Query selectivity (pretrain_val QA rows)\n\n" + _md_table(sel, [
            "model", "source", "n", "own_acc", "generic_acc", "majority_acc", "selectivity", "selectivity_low",
            "selectivity_high"])
            + "\n\nA logistic probe of the claim, fitted per intent on pretrain rows, reading the embedding under the "
              "intent's own query (own_acc) or the generic query (generic_acc); selectivity = own - generic with a "
              "paired 95% CI. Above zero: the question makes the embedding more informative about its own answer. "
              "With a few hundred rows its mean moves by a few hundredths with the draw; the tune-user version "
              "(the demo's quick look, or `diagnose RUN --tune-selectivity-users 600`) is the steadier read.")
    elif diag.get("selectivity_skipped"):
        parts.append(f"## Query selectivity (pretrain_val QA rows)\n\nSkipped: {diag['selectivity_skipped']}.")
    if diag.get("tune_selectivity"):
        sel = [{"model": n, **r} for n in names for r in diag["tune_selectivity"].get(n, []) if r["intent"] == "overall"
               and r["source"] == "all"]
        parts.append("## Query selectivity on tune users (every D_uqa question, cross-validated)\n\n" + _md_table(sel, [
            "model", "n", "own_acc", "generic_acc", "majority_acc", "selectivity", "selectivity_low",
            "selectivity_high"])
            + "\n\nThe same probe, cross-validated over tune users (never trained on), each answering every D_uqa "
              "question from their history window; n = users x intents.")
    pq = diag["perfect_qa"]
    parts.append(f"## Perfect QA learner\n\nOne-hot D_uqa claims ({pq['n_intents']} intents, {pq['n_columns']} "
                 f"columns) vs the FeatureSpec vector, ridge R² against the "
                 f"{target_words(pq.get('target')).noun} on {pq['n_users']} tune users: "
                 f"claims {_fmt(pq['claims_r2'])}, features {_fmt(pq['features_r2'])}.\n\n"
                 + _md_table(pq["per_task"], ["task_id", "claims_r2", "features_r2"]) + f"\n\nNote: {pq['note']}")
    return "\n\n".join(parts) + "\n"


def figure_stage_r2(diag: Mapping[str, Any], metric: str = "oracle_r2", *, target: str | None = None):
    """Plotly grouped bars of one stage-table column per stage, one bar per model (untrained vs trained).
    `diag` is a `diagnose` dict or a {model name: stage_probe_table} mapping. `target`: what the task probes read
    ("oracle_logit" or "label", as `task_targets` names it), for the axis title; by default a diagnose dict's
    `stage_target`, while a bare mapping, which does not say, keeps the column's name."""
    import plotly.graph_objects as go

    comp = stage_comparison(diag, metric)
    if target is None and "stages" in diag:
        target = diag.get("stage_target", "oracle_logit")
    r2 = target_words(target).r2 if target is not None else None
    what, axis = ({"oracle_r2": (r2, r2), "retention": ("retention", f"retention ({r2} / input_tabular's)")}
                  if r2 else {}).get(metric, (metric, metric))
    colours = {"untrained": "#9c9ede", "trained": "#006d2c"}
    fig = go.Figure()
    for name in sorted(comp.columns, key=lambda n: n != "untrained"):   # untrained first, as in time
        fig.add_bar(x=list(comp.index), y=comp[name].tolist(), name=name, marker_color=colours.get(name),
                    hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>")
    if metric == "retention":
        fig.add_hline(y=RETENTION_TARGET, line=dict(color="#999", dash="dot"), annotation_text="target")
    title = f"Probe {what} per stage" + (f" (query: {diag['query']})" if "query" in diag else "")
    fig.update_layout(title=title, barmode="group",
                      template="plotly_white", height=420, yaxis=dict(title=axis),
                      legend=dict(orientation="h", y=-0.3), margin=dict(l=60, r=20, t=60, b=40))
    return fig


def save_diagnostics(diag: Mapping[str, Any], out_dir) -> tuple[Path, Path]:
    """Write diagnostics.json and diagnostics.md into `out_dir`; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "diagnostics.json", out_dir / "diagnostics.md"
    js.write_text(json.dumps(_jsonable(diag), indent=2))
    md.write_text(diagnostics_markdown(diag))
    return js, md


# ----------------------------------------------------------------------------------------------
# command line helpers


def run_model_dir(run) -> Path:
    """The saved model directory of a run directory holding `model/`, or a saved model directory itself."""
    from qanchor_lab.model import CONFIG_NAME

    run = Path(run)
    for candidate in (run, run / "model"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{run} is neither a run directory with model/{CONFIG_NAME} nor a saved model "
                            f"directory (no {CONFIG_NAME})")


def run_marker(run, *, missing: str | None = None) -> dict | None:
    """A run's demo_config.json (in the run directory, or next to a saved model directory given itself) as written:
    what the model depends on (`pipeline.run_key`), with the dataset directory under "data" when the run read a
    user's own tables. None where there is no marker, or a ValueError that ends with `missing` (what to give
    instead) when that is set."""
    from qanchor_lab.pipeline import RUN_MARKER, _read_marker

    run = Path(run)
    candidates = [run / RUN_MARKER] + ([run.parent / RUN_MARKER] if run_model_dir(run) == run else [])
    marker = next((c for c in candidates if c.is_file()), None)
    if marker is None:
        if missing is None:
            return None
        raise ValueError(f"no demo_config.json found for {run} (looked at {', '.join(map(str, candidates))}); "
                         + missing)
    held = _read_marker(marker)
    if not held:   # cut short (an interrupted write) or not a JSON object: it says nothing about the run
        raise ValueError(f"{marker} is not a readable run marker (cut short, or not a JSON object); run the demo "
                         f"again to rewrite it" + (f", or {missing}" if missing else ""))
    return held


def run_demo_config(run, *, missing: str | None = None):
    """The `pipeline.DemoConfig` a run was made with (`run_marker`); the evaluation fields, which the marker leaves
    out, come back at their defaults. None, or `run_marker`'s error, where there is no marker."""
    from dataclasses import fields

    from qanchor_lab.pipeline import DemoConfig

    marker = run_marker(run, missing=missing)
    if marker is None:
        return None
    known = {f.name for f in fields(DemoConfig)}
    return DemoConfig(**{k: v for k, v in marker.items() if k in known})


def resolve_run(run, data=None) -> tuple[Path, Path]:
    """(model dir, dataset dir) for a run directory holding `model/` (or a saved model directory itself).

    The dataset directory is `data` when given, else the one the run's demo_config.json names (a user's own
    tables, `demo --data DIR`) or implies through `pipeline.world_dir` (the synthetic world, MovieLens)."""
    from qanchor_lab.pipeline import world_dir

    model_dir = run_model_dir(run)
    if data is None:
        marker = run_marker(run, missing="pass the world directory with --data")
        data = marker.get("data") or world_dir(run_demo_config(run))
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"world directory {data} does not exist")
    return model_dir, data


def load_run(run, data=None) -> tuple[Path, Any]:
    """(model dir, World) of a run, its dataset read as the run read it: a saved world directory (every table a
    Parquet file) as it is; a directory of your own tables (data/README.md) through `pipeline.load_dataset`, so
    that a dataset without a qa table gets the QA pairs pre-training derived from it (the run's seed, else the
    demo's default, as `pretrain --data` uses)."""
    from qanchor_lab.data import load_world
    from qanchor_lab.pipeline import DemoConfig, load_dataset
    from qanchor_lab.schema import TABLES

    model_dir, data_dir = resolve_run(run, data)
    users_own = data is None and bool((run_marker(run) or {}).get("data"))   # the run read it with load_dataset
    if not users_own and all((data_dir / f"{t}.parquet").is_file() for t in TABLES):
        return model_dir, load_world(data_dir)
    seed = (run_demo_config(run) or DemoConfig()).seed
    return model_dir, load_dataset(data_dir, seed=seed)
