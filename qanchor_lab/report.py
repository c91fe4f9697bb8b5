"""The demo's HTML report: one self-contained file (plotly.js inlined once, so it opens offline) with
the AUC/KS table and CIs, per-task and per-domain AUC bars with the oracle marked, pre-training loss
curves, retrieval before/after, and a plain-language paragraph on where Q-Anchor stands.

The figure builders are public so notebooks can show the same plots. Output is deterministic: the
same inputs give byte-identical HTML (fixed div ids, no timestamps unless passed in `notes`).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go

from qanchor_lab.evaluate import (_check_metrics, ci_label, few_labels_lead, few_labels_rows, formatted_table,
                                   method_label, method_order)

ORACLE = "oracle"
# Which Q-Anchor variant the summary speaks for when the metrics name no reference.
QANCHOR_METHODS = ("qanchor_prompt_tuned", "qanchor_base")
LOSS_KEYS = {"loss": "total", "contrastive": "contrastive", "ntp": "next-token"}
# A fixed palette per known method keeps colours stable across reports and notebooks (keyed by name,
# so adding a method to METHODS never shifts the others' colours).
_COLOURS = {
    "oracle": "#222222",
    "gbdt_features": "#8c6d31",
    "logreg_features": "#bd9e39",
    "tfidf_features": "#e7ba52",
    "text_embedding": "#7b4173",
    "static_embedding": "#6b6ecf",
    "untrained": "#9c9ede",
    "qanchor_base": "#31a354",
    "qanchor_prompt_tuned": "#006d2c",
    "qanchor_plus_features": "#74c476",
}
_EXTRA_COLOURS = ("#e6550d", "#3182bd", "#de2d26", "#636363", "#17becf", "#d62728")
_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table.results { border-collapse: collapse; font-size: 0.9em; }
table.results th, table.results td { border: 1px solid #ccc; padding: 4px 8px; }
table.results td { text-align: right; font-variant-numeric: tabular-nums; }
table.results td:first-child, table.results th:first-child { text-align: left; }
table.results tr.reference { background: #eef7ee; font-weight: 600; }
p.stands { background: #f6f6f6; padding: 0.8em 1em; border-left: 4px solid #31a354; }
ul.notes { color: #555; }
"""


def _colour(name: str, extras: list[str]) -> str:
    if name in _COLOURS:
        return _COLOURS[name]
    if name not in extras:
        extras.append(name)
    return _EXTRA_COLOURS[extras.index(name) % len(_EXTRA_COLOURS)]


def _auc_bars(metrics: Mapping, level: str, title: str) -> go.Figure:
    """Grouped AUC bars per method over the categories of `level` ("tasks" or "domains"); the oracle
    is drawn as a black marker per category rather than a bar."""
    methods = _check_metrics(metrics)
    names = method_order(list(methods))
    categories: list[str] = []
    for n in names:
        categories += [c for c in methods[n][level] if c not in categories]
    fig = go.Figure()
    extras: list[str] = []
    values: list[float] = []
    for n in names:
        if n == ORACLE:
            continue
        ys = [methods[n][level].get(c, {}).get("auc", math.nan) for c in categories]
        values += ys
        fig.add_bar(x=categories, y=ys, name=method_label(n), marker_color=_colour(n, extras),
                    hovertemplate="%{x}<br>AUC %{y:.3f}<extra>" + html.escape(method_label(n)) + "</extra>")
    if ORACLE in methods:
        ys = [methods[ORACLE][level].get(c, {}).get("auc", math.nan) for c in categories]
        values += ys
        fig.add_scatter(x=categories, y=ys, mode="markers", name=method_label(ORACLE),
                        marker=dict(symbol="line-ew", size=34, line=dict(width=3, color=_COLOURS[ORACLE])),
                        hovertemplate="%{x}<br>oracle AUC %{y:.3f}<extra></extra>")
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low = max(0.0, min([0.5] + finite) - 0.03)
    high = min(1.0, max(finite + [0.5]) + 0.03)
    if ORACLE in methods:
        title += " (black dash: oracle)"
    fig.update_layout(
        title=title, barmode="group", bargap=0.25, template="plotly_white", height=460,
        yaxis=dict(title="AUC", range=[low, high]), legend=dict(orientation="h", y=-0.2),
        margin=dict(l=60, r=20, t=60, b=40),
    )
    fig.add_hline(y=0.5, line=dict(color="#999", dash="dot", width=1))
    return fig


def figure_task_bars(metrics: Mapping) -> go.Figure:
    """Per-task AUC, one bar per method, with the oracle's AUC marked on each task."""
    return _auc_bars(metrics, "tasks", "Test AUC per task")


def figure_domain_bars(metrics: Mapping) -> go.Figure:
    """Per-domain average AUC, one bar per method, with the oracle marked."""
    return _auc_bars(metrics, "domains", "Test AUC averaged per domain")


def figure_loss_curves(loss_log: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Pre-training losses over steps from log.jsonl records (keys step, loss, contrastive, ntp)."""
    if not loss_log:
        raise ValueError("loss_log is empty: no log.jsonl records to plot")
    for i, rec in enumerate(loss_log):
        if not isinstance(rec, Mapping) or "step" not in rec:
            raise ValueError(f"loss_log record {i} has no 'step' key: {rec!r}")
    present = [k for k in LOSS_KEYS if any(k in rec for rec in loss_log)]
    if not present:
        raise ValueError(f"loss_log records carry none of the loss keys {', '.join(LOSS_KEYS)}")
    records = sorted(loss_log, key=lambda r: r["step"])
    fig = go.Figure()
    colours = {"loss": "#222222", "contrastive": "#31a354", "ntp": "#3182bd"}
    for k in present:
        pts = [(r["step"], r[k]) for r in records if k in r and r[k] is not None]
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=LOSS_KEYS[k],
                        line=dict(color=colours[k], width=2 if k == "loss" else 1.5))
    fig.update_layout(title="Pre-training loss", template="plotly_white", height=400,
                      xaxis=dict(title="optimizer step"), yaxis=dict(title="loss"),
                      legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=20, t=60, b=40))
    return fig


def _retrieval_stages(retrieval: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Stages (e.g. untrained / trained) that hold a result dict; a None stage was skipped (resume)."""
    stages = {str(k): v for k, v in retrieval.items() if isinstance(v, Mapping)}
    if not stages:
        raise ValueError(
            "retrieval: expected {stage: result dict} such as {'untrained': {...}, 'trained': {...}}; "
            f"got keys {list(retrieval)}"
        )
    return stages


def figure_retrieval(retrieval: Mapping[str, Any]) -> go.Figure:
    """Held-out answer retrieval accuracy (top-k keys) per stage, with chance top-1 as a dotted line."""
    stages = _retrieval_stages(retrieval)
    keys: list[str] = []
    for res in stages.values():
        keys += [k for k, v in res.items() if k.startswith("top") and isinstance(v, (int, float)) and k not in keys]
    fig = go.Figure()
    palette = ("#9c9ede", "#006d2c", "#e6550d", "#3182bd")
    for i, (stage, res) in enumerate(stages.items()):
        fig.add_bar(x=keys, y=[res.get(k, math.nan) for k in keys], name=stage, marker_color=palette[i % len(palette)],
                    hovertemplate="%{x}: %{y:.3f}<extra>" + html.escape(stage) + "</extra>")
    chance = next((res["chance_top1"] for res in stages.values() if "chance_top1" in res), None)
    if chance is not None:
        fig.add_hline(y=chance, line=dict(color="#999", dash="dot"), annotation_text="chance top-1")
    fig.update_layout(title="Held-out answer retrieval", barmode="group", template="plotly_white", height=380,
                      yaxis=dict(title="accuracy", range=[0, 1]), margin=dict(l=60, r=20, t=60, b=40))
    return fig


def _pick_reference(metrics: Mapping) -> str | None:
    methods = metrics["methods"]
    ref = metrics.get("reference")
    if ref in methods:
        return ref
    return next((m for m in QANCHOR_METHODS if m in methods), None)


def where_qanchor_stands(metrics: Mapping) -> str:
    """A plain-language paragraph computed from the numbers: what Q-Anchor beats, matches and trails on
    average AUC (by the paired bootstrap CI), and its gap to the oracle."""
    methods = _check_metrics(metrics)
    ref = _pick_reference(metrics)
    # the level the intervals were drawn at ("95% CI"), or a bare "CI" where the metrics name none: as the table's
    # header reads it, so the paragraph never claims a level the numbers lack
    ci = ci_label(metrics)
    if ref is None:
        ranked = sorted((m for m in methods if m != ORACLE), key=lambda m: -methods[m]["avg_auc"])
        if not ranked:
            return "Only the oracle was evaluated."
        return (f"No Q-Anchor method was evaluated. The best of the {len(ranked)} methods on average AUC is "
                f"{method_label(ranked[0])} ({methods[ranked[0]]['avg_auc']:.3f}).")
    r = methods[ref]
    parts = [f"{method_label(ref)} reaches an average test AUC of {r['avg_auc']:.3f}"]
    if r.get("avg_auc_ci"):
        lo, hi = r["avg_auc_ci"]
        parts[0] += f" ({ci} {lo:.3f}–{hi:.3f})"
    parts[0] += f" and KS {r['avg_ks']:.3f}"
    n_tasks, n_users = metrics.get("n_tasks"), metrics.get("n_test_users")
    if n_tasks and n_users:
        parts[0] += f" over {n_tasks} tasks and {n_users} test users"
    parts[0] += "."
    beats, level_with, trails = [], [], []
    for m in method_order(list(methods)):
        if m in (ref, ORACLE):
            continue
        vs = methods[m].get("vs_reference") if metrics.get("reference") == ref else None
        if not vs:
            continue
        # vs_reference is (method - reference): Q-Anchor's margin is its negation
        margin, lo, hi = -vs["auc_diff"], -vs["auc_high"], -vs["auc_low"]
        text = f"{method_label(m)} ({margin:+.3f}, CI {lo:+.3f} to {hi:+.3f})"
        (beats if lo > 0 else trails if hi < 0 else level_with).append(text)
    if beats:
        parts.append("It is reliably better than " + "; ".join(beats) + ".")
    if level_with:
        parts.append("It cannot be told apart from " + "; ".join(level_with)
                     + f": the {ci} of the AUC difference spans zero.")
    if trails:
        parts.append("It is reliably worse than " + "; ".join(trails) + ".")
    if not (beats or level_with or trails) and len(methods) > 1:
        parts.append("No paired differences against it were computed.")
    if ORACLE in methods:
        o = methods[ORACLE]["avg_auc"]
        gap = o - r["avg_auc"]
        sentence = (f"The oracle, which scores each user by the true label probability, reaches {o:.3f}: "
                    f"a gap of {gap:.3f} AUC")
        if o > 0.5:
            share = (r["avg_auc"] - 0.5) / (o - 0.5)
            sentence += f", so it captures {100 * share:.0f}% of the oracle's lift over chance (AUC 0.5)"
        parts.append(sentence + ".")
    return " ".join(parts)


def _table_html(metrics: Mapping) -> str:
    header, rows = formatted_table(metrics, readable=True)
    names = method_order(list(metrics["methods"]))  # the order formatted_table uses
    ref = metrics.get("reference")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for name, row in zip(names, rows):
        cls = ' class="reference"' if name == ref else ""
        cells = [f'<td title="{html.escape(name)}">{html.escape(row[0])}</td>']
        cells += [f"<td>{html.escape(c)}</td>" for c in row[1:]]
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _retrieval_table(retrieval: Mapping[str, Any]) -> str:
    stages = _retrieval_stages(retrieval)
    keys: list[str] = []
    for res in stages.values():
        keys += [k for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    head = "<th>stage</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for stage, res in stages.items():
        cells = []
        for k in keys:
            v = res.get(k)
            cells.append("–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        rows.append(f"<tr><td>{html.escape(stage)}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def write_report(
    path: str | os.PathLike,
    metrics: Mapping,
    *,
    loss_log: Sequence[Mapping[str, Any]] | None = None,
    retrieval: Mapping[str, Any] | None = None,
    title: str = "Q-Anchor demo report",
    notes: Sequence[str] = (),
    diagnostics: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report as one HTML file that opens offline; returns its path.

    metrics: as evaluate_methods returns (or metrics.json read back; its "config" and "wall_seconds"
    are shown at the end). loss_log: log.jsonl records. retrieval: {stage: answer_retrieval result}.
    notes: extra lines shown under the title (e.g. the run's date, passed in for determinism).
    diagnostics: `qanchor_lab.diagnostics.diagnose` output, shown as its own section."""
    _check_metrics(metrics)
    figures: list[tuple[str, str, go.Figure]] = [
        ("Per-task AUC", "fig-task-auc", figure_task_bars(metrics)),
        ("Per-domain AUC", "fig-domain-auc", figure_domain_bars(metrics)),
    ]
    if loss_log:
        figures.append(("Pre-training loss curves", "fig-loss", figure_loss_curves(loss_log)))
    if retrieval:
        figures.append(("Held-out answer retrieval, before and after pre-training", "fig-retrieval",
                        figure_retrieval(retrieval)))

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    out.append("<h2>Where Q-Anchor stands</h2>")
    out.append(f'<p class="stands">{html.escape(where_qanchor_stands(metrics))}</p>')
    out.append("<h2>Results on the test users</h2>")
    boot = metrics.get("bootstrap")
    if boot:
        out.append(f"<p>Intervals: {round(100 * boot['ci'])}% basic bootstrap over test users "
                   f"({boot['n_boot']} resamples, seed {boot['seed']}); differences are paired (same resamples).</p>")
    out.append(_table_html(metrics))
    if metrics.get("comparisons"):
        out.append("<h2>Does each mechanism matter?</h2>")
        out.append("<p>Paired differences over the same bootstrap resamples of test users (a − b, average over tasks). "
                   "Each probe was fitted once, on the tune users; which tune users those were moves a difference too, "
                   "and these intervals leave that out: <code>python -m qanchor_lab refit-intervals RUN</code> refits "
                   "the probes on bootstrap draws of the tune users and widens the intervals by it (docs/design.md "
                   "§7.36).</p>")
        out.append(_comparisons_html(metrics["comparisons"], ci_label(metrics)))
    if metrics.get("few_labels"):
        out.append("<h2>With few labels</h2>")
        out.append(_few_labels_html(metrics["few_labels"]))
    for i, (heading, div_id, fig) in enumerate(figures):
        out.append(f"<h2>{html.escape(heading)}</h2>")
        if div_id == "fig-retrieval":
            out.append(_retrieval_table(retrieval))
        # plotly.js is inlined with the first figure only; later figures reuse it
        out.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=div_id,
                               config={"displaylogo": False}))
    if diagnostics:  # the section brings its own <h2>
        out.append(diagnostics_section(diagnostics, include_plotlyjs=not figures))
    if "config" in metrics or "wall_seconds" in metrics:
        out.append("<h2>Run</h2>")
        if "wall_seconds" in metrics:
            out.append(f"<p>Wall time: {metrics['wall_seconds']:.1f} s</p>")
        if "config" in metrics:
            cfg = json.dumps(metrics["config"], indent=2, default=str)
            out.append(f"<details><summary>configuration</summary><pre>{html.escape(cfg)}</pre></details>")
    out.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _comparisons_html(comparisons: Sequence[Mapping[str, Any]], ci: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c['question'])}</td><td>{html.escape(c['a'])} − {html.escape(c['b'])}</td>"
        f"<td>{c['auc_diff']:+.3f} [{c['auc_low']:+.3f}, {c['auc_high']:+.3f}]</td>"
        f"<td>{c['ks_diff']:+.3f} [{c['ks_low']:+.3f}, {c['ks_high']:+.3f}]</td>"
        f"<td>{'yes' if c['auc_low'] > 0 else 'no'}</td></tr>" for c in comparisons)
    return (f"<table><thead><tr><th>does it matter?</th><th>a − b</th><th>AUC diff [{ci}]</th>"
            f"<th>KS diff [{ci}]</th><th>AUC CI above zero</th></tr></thead><tbody>{rows}</tbody></table>")


def _few_labels_html(few: Mapping[str, Any]) -> str:
    out = f"<p>{html.escape(few_labels_lead(few))}</p>"
    if "skipped" in few:
        return out
    head = ("<th>method</th><th>AUC [95% CI]</th>"
            f"<th>− {html.escape(method_label(few['reference']))} [95% CI]</th>")
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in few_labels_rows(few))
    return out + f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def diagnostics_section(diag: Mapping[str, Any], *, include_plotlyjs: bool = False) -> str:
    """An HTML fragment for `qanchor_lab.diagnostics.diagnose` output: headline table, probe R² and
    retention per stage (untrained vs trained, with a bar chart), query geometry, overall claim accuracy
    against the majority claim and the tabular yardstick, query selectivity (or why it was skipped), and the
    perfect-QA-learner bound; the target is named as `diagnostics.target_words` names it (the oracle score, or the
    task label on real data).

    Pass include_plotlyjs=True when the page has no plotly.js yet (write_report inlines it with its first
    figure). Deterministic: fixed div id, no timestamps."""
    from qanchor_lab.diagnostics import claim_comparison, figure_stage_r2, stage_comparison, target_words

    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return "–" if isinstance(v, float) and not math.isfinite(v) else (f"{v:.3f}" if isinstance(v, float) else str(v))
        return "–" if v is None else html.escape(str(v))

    def table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
        return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    names = list(diag["models"])
    words = target_words(diag.get("stage_target"))
    out = ["<h2>Representation diagnostics</h2>",
           f"<p>Ridge probes (5-fold) on {diag['n_users']} tune users under the query "
           f"<em>{html.escape(str(diag['query']))}</em>. Retention is a stage's {words.r2} over the tabular "
           f"input's; the target for the final embedding is {diag['retention_target']:.0%}."
           + (f" {html.escape(words.caveat)}" if words.caveat else "") + "</p>",
           table([{"model": n, **diag["summary"][n]} for n in names],
                 ["model", "input_tabular_oracle_r2", "embedding_oracle_r2", "embedding_retention",
                  "meets_retention_target", "claim_acc", "majority_acc", "gbdt_acc", "effective_dim_mean"])]
    r2, keep = stage_comparison(diag, "oracle_r2"), stage_comparison(diag, "retention")
    rows = [{"stage": s, **{f"R² {n}": r2.loc[s, n] for n in names}, **{f"retention {n}": keep.loc[s, n] for n in names}}
            for s in r2.index]
    out.append(table(rows, ["stage", *[f"R² {n}" for n in names], *[f"retention {n}" for n in names]]))
    out.append(figure_stage_r2(diag).to_html(full_html=False, include_plotlyjs=include_plotlyjs,
                                             div_id="fig-diagnostics-stages", config={"displaylogo": False}))
    out.append("<h3>Query geometry</h3><p>user / query / interaction share: how the embeddings' variance splits "
               "over users and task queries; novelty: the share of a task query's embedding that no linear map of the "
               "generic query's embedding predicts, the only part through which the question can add to a probe "
               "refitted per task; task read gain: each task's R² from the embedding under its own query minus under the "
               "generic query (same folds, mean over tasks), whether that part is the task's, with its 95% interval "
               "(users resampled, the probes fixed); task lead gain: the share of each task's target along the "
               "embedding's two leading principal components under its own query minus under the generic query (mean over "
               "tasks): whether the question puts its task first, which a probe fitted on few labels can use, with its "
               "95% interval (users resampled and the directions found anew; wide where leading directions nearly "
               "tie)." + (f" Note: {html.escape(diag['geometry_note'])}." if diag.get("geometry_note") else "")
               + "</p>")
    out.append(table([{"model": n, **diag["geometry"][n]} for n in names],
                     ["model", "effective_dim_mean", "embed_dim", "same_user_cos", "cross_user_cos", "user_share",
                      "query_share", "interaction_share", "novelty_mean", "task_read_gain_mean", "task_read_gain_low",
                      "task_read_gain_high", "task_lead_gain_mean", "task_lead_gain_low", "task_lead_gain_high"]))
    out.append("<h3>Claim accuracy on held-out pre-training users</h3>")
    claims = claim_comparison(diag)
    out.append(table(claims[claims["intent"] == "overall"].to_dict("records"),
                     ["source", "n", *[f"acc_{n}" for n in names], "majority_acc", "logreg_acc", "gbdt_acc"]))
    question = ("Does a question make the embedding more informative about its own answer? A claim probe per intent on "
                "the embedding under the intent's own query against the same probe under the generic query (paired 95% CI)")
    if diag.get("selectivity"):
        out.append(f"<h3>Query selectivity on held-out pre-training users</h3><p>{question}, fitted on pretrain rows and "
                   "scored on pretrain_val rows. A few hundred rows: the mean moves by a few hundredths with the draw; "
                   "the tune-user version (the demo's, or <code>diagnose RUN --tune-selectivity-users 600</code>) is "
                   "the steadier read.</p>")
        out.append(table([{"model": n, **r} for n in names for r in diag["selectivity"][n] if r["intent"] == "overall"],
                         ["model", "source", "n", "own_acc", "generic_acc", "majority_acc", "selectivity",
                          "selectivity_low", "selectivity_high"]))
    elif diag.get("selectivity_skipped"):
        out.append("<h3>Query selectivity on held-out pre-training users</h3>"
                   f"<p>Skipped: {html.escape(diag['selectivity_skipped'])}.</p>")
    if diag.get("tune_selectivity"):
        out.append(f"<h3>Query selectivity on tune users</h3><p>{question}, cross-validated over tune users (never "
                   "trained on), each answering every D_uqa question from their history window; n = users × questions."
                   "</p>")
        out.append(table([{"model": n, **r} for n in names for r in diag["tune_selectivity"].get(n, [])
                          if r["intent"] == "overall" and r["source"] == "all"],
                         ["model", "n", "own_acc", "generic_acc", "majority_acc", "selectivity", "selectivity_low",
                          "selectivity_high"]))
    pq = diag["perfect_qa"]
    out.append(f"<p>Perfect QA learner: one-hot D_uqa claims explain {target_words(pq.get('target')).r2} "
               f"{cell(pq['claims_r2'])} "
               f"against {cell(pq['features_r2'])} for the tabular features. {html.escape(pq['note'])}</p>")
    return "\n".join(out)
