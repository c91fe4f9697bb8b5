"""Score every method on the test users: AUC/KS per task and domain, user-level bootstrap CIs, and
paired differences against a reference method (Q-Anchor by default).

A method's scores are a long table `user_id, task_id, score` (higher = more likely positive) with one
row per (user, task). Only test users count: rows for other users are ignored, and a test user with a
label but no score for a task is an error, never silently dropped. `evaluate_methods` returns the
metrics.json contract (docs/design.md §1.8): `{"methods": {name: {"avg_auc", "avg_ks", "domains", "tasks",
...}}}`; the CI and `vs_reference` keys are extras that the report and the results table read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from qanchor_lab import metrics as M
from qanchor_lab.data import MAX_SHOWN, DataValidationError, _shown, validate_labels, validate_tasks

# Every method the demo knows, in display order: the oracle, the feature baselines (with and without
# the event-text TF-IDF), the text baseline, the LLM variants from weakest to strongest, then Q-Anchor
# deployed next to the features. Other names are allowed and listed after these.
METHODS: tuple[str, ...] = (
    "oracle",
    "gbdt_features",
    "logreg_features",
    "tfidf_features",
    "text_embedding",
    "static_embedding",
    "untrained",
    "qanchor_base",
    "qanchor_prompt_tuned",
    "qanchor_plus_features",
)
METHOD_LABELS: dict[str, str] = {
    "oracle": "oracle (true probability)",
    "gbdt_features": "features + GBDT",
    "logreg_features": "features + logistic regression",
    "tfidf_features": "features + event-text TF-IDF + logistic regression",
    "text_embedding": "text embedding + probe",
    "static_embedding": "static embedding + probe",
    "untrained": "untrained model + probe",
    "qanchor_base": "Q-Anchor (task query) + probe",
    "qanchor_prompt_tuned": "Q-Anchor (prompt tuned)",
    "qanchor_plus_features": "Q-Anchor (task query) + features + probe",
}
DIFF_KEYS = ("auc_diff", "auc_low", "auc_high", "ks_diff", "ks_low", "ks_high")
# Does each of Q-Anchor's mechanisms matter? (question, method a, method b): a - b, paired over test users.
MECHANISMS: tuple[tuple[str, str, str], ...] = (
    ("pre-training", "qanchor_base", "untrained"),
    ("the task query", "qanchor_base", "static_embedding"),
    ("prompt tuning", "qanchor_prompt_tuned", "qanchor_base"),
    ("toward the features", "qanchor_prompt_tuned", "logreg_features"),
    ("the embedding next to the features", "qanchor_plus_features", "logreg_features"),
)
# Why the oracle row is missing on real data (metrics["skipped_methods"], the results table, the report).
NO_ORACLE = "labels carry no oracle_prob (real data has no known label probability)"


def oracle_available(labels: pd.DataFrame, test_users: Sequence[str]) -> bool:
    """Whether the oracle can be scored: True when every test label has an oracle_prob, False when none
    has (real data). Some but not all is an error naming the tasks, as a half-known truth is a bug."""
    if "oracle_prob" not in labels.columns:
        return False
    sub = labels[labels["user_id"].isin(set(test_users))]
    known = sub["oracle_prob"].notna().to_numpy()
    if known.all() and len(sub):
        return True
    if not known.any():
        return False
    partial = sorted(sub.loc[~known, "task_id"].unique().tolist())
    raise DataValidationError(
        f"labels: oracle_prob is given for some test rows but missing for {int((~known).sum())} row(s) of "
        f"task(s) {_shown(partial)}; give it for every row (synthetic data) or for none (real data)"
    )


def method_order(names: Sequence[str]) -> list[str]:
    """Known METHODS first in their canonical order, then any other names in the order given."""
    names = list(dict.fromkeys(names))
    return [m for m in METHODS if m in names] + [m for m in names if m not in METHODS]


def method_label(name: str) -> str:
    """A readable name for tables and plots (the raw name for methods outside METHODS)."""
    return METHOD_LABELS.get(name, name)


def _test_scores(method: str, table: pd.DataFrame, test_labels: pd.DataFrame) -> pd.DataFrame:
    """The method's scores for exactly the labelled (test user, task) pairs; errors name method and task."""
    sc = M.score_frame(table, f"method {method!r}: scores")
    sc = sc[sc["user_id"].isin(set(test_labels["user_id"]))]
    dup = sc.duplicated(subset=["user_id", "task_id"], keep=False).to_numpy()
    if dup.any():
        first = sc.loc[dup].iloc[0]
        raise DataValidationError(
            f"method {method!r}, task {first['task_id']!r}: more than one score for test user(s) "
            f"{_shown(sc.loc[dup & (sc['task_id'] == first['task_id']).to_numpy(), 'user_id'].unique().tolist())}"
        )
    merged = test_labels[["user_id", "task_id"]].merge(sc, on=["user_id", "task_id"], how="left", validate="one_to_one")
    bad = ~np.isfinite(merged["score"].to_numpy())
    if bad.any():
        problems = []
        for task_id, group in merged.loc[bad].groupby("task_id", sort=False):
            problems.append(f"task {task_id!r}: {len(group)} test user(s), e.g. {_shown(group['user_id'].tolist())}")
        raise DataValidationError(
            f"method {method!r}: missing, NaN or infinite score for labelled test users in "
            f"{len(problems)} task(s): " + "; ".join(problems)
        )
    return merged


def _check_named_methods(scores: Mapping[str, Any], reference: str | None,
                         comparisons: Sequence[tuple[str, str, str]]) -> tuple[tuple[str, str, str], ...]:
    """`comparisons` as a tuple of triples, or a clear error for a reference or comparison that names no method at
    all: neither scored nor known. A known method that was not scored is fine (the demo's fast mode leaves some
    out); its differences are simply absent."""
    try:  # a tuple, so that a generator is read once, here and by the caller
        triples = None if isinstance(comparisons, (str, bytes)) else tuple(comparisons)
    except TypeError:
        triples = None
    if triples is None or not all(
            isinstance(c, (tuple, list)) and len(c) == 3 and all(isinstance(x, str) for x in c) for c in triples):
        raise TypeError("comparisons must be a sequence of (question, method a, method b) string triples, "
                        f"e.g. {MECHANISMS[0]!r}")
    # a list, not a dict keyed by the question: two comparisons may share a question's text
    named = [("reference", [reference])] if reference is not None else []
    named += [(f"comparison {question!r}", [a, b]) for question, a, b in triples]
    valid = set(METHODS) | set(scores)
    for where, names in named:
        wrong = [n for n in names if n not in valid]
        if wrong:
            raise ValueError(
                f"{where} names {', '.join(map(repr, wrong))}: neither a scored method ({', '.join(map(repr, scores))}) "
                f"nor a known one ({', '.join(METHODS)})"
            )
    return triples


def evaluate_methods(
    scores: Mapping[str, pd.DataFrame],
    labels: pd.DataFrame,
    tasks: pd.DataFrame,
    test_users: Sequence[str],
    *,
    reference: str | None = "qanchor_prompt_tuned",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    comparisons: Sequence[tuple[str, str, str]] = MECHANISMS,
) -> dict:
    """AUC/KS of each method on the test users, with bootstrap CIs and paired differences to `reference`.

    Returns {"methods": {name: {"avg_auc", "avg_ks", "avg_auc_ci": [lo, hi], "avg_ks_ci": [lo, hi],
    "vs_reference": {"auc_diff", "auc_low", "auc_high", "ks_diff", "ks_low", "ks_high"},
    "domains": {domain: {"auc", "ks"}}, "tasks": {task_id: {"auc", "ks"}}}}, "reference",
    "n_test_users", "n_tasks", "bootstrap": {"n_boot", "seed", "ci"}}.

    Methods come in `method_order`. `vs_reference` is (method - reference) on the average over tasks,
    from a paired bootstrap that resamples test users (same draws for every method and both metrics);
    it is absent when `reference` is None or a known method that was not scored (then "reference" is None).
    "comparisons": [{"question", "a", "b", "auc_diff", "auc_low", "auc_high", "ks_diff", ...}] for each
    (question, a, b) of `comparisons` whose two methods were scored (same resamples as above). A reference or
    comparison naming a method that is neither scored nor one of METHODS is an error (a misspelt name would
    otherwise drop its differences without a word).
    """
    if not scores:
        raise ValueError(f"scores is empty; give at least one method (known methods: {', '.join(METHODS)})")
    comparisons = _check_named_methods(scores, reference, comparisons)
    test = pd.Index(pd.Series(list(test_users), dtype="str").unique())
    if len(test) == 0:
        raise ValueError("test_users is empty")
    tasks_v = validate_tasks(tasks)
    labels_v = validate_labels(labels, tasks=tasks_v)
    test_labels = labels_v[labels_v["user_id"].isin(test)][["user_id", "task_id", "label"]].reset_index(drop=True)
    if test_labels.empty:
        raise DataValidationError(
            f"labels: none of the {len(test)} test users has a label (e.g. {_shown(test[:MAX_SHOWN].tolist())})"
        )
    unlabelled = test.difference(pd.Index(test_labels["user_id"].unique()))
    if len(unlabelled):
        raise DataValidationError(
            f"labels: {len(unlabelled)} test user(s) have no label for any task, e.g. {_shown(unlabelled.tolist())}"
        )

    order = method_order(list(scores))
    table = {name: _test_scores(name, scores[name], test_labels) for name in order}
    ref = reference if reference in table else None
    # one set of user resamples for every method, interval and difference below (metrics.Resamples)
    draws = M.Resamples(test_labels, tasks_v, table, n_boot=n_boot, seed=seed)

    methods: dict[str, dict] = {}
    for name in order:
        try:
            summary = M.summarize(M.task_metrics(test_labels, table[name], tasks_v))
            auc_ci = draws.ci(name, "auc", ci=ci)
            ks_ci = draws.ci(name, "ks", ci=ci)
        except DataValidationError as exc:
            raise DataValidationError(f"method {name!r}: {exc}") from None
        entry: dict[str, Any] = {
            "avg_auc": summary["avg_auc"],
            "avg_ks": summary["avg_ks"],
            "avg_auc_ci": [auc_ci["low"], auc_ci["high"]],
            "avg_ks_ci": [ks_ci["low"], ks_ci["high"]],
        }
        if ref is not None:
            if name == ref:
                entry["vs_reference"] = {k: 0.0 for k in DIFF_KEYS}
            else:
                pair = {metric: draws.paired(name, ref, metric, ci=ci, alternative="two-sided") for metric in M.METRICS}
                entry["vs_reference"] = {
                    f"{metric}_{key}": pair[metric][src]
                    for metric in M.METRICS
                    for key, src in (("diff", "diff"), ("low", "low"), ("high", "high"))
                }
        entry["domains"] = summary["domains"]
        entry["tasks"] = summary["tasks"]
        methods[name] = entry
    compared = []
    for question, a, b in comparisons:
        if a in table and b in table:
            pair = {metric: draws.paired(a, b, metric, ci=ci, alternative="two-sided") for metric in M.METRICS}
            compared.append({"question": question, "a": a, "b": b,
                             **{f"{metric}_{key}": pair[metric][key] for metric in M.METRICS for key in ("diff", "low", "high")}})
    return {
        "methods": methods,
        "comparisons": compared,
        "reference": ref,
        "n_test_users": int(test_labels["user_id"].nunique()),
        "n_tasks": int(test_labels["task_id"].nunique()),
        "bootstrap": {"n_boot": int(n_boot), "seed": int(seed), "ci": float(ci)},
    }


def _check_metrics(metrics: Mapping) -> Mapping[str, dict]:
    methods = metrics.get("methods") if isinstance(metrics, Mapping) else None
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("metrics: expected a dict with a non-empty 'methods' entry (as evaluate_methods returns)")
    for name, entry in methods.items():
        missing = [k for k in ("avg_auc", "avg_ks", "domains", "tasks") if k not in entry]
        if missing:
            raise ValueError(f"metrics: method {name!r} lacks key(s) {_shown(missing)}")
    return methods


def _domains_of(methods: Mapping[str, dict]) -> list[str]:
    seen: dict[str, None] = {}
    for entry in methods.values():
        seen.update(dict.fromkeys(entry["domains"]))
    return list(seen)


def results_table(metrics: Mapping) -> pd.DataFrame:
    """One row per method (index `method`, in method_order): avg AUC and KS with CI bounds, the AUC of
    each domain (`auc_<domain>`), and the paired AUC difference to the reference with its CI (NaN
    where the metrics hold no such value)."""
    methods = _check_metrics(metrics)
    domains = _domains_of(methods)
    rows = []
    for name in method_order(list(methods)):
        e = methods[name]
        auc_ci = e.get("avg_auc_ci") or [math.nan, math.nan]
        ks_ci = e.get("avg_ks_ci") or [math.nan, math.nan]
        vs = e.get("vs_reference") or {}
        row = {
            "method": name,
            "avg_auc": e["avg_auc"],
            "avg_auc_low": auc_ci[0],
            "avg_auc_high": auc_ci[1],
            "avg_ks": e["avg_ks"],
            "avg_ks_low": ks_ci[0],
            "avg_ks_high": ks_ci[1],
        }
        for d in domains:
            row[f"auc_{d}"] = e["domains"].get(d, {}).get("auc", math.nan)
        row.update({k: vs.get(k, math.nan) for k in ("auc_diff", "auc_low", "auc_high")})
        rows.append(row)
    return pd.DataFrame(rows).set_index("method").rename(
        columns={"auc_low": "auc_diff_low", "auc_high": "auc_diff_high"}
    ).astype(float)


def _fmt(value: float, low: float = math.nan, high: float = math.nan, *, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    spec = "+.3f" if signed else ".3f"
    text = format(value, spec)
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{format(low, spec)}, {format(high, spec)}]"
    return text


def ci_label(metrics: Mapping) -> str:
    """"80% CI" for the level the metrics' intervals were drawn at (metrics["bootstrap"]["ci"]), or "CI"
    where they name none: every table header reads it, so none can claim a level the numbers lack."""
    return level_label((metrics.get("bootstrap") or {}).get("ci"))


def level_label(level: float | None) -> str:
    """"80% CI" for an interval level of 0.80, "CI" for an unknown one (None)."""
    return f"{round(100 * level)}% CI" if level else "CI"


def formatted_table(metrics: Mapping, *, readable: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings ("0.812 [0.801, 0.823]") for markdown and HTML renderings; rows in
    method_order. `readable` names methods by method_label instead of their keys."""
    table = results_table(metrics)
    reference = metrics.get("reference")
    ci = ci_label(metrics)
    domains = [c[len("auc_"):] for c in table.columns if c.startswith("auc_") and not c.startswith("auc_diff")]
    header = ["method", f"avg AUC [{ci}]", f"avg KS [{ci}]"] + [f"AUC {d}" for d in domains]
    if reference is not None:
        header.append(f"AUC − {method_label(reference) if readable else reference} [{ci}]")
    rows = []
    for name, r in table.iterrows():
        row = [
            method_label(str(name)) if readable else str(name),
            _fmt(r["avg_auc"], r["avg_auc_low"], r["avg_auc_high"]),
            _fmt(r["avg_ks"], r["avg_ks_low"], r["avg_ks_high"]),
        ] + [_fmt(r[f"auc_{d}"]) for d in domains]
        if reference is not None:
            row.append("reference" if name == reference else _fmt(r["auc_diff"], r["auc_diff_low"], r["auc_diff_high"], signed=True))
        rows.append(row)
    return header, rows


def results_markdown(metrics: Mapping) -> str:
    """The results table as a GitHub-flavoured markdown table (one row per method)."""
    header, rows = formatted_table(metrics)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    out = "\n".join([line(header), "| " + " | ".join(align) + " |"] + [line(r) for r in rows]) + "\n"
    for name, why in (metrics.get("skipped_methods") or {}).items():
        out += f"\nNot evaluated: {method_label(name)}: {why}.\n"
    if metrics.get("comparisons"):
        out += "\n" + comparisons_markdown(metrics)
    if metrics.get("few_labels"):
        out += "\n" + few_labels_markdown(metrics)
    return out


def few_labels_lead(few: Mapping) -> str:
    """The sentence that introduces the few-label read (label_budget.few_label_read), or says why it was left out."""
    if "skipped" in few:
        return f"Few-label read left out: {few['skipped']}."
    return (f"With {few['budget']} labelled tune users a task, a probe fitted on each of {few['draws']} draws of them "
            f"({few['interval']}). A question that puts its task first pays here before it pays with every tune "
            "user labelled (docs/design.md §7.43).")


def few_labels_rows(few: Mapping) -> list[list[str]]:
    """[method, AUC [CI], difference from the reference [CI]] per method of the few-label read."""
    ref = few["reference"]
    return [[method_label(m), _fmt(r["auc"], r["auc_low"], r["auc_high"]),
             "reference" if m == ref else _fmt(r["diff"], r["diff_low"], r["diff_high"], signed=True)]
            for m, r in few["methods"].items()]


def few_labels_markdown(metrics: Mapping) -> str:
    """The few-label read as a sentence and a markdown table."""
    few = metrics["few_labels"]
    out = few_labels_lead(few) + "\n"
    if "skipped" in few:
        return out
    out += f"\n| method | AUC [95% CI] | − {method_label(few['reference'])} [95% CI] |\n| --- | ---: | ---: |\n"
    return out + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in few_labels_rows(few))


def comparisons_markdown(metrics: Mapping) -> str:
    """Does each mechanism matter: paired AUC / KS differences with their CIs, one row per question."""
    ci = ci_label(metrics)
    lines = [f"| does it matter? | a − b | AUC diff [{ci}] | KS diff [{ci}] | CI above zero |",
             "| --- | --- | ---: | ---: | --- |"]
    for c in metrics.get("comparisons", []):
        lines.append(f"| {c['question']} | {c['a']} − {c['b']} | {_fmt(c['auc_diff'], c['auc_low'], c['auc_high'], signed=True)} | "
                     f"{_fmt(c['ks_diff'], c['ks_low'], c['ks_high'], signed=True)} | {'yes' if c['auc_low'] > 0 else 'no'} |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"metrics.json: cannot write a value of type {type(value).__name__}: {value!r}")


def write_metrics(metrics: Mapping, path: str | os.PathLike, *, config: Mapping, wall_seconds: float) -> Path:
    """Write metrics.json: everything in `metrics` ("methods", "reference", ...) plus "config" (the run's
    settings, JSON-able) and "wall_seconds". Key order is kept so the file diffs cleanly between runs."""
    _check_metrics(metrics)
    if not np.isfinite(wall_seconds) or wall_seconds < 0:
        raise ValueError(f"wall_seconds must be a finite number >= 0; got {wall_seconds!r}")
    payload = {**{k: v for k, v in metrics.items() if k not in ("config", "wall_seconds")},
               "config": dict(config), "wall_seconds": float(wall_seconds)}
    try:
        text = json.dumps(payload, indent=2, allow_nan=False, default=_jsonable)
    except ValueError as exc:
        raise ValueError(f"metrics.json: {exc} (NaN or infinity in the metrics or config)") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
