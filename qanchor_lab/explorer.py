"""The query explorer: one user population seen through one query at a time (issue 9, item 4).

`explore(model, world)` returns a widget (plotly FigureWidget + ipywidgets): pick a task query or type
any question, switch between the task query and its tuned soft prompt, colour users by label, persona,
a trait or the predicted score, and select users to read their timelines.

The computation lives in plain functions, testable without a browser:
- `Population`: the users, their behaviour prefixes run ONCE into a KV cache
  (embedder.build_prefix_cache_in_chunks), labels, traits and hover summaries. A query then costs only its own tokens
  (`embed_query`, `embed_tuned`: embedder.run_cached / TaskAdapter.embed over the cache, docs/design.md §2).
- `project` (UMAP or PCA to 2-D) and `align_layouts` / `place_new`, which keep coordinates comparable across
  queries so points do not jump at every change:
  * "warm_start" (default): the first task query gets a full UMAP; every other query starts UMAP from the
    coordinates it is compared with and runs a few epochs, then an orthogonal Procrustes fit (rotation,
    reflection, uniform scale, shift) maps it onto them. A new free-text query is placed the same way,
    starting from the coordinates on screen: about a second over 2,000 users.
  * "aligned_umap": umap-learn's AlignedUMAP over all task queries at open time (identity relations between
    consecutive queries). Exact to the library's method but slow: minutes for 10 queries x 2,000 users on
    two cores, so it is an option, not the default. New free-text queries are still placed by warm start.
  * PCA layouts are aligned by the Procrustes fit alone.
- `QueryExplorer` only wires widgets to those functions.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from qanchor_lab.configs import DictConfig
from qanchor_lab.behaviour import BehaviourStore
from qanchor_lab.embedder import PrefixCache, build_prefix_cache_in_chunks, run_cached
from qanchor_lab.parallel import torch_threads
from qanchor_lab.schema import string_list

Method = Literal["umap", "pca"]
METHODS: tuple[str, ...] = ("umap", "pca")
Align = Literal["warm_start", "aligned_umap"]
ALIGNS: tuple[str, ...] = ("warm_start", "aligned_umap")
# answers the score projection compares against when no tuned adapter exists (the semantic tower's space)
YES_NO = ("Yes", "No")
PROFILE_FIELDS = ("age", "credit_limit", "bureau_score", "city_tier")
QUERY, PROMPT = "task query", "tuned prompt"


@dataclass
class ExplorerConfig(DictConfig):
    n_neighbors: int = 15             # UMAP neighbourhood size (clamped below the population size)
    min_dist: float = 0.1             # UMAP minimum distance between embedded points
    reference_epochs: int = 200       # epochs of the reference UMAP (first task query), from a PCA start
    warm_epochs: int = 30             # epochs of a UMAP started from existing coordinates (enough to settle)
    align: Align = "warm_start"       # how task-query layouts are aligned at open time (module docstring)
    batch_size: int = 256             # users per suffix run over the prefix cache
    # torch threads for the explorer's LLM passes (None: torch's own setting). On the shared 2-core machines two
    # threads wait on each other whenever anything else runs: a new query over 2,000 users took 0.82 s at one
    # thread and 7.3 s at two while one other process kept a core busy (bench explorer)
    threads: int | None = 1
    max_timeline_users: int = 3       # selected users whose timelines the side panel shows
    max_timeline_events: int = 12     # most recent events shown per selected user
    transition_ms: int = 600          # animated transition between two queries (when "animate" is ticked)
    width: int = 760                  # figure size in pixels
    height: int = 560

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise ValueError(f"ExplorerConfig.align must be one of {ALIGNS}, got {self.align!r}")
        for name in ("n_neighbors", "reference_epochs", "warm_epochs", "batch_size", "max_timeline_users",
                     "max_timeline_events", "width", "height"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExplorerConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.n_neighbors < 2:
            raise ValueError(f"ExplorerConfig.n_neighbors must be >= 2, got {self.n_neighbors}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"ExplorerConfig.threads must be None or >= 1, got {self.threads}")
        if not 0 <= self.min_dist <= 1:
            raise ValueError(f"ExplorerConfig.min_dist must lie in [0, 1], got {self.min_dist}")
        if self.transition_ms < 0:
            raise ValueError(f"ExplorerConfig.transition_ms must be >= 0, got {self.transition_ms}")



# ----------------------------------------------------------------------------------------------
# embedding queries over a cached population


@torch.no_grad()
def embed_query(model, cache: PrefixCache, query: str, *, batch_size: int = 256) -> np.ndarray:
    """(N, d) embeddings of every cached user under `query`; only the query's tokens run."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"embed_query: the query must be non-empty text, got {query!r}")
    suffix = model.make_suffix([query])
    out = [run_cached(model, rows, suffix.tile(len(rows))) for rows in cache.chunks(batch_size)]   # (b, d) each
    return torch.cat(out).cpu().numpy()                                        # (N, d)


@torch.no_grad()
def embed_tuned(model, cache: PrefixCache, adapter, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) embeddings under a TaskAdapter's soft prompt and (N,) its P(positive) for every cached user."""
    embs, probs = [], []
    for rows in cache.chunks(batch_size):
        emb = adapter.embed(model, rows)                                      # (b, d)
        embs.append(emb)
        probs.append(adapter.class_probs(emb)[:, 1])
    return torch.cat(embs).cpu().numpy(), torch.cat(probs).cpu().numpy()


@torch.no_grad()
def answer_projection(model, emb: np.ndarray) -> np.ndarray:
    """(N,) cosine to the answer "Yes" minus cosine to "No" in the semantic tower's space: a label-free score
    for any query (pre-training pulls a user's embedding toward the embedding of its answer)."""
    answers = model.embed_answers(list(YES_NO)).cpu().numpy()                 # (2, d) unit rows
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    return unit @ answers[0] - unit @ answers[1]


# ----------------------------------------------------------------------------------------------
# 2-D layouts and their alignment


def procrustes_onto(coords: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`coords` (N, 2) rotated/reflected, uniformly scaled and shifted to best match `reference` (N, 2) in the
    least-squares sense (orthogonal Procrustes): the layout's shape is kept, only its pose changes."""
    from scipy.linalg import orthogonal_procrustes

    a = coords - coords.mean(0)
    b = reference - reference.mean(0)
    rotation, singular_sum = orthogonal_procrustes(a, b)                      # (2, 2), sum of singular values
    scale = singular_sum / max(float((a ** 2).sum()), 1e-12)
    return (a @ rotation * scale + reference.mean(0)).astype(np.float32)


def project(emb: np.ndarray, method: Method = "umap", *, init: np.ndarray | None = None, seed: int = 0,
            config: ExplorerConfig | None = None) -> np.ndarray:
    """(N, 2) layout of embeddings (N, d). UMAP starts from `init` (N, 2) when given and runs only
    `warm_epochs` (a layout that settles from existing coordinates), else from PCA for `reference_epochs`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = config or ExplorerConfig()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) < 4:
        raise ValueError(f"project: need an (N, d) array with N >= 4 users, got shape {emb.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(2, random_state=seed).fit_transform(emb).astype(np.float32)
    import warnings

    from sklearn.neighbors import NearestNeighbors
    from umap import UMAP

    k = min(config.n_neighbors, len(emb) - 1)
    # exact neighbours (includes each point itself, as umap's own search does): milliseconds at this size,
    # where umap's approximate search would be compiled and run afresh for every query
    dist, idx = NearestNeighbors(n_neighbors=k).fit(emb).kneighbors(emb)
    if init is not None and init.shape != (len(emb), 2):
        raise ValueError(f"project: init must have shape ({len(emb)}, 2), got {init.shape}")
    reducer = UMAP(n_neighbors=k, min_dist=config.min_dist, random_state=seed, precomputed_knn=(idx, dist, None),
                   init="pca" if init is None else np.asarray(init, dtype=np.float32),
                   n_epochs=config.reference_epochs if init is None else config.warm_epochs)
    with warnings.catch_warnings():  # random_state disables parallelism (umap says so every call)
        warnings.simplefilter("ignore")
        return reducer.fit_transform(emb).astype(np.float32)


def place_new(emb: np.ndarray, current: np.ndarray, method: Method = "umap", *, seed: int = 0,
              config: ExplorerConfig | None = None) -> np.ndarray:
    """Layout (N, 2) of a new query's embeddings aligned to the coordinates on screen `current` (N, 2)."""
    init = current if method == "umap" else None
    return procrustes_onto(project(emb, method, init=init, seed=seed, config=config), current)


def align_layouts(embs: Sequence[np.ndarray], method: Method = "umap", *, seed: int = 0,
                  config: ExplorerConfig | None = None) -> list[np.ndarray]:
    """Aligned (N, 2) layouts of several queries' embeddings of the same users (config.align)."""
    config = config or ExplorerConfig()
    if not embs:
        return []
    if method == "umap" and config.align == "aligned_umap" and len(embs) > 1:
        import warnings

        from umap import AlignedUMAP

        n = len(embs[0])
        identity = {i: i for i in range(n)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted = AlignedUMAP(n_neighbors=min(config.n_neighbors, n - 1), min_dist=config.min_dist,
                                 random_state=seed).fit([np.asarray(e, np.float32) for e in embs],
                                                        relations=[identity] * (len(embs) - 1))
        return [np.asarray(e, np.float32) for e in fitted.embeddings_]
    reference = project(embs[0], method, seed=seed, config=config)
    return [reference] + [place_new(e, reference, method, seed=seed, config=config) for e in embs[1:]]


def displacement(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square distance a point moves from layout `b` to layout `a` (N, 2), in units of `b`'s
    spread (its RMS distance to its centre): 0 = no point moves, ~1.4 = unrelated layouts."""
    spread = float(np.sqrt(((b - b.mean(0)) ** 2).sum(1).mean()))
    return float(np.sqrt(((a - b) ** 2).sum(1).mean())) / max(spread, 1e-12)


def interpolate(a: np.ndarray, b: np.ndarray, n_frames: int) -> list[np.ndarray]:
    """`n_frames` (>= 2) layouts moving linearly from `a` to `b`, both ends included."""
    if n_frames < 2:
        raise ValueError(f"interpolate: n_frames must be >= 2, got {n_frames}")
    return [(1 - t) * a + t * b for t in np.linspace(0.0, 1.0, n_frames)]


def animation_figure(a: np.ndarray, b: np.ndarray, *, names: tuple[str, str] = ("A", "B"), color=None,
                     n_frames: int = 12, hovertext=None):
    """A plotly Figure with frames morphing layout `a` into `b` (a static, shareable animation). `color`: one
    value per point, numbers (a colour scale) or categories such as personas (one colour each, named in the
    legend, as the explorer colours them; NaN = unknown)."""
    steps = interpolate(a, b, n_frames)
    marker, legend = dict(size=5), []
    if color is not None:
        values = pd.Series(color).reset_index(drop=True)   # a list's numbers with None stay numbers (NaN)
        if len(values) != len(a):
            raise ValueError(f"animation_figure: color has {len(values)} values for {len(a)} points")
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            marker.update(color=values.to_numpy(dtype=float, na_value=np.nan), colorscale="Viridis")
        else:   # plotly takes only numbers or colour names as colours: map categories to the explorer's palette
            colours, legend = _colour_values("category", values)
            marker.update(color=colours)
    # frames move only the points (trace 0), never the legend entries after it
    frames = [go.Frame(data=[go.Scatter(x=s[:, 0], y=s[:, 1])], traces=[0], name=str(i)) for i, s in enumerate(steps)]
    fig = go.Figure(data=[go.Scatter(x=a[:, 0], y=a[:, 1], mode="markers", marker=marker, hovertext=hovertext,
                                     hoverinfo="text" if hovertext is not None else None, showlegend=False)]
                    + _legend_traces(legend), frames=frames)
    play = dict(label="play", method="animate",
                args=[None, dict(frame=dict(duration=60, redraw=False), transition=dict(duration=0), fromcurrent=False)])
    fig.update_layout(title=f"{names[0]} → {names[1]}", updatemenus=[dict(type="buttons", buttons=[play])],
                      xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False))
    return fig


# ----------------------------------------------------------------------------------------------
# what the hover and the side panel show


def user_summaries(world, user_ids: Sequence[str], *, top: int = 2) -> list[str]:
    """One short HTML summary per user: persona, a few profile fields, event counts and the most frequent
    event texts of each of the world's own modalities (world.modalities: the synthetic four, MovieLens's
    liked/mixed/disliked, whatever a user's own log declares)."""
    ids = list(user_ids)
    modalities = list(world.modalities)
    ev = world.events.loc[world.events["user_id"].isin(set(ids)), ["user_id", "modality", "text"]]
    counts = pd.crosstab(ev["user_id"], ev["modality"]).reindex(index=list(dict.fromkeys(ids)), columns=modalities,
                                                                 fill_value=0)   # one row per user, so .at is a number
    freq = ev.groupby(["user_id", "modality", "text"], sort=False).size().rename("n").reset_index()
    freq = freq.sort_values(["user_id", "modality", "n", "text"], ascending=[True, True, False, True])
    tops = freq.groupby(["user_id", "modality"], sort=False).head(top)
    lines: dict[tuple[str, str], str] = {
        key: ", ".join(f"{html.escape(t[:40])} ×{n}" for t, n in zip(g["text"], g["n"]))
        for key, g in tops.groupby(["user_id", "modality"], sort=False)}
    users = world.users.set_index("user_id")
    profiles = world.profiles.set_index("user_id")
    fields = [f for f in PROFILE_FIELDS if f in profiles.columns]
    out = []
    for u in ids:
        head = f"<b>{html.escape(u)}</b>"
        persona = users.at[u, "persona"] if "persona" in users.columns and u in users.index else None
        if not pd.isna(persona) and str(persona).strip():   # worlds without personas leave the column empty
            head += f" · {html.escape(str(persona))}"
        parts = [head]
        if fields and u in profiles.index:
            parts.append(" · ".join(f"{f.replace('_', ' ')} {profiles.at[u, f]:,.0f}" for f in fields))
        for m in modalities:
            if counts.at[u, m]:
                parts.append(f"{m} ({counts.at[u, m]}): {lines.get((u, m), '')}")
        out.append("<br>".join(parts))
    return out


def timelines_html(world, user_ids: Sequence[str], *, max_users: int = 3, max_events: int = 12) -> str:
    """HTML of the most recent events of the first `max_users` users (world.user_timeline)."""
    from qanchor_lab.world import user_timeline

    ids = list(user_ids)
    if not ids:
        return "<i>Select users (lasso, box or click) to see their timelines.</i>"
    blocks = [f"<b>{len(ids)} user(s) selected</b>" + (f"; the first {max_users} shown" if len(ids) > max_users else "")]
    for u in ids[:max_users]:
        tl = user_timeline(world, u).tail(max_events)
        rows = "".join(f"<tr><td>{t:%m-%d %H:%M}</td><td>{html.escape(m)}</td><td>{html.escape(h)}</td></tr>"
                       for t, m, h in zip(tl["timestamp"], tl["modality"], tl["hover"]))
        blocks.append(f"<h4 style='margin:6px 0 2px'>{html.escape(u)}</h4>"
                      f"<table style='font-size:11px'>{rows}</table>")
    return "".join(blocks)


# ----------------------------------------------------------------------------------------------
# the population: cached once


def pick_users(world, n_users: int, seed: int = 0) -> list[str]:
    """Up to `n_users` users, drawn with `seed`: downstream users first (they carry task labels), then
    pre-training users; returned in world order."""
    if n_users < 4:
        raise ValueError(f"n_users must be >= 4, got {n_users}")
    rng = np.random.default_rng(seed)
    labelled = world.users_in("tune", "test")
    is_labelled = set(labelled)
    others = [u for u in world.users["user_id"] if u not in is_labelled]
    chosen = set(list(rng.permutation(labelled))[:n_users])
    chosen |= set(list(rng.permutation(others))[:max(n_users - len(chosen), 0)])
    return [u for u in world.users["user_id"] if u in chosen]


@dataclass
class Population:
    """Users under exploration with their prefix KV cache (computed once) and per-user metadata."""

    user_ids: list[str]
    cache: PrefixCache
    world: object | None = None                   # World: labels, traits, personas, timelines (None: store only)
    labels: pd.DataFrame | None = None            # (users, tasks) 0/1, NaN where a user has no label
    traits: pd.DataFrame = field(default_factory=pd.DataFrame)   # (users, numeric trait columns)
    personas: pd.Series | None = None
    hover: list[str] = field(default_factory=list)
    seconds_cache: float = 0.0                    # time the prefix cache took

    def __len__(self) -> int:
        return len(self.user_ids)

    @classmethod
    def build(cls, model, world_or_store, *, users: Sequence[str] | None = None, n_users: int = 2000,
              seed: int = 0, batch_size: int = 256, threads: int | None = None) -> "Population":
        world = None if isinstance(world_or_store, BehaviourStore) else world_or_store
        if users is not None:   # one point per user (its cache row, label and hover): a repeat named on every path
            users = string_list(users, "explore: users", unique=True)
        if world is None:
            store = world_or_store
            ids = list(users) if users is not None else list(store.user_ids)[:n_users]
        else:
            if users is not None:
                ids = list(users)
                known = set(world.users["user_id"])
                unknown = [u for u in ids if u not in known]
                if unknown:
                    raise ValueError(f"explore: {len(unknown)} user(s) not in the world's users table, e.g. {unknown[:5]}")
            else:
                ids = pick_users(world, n_users, seed)
            store = model.behaviour(world.events, world.profiles, ids)
        if len(ids) < 4:
            raise ValueError(f"explore: need at least 4 users, got {len(ids)}")
        try:
            store.indices(ids)
        except KeyError as e:  # the store names the unknown users; a ValueError like every other bad input here
            raise ValueError(f"explore: {e.args[0]}") from None
        model.eval()
        start = time.perf_counter()
        with torch_threads(threads):
            cache = build_prefix_cache_in_chunks(model, store, ids, chunk=batch_size)
        seconds = time.perf_counter() - start
        if world is None:
            return cls(ids, cache, hover=[f"<b>{html.escape(u)}</b>" for u in ids], seconds_cache=seconds)
        labels = world.labels.pivot(index="user_id", columns="task_id", values="label").reindex(ids).astype(float)
        table = world.users.set_index("user_id").reindex(ids)
        traits = table[[c for c in table.columns if c.startswith("trait_")]]
        personas = table["persona"] if "persona" in table.columns else None
        return cls(ids, cache, world, labels, traits, personas, user_summaries(world, ids), seconds)


# ----------------------------------------------------------------------------------------------
# the widget


PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880", "#ff97ff",
           "#fecb52")
MISSING = "#d0d0d0"


def _colour_values(kind: str, values: pd.Series | np.ndarray, names: dict | None = None) -> tuple[object, list]:
    """Marker colours and legend entries [(name, colour)] for categorical `values` (NaN = missing)."""
    values = pd.Series(values)
    cats = sorted(v for v in values.dropna().unique())
    colours = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(cats)}
    if kind == "label":
        colours = {0.0: PALETTE[0], 1.0: PALETTE[1]}
    marker = [colours.get(v, MISSING) for v in values]
    legend = [((names or {}).get(c, str(c)), colours[c]) for c in colours if c in set(cats)]
    if values.isna().any():
        legend.append(("no label" if kind == "label" else "unknown", MISSING))
    return marker, legend


def _legend_traces(legend: list) -> list[go.Scatter]:
    """One empty trace per legend entry [(name, colour)] of `_colour_values`: a legend that leaves the points'
    trace (and so its point indices) alone."""
    return [go.Scatter(x=[None], y=[None], mode="markers", name=str(name), marker=dict(size=8, color=c),
                       hoverinfo="skip") for name, c in legend]


class QueryExplorer(widgets.HBox):
    """The widget. Plain methods (`show_task`, `show_text`, `set_prompt`, `set_colour`, `set_method`,
    `select`) do what the controls do, so notebooks and tests can drive it without a browser."""

    def __init__(self, model, population: Population, *, adapters: dict | None = None, method: Method = "umap",
                 seed: int = 0, config: ExplorerConfig | None = None, queries: Sequence[str] | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model, self.population = model.eval(), population
        self.config = config or ExplorerConfig()
        self.seed, self.method = seed, method
        world = population.world
        tasks = world.tasks[["task_id", "query"]] if world is not None else pd.DataFrame(columns=["task_id", "query"])
        if queries is not None:  # extra named queries (the only ones when exploring a bare store)
            tasks = pd.concat([tasks, pd.DataFrame({"task_id": [f"query {i + 1}" for i in range(len(queries))],
                                                    "query": list(queries)})], ignore_index=True)
        if tasks.empty:
            raise ValueError("explore: no queries to show; pass a World (its tasks) or queries=[...] with a store")
        self.tasks = dict(zip(tasks["task_id"], tasks["query"]))
        self.adapters = dict(adapters or {})
        unknown = sorted(set(self.adapters) - set(self.tasks))
        if unknown:
            raise ValueError(f"explore: adapters for unknown task(s) {unknown}; tasks: {', '.join(self.tasks)}")
        self.timings: dict[str, float] = {}
        # key -> {"emb": (N, d), "score": (N,), "score_kind": str}; keys ("task", id, QUERY|PROMPT) or ("text", q)
        self._views: dict[tuple, dict] = {}
        self._layouts: dict[tuple, np.ndarray] = {}   # (method, key) -> (N, 2)
        self.selected: list[int] = []

        start = time.perf_counter()
        for task_id in self.tasks:
            self._view(("task", task_id, QUERY))
        self.timings["embed_task_queries"] = time.perf_counter() - start
        start = time.perf_counter()
        self._ensure_task_layouts(method)
        self.timings["align_task_queries"] = time.perf_counter() - start

        first = next(iter(self.tasks))
        self.key = ("task", first, QUERY)
        self.coords = self._layouts[(method, self.key)]

        # ----- controls -----
        self.task_dropdown = widgets.Dropdown(options=[(f"{t}: {q}", t) for t, q in self.tasks.items()], value=first,
                                              description="query", layout=widgets.Layout(width="98%"))
        self.text = widgets.Text(placeholder="or type any question and press Enter", continuous_update=False,
                                 description="free text", layout=widgets.Layout(width="78%"))
        self.submit = widgets.Button(description="embed", button_style="primary", layout=widgets.Layout(width="18%"))
        self.prompt_toggle = widgets.ToggleButtons(options=[QUERY, PROMPT], value=QUERY, description="suffix")
        colour_options = (["label"] if world is not None else []) + (["persona"] if population.personas is not None else []) + ["score"] + list(population.traits.columns)
        self.colour = widgets.Dropdown(options=colour_options, value=colour_options[0], description="colour by")
        self.method_toggle = widgets.ToggleButtons(options=list(METHODS), value=method, description="layout")
        self.animate = widgets.Checkbox(value=False, description="animate changes", indent=False)
        self.status = widgets.HTML()
        self.panel = widgets.HTML(timelines_html(world, []) if world is not None else "",
                                  layout=widgets.Layout(width="360px", max_height=f"{self.config.height}px",
                                                        overflow="auto"))

        self.fig = go.FigureWidget(
            data=[go.Scatter(x=self.coords[:, 0], y=self.coords[:, 1], mode="markers", name="users",
                             showlegend=False, customdata=population.user_ids, hovertext=population.hover,
                             hoverinfo="text", marker=dict(size=5, opacity=0.8),
                             selected=dict(marker=dict(size=8, opacity=1)), unselected=dict(marker=dict(opacity=0.35)))],
            layout=dict(width=self.config.width, height=self.config.height, dragmode="lasso",
                        margin=dict(l=10, r=40, t=60, b=10), hoverlabel=dict(align="left"),
                        xaxis=dict(showticklabels=False, zeroline=False), yaxis=dict(showticklabels=False, zeroline=False),
                        legend=dict(orientation="h", y=-0.02)))
        self.fig.data[0].on_selection(self._on_selection)
        self.fig.data[0].on_click(self._on_selection)
        # a double click clears the selection in the browser; without this the panel and `selected` stay stale
        self.fig.data[0].on_deselect(lambda trace, points: self._guard(self.select, []))

        self._quiet = False  # set while the explorer itself moves a control
        self.task_dropdown.observe(self._on_task, names="value")
        self.text.observe(lambda change: self._guard(self.show_text, change["new"]) if change["new"].strip() else None,
                          names="value")
        self.submit.on_click(lambda _: self._guard(self.show_text, self.text.value))
        self.prompt_toggle.observe(lambda change: self._guard(self.set_prompt, change["new"] == PROMPT), names="value")
        self.colour.observe(lambda change: self._guard(self.set_colour, change["new"]), names="value")
        self.method_toggle.observe(lambda change: self._guard(self.set_method, change["new"]), names="value")

        controls = widgets.VBox([self.task_dropdown, widgets.HBox([self.text, self.submit]), self.prompt_toggle,
                                 widgets.HBox([self.colour, self.animate]), self.method_toggle, self.status])
        # the column is as wide as the figure, so the browser never clips the colour bar
        left = widgets.VBox([controls, self.fig], layout=widgets.Layout(min_width=f"{self.config.width + 10}px"))
        super().__init__([left, self.panel])
        self.add_class("qanchor-explorer")  # a handle for pages and browser tests
        self._refresh(animate=False)

    # ----- computation (no widget code) -----
    def _view(self, key: tuple) -> dict:
        """Embeddings and score of one view, computed once."""
        if key in self._views:
            return self._views[key]
        pop, bs = self.population, self.config.batch_size
        with torch_threads(self.config.threads):
            if key[0] == "task" and key[2] == PROMPT:
                emb, score = embed_tuned(self.model, pop.cache, self.adapters[key[1]], batch_size=bs)
                kind = "adapter P(positive)"
            else:
                query = self.tasks[key[1]] if key[0] == "task" else key[1]
                emb = embed_query(self.model, pop.cache, query, batch_size=bs)
                score, kind = answer_projection(self.model, emb), "cos(Yes) − cos(No), no labels"
        self._views[key] = {"emb": emb, "score": score, "score_kind": kind}
        return self._views[key]

    def _ensure_task_layouts(self, method: str) -> None:
        keys = [("task", t, QUERY) for t in self.tasks]
        if all((method, k) in self._layouts for k in keys):
            return
        layouts = align_layouts([self._views[k]["emb"] for k in keys], method, seed=self.seed, config=self.config)
        self._layouts.update({(method, k): xy for k, xy in zip(keys, layouts)})

    def layout_of(self, key: tuple) -> np.ndarray:
        """(N, 2) coordinates of a view under the current method; a view not seen before is placed from the
        coordinates on screen (same method) or the method's reference layout."""
        if (self.method, key) not in self._layouts:
            emb = self._view(key)["emb"]
            on_screen = self._layouts.get((self.method, self.key))
            current = on_screen if on_screen is not None else self._layouts[(self.method, ("task", next(iter(self.tasks)), QUERY))]
            self._layouts[(self.method, key)] = place_new(emb, current, self.method, seed=self.seed, config=self.config)
        return self._layouts[(self.method, key)]

    def colour_values(self) -> tuple[str, object, list]:
        """(title, marker colours, legend entries) for the current colour choice and view."""
        choice, pop = self.colour.value, self.population
        if choice == "label":
            labelled = self.key[0] == "task" and pop.labels is not None and self.key[1] in pop.labels.columns
            values = pop.labels[self.key[1]].to_numpy() if labelled else np.full(len(pop), np.nan)
            marker, legend = _colour_values("label", values, {0.0: "negative", 1.0: "positive"})
            return ("label" if labelled else "label (none for this query)"), marker, legend
        if choice == "persona":
            marker, legend = _colour_values("persona", pop.personas.to_numpy())
            return "persona", marker, legend
        if choice == "score":
            view = self._view(self.key)
            return f"score: {view['score_kind']}", np.asarray(view["score"]), []
        return choice, pop.traits[choice].to_numpy(), []

    # ----- actions (what the controls call) -----
    def show_task(self, task_id: str, prompt: bool | None = None) -> None:
        if task_id not in self.tasks:
            raise ValueError(f"unknown task {task_id!r}; tasks: {', '.join(self.tasks)}")
        use_prompt = (self.prompt_toggle.value == PROMPT) if prompt is None else prompt
        use_prompt = use_prompt and task_id in self.adapters
        self._set_quietly(self.task_dropdown, task_id)
        self._set_quietly(self.prompt_toggle, PROMPT if use_prompt else QUERY)
        self._show(("task", task_id, PROMPT if use_prompt else QUERY))

    def show_text(self, query: str) -> None:
        """Any question, embedded over the cached prefixes; a task's own query shows that task (its labels, and
        its tuned prompt when there is one) rather than the same embeddings again under another name."""
        query = (query or "").strip()
        if not query:
            raise ValueError("show_text: type a question first")
        task = next((t for t, q in self.tasks.items() if q.strip() == query), None)
        if task is not None:
            self.show_task(task, prompt=False)
            return
        self._set_quietly(self.task_dropdown, None)
        self._set_quietly(self.prompt_toggle, QUERY)
        self._show(("text", query))

    def set_prompt(self, on: bool) -> None:
        if self.key[0] != "task":
            raise ValueError("the tuned prompt exists only for task queries; pick a task first")
        self.show_task(self.key[1], prompt=on)

    def set_colour(self, choice: str) -> None:
        self._set_quietly(self.colour, choice)
        self._refresh(animate=False)

    def set_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self._set_quietly(self.method_toggle, method)
        if method == self.method:
            return
        self.method = method
        start = time.perf_counter()
        self._ensure_task_layouts(method)
        if (method, self.key) not in self._layouts:   # place the current view against this method's reference
            reference = self._layouts[(method, ("task", next(iter(self.tasks)), QUERY))]
            self._layouts[(method, self.key)] = place_new(self._view(self.key)["emb"], reference, method,
                                                          seed=self.seed, config=self.config)
        self.timings["layout"] = time.perf_counter() - start
        self._refresh(animate=False)

    def select(self, users: Sequence[int | str]) -> None:
        """Show the timelines of these users: row positions in the population (what the figure's selection
        gives) or user ids; `selected` keeps them as row positions."""
        self.selected = self._rows(users)
        if self.population.world is not None:
            ids = [self.population.user_ids[i] for i in self.selected]
            self.panel.value = timelines_html(self.population.world, ids, max_users=self.config.max_timeline_users,
                                              max_events=self.config.max_timeline_events)

    def _rows(self, users: Sequence[int | str]) -> list[int]:
        """Row positions of `users` (rows in [0, N) or user ids), or a ValueError naming the ones that are
        neither: a negative row would silently wrap to the other end of the population."""
        if isinstance(users, str):   # one id, not its characters
            users = [users]
        ids, n = self.population.user_ids, len(self.population)
        row_of = {u: i for i, u in enumerate(ids)}
        rows, bad = [], []
        for item in users:
            if isinstance(item, str) and item in row_of:
                rows.append(row_of[item])
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and 0 <= item < n:
                rows.append(int(item))
            else:
                bad.append(item)
        if bad:
            raise ValueError(f"select: {len(bad)} item(s) are neither a row in [0, {n}) nor a user id of this "
                             f"population, e.g. {bad[:5]}")
        return rows

    # ----- wiring -----
    def _show(self, key: tuple) -> None:
        start = time.perf_counter()
        fresh = key not in self._views
        self._view(key)
        self.timings["embed"] = time.perf_counter() - start if fresh else 0.0
        start = time.perf_counter()
        self.layout_of(key)
        self.key = key
        self.timings["layout"] = time.perf_counter() - start
        self._refresh(animate=self.animate.value)

    def _refresh(self, *, animate: bool) -> None:
        start = time.perf_counter()
        self.coords = self._layouts[(self.method, self.key)]
        title, colour, legend = self.colour_values()
        numeric = not legend and not isinstance(colour, list)
        marker = dict(color=colour, colorscale="Viridis" if numeric else None, showscale=numeric,
                      # title on top, one short line per clause, so it fits the colour bar's width
                      colorbar=dict(title=dict(text=title.replace(": ", ":<br>").replace(", ", ",<br>"), side="top",
                                               font=dict(size=11))) if numeric else None)
        trace = self.fig.data[0]
        animate = animate and self.config.transition_ms > 0
        if animate:  # plotly.js tweens the points from the old positions to the new ones
            with self.fig.batch_animate(duration=self.config.transition_ms, easing="cubic-in-out"):
                trace.x, trace.y = self.coords[:, 0], self.coords[:, 1]
        with self.fig.batch_update():
            if not animate:
                trace.x, trace.y = self.coords[:, 0], self.coords[:, 1]
            trace.marker.update(marker)
            self.fig.layout.title = dict(text=self._title(title), font=dict(size=13))
        # one legend entry per category: empty traces, so point indices of the main trace never change
        wanted = [(str(name), c) for name, c in legend]
        have = [(t.name, t.marker.color) for t in self.fig.data[1:]]
        if wanted != have:
            self.fig.data = self.fig.data[:1]
            self.fig.add_traces(_legend_traces(legend))
        self.timings["figure"] = time.perf_counter() - start
        self.prompt_toggle.disabled = not (self.key[0] == "task" and self.key[1] in self.adapters)
        self.status.value = (f"<small>{len(self.population)} users · {self.method} · embed "
                             f"{self.timings.get('embed', 0):.2f} s · layout {self.timings.get('layout', 0):.2f} s · "
                             f"figure {self.timings['figure']:.2f} s</small>")

    def _title(self, colour_title: str) -> str:
        if self.key[0] == "text":
            what = f"free text: “{html.escape(self.key[1])}”"
        else:
            what = f"{self.key[1]}: “{html.escape(self.tasks[self.key[1]])}”" + (" + tuned prompt" if self.key[2] == PROMPT else "")
        return f"{what}<br><sup>colour: {html.escape(colour_title)}</sup>"

    def _on_task(self, change) -> None:
        if change["new"] is not None:
            self._guard(self.show_task, change["new"])

    def _on_selection(self, trace, points, selector=None) -> None:
        self._guard(self.select, points.point_inds)

    def _guard(self, action, value) -> None:
        """What every control calls: `action(value)`, unless the explorer itself is moving the control. An input
        the action refuses (a ValueError, e.g. "embed" with no question typed) is shown in the status line under
        the controls, where the user is looking; raised inside a widget callback it would reach only the Jupyter
        log. The controls then go back to the view on screen."""
        if self._quiet:
            return
        try:
            action(value)
        except ValueError as e:
            self._sync_controls()
            self.status.value = f'<small style="color:#b00020">{html.escape(str(e))}</small>'

    def _sync_controls(self) -> None:
        """The query, suffix and layout controls set to what the figure shows."""
        task = self.key[0] == "task"
        self._set_quietly(self.task_dropdown, self.key[1] if task else None)
        self._set_quietly(self.prompt_toggle, self.key[2] if task else QUERY)
        self._set_quietly(self.method_toggle, self.method)

    def _set_quietly(self, control, value) -> None:
        if control.value != value:
            self._quiet = True
            try:
                control.value = value
            finally:
                self._quiet = False


def explore(model, world_or_store, *, users: Sequence[str] | None = None, n_users: int = 2000,
            adapters: dict | None = None, method: Method = "umap", seed: int = 0,
            config: ExplorerConfig | None = None, queries: Sequence[str] | None = None) -> QueryExplorer:
    """The query explorer over a World (its tasks, labels and timelines) or a bare BehaviourStore (then
    `queries` names what the dropdown offers). `adapters` maps task_id -> TaskAdapter (`load_adapters`).
    Prefix caches are built here, once; every later query runs only its own tokens."""
    config = config or ExplorerConfig()
    population = Population.build(model, world_or_store, users=users, n_users=n_users, seed=seed,
                                  batch_size=config.batch_size, threads=config.threads)
    return QueryExplorer(model, population, adapters=adapters, method=method, seed=seed, config=config, queries=queries)


def load_adapters(directory, task_ids: Sequence[str] | None = None, *, device: str | torch.device = "cpu") -> dict:
    """task_id -> TaskAdapter saved by the evaluation (`<run>/adapters/<task_id>.safetensors`), on `device` (the
    model's: `model.device`); an absent directory gives {} (the explorer then disables the tuned-prompt toggle)."""
    from pathlib import Path

    from qanchor_lab.prompt_tuning import TaskAdapter

    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found = {p.stem: p for p in sorted(directory.glob("*.safetensors"))}
    if task_ids is not None:
        found = {t: p for t, p in found.items() if t in set(task_ids)}
    return {t: TaskAdapter.load(p, device=device) for t, p in found.items()}
