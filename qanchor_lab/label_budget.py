"""How many labels does each representation need? Probe AUC against the number of labelled tune users
(docs/design.md §7.13).

The demo fits every probe on all tune users (1,500 in the default world); with that many labels the task query
adds nothing a probe does not already find (§7.11). Deployments often have far fewer. `label_curve` draws n tune
users per task and draw (stratified: the tune split's positive rate, at least `ProbeConfig.cv` of each class so
the probe's CV can run), fits the library's probe (`baselines.probe_scores`) on each representation and scores
every test user. All representations see the same draws, so their differences are paired. `curve_summary`
averages over tasks and gives each method's mean and its difference from a reference with a t-interval over
draws: what it covers is which users happened to be labelled; the test users are fixed. `fit_label_curve` keeps
every test score (a `LabelCurve`), so that `LabelCurve.summary` also resamples the test users, as the demo's
report does, and its intervals cover both (§7.46). `run_label_curve` does all of it for a model: the embedding
under each task's query (qanchor_base), under the generic query (static_embedding), the hand-crafted features
(logreg_features), and optionally another model's embedding (e.g. the untrained one). `few_label_read` is one
budget of it as every evaluation reports it (`evaluate_run`, the demo's "With few labels", §7.45).

`tune_splits` is the same comparison for *choosing* between variants, where test users must not be read: the probe
fitted on a share of the tune users (every one of them labelled) and scored on the others, over random splits, in
the label curve's table shape (budget = users fitted, draw = split), so `curve_summary` gives paired t-intervals
over splits, and `split_contrasts` pairs two runs' splits draw by draw at any budget (§7.60). `run_tune_splits` runs
it for a model (docs/design.md §7.16), after `check_tune_splits` has ruled out, from the labels alone, a split that
cannot be fitted or scored. Those intervals cover which tune users the probe happened to be fitted on, not
which users were drawn into the tune split (§7.35): `tune_crossfit` scores every tune user once, out of fold, and
`tune_resamples` resamples users over those scores, as the test report does, for intervals a choice between models
can rest on (`Resamples.contrast` compares one model's query gain with another's).

`refit_scores` is the test users' side of the same question: the report resamples test users around one fit of
each probe, so `refit_scores` refits the probes on bootstrap draws of the tune users and `refit_contrasts` widens
the report's paired intervals by their spread (docs/design.md §7.36; `python -m qanchor_lab refit-intervals RUN`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from qanchor_lab.baselines import (ProbeConfig, _check_matrix, _split_ids, _tune_targets, blend_min_per_class, can_blend,
                                   fewest_of_a_class, probe_scores)
from qanchor_lab.data import DataValidationError, require_columns, validate_labels, validate_tasks
from qanchor_lab.parallel import fit_map

BUDGETS: tuple[int, ...] = (50, 100, 200, 400)  # labelled tune users per task, the default curve


def budget_problem(y: np.ndarray, n: int, min_per_class: int) -> str | None:
    """Why n labelled rows cannot be drawn from `y` (0/1) with `min_per_class` of each class, or None if they can."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n > len(y):
        return f"a budget of {n} labelled users exceeds the {len(y)} tune users"
    if min(n_pos, n_neg) < min_per_class or n < 2 * min_per_class:
        return f"a budget of {n} cannot hold {min_per_class} of each class ({n_pos} positive, {n_neg} negative tune users)"
    return None


def draw_labelled(y: np.ndarray, n: int, rng: np.random.Generator, min_per_class: int) -> np.ndarray:
    """Indices of n rows of `y` (0/1): positives in y's proportion, at least `min_per_class` of each class."""
    problem = budget_problem(y, n, min_per_class)
    if problem:
        raise ValueError(problem)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    k = int(np.clip(round(n * len(pos) / len(y)), min_per_class, min(len(pos), n - min_per_class)))
    if n - k > len(neg):
        k = n - len(neg)
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]))


def label_curve(
    representations: Mapping[str, np.ndarray],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    budgets: Sequence[int] = BUDGETS,
    draws: int = 5,
    seed: int = 0,
    config: ProbeConfig | None = None,
    show_progress: bool = False,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Test AUC of a probe fitted on `budget` labelled tune users, per representation, task, budget and draw.

    `representations`: name -> rows for tune users then test users, either (U, d), one matrix for every task,
    or (U, T, d), one per task in `tasks` order (e.g. the embedding under each task's query). Draw r of budget
    n picks the same users for every representation (seeded by `seed`, n, r and the task). A budget of all tune
    users has a single draw. `n_jobs`: worker processes, one task each (parallel.fit_map; the same curve for any
    value). Returns one row per (budget, draw, task, method): columns budget, draw, task_id, method, auc,
    n_positive. `fit_label_curve` keeps the test scores as well, for intervals that also cover the test users."""
    return fit_label_curve(representations, labels, tasks, tune_users, test_users, budgets=budgets, draws=draws,
                           seed=seed, config=config, show_progress=show_progress, n_jobs=n_jobs).table()


@dataclass
class LabelCurve:
    """A label curve's fitted probes with every test score kept (`fit_label_curve`, `run_label_curve`).

    `table()` is `label_curve`'s AUC table. `summary(reference)` averages it as `curve_summary` does, with
    intervals that also resample the test users, as every interval of the demo's report does (docs/design.md
    §7.46)."""
    test: list[str]                       # test user ids, the order of every score array
    task_ids: list[str]
    test_y: list[np.ndarray]              # per task: the test users' labels (0/1; NaN: not labelled for that task)
    draws_of: list[tuple[int, int]]       # (budget, draw) pairs, in the order of each task's fits
    fits: list[list[tuple[int, dict[str, np.ndarray]]]]  # per task, per (budget, draw): (positives drawn, name -> scores)
    n_tune: int                           # tune users: a budget of all of them has no draw-to-draw variation
    labels: pd.DataFrame                  # the test users' labels of these tasks, for resampling them
    tasks: pd.DataFrame
    _resamples: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (n_boot, seed) -> Resamples

    @property
    def methods(self) -> list[str]:
        return list(self.fits[0][0][1])

    def table(self) -> pd.DataFrame:
        """One AUC row per (budget, draw, task, method), in that order: columns budget, draw, task_id, method, auc,
        n_positive."""
        known = [~np.isnan(yt) for yt in self.test_y]   # per task: the test users labelled for it
        return pd.DataFrame([
            {"budget": n, "draw": r, "task_id": task_id, "method": name, "auc": float(roc_auc_score(yt[k], s[k])),
             "n_positive": n_pos}
            for i, (n, r) in enumerate(self.draws_of)
            for task_id, yt, k, task_fits in zip(self.task_ids, self.test_y, known, self.fits)
            for n_pos, scores in [task_fits[i]]
            for name, s in scores.items()])

    def summary(self, reference: str | None = None, *, n_boot: int = 1000, seed: int = 0,
                ci: float = 0.95) -> pd.DataFrame:
        """`curve_summary`'s table (per budget and method: auc and diff from `reference`, default the first method),
        its intervals covering which tune users were labelled *and* which users were tested.

        The draws' t-interval (kept as auc_draws_low/high, diff_draws_low/high) and the test users' bootstrap
        interval for the mean over draws (`n_boot` resamples with `seed`: for the same test users, n_boot and seed
        the demo's report resamples them alike) are independent sources; their half-widths add in quadrature. A
        budget of every tune user has one fit and no draw-to-draw variation: its interval is the bootstrap's own,
        the report's interval for the same probe. Another single draw leaves the spread over draws unknown: NaN."""
        from qanchor_lab.metrics import Resamples, _check_n_boot

        _check_n_boot(n_boot)
        table = curve_summary(self.table(), reference=reference, ci=ci)
        reference = table["reference"].iloc[0]
        if (n_boot, seed) not in self._resamples:
            self._resamples[n_boot, seed] = Resamples(self.labels, self.tasks, self._score_tables(), n_boot=n_boot,
                                                      seed=seed)
        resamples = self._resamples[n_boot, seed]
        methods = self.methods
        rows = []
        for r in table.to_dict("records"):
            at = [i for i, (n, _) in enumerate(self.draws_of) if n == r["budget"]]

            def mean_of(m: str) -> dict[str, float]:   # the mean over this budget's draws, as contrast terms
                return {f"{methods.index(m)}:{i}": 1 / len(at) for i in at}

            terms = {"auc": mean_of(r["method"]), "diff": mean_of(r["method"])}
            for key, w in mean_of(reference).items():   # the reference against itself: weights of 0, a difference of 0
                terms["diff"][key] = terms["diff"].get(key, 0.0) - w
            row = {k: r[k] for k in ("budget", "method", "draws", "auc")}
            for v in ("auc", "diff"):
                users = resamples.contrast(terms[v], ci=ci)
                if r["budget"] == self.n_tune:     # one fit on every tune user: the test users are all that varies
                    low, high = users["low"], users["high"]
                else:
                    both = float(np.hypot((r[f"{v}_high"] - r[f"{v}_low"]) / 2, (users["high"] - users["low"]) / 2))
                    low, high = r[v] - both, r[v] + both
                row |= {v: r[v], f"{v}_low": low, f"{v}_high": high, f"{v}_draws_low": r[f"{v}_low"],
                        f"{v}_draws_high": r[f"{v}_high"]}
            rows.append(row | {"reference": reference})
        return pd.DataFrame(rows)

    def _score_tables(self) -> dict[str, pd.DataFrame]:
        """"method index:fit index" -> (user_id, task_id, score) over every test user and task."""
        user_col = np.tile(np.asarray(self.test, dtype=object), len(self.task_ids))   # (T*U,): users within each task
        task_col = np.repeat(np.asarray(self.task_ids, dtype=object), len(self.test))  # (T*U,)
        return {f"{j}:{i}": pd.DataFrame({"user_id": user_col, "task_id": task_col,
                                          "score": np.concatenate([task_fits[i][1][m] for task_fits in self.fits])})
                for j, m in enumerate(self.methods) for i in range(len(self.draws_of))}


def fit_label_curve(representations: Mapping[str, np.ndarray], labels: pd.DataFrame, tasks: pd.DataFrame,
                    tune_users: Sequence[str], test_users: Sequence[str], *, budgets: Sequence[int] = BUDGETS,
                    draws: int = 5, seed: int = 0, config: ProbeConfig | None = None, show_progress: bool = False,
                    n_jobs: int | None = None) -> LabelCurve:
    """`label_curve`'s probes (the same arguments), kept as a `LabelCurve`: one fit_map job per task."""
    config = config or ProbeConfig()
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1; got {draws!r}")
    tune, test, labels_v, task_ids, mats = _tune_test_inputs(representations, labels, tasks, tune_users, test_users)
    budgets = list(budgets)
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 < b <= len(tune)]
    if bad or not budgets:
        raise ValueError(f"budgets must be labelled-user counts in 1..{len(tune)} (the tune users); got {bad or budgets}")
    test_y = labels_v[labels_v["user_id"].isin(set(test))].pivot(index="user_id", columns="task_id", values="label")
    missing = [u for u in test if u not in test_y.index]
    if missing:
        raise DataValidationError(f"labels: {len(missing)} test user(s) have no label, e.g. {missing[:5]}")
    # a test user without a label for some task is left out of that task's AUC, as the report leaves it out
    test_y = test_y.reindex(index=test, columns=task_ids)                       # (U, T), NaN where unlabelled
    for t in task_ids:
        if test_y[t].nunique() < 2:
            raise DataValidationError(f"task {t!r}: the labelled test users need both classes for an AUC; their "
                                      f"{int(test_y[t].notna().sum())} label(s) are {sorted(test_y[t].dropna().unique())}")
    # per task: the tune users labelled for it (positions into `tune`), their labels, and the test labels
    targets = [(*_tune_targets(labels_v, t, tune), test_y[t].to_numpy(dtype=np.float64)) for t in task_ids]
    for task_id, (_, y, _) in zip(task_ids, targets):
        problem = next(filter(None, (budget_problem(y, int(n), config.cv) for n in budgets)), None)
        if problem:
            raise ValueError(f"task {task_id!r}: {problem}")
    draws_of = [(int(n), r) for n in budgets for r in range(1 if n == len(tune) else draws)]
    # one job per task, carrying only that task's rows of each representation
    jobs = [(k, {name: (X[:, k] if X.ndim == 3 else X) for name, X in mats.items()}, pos, y, len(test), draws_of,
             seed, config) for k, (pos, y, _) in enumerate(targets)]
    fits = fit_map(_curve_of_task, jobs, n_jobs, desc="label curve", show_progress=show_progress)
    scored = labels_v[labels_v["user_id"].isin(set(test)) & labels_v["task_id"].isin(set(task_ids))]
    tasks_v = validate_tasks(tasks)
    return LabelCurve(test, task_ids, [yt for _, _, yt in targets], draws_of, fits, len(tune), scored,
                      tasks_v[tasks_v["task_id"].isin(set(task_ids))])


def _curve_of_task(k: int, mats: Mapping[str, np.ndarray], pos: np.ndarray, y: np.ndarray, n_test: int,
                   draws_of: Sequence[tuple[int, int]], seed: int,
                   config: ProbeConfig) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The probes of one task (index k) for each (budget, draw) of `draws_of`: (positives drawn, name -> test
    scores); a fit_map job. The draw is seeded by the seed, budget, draw and task, never by the worker."""
    out = []
    for n, r in draws_of:
        picked = draw_labelled(y, n, np.random.default_rng([seed, n, r, k]), config.cv)
        scores = {name: probe_scores(X[pos[picked]], y[picked], X[len(X) - n_test:], config)  # test: the last rows
                  for name, X in mats.items()}
        out.append((int(y[picked].sum()), scores))
    return out


def _tune_test_inputs(representations: Mapping[str, np.ndarray], labels: pd.DataFrame, tasks: pd.DataFrame,
                      tune_users: Sequence[str], test_users: Sequence[str]):
    """(tune, test, validated labels, task ids, name -> checked matrix) for probes fitted on tune users and scored on
    test users, the representations' rows tune users then test users."""
    tune, test = _split_ids(tune_users, test_users)
    tasks_v = validate_tasks(tasks)
    labels_v = validate_labels(labels, tasks=tasks_v)
    task_ids = tasks_v["task_id"].tolist()
    if not representations:
        raise ValueError("representations: give at least one (name -> matrix)")
    mats = {name: _per_task(name, X, len(tune) + len(test), len(task_ids)) for name, X in representations.items()}
    return tune, test, labels_v, task_ids, mats


def _per_task(name: str, X, n_rows: int, n_tasks: int) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 3:
        if X.shape[:2] != (n_rows, n_tasks):
            raise ValueError(f"representation {name!r}: a per-task array must be (users, tasks, d) = "
                             f"({n_rows}, {n_tasks}, d); got {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"representation {name!r} holds NaN or infinite values")
        return X
    return _check_matrix(X, n_rows, f"representation {name!r} (rows: tune users, then test users)")


def curve_summary(curve: pd.DataFrame, reference: str | None = None, ci: float = 0.95) -> pd.DataFrame:
    """Per (budget, method): AUC averaged over tasks, its mean over draws with a t-interval (auc_low, auc_high),
    and the paired difference from `reference` (default: the first method) with its t-interval (diff, diff_low,
    diff_high). With one draw (a budget of every tune user) the intervals are NaN."""
    per_draw = _per_draw(curve)                                                          # (budget x draw, M)
    methods = list(dict.fromkeys(curve["method"]))
    reference = reference or methods[0]
    if reference not in methods:
        raise ValueError(f"reference {reference!r} is not a method of the curve; methods: {', '.join(methods)}")
    rows = []
    for budget, g in per_draw.groupby(level="budget", sort=True):
        for m in methods:
            mean, lo, hi = _t_interval(g[m].to_numpy(), ci)
            d = _t_interval((g[m] - g[reference]).to_numpy(), ci)
            rows.append({"budget": int(budget), "method": m, "draws": len(g), "auc": mean, "auc_low": lo,
                         "auc_high": hi, "diff": d[0], "diff_low": d[1], "diff_high": d[2], "reference": reference})
    return pd.DataFrame(rows)


def split_contrasts(curve: pd.DataFrame, contrasts: Mapping[str, Mapping[str, float]],
                    ci: float = 0.95) -> pd.DataFrame:
    """Per (budget, contrast): a weighted sum of methods' AUCs (averaged over tasks) taken draw by draw, its mean
    over draws and a t-interval (diff, low, high). `contrasts` maps a title to {method: weight}, e.g. the query's
    gain of one run against another's {"qanchor_base": 1, "static_embedding": -1, "other:qanchor_base": -1,
    "other:static_embedding": 1}: paired by draw, so with `tune_splits`' frames of two runs on the same splits
    it compares them on the same fitted and scored users, at any budget (the cross-fit's intervals are for the
    full budget only). Like `curve_summary`'s, the interval covers the draws, not which users are tune users."""
    per_draw = _per_draw(curve)                                                          # (budget x draw, M)
    unknown = sorted({m for terms in contrasts.values() for m in terms} - set(per_draw.columns))
    if unknown:
        raise ValueError(f"contrasts name methods the curve lacks: {', '.join(unknown)}; methods: "
                         f"{', '.join(per_draw.columns)}")
    rows = []
    for budget, g in per_draw.groupby(level="budget", sort=True):
        for title, terms in contrasts.items():
            values = sum(w * g[m] for m, w in terms.items()).to_numpy()                    # (draws,)
            diff, low, high = _t_interval(values, ci)
            rows.append({"budget": int(budget), "contrast": title, "draws": len(g), "diff": diff, "low": low,
                         "high": high})
    return pd.DataFrame(rows)


def _per_draw(curve: pd.DataFrame) -> pd.DataFrame:
    """A curve's AUC averaged over tasks: one row per (budget, draw), one column per method, methods in order."""
    if curve.empty:
        raise ValueError("curve is empty")
    return curve.groupby(["budget", "draw", "method"], sort=False)["auc"].mean().unstack("method")


def _t_interval(x: np.ndarray, ci: float) -> tuple[float, float, float]:
    mean = float(np.mean(x))
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + ci / 2, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def model_representations(model, world, users: Sequence[str], *, others: Mapping[str, object] | None = None,
                          show_progress: bool = True) -> dict[str, np.ndarray]:
    """What the label curve and the tune splits compare, rows in `users` order: qanchor_base (the embedding under
    each task's query, (U, T, d)), static_embedding (under the generic query), each of `others` (name -> another
    model, e.g. {"untrained": ...}) under each task's query, and logreg_features (the hand-crafted features)."""
    from qanchor_lab.baselines import _feature_matrix
    from qanchor_lab.pipeline import query_embeddings

    users = list(users)
    reps = query_representations(model, world, users, show_progress=show_progress)
    for name, other in (others or {}).items():
        reps[name] = query_embeddings(other, world, users, show_progress=show_progress)[:, :-1]  # (U, T, d)
    reps["logreg_features"] = _feature_matrix(world, users)[1]
    return reps


def query_representations(model, world, users: Sequence[str], *, prefix: str = "",
                          show_progress: bool = True) -> dict[str, np.ndarray]:
    """A model's embeddings under each task's query ((U, T, d), `prefix` + "qanchor_base") and under the generic
    query ((U, d), `prefix` + "static_embedding"), rows in `users` order; one pass over both."""
    from qanchor_lab.pipeline import query_embeddings

    emb = query_embeddings(model, world, list(users), show_progress=show_progress)   # (U, T+1, d)
    return {f"{prefix}qanchor_base": emb[:, :-1], f"{prefix}static_embedding": emb[:, -1]}


def run_label_curve(model, world, *, budgets: Sequence[int] = BUDGETS, draws: int = 5, seed: int = 0,
                    others: Mapping[str, object] | None = None, config: ProbeConfig | None = None,
                    show_progress: bool = True, n_jobs: int | None = None) -> LabelCurve:
    """The label curve of a Q-Anchor model on a world's tune and test users, over `model_representations`: a
    `LabelCurve` (`.table()` for the AUCs, `.summary(reference)` for the curve with its intervals)."""
    tune, test = world.users_in("tune"), world.users_in("test")
    reps = model_representations(model, world, tune + test, others=others, show_progress=show_progress)
    return fit_label_curve(reps, world.labels, world.tasks, tune, test, budgets=budgets, draws=draws, seed=seed,
                           config=config, show_progress=show_progress, n_jobs=n_jobs)


def few_label_read(representations: Mapping[str, np.ndarray], labels: pd.DataFrame, tasks: pd.DataFrame,
                   tune_users: Sequence[str], test_users: Sequence[str], *, budget: int, draws: int, seed: int = 0,
                   reference: str = "static_embedding", config: ProbeConfig | None = None, n_boot: int = 1000,
                   n_jobs: int | None = None) -> dict:
    """One budget of the label curve as the demo's report reads it (docs/design.md §7.43, §7.46): each
    representation's average test AUC with `budget` labelled tune users a task, and its paired difference from
    `reference`, both averaged over `draws` draws of the labelled users, with `LabelCurve.summary`'s intervals:
    `auc_low`/`auc_high` and `diff_low`/`diff_high` cover which tune users were labelled and which users were
    tested (the report's own `n_boot` resamples with `seed`), `*_draws_low`/`*_draws_high` the draws alone. With a
    single draw the spread over draws is unknown and every interval is NaN. Where the tune split cannot give fewer
    than all its users with `ProbeConfig.cv` of each class for some task, the read is left out ({"skipped": why},
    naming the task) rather than failing the evaluation around it."""
    from qanchor_lab.metrics import _check_n_boot

    config = config or ProbeConfig()
    if reference not in representations:
        raise ValueError(f"reference {reference!r} is not among the representations: {', '.join(representations)}")
    _check_n_boot(n_boot)
    tune = list(tune_users)
    tasks = validate_tasks(tasks)
    labels = validate_labels(labels, tasks=tasks)
    for task_id in tasks["task_id"]:
        _, y = _tune_targets(labels, task_id, tune)
        problem = (f"with {budget} labels a task every draw would label all {len(y)} tune users" if budget >= len(y)
                   else budget_problem(y, budget, config.cv))
        if problem:
            return {"budget": budget, "draws": draws, "skipped": f"task {task_id!r}: {problem}"}
    curve = fit_label_curve(representations, labels, tasks, tune, test_users, budgets=[budget], draws=draws,
                            seed=seed, config=config, n_jobs=n_jobs)
    summary = curve.summary(reference, n_boot=n_boot, seed=seed)
    methods = {r.pop("method"): {k: float(v) for k, v in r.items() if k not in ("budget", "draws", "reference")}
               for r in summary.to_dict("records")}
    return {"budget": budget, "draws": draws, "seed": seed, "reference": reference, "n_boot": n_boot,
            "interval": "95% intervals covering which tune users were labelled and which users were tested",
            "methods": methods}


def tune_splits(
    representations: Mapping[str, np.ndarray],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    tune_users: Sequence[str],
    *,
    splits: int = 10,
    fit_share: float = 0.7,
    seed: int = 0,
    config: ProbeConfig | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Probe AUC on tune users only: split r fits the library's probe on a random `fit_share` of the tune users and
    scores the rest, every representation on the same users, so differences are paired. `representations` as in
    `label_curve`, rows in `tune_users` order; every tune user needs a label for every task. Returns one row per
    (split, task, method) in the label curve's shape: budget (users fitted), draw (the split), task_id, method, auc,
    n_positive (positives fitted)."""
    cut = check_tune_splits(labels, tasks, tune_users, splits=splits, fit_share=fit_share, seed=seed, config=config)
    tune = list(tune_users)
    _check_tune_rows(representations, tune)
    parts = []
    for r in tqdm(range(splits), desc="tune splits", unit="split", disable=not show_progress):
        order = _split_order(seed, r, len(tune))
        fit, scored = [tune[i] for i in order[:cut]], [tune[i] for i in order[cut:]]
        reps = {name: np.asarray(X)[order] for name, X in representations.items()}   # rows: fit users, then scored
        try:
            curve = label_curve(reps, labels, tasks, fit, scored, budgets=[cut], draws=1, config=config)
        except ValueError as exc:
            raise ValueError(f"tune split {r}: {exc}") from None
        parts.append(curve.assign(draw=r))
    return pd.concat(parts, ignore_index=True)


def check_tune_splits(labels: pd.DataFrame, tasks: pd.DataFrame, tune_users: Sequence[str], *, splits: int = 10,
                      fit_share: float = 0.7, seed: int = 0, config: ProbeConfig | None = None) -> int:
    """What `tune_splits` can check from the labels alone, before a user is embedded (20-30 s on the default
    world): its arguments, a label for every tune user and task, and each split's fitted users holding
    `ProbeConfig.cv` of each class for every task (a small `fit_share` can miss a rare task's positives) and its
    scored users both classes. Raises a ValueError naming the split and task; returns the number of users each probe
    is fitted on."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1; got {splits!r}")
    if not 0 < fit_share < 1:
        raise ValueError(f"fit_share must lie strictly between 0 and 1; got {fit_share!r}")
    tune = list(tune_users)
    cut = int(round(fit_share * len(tune)))
    if not 0 < cut < len(tune):
        raise ValueError(f"fit_share {fit_share} of {len(tune)} tune users leaves no users to fit or to score")
    y = _tune_label_matrix(labels, tasks, tune, "tune_splits")                         # (U, T)
    min_per_class = (config or ProbeConfig()).cv
    for r in range(splits):
        order = _split_order(seed, r, len(tune))
        fitted, scored = y.iloc[order[:cut]], y.iloc[order[cut:]]                      # (cut, T), (U - cut, T)
        for task_id in y.columns:
            problem = budget_problem(fitted[task_id].to_numpy(), cut, min_per_class)
            if problem:
                raise ValueError(f"tune split {r}: task {task_id!r}: {problem}")
            if scored[task_id].nunique() < 2:
                raise ValueError(f"tune split {r}: task {task_id!r}: its {len(scored)} scored tune users are all "
                                 f"{int(scored[task_id].iloc[0])}, and an AUC needs both classes (a smaller fit_share)")
    return cut


def _split_order(seed: int, r: int, n: int) -> np.ndarray:
    """Split r of `tune_splits` over n tune users: a permutation, its first `cut` users fitted, the rest scored."""
    return np.random.default_rng([seed, r]).permutation(n)


def _check_tune_rows(representations: Mapping[str, np.ndarray], tune: list[str]) -> None:
    if not representations:
        raise ValueError("representations: give at least one (name -> matrix)")
    for name, X in representations.items():
        if np.ndim(X) not in (2, 3) or len(X) != len(tune):
            raise ValueError(f"representation {name!r}: expected one row per tune user ({len(tune)}); "
                             f"got shape {np.shape(X)}")


def _tune_label_matrix(labels: pd.DataFrame, tasks: pd.DataFrame, tune: list[str], who: str) -> pd.DataFrame:
    """(tune users x tasks) 0/1 labels, tasks in `tasks` order. The scored users are tune users, so each needs
    every task's label (label_curve would call them test users); a gap is named with its user and task."""
    tasks_v = validate_tasks(tasks)
    labels_v = validate_labels(labels, tasks=tasks_v)
    y = (labels_v[labels_v["user_id"].isin(set(tune))].pivot(index="user_id", columns="task_id", values="label")
         .reindex(index=tune, columns=tasks_v["task_id"]))
    missing = y.isna()
    if missing.any().any():
        users = [u for u in tune if missing.loc[u].any()]
        raise DataValidationError(f"labels: {who} scores tune users, so each needs a label for every task; "
                                  f"{len(users)} tune user(s) miss one, e.g. {users[:5]} (task "
                                  f"{missing.columns[missing.loc[users[0]]][0]!r} for {users[0]!r})")
    return y.astype(int)


def tune_crossfit(
    representations: Mapping[str, np.ndarray],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    tune_users: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    config: ProbeConfig | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Out-of-fold probe scores for every tune user: the users cut into `folds` folds (seeded, the same for every
    task and representation), each fold scored by the library's probe fitted on the others. Returns the
    evaluation's long score table with the fold: user_id, task_id, method, score, fold (`tune_resamples` turns it
    into paired CIs).

    Why beside `tune_splits`: its t-interval over splits covers which tune users the probe was fitted on, not
    which users were drawn into the tune split; the splits overlap, so the interval shrinks towards zero as
    splits are added while a new draw of users would still move the difference (docs/design.md §7.35). Scoring
    every tune user once and resampling users, as the test report does, gives intervals of the test report's
    kind, on users a choice may read."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2; got {folds!r}")
    tune = list(tune_users)
    if len(tune) < folds:
        raise ValueError(f"{folds} folds need at least as many tune users; got {len(tune)}")
    _check_tune_rows(representations, tune)
    y = _tune_label_matrix(labels, tasks, tune, "tune_crossfit")                      # (U, T)
    task_ids = list(y.columns)
    mats = {name: _per_task(name, X, len(tune), len(task_ids)) for name, X in representations.items()}
    fold_of = np.empty(len(tune), dtype=np.int64)
    fold_of[np.random.default_rng([seed, folds]).permutation(len(tune))] = np.arange(len(tune)) % folds
    config = config or ProbeConfig()
    scores = {name: np.empty((len(tune), len(task_ids))) for name in mats}               # name -> (U, T)
    jobs = [(f, k) for f in range(folds) for k in range(len(task_ids))]
    for f, k in tqdm(jobs, desc="tune cross-fit", unit="fit", disable=not show_progress):
        fit, scored = fold_of != f, fold_of == f
        yk = y.iloc[:, k].to_numpy()
        if min(yk[fit].sum(), (1 - yk[fit]).sum()) < config.cv:
            raise ValueError(f"task {task_ids[k]!r}: fold {f}'s fitting users hold {int(yk[fit].sum())} positive and "
                             f"{int((1 - yk[fit]).sum())} negative labels; the probe needs at least {config.cv} of each")
        for name, X in mats.items():
            Xk = X[:, k] if X.ndim == 3 else X
            scores[name][scored, k] = probe_scores(Xk[fit], yk[fit], Xk[scored], config)
    return pd.concat([pd.DataFrame({"user_id": np.repeat(tune, len(task_ids)), "task_id": task_ids * len(tune),
                                    "method": name, "score": S.ravel(), "fold": np.repeat(fold_of, len(task_ids))})
                      for name, S in scores.items()], ignore_index=True)


def tune_resamples(scores: pd.DataFrame, labels: pd.DataFrame, tasks: pd.DataFrame, *, n_boot: int = 1000,
                   seed: int = 0):
    """`metrics.Resamples` over the tune users of cross-fitted scores (`tune_crossfit`'s table, or several runs'
    tables on the same folds concatenated with distinct method names): `.paired(a, b)` and `.contrast({...})`
    resample users as the test report does. Each fold's AUC is its own probe's (every fold of a task is a
    column of the resamples, and their mean is the task's), as in `tune_splits`: pooling five probes' scores
    into one AUC would also count how their intercepts differ."""
    from qanchor_lab.metrics import Resamples

    require_columns(scores, ("user_id", "task_id", "method", "score", "fold"), "tune scores")
    fold_of = scores.drop_duplicates("user_id").set_index("user_id")["fold"]
    folds = sorted(fold_of.unique())
    column = lambda task, fold: task.astype(str) + " | fold " + fold.astype(str)  # noqa: E731
    tune_labels = labels[labels["user_id"].isin(fold_of.index)]
    tune_labels = tune_labels.assign(task_id=column(tune_labels["task_id"], tune_labels["user_id"].map(fold_of)))
    per_fold = validate_tasks(tasks).loc[lambda t: t["task_id"].isin(set(scores["task_id"]))]
    per_fold = pd.concat([per_fold.assign(task_id=per_fold["task_id"] + f" | fold {f}") for f in folds],
                         ignore_index=True)
    scored = scores.assign(task_id=column(scores["task_id"], scores["fold"]))
    return Resamples(tune_labels, per_fold, {m: g[["user_id", "task_id", "score"]]
                                             for m, g in scored.groupby("method", sort=False)},
                     n_boot=n_boot, seed=seed)


# The report's methods that blend two representations, as the demo fits them (baselines.blended_probe_scores,
# features first): refit_scores refits them beside the plain probes.
PLUS_FEATURES: dict[str, tuple[str, str]] = {"qanchor_plus_features": ("logreg_features", "qanchor_base")}


def refit_scores(
    representations: Mapping[str, np.ndarray],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    tune_users: Sequence[str],
    test_users: Sequence[str],
    *,
    refits: int = 30,
    seed: int = 0,
    blends: Mapping[str, tuple[str, str]] | None = None,
    config: ProbeConfig | None = None,
    configs: Mapping[str, ProbeConfig] | None = None,
    n_jobs: int | None = None,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Test-user scores of each representation's probe fitted on every tune user once (refit 0: the report's
    fit) and on `refits` bootstrap draws of the tune users (refits 1..R: each user weighted by how often the draw
    holds it, users it misses left out; the same draw for every representation and task, so differences stay
    paired). `representations` as in `label_curve` (rows: tune users, then test users); `blends` maps a method
    name to two of them (features, embedding) fitted as the demo fits its qanchor_plus_features (`PLUS_FEATURES`,
    `baselines.features_with_embedding`: blended, or one probe where a class is too rare to blend). `configs`: a
    representation's own probe settings where they differ from `config`. Returns the long table user_id, task_id,
    method, score, refit (categorical columns); `refit_contrasts` turns it into intervals. A draw that leaves some
    task fewer distinct users of a class than its refit 0's probes need (a rare class on a small world) is drawn
    again (the next of `MAX_REDRAWS` seeded draws), so that every refit fits what refit 0 fits.

    Why: the test report resamples the test users around one fit of each probe, so its intervals leave out which
    users the probes happened to be fitted on, which moves a difference between two methods too (docs/design.md
    §7.35, §7.36). The spread of a difference over the refits measures that part."""
    from qanchor_lab.baselines import _fit_task, _Rows
    from qanchor_lab.parallel import fit_map

    if isinstance(refits, bool) or not isinstance(refits, int) or refits < 2:
        raise ValueError(f"refits must be an int >= 2 (a spread needs two draws); got {refits!r}")
    unknown = sorted(set(configs or {}) - set(representations))
    if unknown:
        raise ValueError(f"configs: {', '.join(map(repr, unknown))} name no representation; known: {', '.join(representations)}")
    config = config or ProbeConfig()
    tune, test, labels_v, task_ids, mats = _tune_test_inputs(representations, labels, tasks, tune_users, test_users)
    blends = dict(blends or {})
    for name, pair in blends.items():
        unknown = [p for p in pair if p not in mats]
        if len(pair) != 2 or unknown:
            raise ValueError(f"blend {name!r}: give two of the representations ({', '.join(mats)}); got {pair!r}")
        if name in mats:
            raise ValueError(f"blend {name!r}: the name is already a representation's")
    configs = {name: (configs or {}).get(name, config) for name in mats}
    targets = [_tune_targets(labels_v, t, tune) for t in task_ids]  # per task: labelled tune positions, labels
    # the fewest distinct users of each class a task's refits need: every probe's CV folds, and where refit 0
    # blends a task (enough of each class), the blend's
    probe_need = max(c.cv for c in [*configs.values(), *([config] if blends else [])])
    need = [max(probe_need, blend_min_per_class(config)) if blends and can_blend(y, config) else probe_need
            for _, y in targets]
    counts = [None] + [_bootstrap_draw(len(tune), targets, need, task_ids, [seed, r]) for r in range(1, refits + 1)]
    # per task, each representation as one array that every refit's job takes its rows from when it runs (_Rows), so
    # the jobs hold no copies
    blocks = [{name: np.ascontiguousarray(X[:, k]) if X.ndim == 3 else X for name, X in mats.items()}
              for k in range(len(task_ids))]
    jobs = []
    for r, count in enumerate(counts):
        for k, (task_id, (pos, y)) in enumerate(zip(task_ids, targets)):
            w = None if count is None else count[pos].astype(np.float64)  # (n labelled,)
            keep = slice(None) if w is None else w > 0
            fit = tuple((name, _Rows(B, pos[keep]), _Rows(B, slice(len(tune), None))) for name, B in blocks[k].items())
            jobs.append((task_id, f" (refit {r})", _refit_one,
                         (fit, y[keep], None if w is None else w[keep], blends, configs, config), {}))
    per_job = fit_map(_fit_task, jobs, n_jobs, desc="probe refits", show_progress=show_progress)
    names = list(mats) + list(blends)
    n_test, n_tasks = len(test), len(task_ids)
    score = np.empty((len(counts), len(names), n_tasks, n_test))  # (R+1, M, T, U)
    for j, out in enumerate(per_job):
        r, k = divmod(j, n_tasks)
        for m, name in enumerate(names):
            score[r, m, k] = out[name]
    shape = score.shape
    idx = np.indices(shape).reshape(len(shape), -1)
    return pd.DataFrame({
        "user_id": pd.Categorical.from_codes(idx[3], test),
        "task_id": pd.Categorical.from_codes(idx[2], task_ids),
        "method": pd.Categorical.from_codes(idx[1], names),
        "score": score.ravel(),
        "refit": idx[0].astype(np.int32),
    })


MAX_REDRAWS = 100  # refit_scores: draws tried per refit before a task's rare class is named as the cause


def _bootstrap_draw(n: int, targets, need: Sequence[int], task_ids: Sequence[str], key: list[int]) -> np.ndarray:
    """(n,) how often each of n tune users one bootstrap draw holds: the first of the draws seeded `key`, then
    `key + [1]`, `key + [2]`, ... in which every task's labelled users hold `need` distinct users of each class."""
    for attempt in range(MAX_REDRAWS):
        count = np.random.default_rng(key + [attempt] * bool(attempt)).multinomial(n, np.full(n, 1 / n))  # (n,)
        short = [k for k, ((pos, y), m) in enumerate(zip(targets, need)) if fewest_of_a_class(y[count[pos] > 0]) < m]
        if not short:
            return count
    k = short[0]
    y_k = targets[k][1]
    raise ValueError(f"task {task_ids[k]!r}: {MAX_REDRAWS} bootstrap draws of the {n} tune users each left fewer than "
                     f"{need[k]} distinct users of a class ({int(y_k.sum())} positive and {int(len(y_k) - y_k.sum())} "
                     "negative tune labels in all); refit intervals need more labelled users of the rarer class")


def _refit_one(fit: Sequence[tuple[str, np.ndarray, np.ndarray]], y: np.ndarray, w: np.ndarray | None,
               blends: Mapping[str, tuple[str, str]], configs: Mapping[str, ProbeConfig],
               config: ProbeConfig) -> dict[str, np.ndarray]:
    """One task's probes of one refit: name -> test scores (a `refit_scores` job, maybe in a worker); `fit` holds
    (name, fitted rows, test rows) per representation."""
    from qanchor_lab.baselines import features_with_embedding

    rows = {name: (X, Xt) for name, X, Xt in fit}
    out = {name: probe_scores(X, y, Xt, configs[name], sample_weight=w) for name, (X, Xt) in rows.items()}
    for name, (a, b) in blends.items():   # as the demo fits them: blended, or one probe where a class is too rare
        out[name] = features_with_embedding(rows[a][0], y, rows[a][1], rows[b][0], rows[b][1], config, sample_weight=w)
    return out


def refit_contrasts(scores: pd.DataFrame, labels: pd.DataFrame, tasks: pd.DataFrame,
                    contrasts: Mapping[str, Mapping[str, float]], *, n_boot: int = 1000, seed: int = 0,
                    ci: float = 0.95) -> pd.DataFrame:
    """One row per contrast (name -> {method: weight}, as `Resamples.contrast`) of `refit_scores`' table: diff
    (refit 0, the report's fit, on every test user), low/high (the report's interval: test users resampled, the
    same resamples for the same n_boot and seed), fit_sd (the contrast's standard deviation over the refits),
    fit_low/fit_high and p_value (both sources of variation: `Resamples.contrast`'s other_draws), refits."""
    from qanchor_lab.metrics import Resamples, task_metrics

    require_columns(scores, ("user_id", "task_id", "method", "score", "refit"), "refit scores")
    refit_ids = sorted(int(r) for r in pd.unique(scores["refit"]))
    if refit_ids[:1] != [0] or len(refit_ids) < 3:
        raise ValueError(f"refit scores: need refit 0 (every tune user once) and at least two refits; got {refit_ids[:5]}")
    known = set(scores["method"].astype(str))
    for title, terms in contrasts.items():
        missing = [m for m in terms if m not in known]
        if missing:
            raise ValueError(f"contrast {title!r}: no refit scores for {', '.join(missing)}; known: {', '.join(sorted(known))}")
    used = sorted({m for terms in contrasts.values() for m in terms})
    frame = scores[scores["method"].astype(str).isin(used)].astype({"user_id": str, "task_id": str, "method": str})
    test_labels = labels[labels["user_id"].isin(set(frame["user_id"]))]
    avg = {}                                                            # (refit, method) -> AUC averaged over tasks
    for (r, m), g in frame[frame["refit"] > 0].groupby(["refit", "method"], sort=True):
        avg[(int(r), m)] = float(task_metrics(test_labels, g[["user_id", "task_id", "score"]], tasks)["auc"].mean())
    first = frame[frame["refit"] == 0]
    resamples = Resamples(test_labels, tasks, {m: g[["user_id", "task_id", "score"]]
                                               for m, g in first.groupby("method", sort=False)},
                          n_boot=n_boot, seed=seed)
    rows = []
    for title, terms in contrasts.items():
        draws = np.array([sum(float(w) * avg[(r, m)] for m, w in terms.items()) for r in refit_ids[1:]])  # (R,)
        report = resamples.contrast(terms, ci=ci)
        both = resamples.contrast(terms, ci=ci, other_draws=draws)
        rows.append({"contrast": title, "diff": report["diff"], "low": report["low"], "high": report["high"],
                     "fit_sd": float(draws.std(ddof=1)), "fit_low": both["low"], "fit_high": both["high"],
                     "p_value": both["p_value"], "refits": len(draws)})
    return pd.DataFrame(rows)


def run_tune_splits(model, world, *, splits: int = 10, fit_share: float = 0.7, seed: int = 0,
                    others: Mapping[str, object] | None = None, config: ProbeConfig | None = None,
                    show_progress: bool = True) -> pd.DataFrame:
    """`tune_splits` for a Q-Anchor model over `model_representations` of the world's tune users; the judge of
    docs/design.md §7.16. `curve_summary(result, reference="static_embedding")` gives the task query's gain."""
    tune = world.users_in("tune")
    check_tune_splits(world.labels, world.tasks, tune, splits=splits, fit_share=fit_share, seed=seed, config=config)
    reps = model_representations(model, world, tune, others=others, show_progress=show_progress)   # the slow part
    return tune_splits(reps, world.labels, world.tasks, tune, splits=splits, fit_share=fit_share, seed=seed,
                       config=config, show_progress=show_progress)
