"""plotly figures for experiment summaries: bars with CI error bars, lines with CI bands, a heatmap.

Each takes a summary table (core.summarize's columns) and returns a go.Figure; the notebooks show them. Default
titles name the intervals' level the summary was computed at (its `attrs["ci"]`, or `ci=` given), "CI" where unknown.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go

from qanchor_lab.evaluate import level_label

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def bar_with_ci(summary: pd.DataFrame, *, metric: str = "auc", title: str = "", order: Sequence[str] | None = None,
                ci: float | None = None) -> go.Figure:
    """One bar per variant (a group per method): mean over seeds with its bootstrap CI as error bars."""
    fig = go.Figure()
    for i, (method, g) in enumerate(summary.groupby("method", sort=False)):
        if order is not None:
            g = g.set_index("variant").reindex([v for v in order if v in set(g["variant"])]).reset_index()
        fig.add_bar(x=g["variant"], y=g[metric], name=method, marker_color=COLOURS[i % len(COLOURS)],
                    error_y=dict(type="data", symmetric=False, array=g[f"{metric}_high"] - g[metric],
                                 arrayminus=g[metric] - g[f"{metric}_low"]),
                    hovertext=g.get("sentence"))
    lo = float(summary[f"{metric}_low"].min())
    fig.update_layout(title=title or f"average {metric.upper()} over tasks and seeds ({_level(summary, ci)})",
                      barmode="group",
                      yaxis=dict(title=metric.upper(), range=[max(0.0, lo - 0.05), None]), template="plotly_white")
    return fig


def line_with_band(table: pd.DataFrame, x: str, *, metric: str = "auc", title: str = "", log_x: bool = False,
                   ci: float | None = None) -> go.Figure:
    """Mean metric against a swept value `x`, one line per method, with the CI as a shaded band."""
    fig = go.Figure()
    for i, (method, g) in enumerate(table.groupby("method", sort=False)):
        g = g.sort_values(x)
        colour = COLOURS[i % len(COLOURS)]
        fig.add_scatter(x=list(g[x]) + list(g[x])[::-1], y=list(g[f"{metric}_high"]) + list(g[f"{metric}_low"])[::-1],
                        fill="toself", fillcolor=colour, opacity=0.2, line=dict(width=0), hoverinfo="skip",
                        showlegend=False, name=f"{method} CI")
        fig.add_scatter(x=g[x], y=g[metric], mode="lines+markers", name=method, line=dict(color=colour))
    fig.update_layout(title=title or f"{metric.upper()} against {x} ({_level(table, ci)} band)", xaxis=dict(title=x),
                      yaxis=dict(title=metric.upper()), template="plotly_white")
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def heatmap(grid: pd.DataFrame, *, title: str = "", zlabel: str = "AUC") -> go.Figure:
    """A (rows x columns) grid of values, e.g. heatmap_values() of the scaling experiment, annotated."""
    text = grid.map(lambda v: f"{v:.3f}" if pd.notna(v) else "")
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index],
                               text=text.to_numpy(), texttemplate="%{text}", colorscale="Viridis",
                               colorbar=dict(title=zlabel)))
    fig.update_layout(title=title, xaxis=dict(title=str(grid.columns.name or "")),
                      yaxis=dict(title=str(grid.index.name or "")), template="plotly_white")
    return fig


def _level(table: pd.DataFrame, ci: float | None) -> str:
    """"95% CI" for the level given, else the one the table was computed at, else "CI"."""
    return level_label(ci if ci is not None else table.attrs.get("ci"))
