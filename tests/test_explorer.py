"""The query explorer driven headlessly: each control changes the figure's data, prefixes are never
recomputed per query, and alignment keeps points closer than unaligned projections."""

import numpy as np
import pandas as pd
import pytest
import torch

from qanchor_lab.embedder import CachedEmbedder
from qanchor_lab.explorer import (MISSING, PROMPT, QUERY, ExplorerConfig, Population, QueryExplorer, align_layouts,
                                  animation_figure, displacement, embed_query, embed_tuned, explore, load_adapters,
                                  procrustes_onto, project, user_summaries)
from qanchor_lab.prompt_tuning import PromptTuningConfig, TaskAdapter

N_USERS = 150


@pytest.fixture(scope="module")
def population(_tiny_model_session, small_world):
    return Population.build(_tiny_model_session, small_world, n_users=N_USERS, seed=3, batch_size=64)


@pytest.fixture(scope="module")
def adapter(_tiny_model_session, small_world):
    """A real TaskAdapter for the first task (random prompt and prototypes: the toggle only needs one)."""
    model = _tiny_model_session
    cfg = PromptTuningConfig(n_prompt=2)
    H = model.llm.get_input_embeddings().weight.shape[1]
    a = TaskAdapter(2, H, model.config.embed_dim, 2, 1, small_world.tasks["query"].iloc[0], cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a.prompt.copy_(torch.randn(a.prompt.shape, generator=g) * float(model.encoder.embed_scale))
        a.prototypes.copy_(torch.randn(a.prototypes.shape, generator=g))
    return a


@pytest.fixture()
def explorer(_tiny_model_session, population, adapter, small_world):
    task0 = small_world.tasks["task_id"].iloc[0]
    return QueryExplorer(_tiny_model_session, population, adapters={task0: adapter}, method="pca", seed=0)


def _xy(ex):
    return np.stack([np.asarray(ex.fig.data[0].x), np.asarray(ex.fig.data[0].y)], 1)


def test_population_prefers_labelled_users_and_caches_each_once(population, small_world):
    assert len(population) == N_USERS == len(population.cache) == len(population.hover)
    labelled = set(small_world.users_in("tune", "test"))
    assert set(population.user_ids) <= labelled          # enough downstream users: all labelled
    assert population.labels.notna().all().all()
    assert "persona" in population.hover[0] or population.personas.iloc[0] in population.hover[0]


def test_embed_query_equals_the_cached_embedder(_tiny_model_session, population, small_world, tiny_store):
    query = "Will this user buy a new phone next month?"
    ours = embed_query(_tiny_model_session, population.cache, query, batch_size=64)   # 150 rows: a partial chunk
    ref = CachedEmbedder(_tiny_model_session, tiny_store).encode(population.user_ids, [query])[:, 0]
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-5


def test_tuned_embeddings_give_the_adapters_own_scores(_tiny_model_session, population, adapter):
    emb, prob = embed_tuned(_tiny_model_session, population.cache, adapter, batch_size=64)
    assert emb.shape == (N_USERS, _tiny_model_session.config.embed_dim)
    np.testing.assert_allclose(prob, adapter.score(_tiny_model_session, population.cache), atol=1e-5)


def test_dropdown_moves_the_points(explorer, small_world):
    before, title = _xy(explorer), explorer.fig.layout.title.text
    task1 = small_world.tasks["task_id"].iloc[1]
    explorer.task_dropdown.value = task1
    assert explorer.key == ("task", task1, QUERY)
    assert not np.allclose(_xy(explorer), before)
    assert task1 in explorer.fig.layout.title.text != title


def test_free_text_box_and_button_embed_a_new_query(explorer, _tiny_model_session, monkeypatch):
    calls = []
    real = _tiny_model_session.encode_prefix
    monkeypatch.setattr(_tiny_model_session, "encode_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = _xy(explorer)
    explorer.text.value = "Is this user saving for a house?"                     # Enter in the box
    assert explorer.key == ("text", "Is this user saving for a house?")
    assert explorer.task_dropdown.value is None
    assert not np.allclose(_xy(explorer), before)
    moved = _xy(explorer)
    explorer.text.value = "  Will this user take a loan for a car?"
    explorer.submit.click()                                                    # the button path, same text
    assert explorer.key == ("text", "Will this user take a loan for a car?")
    assert not np.allclose(_xy(explorer), moved)
    assert calls == []                                                         # no prefix recomputed per query
    assert "free text" in explorer.fig.layout.title.text
    # a free-text query has no labels: every point in the "no label" colour, said in the legend
    assert explorer.colour.value == "label" and len(set(explorer.fig.data[0].marker.color)) == 1
    assert [t.name for t in explorer.fig.data[1:]] == ["no label"]
    assert explorer.prompt_toggle.disabled


def test_a_refused_input_from_a_control_is_shown_in_the_status_line(explorer, small_world):
    task0 = small_world.tasks["task_id"].iloc[0]
    shown = explorer.key
    explorer.text.value = "   "
    explorer.submit.click()                  # "embed" with no question: raised in a callback, only the log saw it
    assert "type a question" in explorer.status.value and explorer.key == shown
    explorer.text.value = "Is this user saving for a house?"
    assert "type a question" not in explorer.status.value          # the next view clears the message
    explorer.prompt_toggle.value = PROMPT    # no tuned prompt for free text: refused, the toggle set back
    assert "tuned prompt exists only for task queries" in explorer.status.value
    assert explorer.prompt_toggle.value == QUERY and explorer.key[0] == "text"
    explorer.task_dropdown.value = task0
    assert explorer.key == ("task", task0, QUERY)


def test_a_tasks_own_query_typed_as_free_text_shows_that_task(explorer, small_world):
    task1, query1 = small_world.tasks[["task_id", "query"]].iloc[1]
    explorer.text.value = f"  {query1} "
    assert explorer.key == ("task", task1, QUERY) and explorer.task_dropdown.value == task1
    assert explorer.fig.layout.title.text.startswith(task1)       # its labels colour the points, not "no label"
    assert "no label" not in [t.name for t in explorer.fig.data[1:]]


def test_prompt_toggle_switches_to_the_tuned_prompt(explorer, small_world, adapter, _tiny_model_session, population):
    task0, task1 = small_world.tasks["task_id"].iloc[:2]
    assert not explorer.prompt_toggle.disabled                                  # task0 has an adapter
    explorer.set_colour("score")
    before_xy, before_colour = _xy(explorer), np.asarray(explorer.fig.data[0].marker.color)
    explorer.prompt_toggle.value = PROMPT
    assert explorer.key == ("task", task0, PROMPT)
    assert not np.allclose(_xy(explorer), before_xy)
    np.testing.assert_allclose(np.asarray(explorer.fig.data[0].marker.color),
                               adapter.score(_tiny_model_session, population.cache), atol=1e-5)
    assert not np.allclose(np.asarray(explorer.fig.data[0].marker.color), before_colour)
    assert "adapter P(positive)" in explorer.fig.data[0].marker.colorbar.title.text
    explorer.task_dropdown.value = task1                                         # no adapter: back to the query
    assert explorer.key == ("task", task1, QUERY) and explorer.prompt_toggle.disabled
    assert explorer.prompt_toggle.value == QUERY


def test_colour_selector_changes_marker_colours(explorer, population):
    labels = explorer.fig.data[0].marker.color
    assert {t.name for t in explorer.fig.data[1:]} <= {"negative", "positive"}
    explorer.colour.value = "persona"
    assert list(explorer.fig.data[0].marker.color) != list(labels)
    assert {t.name for t in explorer.fig.data[1:]} == set(population.personas)
    explorer.colour.value = "trait_credit_risk"
    np.testing.assert_allclose(explorer.fig.data[0].marker.color, population.traits["trait_credit_risk"])
    assert len(explorer.fig.data) == 1 and explorer.fig.data[0].marker.showscale
    explorer.colour.value = "score"
    assert "cos(Yes)" in explorer.fig.data[0].marker.colorbar.title.text        # which score, in the legend


def test_selection_fills_the_timeline_panel(explorer, population):
    from plotly.callbacks import Points

    assert "Select users" in explorer.panel.value
    explorer.fig.data[0]._dispatch_on_selection(Points(point_inds=[4, 7], trace_index=0), None)
    assert explorer.selected == [4, 7]
    assert population.user_ids[4] in explorer.panel.value and population.user_ids[7] in explorer.panel.value
    assert "<table" in explorer.panel.value


def _js_points(explorer, event_type, inds):
    """Send a selection event down plotly's front-end message path, as the browser does."""
    explorer.fig._js2py_pointsCallback = {"event_type": event_type, "selector": None, "device_state": None,
                                          "points": {"xs": [0.0] * len(inds), "ys": [0.0] * len(inds),
                                                     "point_indexes": list(inds), "trace_indexes": [0] * len(inds)}}


def test_double_click_deselect_clears_the_selection(explorer, population):
    _js_points(explorer, "plotly_selected", [1, 2])
    assert explorer.selected == [1, 2] and population.user_ids[1] in explorer.panel.value
    _js_points(explorer, "plotly_deselect", [])
    assert explorer.selected == [] and "Select users" in explorer.panel.value
    assert population.user_ids[1] not in explorer.panel.value


def test_select_takes_rows_or_user_ids_and_names_anything_else(explorer, population):
    n, uid = len(population), population.user_ids[3]
    explorer.select([uid, 7])
    assert explorer.selected == [3, 7] and uid in explorer.panel.value
    explorer.select(uid)                                                        # one id, not its characters
    assert explorer.selected == [3]
    for bad in ([n], [-1], ["u_nobody"], [True], [2.0]):                       # -1 would wrap to the last user
        with pytest.raises(ValueError, match=rf"neither a row in \[0, {n}\) nor a user id.*{bad[0]!r}"):
            explorer.select(bad)
    assert explorer.selected == [3]                                             # a refused call changes nothing


def test_repeated_users_are_refused_on_both_paths(_tiny_model_session, small_world, tiny_store, population):
    ids = population.user_ids[:6]
    for source in (small_world, tiny_store):   # a bare store would otherwise draw the user twice
        with pytest.raises(ValueError, match=rf"explore: users repeats 1 value\(s\): \['{ids[0]}'\]"):
            Population.build(_tiny_model_session, source, users=ids + [ids[0]], batch_size=64)


def test_hover_counts_the_worlds_own_modalities(small_world):
    """A world that is not the synthetic one (MovieLens, a user's own log): the hover still counts each of its
    modalities and leaves out a persona it does not have."""
    from dataclasses import replace

    events = small_world.events.assign(modality="my_" + small_world.events["modality"])
    world = replace(small_world, events=events, users=small_world.users.assign(persona=""), manifest={})
    assert all(m.startswith("my_") for m in world.modalities)
    ids = small_world.users_in("test")[:3]
    for u, hover in zip(ids, user_summaries(world, ids)):
        assert f"<b>{u}</b> ·" not in hover                                       # no empty persona
        counts = events[events["user_id"] == u].groupby("modality").size()
        assert len(counts) and all(f"{m} ({k}):" in hover for m, k in counts.items())


def test_procrustes_recovers_a_rotated_scaled_shifted_layout():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 2)).astype(np.float32)
    theta = 1.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.diag([1, -1])
    moved = 3.0 * ref @ rot + np.array([5.0, -2.0])
    assert displacement(moved, ref) > 1
    np.testing.assert_allclose(procrustes_onto(moved, ref), ref, atol=1e-4)


def test_aligned_pca_layouts_move_less_than_unaligned(population, _tiny_model_session, small_world):
    embs = [embed_query(_tiny_model_session, population.cache, q) for q in small_world.tasks["query"]]
    aligned = align_layouts(embs, "pca")
    unaligned = [project(e, "pca") for e in embs]
    a = [displacement(aligned[i], aligned[0]) for i in range(1, len(embs))]
    u = [displacement(unaligned[i], unaligned[0]) for i in range(1, len(embs))]
    assert all(x <= y + 1e-6 for x, y in zip(a, u)) and sum(a) < sum(u)


@pytest.mark.slow
def test_umap_toggle_and_warm_start_alignment(explorer, population, _tiny_model_session, small_world):
    """UMAP layouts aligned by warm start + Procrustes move far less between queries than independent UMAPs."""
    before = _xy(explorer)
    explorer.method_toggle.value = "umap"
    assert explorer.method == "umap" and not np.allclose(_xy(explorer), before)
    queries = small_world.tasks["query"].iloc[:3]
    embs = [explorer._views[("task", t, QUERY)]["emb"] for t in small_world.tasks["task_id"].iloc[:3]]
    aligned = [explorer.layout_of(("task", t, QUERY)) for t in small_world.tasks["task_id"].iloc[:3]]
    unaligned = [project(e, "umap", seed=i) for i, e in enumerate(embs)]   # as a fresh UMAP per query would be
    a = [displacement(aligned[i], aligned[0]) for i in (1, 2)]
    u = [displacement(unaligned[i], unaligned[0]) for i in (1, 2)]
    assert max(a) < min(u), (a, u, list(queries))
    explorer.text.value = "Will this user travel abroad?"                       # new query: placed from the screen
    assert displacement(_xy(explorer), aligned[0]) < min(u)


def test_animation_figure_has_frames_between_two_layouts(population):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 2)), rng.normal(size=(20, 2))
    fig = animation_figure(a, b, names=("x", "y"), n_frames=5)
    assert len(fig.frames) == 5
    np.testing.assert_allclose(fig.frames[0].data[0].x, a[:, 0])
    np.testing.assert_allclose(fig.frames[-1].data[0].x, b[:, 0])


def test_animation_figure_colours_categories_like_the_explorer(population):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    persona = pd.Series(["saver", "spender", "saver", None, "spender", "saver"])
    fig = animation_figure(a, b, color=persona, n_frames=3)
    colours = list(fig.data[0].marker.color)
    assert colours[0] == colours[2] != colours[1] and colours[3] == MISSING
    assert [t.name for t in fig.data[1:]] == ["saver", "spender", "unknown"]     # a legend for the colours
    assert all(f.traces == (0,) for f in fig.frames)                             # frames move only the points
    numeric = animation_figure(a, b, color=population.traits.iloc[:6, 0], n_frames=3)
    assert numeric.data[0].marker.colorscale is not None and len(numeric.data) == 1
    with pytest.raises(ValueError, match="color has 5 values for 6 points"):
        animation_figure(a, b, color=persona[:5])


def test_animated_change_still_lands_on_the_new_layout(explorer, small_world):
    explorer.animate.value = True
    task2 = small_world.tasks["task_id"].iloc[2]
    explorer.task_dropdown.value = task2
    np.testing.assert_allclose(_xy(explorer), explorer.layout_of(("task", task2, QUERY)), atol=1e-6)


def test_explore_over_a_bare_store_uses_the_given_queries(_tiny_model_session, tiny_store):
    ex = explore(_tiny_model_session, tiny_store, n_users=40, method="pca", queries=["Is this user a student?"])
    assert list(ex.tasks) == ["query 1"] and ex.colour.options[0] == "score" and len(ex.fig.data[0].x) == 40
    with pytest.raises(ValueError, match="queries"):
        explore(_tiny_model_session, tiny_store, n_users=40, method="pca")
    with pytest.raises(ValueError, match="u_nobody"):
        explore(_tiny_model_session, tiny_store, users=["u_nobody"] + tiny_store.user_ids[:9], method="pca",
                queries=["Is this user a student?"])


def test_bad_input_gets_clear_errors(_tiny_model_session, small_world, population, explorer, tmp_path):
    with pytest.raises(ValueError, match="u_nobody"):
        explore(_tiny_model_session, small_world, users=["u_nobody"] + population.user_ids[:10], method="pca")
    with pytest.raises(ValueError, match="align must be one of"):
        ExplorerConfig(align="procrustes")
    with pytest.raises(ValueError, match="threads"):
        ExplorerConfig(threads=0)
    with pytest.raises(ValueError, match="method must be one of"):
        explorer.set_method("tsne")
    with pytest.raises(ValueError, match="type a question"):
        explorer.show_text("   ")
    with pytest.raises(ValueError, match="unknown task"):
        QueryExplorer(_tiny_model_session, population, adapters={"no_such_task": None}, method="pca")
    assert load_adapters(tmp_path / "missing") == {}


def test_load_adapters_reads_saved_adapters(adapter, small_world, tmp_path, monkeypatch):
    task0 = small_world.tasks["task_id"].iloc[0]
    adapter.save(tmp_path / task0)
    loaded = load_adapters(tmp_path)
    assert list(loaded) == [task0]
    torch.testing.assert_close(loaded[task0].prompt, adapter.prompt)
    asked = []   # the device reaches TaskAdapter.load (which reads the tensors onto it: tests/test_embedder.py)
    monkeypatch.setattr(TaskAdapter, "load", classmethod(lambda cls, p, device="cpu": asked.append(device)))
    load_adapters(tmp_path, device="meta")
    assert asked == ["meta"]


@pytest.mark.slow
def test_bench_explorer_reports_both_latencies_beside_the_targets():
    from qanchor_lab.bench import TARGET_EMBED_S, TARGET_UPDATE_S, bench_explorer

    result = bench_explorer(fast=True, n_users=120, method="pca", repeats=2)
    assert result["users"] == 120 and result["method"] == "pca"
    assert (result["target_embed_seconds"], result["target_update_seconds"]) == (TARGET_EMBED_S, TARGET_UPDATE_S)
    assert set(result["by_threads"]) == {"explorer_default", "torch_default"}
    assert result["by_threads"]["explorer_default"]["torch_threads"] == ExplorerConfig().threads
    for figures in result["by_threads"].values():
        assert len(figures["embed_seconds_all"]) == len(figures["update_seconds_all"]) == 2
        assert 0 < figures["embed_seconds"] and 0 < figures["layout_seconds"] < figures["update_seconds"]
    assert result["embed_seconds"] == result["by_threads"]["explorer_default"]["embed_seconds"]


@pytest.mark.slow
def test_aligned_umap_option_aligns_task_queries(population, _tiny_model_session, small_world):
    """ExplorerConfig(align="aligned_umap"): umap-learn's AlignedUMAP over the task queries at open time."""
    embs = [embed_query(_tiny_model_session, population.cache, q)[:60] for q in small_world.tasks["query"].iloc[:2]]
    config = ExplorerConfig(align="aligned_umap", n_neighbors=10)
    aligned = align_layouts(embs, "umap", config=config)
    unaligned = [project(e, "umap", seed=i, config=config) for i, e in enumerate(embs)]
    assert [a.shape for a in aligned] == [(60, 2), (60, 2)]
    assert displacement(aligned[1], aligned[0]) < displacement(unaligned[1], unaligned[0])
    warm = align_layouts(embs, "umap", config=ExplorerConfig(align="warm_start", n_neighbors=10))
    assert not np.allclose(aligned[0], warm[0])                                   # the option is really another method


def test_explorer_passes_run_with_the_configured_threads(explorer, monkeypatch):
    import qanchor_lab.explorer as module

    seen, real = [], module.embed_query
    monkeypatch.setattr(module, "embed_query", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        explorer.config.threads = 1
        explorer.show_text("Will this user move to another city?")
        assert seen == [1] and torch.get_num_threads() == 2                     # used one, then restored
    finally:
        torch.set_num_threads(before)
