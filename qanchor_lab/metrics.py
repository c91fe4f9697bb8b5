"""Evaluation metrics: AUC and KS per task, domain/overall summaries, and user-level bootstrap CIs.

KS is `max(TPR - FPR)` over thresholds, as in the paper. The bootstraps resample USERS (one draw
shared by every task and, for the paired test, by both methods), so the intervals account for the
correlation between tasks and between methods scored on the same people.

The bootstraps are vectorised: each task's scores are sorted once, and a resample is a vector of
per-user multiplicities, so weighted AUC and KS over all resamples are cumulative sums over the
sorted order (1000 resamples x 10 tasks x 1500 users take well under a second). `Resamples` shares one set of
resamples among many methods and computes each method's resampled metrics once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, get_args

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from qanchor_lab.data import DataValidationError, require_columns, validate_labels, validate_tasks
from qanchor_lab.schema import DOMAINS

Metric = Literal["auc", "ks"]
Alternative = Literal["greater", "two-sided"]
METRICS: tuple[str, ...] = get_args(Metric)
ALTERNATIVES: tuple[str, ...] = get_args(Alternative)
SCORE_COLUMNS = ("user_id", "task_id", "score")
# Resamples where some task has a single class are dropped; fewer valid ones than this share is an error.
MIN_VALID_SHARE = 0.5


# ----------------------------------------------------------------------------------------------
# single-task metrics


def _check_binary(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-d; got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"y_true and y_score differ in length: {len(y)} vs {len(s)}")
    if len(y) == 0:
        raise ValueError("y_true and y_score are empty")
    try:
        yf = y.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y_true must hold 0/1 labels; found {sorted(set(y.tolist()))[:5]}") from None
    bad_y = (yf != 0) & (yf != 1)
    if bad_y.any():
        raise ValueError(f"y_true must hold 0/1 labels; found {sorted(set(y[bad_y].tolist()))[:5]}")
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        raise ValueError(
            f"y_score has {int(nonfinite.sum())} NaN or infinite value(s) at position(s) "
            f"{np.flatnonzero(nonfinite)[:5].tolist()}"
        )
    n_pos = int(yf.sum())
    if n_pos == 0 or n_pos == len(yf):
        raise ValueError(
            f"AUC/KS need both classes; y_true has only class {int(yf[0])} ({len(yf)} rows)"
        )
    return yf.astype(np.int64), s


def auc(y_true, y_score) -> float:
    """Area under the ROC curve (ties count one half)."""
    y, s = _check_binary(y_true, y_score)
    return float(roc_auc_score(y, s))


def ks(y_true, y_score) -> float:
    """Kolmogorov-Smirnov statistic: the largest gap TPR - FPR over thresholds."""
    y, s = _check_binary(y_true, y_score)
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.max(tpr - fpr))


_METRIC_FUNCS = {"auc": auc, "ks": ks}


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")


# ----------------------------------------------------------------------------------------------
# tables of scores


def score_frame(scores: pd.DataFrame, name: str = "scores") -> pd.DataFrame:
    """A (user_id, task_id, score) table's columns, coerced: string ids and float scores (NaN where a score is
    not a number). Raises, naming `name`, when a column is missing; checks nothing else."""
    require_columns(scores, SCORE_COLUMNS, name)
    return pd.DataFrame(
        {
            "user_id": scores["user_id"].astype("str").to_numpy(),
            "task_id": scores["task_id"].astype("str").to_numpy(),
            "score": pd.to_numeric(scores["score"], errors="coerce").to_numpy(dtype=np.float64),
        }
    )


def validate_scores(scores: pd.DataFrame, name: str = "scores") -> pd.DataFrame:
    """Check a (user_id, task_id, score) table: columns present, finite scores, unique pairs."""
    out = score_frame(scores, name)
    bad = ~np.isfinite(out["score"].to_numpy())
    if bad.any():
        rows = out.loc[bad, ["user_id", "task_id"]].head(5)
        pairs = ", ".join(f"({u!r}, {t!r})" for u, t in rows.itertuples(index=False))
        raw = scores["score"].to_numpy()[bad][:5].tolist()
        raise DataValidationError(
            f"{name}: column 'score' has {int(bad.sum())} missing, non-numeric or infinite value(s) "
            f"{raw!r} at (user, task) {pairs}"
        )
    dup = out.duplicated(subset=["user_id", "task_id"], keep=False).to_numpy()
    if dup.any():
        rows = out.loc[dup, ["user_id", "task_id"]].drop_duplicates().head(5)
        pairs = ", ".join(f"({u!r}, {t!r})" for u, t in rows.itertuples(index=False))
        raise DataValidationError(f"{name}: more than one score for (user, task) {pairs}")
    return out


def _joined(
    labels: pd.DataFrame, tasks: pd.DataFrame, scores: dict[str, pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels joined with each named score table as columns; error on any labelled pair with no score."""
    tasks = validate_tasks(tasks)
    joined = validate_labels(labels, tasks=tasks)[["user_id", "task_id", "label"]]
    for name, table in scores.items():
        sc = validate_scores(table, name).rename(columns={"score": name})
        joined = joined.merge(sc, on=["user_id", "task_id"], how="left", validate="one_to_one")
        absent = joined[name].isna().to_numpy()
        if absent.any():
            rows = joined.loc[absent, ["user_id", "task_id"]].head(5)
            pairs = ", ".join(f"({u!r}, {t!r})" for u, t in rows.itertuples(index=False))
            raise DataValidationError(
                f"{name}: {int(absent.sum())} labelled (user, task) pair(s) have no score, e.g. {pairs}"
            )
    # each merge leaves its column in a block of its own; a label curve's hundreds of score tables would make
    # pandas warn about a fragmented frame on the next insert, so the blocks are consolidated once
    return joined.copy(), tasks


def _task_order(joined: pd.DataFrame, tasks: pd.DataFrame) -> list[str]:
    """Tasks that have labels, in the tasks table's order."""
    present = set(joined["task_id"].unique())
    return [t for t in tasks["task_id"] if t in present]


def task_metrics(labels: pd.DataFrame, scores: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """One row per labelled task (tasks-table order): task_id, domain, auc, ks, n, positive_rate."""
    joined, tasks = _joined(labels, tasks, {"scores": scores})
    domain = dict(zip(tasks["task_id"], tasks["domain"]))
    rows = []
    for task_id, group in joined.groupby("task_id", sort=False):
        y = group["label"].to_numpy()
        s = group["scores"].to_numpy()
        try:
            rows.append(
                {
                    "task_id": task_id,
                    "domain": domain[task_id],
                    "auc": auc(y, s),
                    "ks": ks(y, s),
                    "n": int(len(y)),
                    "positive_rate": float(y.mean()),
                }
            )
        except ValueError as exc:
            raise DataValidationError(f"task {task_id!r}: {exc}") from None
    order = {t: i for i, t in enumerate(_task_order(joined, tasks))}
    rows.sort(key=lambda r: order[r["task_id"]])
    return pd.DataFrame(rows, columns=["task_id", "domain", "auc", "ks", "n", "positive_rate"])


def summarize(task_table: pd.DataFrame) -> dict:
    """Averages of a `task_metrics` table: overall mean over tasks, and the mean over each domain's tasks."""
    require_columns(task_table, ("task_id", "domain", "auc", "ks"), "task table")
    if len(task_table) == 0:
        raise DataValidationError("task table: no tasks to summarise")
    domains_present = list(dict.fromkeys(task_table["domain"]))
    ordered = [d for d in DOMAINS if d in domains_present] + [d for d in domains_present if d not in DOMAINS]
    by_domain = task_table.groupby("domain", sort=False)[["auc", "ks"]].mean()
    return {
        "avg_auc": float(task_table["auc"].mean()),
        "avg_ks": float(task_table["ks"].mean()),
        "domains": {d: {"auc": float(by_domain.loc[d, "auc"]), "ks": float(by_domain.loc[d, "ks"])} for d in ordered},
        "tasks": {
            str(r.task_id): {"auc": float(r.auc), "ks": float(r.ks)}
            for r in task_table[["task_id", "auc", "ks"]].itertuples(index=False)
        },
    }


# ----------------------------------------------------------------------------------------------
# weighted metrics over many resamples at once


@dataclass
class _SortedTask:
    """One task's labels and one method's scores, laid out for weighted AUC/KS over many resamples.

    Positives and negatives are each sorted by descending score; for every positive the counts of
    negatives above it and tied with it, and of positives at or above it, locate it in both orders."""

    pos_users: np.ndarray  # (P,) global user index of each positive, descending score
    neg_users: np.ndarray  # (N,) global user index of each negative, descending score
    neg_above: np.ndarray  # (P,) negatives scoring strictly higher than each positive
    neg_at_or_above: np.ndarray  # (P,) negatives scoring higher or equal
    pos_at_or_above: np.ndarray  # (P,) positives scoring higher or equal (itself included)


def _sort_task(user_idx: np.ndarray, y: np.ndarray, s: np.ndarray) -> _SortedTask:
    is_pos = y == 1
    p_order = np.argsort(-s[is_pos], kind="stable")
    n_order = np.argsort(-s[~is_pos], kind="stable")
    p_neg = -s[is_pos][p_order]  # (P,) ascending negated scores
    n_neg = -s[~is_pos][n_order]  # (N,)
    return _SortedTask(
        pos_users=user_idx[is_pos][p_order],
        neg_users=user_idx[~is_pos][n_order],
        neg_above=np.searchsorted(n_neg, p_neg, side="left"),
        neg_at_or_above=np.searchsorted(n_neg, p_neg, side="right"),
        pos_at_or_above=np.searchsorted(p_neg, p_neg, side="right"),
    )


def _weighted_metric(task: _SortedTask, weights_t: np.ndarray, metric: str) -> np.ndarray:
    """AUC or KS of one task under each column of user multiplicities; NaN where a class is absent.

    weights_t: (n_users, B) multiplicities (users on rows so gathers are contiguous). Equal to
    sklearn's roc_auc_score / roc_curve with sample_weight (ties count one half for AUC; KS is taken
    at thresholds equal to a positive's score, where TPR - FPR peaks)."""
    w_pos = weights_t[task.pos_users]  # (P, B)
    cum_neg = np.zeros((len(task.neg_users) + 1, weights_t.shape[1]))  # (N+1, B); row k: top-k negatives
    np.cumsum(weights_t[task.neg_users], axis=0, out=cum_neg[1:])
    total_pos = w_pos.sum(axis=0)  # (B,)
    total_neg = cum_neg[-1]  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "auc":
            # a positive beats the negatives below it and half of those tied with it:
            # total_neg - above - tied/2 = total_neg - (above + at_or_above)/2
            above_twice = cum_neg[task.neg_above] + cum_neg[task.neg_at_or_above]  # (P, B)
            pairs = total_pos * total_neg - 0.5 * (w_pos * above_twice).sum(axis=0)  # (B,)
            value = pairs / (total_pos * total_neg)
        else:
            cum_pos = np.cumsum(w_pos, axis=0)  # (P, B)
            tpr = cum_pos[task.pos_at_or_above - 1] / total_pos  # (P, B)
            fpr = cum_neg[task.neg_at_or_above] / total_neg  # (P, B)
            value = np.maximum((tpr - fpr).max(axis=0), 0.0)  # the (0, 0) point gives 0
    value[(total_pos == 0) | (total_neg == 0)] = np.nan
    return value


@dataclass
class _Prepared:
    task_ids: list[str]
    n_users: int
    sorted_tasks: dict[str, list[_SortedTask]]  # method name -> one entry per task


def _prepare(labels: pd.DataFrame, tasks: pd.DataFrame, scores: dict[str, pd.DataFrame]) -> _Prepared:
    joined, tasks = _joined(labels, tasks, scores)
    user_codes, user_index = pd.factorize(joined["user_id"], sort=True)
    joined = joined.assign(_u=user_codes)
    task_ids = _task_order(joined, tasks)
    sorted_tasks: dict[str, list[_SortedTask]] = {name: [] for name in scores}
    for task_id in task_ids:
        group = joined[joined["task_id"] == task_id]
        y = group["label"].to_numpy(dtype=np.float64)
        if y.min() == y.max():
            raise DataValidationError(
                f"task {task_id!r}: AUC/KS need both classes; all {len(y)} labels are {int(y[0])}"
            )
        for name in scores:
            sorted_tasks[name].append(_sort_task(group["_u"].to_numpy(), y, group[name].to_numpy()))
    return _Prepared(task_ids=task_ids, n_users=len(user_index), sorted_tasks=sorted_tasks)


def _check_n_boot(n_boot: int) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")


def _check_boot_args(metric: str, n_boot: int, ci: float, alternative: str | None = None) -> None:
    _check_metric(metric)
    _check_n_boot(n_boot)
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie strictly between 0 and 1; got {ci!r}")
    if alternative is not None and alternative not in ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; valid choices: {', '.join(ALTERNATIVES)}")


def _resample_weights(n_users: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_users, n_boot) multiplicities: column b counts each user in draw b of n_users users with
    replacement. Users are on rows so each task's gathers read contiguous memory."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_users, size=(n_boot, n_users))  # (B, U)
    flat = (np.arange(n_boot)[:, None] * n_users + draws).ravel()  # (B*U,)
    counts = np.bincount(flat, minlength=n_boot * n_users).reshape(n_boot, n_users)  # (B, U)
    return np.ascontiguousarray(counts.T, dtype=np.float64)  # (U, B)


def _per_task_values(prep: _Prepared, name: str, weights: np.ndarray, metric: str) -> np.ndarray:
    """(B, T) metric of each task under each column of weights (U, B)."""
    return np.stack([_weighted_metric(t, weights, metric) for t in prep.sorted_tasks[name]], axis=1)


def _interval(samples: np.ndarray, ci: float, observed: float) -> tuple[float, float]:
    """Basic (pivotal) bootstrap interval [2θ - q_hi, 2θ - q_lo]. Unlike the percentile interval it
    corrects the resampling bias of max-type statistics: KS, a maximum over thresholds, grows on
    resamples, which would put the percentile interval above the estimate."""
    alpha = (1.0 - ci) / 2.0
    q_low, q_high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(2 * observed - q_high), float(2 * observed - q_low)


def _valid_rows(*per_task: np.ndarray, n_boot: int) -> np.ndarray:
    valid = np.ones(n_boot, dtype=bool)
    for values in per_task:
        valid &= np.isfinite(values).all(axis=1)
    if valid.sum() < MIN_VALID_SHARE * n_boot:
        raise DataValidationError(
            f"only {int(valid.sum())} of {n_boot} bootstrap resamples kept both classes in every task; "
            "a task has too few positives or negatives for a user-level bootstrap"
        )
    return valid


class Resamples:
    """Per-task AUC/KS of several methods under one shared set of user resamples.

    Each (method, metric) is computed once, on first use, and every interval and paired difference drawn
    from it reuses it: the evaluation's 20 intervals and 28 paired differences over 10 methods would otherwise
    resample 76 (method, metric) tables where 20 differ. `bootstrap_ci` and `paired_bootstrap` are this class
    for one or two methods, so the numbers agree to the bit.

    `scores`: {method name: (user_id, task_id, score) table}; every table must score every labelled pair.
    Whether a resample keeps both classes in every task depends on the labels alone, so one resample is
    dropped (or kept) for every method alike."""

    def __init__(self, labels: pd.DataFrame, tasks: pd.DataFrame, scores: dict[str, pd.DataFrame], *,
                 n_boot: int = 1000, seed: int = 0):
        if not scores:
            raise ValueError("Resamples needs at least one score table")
        _check_n_boot(n_boot)
        self.n_boot = int(n_boot)
        self._prep = _prepare(labels, tasks, scores)
        self._weights = _resample_weights(self._prep.n_users, self.n_boot, seed)  # (U, B)
        self._values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def task_ids(self) -> list[str]:
        return list(self._prep.task_ids)

    @property
    def n_users(self) -> int:
        return self._prep.n_users

    def values(self, name: str, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """(observed (T,), resampled (B, T)) per-task metric of one method."""
        _check_metric(metric)
        if name not in self._prep.sorted_tasks:
            raise KeyError(f"no scores named {name!r}; known: {', '.join(self._prep.sorted_tasks)}")
        key = (name, metric)
        if key not in self._values:
            ones = np.ones((self._prep.n_users, 1))  # (U, 1): the observed data
            observed = _per_task_values(self._prep, name, ones, metric)[0]  # (T,)
            self._values[key] = (observed, _per_task_values(self._prep, name, self._weights, metric))  # (B, T)
        return self._values[key]

    def ci(self, name: str, metric: Metric = "auc", *, ci: float = 0.95, per_task: bool = False) -> dict:
        """As `bootstrap_ci`, for the method `name`."""
        _check_boot_args(metric, self.n_boot, ci)
        observed, boot = self.values(name, metric)
        boot = boot[_valid_rows(boot, n_boot=self.n_boot)]
        low, high = _interval(boot.mean(axis=1), ci, float(observed.mean()))
        result = {
            "metric": metric,
            "value": float(observed.mean()),
            "low": low,
            "high": high,
            "ci": ci,
            "n_boot": int(len(boot)),
            "n_users": self._prep.n_users,
        }
        if per_task:
            result["tasks"] = {}
            for j, task_id in enumerate(self._prep.task_ids):
                t_low, t_high = _interval(boot[:, j], ci, float(observed[j]))
                result["tasks"][task_id] = {"value": float(observed[j]), "low": t_low, "high": t_high}
        return result

    def paired(self, a: str, b: str, metric: Metric = "auc", *, ci: float = 0.95,
               alternative: Alternative = "greater", per_task: bool = False) -> dict:
        """As `paired_bootstrap`, for the methods `a` and `b` (a - b)."""
        terms = {a: 1.0}
        terms[b] = terms.get(b, 0.0) - 1.0  # a method against itself: weight 0, a difference of 0
        return self.contrast(terms, metric, ci=ci, alternative=alternative, per_task=per_task)

    def contrast(self, terms: Mapping[str, float], metric: Metric = "auc", *, ci: float = 0.95,
                 alternative: Alternative = "greater", per_task: bool = False,
                 other_draws: np.ndarray | None = None) -> dict:
        """A weighted sum of methods' metrics under the same resamples, e.g. {a: 1, b: -1} (= `paired(a, b)`, to
        the bit) or a difference of differences {a: 1, b: -1, c: -1, d: 1}: whether the gain of a over b exceeds
        that of c over d on the same users. Keys as `paired`'s result ("diff" is the contrast's value).

        `other_draws`: (R,) values of the average contrast under R draws of another source of variation,
        independent of which users are scored (label_budget.refit_scores: which users the probes were fitted
        on). Resample b gets draw b mod R's deviation from the draws' mean added, so the interval and p-value
        cover both sources around the same observed value; per-task intervals do not take them."""
        _check_boot_args(metric, self.n_boot, ci, alternative)
        if not terms:
            raise ValueError("contrast needs at least one (method -> weight) term")
        values = {name: self.values(name, metric) for name in terms}
        observed = sum(float(w) * values[n][0] for n, w in terms.items())  # (T,)
        valid = _valid_rows(*(v[1] for v in values.values()), n_boot=self.n_boot)
        diffs = sum(float(w) * values[n][1][valid] for n, w in terms.items())  # (B', T)
        avg = diffs.mean(axis=1)  # (B',)
        if other_draws is not None:
            draws = np.asarray(other_draws, dtype=np.float64)
            if draws.ndim != 1 or len(draws) < 2 or not np.isfinite(draws).all():
                raise ValueError(f"other_draws must be a 1-d array of at least 2 finite numbers; got shape {draws.shape}")
            dev = draws - draws.mean()                                                  # (R,)
            avg = avg + dev[np.arange(len(avg)) % len(dev)]  # (B',): both sources, independent
        low, high = _interval(avg, ci, float(observed.mean()))
        result = {
            "metric": metric,
            "diff": float(observed.mean()),
            "low": low,
            "high": high,
            "p_value": _p_value(avg, float(observed.mean()), alternative),
            "alternative": alternative,
            "ci": ci,
            "n_boot": int(valid.sum()),
            "n_users": self._prep.n_users,
        }
        if per_task:
            result["tasks"] = {}
            for j, task_id in enumerate(self._prep.task_ids):
                t_low, t_high = _interval(diffs[:, j], ci, float(observed[j]))
                result["tasks"][task_id] = {
                    "diff": float(observed[j]),
                    "low": t_low,
                    "high": t_high,
                    "p_value": _p_value(diffs[:, j], float(observed[j]), alternative),
                }
        return result


def bootstrap_ci(
    labels: pd.DataFrame,
    scores: pd.DataFrame,
    tasks: pd.DataFrame,
    *,
    metric: Metric = "auc",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    per_task: bool = False,
) -> dict:
    """Basic bootstrap CI (see `_interval`) of one method's average metric over tasks, resampling users.

    Returns {"metric", "value" (on the data as given), "low", "high", "n_boot" (resamples used),
    "n_users"}; with per_task, also "tasks": {task_id: {"value", "low", "high"}}. The same seed draws
    the same resamples as `paired_bootstrap`, so the two can be reported side by side."""
    _check_boot_args(metric, n_boot, ci)
    return Resamples(labels, tasks, {"scores": scores}, n_boot=n_boot, seed=seed).ci(
        "scores", metric, ci=ci, per_task=per_task)


def _p_value(diffs: np.ndarray, observed: float, alternative: str) -> float:
    """Bootstrap p-value of "the difference is 0", read off the reflected values 2θ - d* that `_interval`'s basic
    interval takes its quantiles of, so the two agree: the two-sided p is below 1 - ci when that interval excludes
    0 (to the 1 / n_boot resolution, as np.quantile interpolates between resamples). The raw share of d* <= 0
    would not: KS grows on resamples, so d* is skewed away from θ and that share disagrees with the interval."""
    reflected = 2 * observed - diffs  # the same arithmetic as `_interval`'s bounds
    at_most_zero = float(np.mean(reflected <= 0))
    if alternative == "greater":
        return at_most_zero
    return min(1.0, 2.0 * min(at_most_zero, float(np.mean(reflected >= 0))))


def paired_bootstrap(
    labels: pd.DataFrame,
    scores_a: pd.DataFrame,
    scores_b: pd.DataFrame,
    tasks: pd.DataFrame,
    *,
    metric: Metric = "auc",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    alternative: Alternative = "greater",
    per_task: bool = False,
) -> dict:
    """Paired user-level bootstrap of the difference (a - b) in the average metric over tasks.

    Each resample draws users with replacement once and scores both methods on every task with that
    same draw. Returns {"metric", "diff" (on the data as given), "low", "high" (basic bootstrap CI),
    "p_value", "alternative", "ci", "n_boot" (resamples used), "n_users"}.

    p_value: from the reflected resamples 2 * diff - diff* that the basic interval is built on (`_p_value`), so
    it is below 1 - ci just when the two-sided interval excludes 0 (but within a resample of the edge, where
    np.quantile interpolates). With alternative="greater" it is the share of them <= 0 (small when a is reliably
    better than b); with "two-sided" it is 2 * min(share <= 0, share >= 0), capped at 1. Its resolution is
    1 / n_boot, so 0.0 means "below 1 / n_boot". With per_task, also
    "tasks": {task_id: {"diff", "low", "high", "p_value"}} from the same resamples."""
    _check_boot_args(metric, n_boot, ci, alternative)
    return Resamples(labels, tasks, {"a": scores_a, "b": scores_b}, n_boot=n_boot, seed=seed).paired(
        "a", "b", metric, ci=ci, alternative=alternative, per_task=per_task)
