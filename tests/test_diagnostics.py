"""Representation diagnostics: probes, geometry, claim accuracy, the perfect-QA bound, diagnose and its CLI."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from qanchor_lab import diagnostics as D
from qanchor_lab.world import INTENTS
from tests.conftest import tiny_config


# ----- effective dimensionality and probes ------------------------------------------------------------


def test_effective_dimensionality_isotropic_rank_one_and_constant():
    rng = np.random.default_rng(0)
    assert D.effective_dimensionality(rng.normal(size=(20000, 8))) == pytest.approx(8, abs=0.2)
    rank1 = np.outer(rng.normal(size=500), rng.normal(size=16))
    assert D.effective_dimensionality(rank1) == pytest.approx(1.0, abs=1e-6)
    # two directions, one with 3x the spread: (1 + 9)^2 / (1 + 81)
    two = np.column_stack([rng.normal(size=20000), 3 * rng.normal(size=20000)])
    assert D.effective_dimensionality(two) == pytest.approx(100 / 82, rel=0.03)
    assert D.effective_dimensionality(np.ones((10, 4))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        D.effective_dimensionality(np.ones((1, 4)))


def test_probe_r2_linear_target_noise_and_multi_target_agree():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 12))
    y = X @ rng.normal(size=12) + 0.05 * rng.normal(size=400)
    noise = rng.normal(size=400)
    assert D.probe_r2(X, y) > 0.95
    assert D.probe_r2(X, noise) <= 0.1
    both = D.probe_r2_many(X, np.column_stack([y, noise]))
    assert both[0] == pytest.approx(D.probe_r2(X, y), abs=1e-9)
    assert both[1] == pytest.approx(D.probe_r2(X, noise), abs=1e-9)
    assert D.probe_r2(X, y, seed=3) == D.probe_r2(X, y, seed=3)  # deterministic
    assert np.isnan(D.probe_r2(X, np.ones(400)))
    with pytest.raises(ValueError, match="same n"):
        D.probe_r2(X, y[:-1])


def test_mean_offdiag_cos_matches_brute_force():
    V = np.random.default_rng(2).normal(size=(7, 5))
    N = V / np.linalg.norm(V, axis=1, keepdims=True)
    brute = np.mean([N[i] @ N[j] for i in range(7) for j in range(7) if i != j])
    assert D._mean_offdiag_cos(V) == pytest.approx(brute)


# ----- stages -----------------------------------------------------------------------------------------


def _tune(world, n=100):
    return world.users_in("tune")[:n]


def test_stage_representations_are_the_models_own_tensors(tiny_model, small_world, tiny_store):
    users = _tune(small_world, 24)
    query = small_world.tasks["query"].iloc[0]
    reps = D.stage_representations(tiny_model, small_world, users, query, store=tiny_store, batch_size=10)
    L = tiny_model.llm.config.num_hidden_layers
    expected = (["input_tabular", "input_events", "tabular_token"] + [f"prefix_layer_{i}" for i in range(L + 1)]
                + ["user_emb_hidden", "embedding"])
    assert list(reps) == expected
    assert all(v.shape[0] == len(users) and np.isfinite(v).all() for v in reps.values())

    batch = tiny_store.batch(tiny_store.indices(users))
    np.testing.assert_allclose(reps["input_tabular"], batch.tabular.numpy())
    M, Dv = len(batch.events), next(iter(batch.events.values())).shape[-1]
    assert reps["input_events"].shape[1] == M * Dv
    tiny_model.eval()
    with torch.no_grad():
        prefix = tiny_model.encode_prefix(batch)
        w = prefix.mask.float().unsqueeze(-1)
        layer0 = (prefix.embeds * w).sum(1) / w.sum(1)          # layer 0 is the decoder's input
        emb = tiny_model.embed(batch, [query] * len(users))
        head = F.normalize(tiny_model.head(torch.from_numpy(reps["user_emb_hidden"])), dim=-1)
    np.testing.assert_allclose(reps["prefix_layer_0"], layer0.numpy(), atol=1e-5)
    np.testing.assert_allclose(reps["embedding"], emb.numpy(), atol=1e-5)
    # the embedding is the head applied to the <user_emb> hidden state: the two stages are linked
    np.testing.assert_allclose(head.numpy(), reps["embedding"], atol=1e-5)
    # the last prefix layer differs from the first (the decoder did run on the prefix)
    assert not np.allclose(reps[f"prefix_layer_{L}"], reps["prefix_layer_0"])


def test_stage_probe_table_order_finite_and_retention(tiny_model, small_world, tiny_store):
    users = _tune(small_world, 100)
    query = small_world.tasks["query"].iloc[0]
    table = D.stage_probe_table(tiny_model, small_world, users, query, store=tiny_store)
    L = tiny_model.llm.config.num_hidden_layers
    assert table["stage"].tolist() == (["input_tabular", "input_events", "tabular_token"]
                                       + [f"prefix_layer_{i}" for i in range(L + 1)] + ["user_emb_hidden", "embedding"])
    tasks = small_world.tasks["task_id"].tolist()
    assert [c for c in table.columns if c.startswith("oracle:")] == [f"oracle:{t}" for t in tasks]
    assert {"trait:spending_power", "trait:abroad_plan", "trait:trend_liquidity", "trait:trend_engagement"} <= set(table.columns)
    numbers = table.drop(columns="stage").to_numpy(dtype=float)
    assert np.isfinite(numbers).all()
    row = table.set_index("stage")
    assert row.loc["input_tabular", "retention"] == pytest.approx(1.0)
    assert row.loc["embedding", "retention"] == pytest.approx(row.loc["embedding", "oracle_r2"]
                                                              / row.loc["input_tabular", "oracle_r2"])
    assert row.loc["input_tabular", "oracle_r2"] == pytest.approx(row.filter(like="oracle:").loc["input_tabular"].mean())
    # the tabular input predicts the oracle scores well above chance even on 100 users
    assert row.loc["input_tabular", "oracle_r2"] > 0.2
    # deterministic given the seed
    again = D.stage_probe_table(tiny_model, small_world, users, query, store=tiny_store)
    pd.testing.assert_frame_equal(table, again)


def test_stage_table_without_tabular_tokens_and_refuses_test_users(small_world):
    from qanchor_lab.model import QAnchorModel

    w = small_world
    model = QAnchorModel.from_data(tiny_config(use_tabular=False), w.events, w.profiles, w.users_in("pretrain"))
    users = _tune(w, 12)
    reps = D.stage_representations(model, w, users, "How does this user pay?")
    assert "tabular_token" not in reps and "input_tabular" in reps
    with pytest.raises(ValueError, match="test"):
        D.stage_probe_table(model, w, w.users_in("test")[:20], "q", stages=reps)
    with pytest.raises(ValueError, match="split"):
        D.sample_users(w, "test")
    with pytest.raises(ValueError, match="empty"):
        D.stage_representations(model, w, [], "q")


def test_pretrain_val_users_have_no_oracle_columns_and_retention_falls_back_to_traits(small_world):
    users = small_world.users_in("pretrain_val")
    rng = np.random.default_rng(0)
    truth = D.trait_targets(small_world, users).to_numpy()
    reps = {"input_tabular": truth + 0.1 * rng.normal(size=truth.shape),   # knows every trait
            "embedding": rng.normal(size=(len(users), 3))}                   # knows nothing
    table = D.stage_probe_table(None, small_world, users, "q", stages=reps).set_index("stage")
    assert not any(c.startswith("oracle:") for c in table.columns)
    assert table["oracle_r2"].isna().all()
    assert table.loc["input_tabular", "trait_mean_r2"] > 0.9
    assert table.loc["input_tabular", "retention"] == pytest.approx(1.0)
    assert table.loc["embedding", "retention"] < 0.1


# ----- geometry ---------------------------------------------------------------------------------------


def test_query_geometry_shapes_and_bounds(tiny_model, small_world, tiny_store):
    users = _tune(small_world, 40)
    queries = small_world.tasks["query"].tolist()[:3]
    g = D.query_geometry(tiny_model, tiny_store, users, queries)
    assert [r["query"] for r in g["per_query"]] == queries
    assert all(1.0 <= r["effective_dim"] <= g["embed_dim"] for r in g["per_query"])
    assert -1 <= g["cross_user_cos"] <= 1 and -1 <= g["same_user_cos"] <= 1
    assert 0 <= g["user_share"] <= 1 and 0 <= g["query_share"] <= 1
    assert g["user_share"] + g["query_share"] <= 1 + 1e-9
    emb = tiny_model.encode(tiny_store, queries, user_ids=users)
    assert g["effective_dim_mean"] == pytest.approx(np.mean([D.effective_dimensionality(emb[:, j]) for j in range(3)]))
    with pytest.raises(ValueError, match="2 queries"):
        D.query_geometry(tiny_model, tiny_store, users, queries[:1])
    assert g["user_share"] + g["query_share"] + g["interaction_share"] == pytest.approx(1.0)
    ref = D.query_geometry(tiny_model, tiny_store, users, queries, reference_query=queries[-1])
    assert "novelty" not in ref["per_query"][-1] and all(0 <= r["novelty"] <= 1.5 for r in ref["per_query"][:-1])
    assert ref["novelty_mean"] == pytest.approx(np.mean([r["novelty"] for r in ref["per_query"][:-1]]))
    with pytest.raises(ValueError, match="reference_query"):
        D.query_geometry(tiny_model, tiny_store, users, queries, reference_query="not asked")


class _FixedEncoder:
    """Stands in for a model in query_geometry: fixed embeddings per query, so the read gain's truth is known."""

    def __init__(self, emb: dict[str, np.ndarray]):
        self.emb = emb

    def encode(self, store, queries, *, user_ids, batch_size=64, show_progress_bar=False):
        return np.stack([self.emb[q] for q in queries], axis=1)                 # (U, Q, d)


def test_paired_r2_gain_interval_covers_the_truth_and_narrows_with_users():
    rng = np.random.default_rng(1)

    def draw(n, gain):  # two predictions of y whose R² differ by `gain` in expectation
        y = rng.normal(size=(n, 2))
        a = np.sqrt(0.3 + gain) * (np.sqrt(0.3 + gain) * y + np.sqrt(0.7 - gain) * rng.normal(size=(n, 2)))
        b = np.sqrt(0.3) * (np.sqrt(0.3) * y + np.sqrt(0.7) * rng.normal(size=(n, 2)))
        return y, a, b                                                          # R² of a: 0.3 + gain; of b: 0.3

    covered = [lo <= 0.1 <= hi for lo, hi in (D.paired_r2_gain_interval(*draw(300, 0.1), n_boot=300, seed=s)
                                               for s in range(60))]
    assert 0.85 <= np.mean(covered) <= 1.0                                      # a 95% interval, 60 worlds
    y, a, b = draw(300, 0.0)
    assert D.paired_r2_gain_interval(y, a, b, seed=3) == D.paired_r2_gain_interval(y, a, b, seed=3)
    lo, hi = D.paired_r2_gain_interval(y, a, b)
    y4, a4, b4 = draw(1200, 0.0)
    lo4, hi4 = D.paired_r2_gain_interval(y4, a4, b4)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.7                                 # 4x the users: about half as wide
    assert D.paired_r2_gain_interval(y, a, a) == (0.0, 0.0)                     # the same read: no gain at all
    with pytest.raises(ValueError, match="same"):
        D.paired_r2_gain_interval(y, a[:10], b)
    # a rare 0/1 target (a small log's label): resamples without a positive have no R² and are left out, not ±inf
    rare = np.zeros((40, 3))
    rare[0, 0] = rare[1, 1] = rare[2, 2] = 1.0                                  # one positive per task
    pa, pb = rare + 0.3 * rng.normal(size=rare.shape), 0.3 * rng.normal(size=rare.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # no divide-by-zero on the way
        lo, hi = D.paired_r2_gain_interval(rare[:, :1], pa[:, :1], pb[:, :1])
        assert np.isfinite([lo, hi]).all() and lo < hi
        # a constant task has no R² at all: it is left out, the rest read as without it
        with_constant = np.column_stack([rare[:, :1], np.ones(40)])
        assert D.paired_r2_gain_interval(with_constant, np.column_stack([pa[:, :1], pb[:, 1]]),
                                         np.column_stack([pb[:, :1], pb[:, 1]])) == pytest.approx((lo, hi), abs=1e-12)
        # three rare tasks at once: most resamples miss some task's positive, too few are left to say anything
        assert np.isnan(D.paired_r2_gain_interval(rare, pa, pb)).all()
        assert np.isnan(D.paired_r2_gain_interval(np.ones((40, 2)), pa[:, :2], pb[:, :2])).all()


def test_task_read_gain_is_positive_only_where_the_question_keeps_its_task():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.normal(size=n)                                                      # the task's truth
    user = rng.normal(size=(n, 6))                                              # what every query keeps
    asks = np.column_stack([user[:, :5], y + 0.1 * rng.normal(size=n)])        # trades a user column for the task
    other = user @ rng.normal(size=(6, 6)) + 1.0                                # a linear view of the generic one
    enc = _FixedEncoder({"asks": asks, "generic": user, "other": other})        # the generic query lacks y
    users = [f"u{i}" for i in range(n)]
    g = D.query_geometry(enc, None, users, ["asks", "other", "generic"], reference_query="generic",
                         targets={"asks": y, "other": y})
    asks_row, other_row, generic_row = g["per_query"]
    assert asks_row["task_r2"] > 0.9 and asks_row["task_r2_reference"] < 0.05
    assert abs(other_row["task_r2"] - other_row["task_r2_reference"]) < 0.02
    assert "task_r2" not in generic_row
    assert g["task_read_gain_mean"] == pytest.approx(np.mean([asks_row["task_r2"] - asks_row["task_r2_reference"],
                                                              other_row["task_r2"] - other_row["task_r2_reference"]]))
    assert g["task_read_gain_low"] < g["task_read_gain_mean"] < g["task_read_gain_high"]
    kept = D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={"asks": y})
    assert kept["task_read_gain_low"] > 0.8                                     # the task kept: far from zero
    linear = D.query_geometry(enc, None, users, ["other", "generic"], reference_query="generic", targets={"other": y})
    assert -0.01 < linear["task_read_gain_low"] <= linear["task_read_gain_high"] < 0.01  # a linear view: nothing
    assert "task_read_gain_mean" not in D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic")
    only_reference = D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic",
                                      targets={"generic": y})                   # nothing asked for a task: no read
    assert "task_read_gain_mean" not in only_reference and "task_r2" not in only_reference["per_query"][0]
    with pytest.raises(ValueError, match="not among the queries"):
        D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={"other": y})
    with pytest.raises(ValueError, match="one value per user"):
        D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={"asks": y[:10]})
    with pytest.raises(ValueError, match="pass reference_query"):
        D.query_geometry(enc, None, users, ["asks", "generic"], targets={"asks": y})


def test_task_lead_share_says_whether_the_question_puts_its_task_first():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.normal(size=n)                                                      # the task's truth
    f, g = rng.normal(size=(2, n))                                              # other traits, not the task's
    noise = lambda k: 0.5 * rng.normal(size=(n, k))
    # both embeddings hold y in one clean column; they differ in which factors the other columns share
    first = np.column_stack([y + 0.1 * rng.normal(size=n), y[:, None] + noise(5), f[:, None] + noise(3)])
    last = np.column_stack([y + 0.1 * rng.normal(size=n), f[:, None] + noise(5), g[:, None] + noise(3)])
    assert D.lead_share(first, y) > 0.8 and D.lead_share(last, y) < 0.1
    # the leading components counted: y is last's third direction
    assert D.lead_share(last, y, components=3) > 0.8 and D.lead_share(first, y, components=1) > 0.8
    with pytest.raises(ValueError, match="components"):
        D.lead_share(first, y, components=0)
    # the probe's view: per-column scale and sign do not matter, a constant column is ignored
    scaled = np.column_stack([first * rng.uniform(0.01, 100, size=9) * np.sign(rng.normal(size=9)), np.ones(n)])
    assert D.lead_share(scaled, y) == pytest.approx(D.lead_share(first, y))
    assert D.lead_share(first, -y) == pytest.approx(D.lead_share(first, y))
    # weights are multiplicities: counting a row twice is the same as holding it twice
    w = rng.integers(0, 3, size=n).astype(float)
    rows = np.repeat(np.arange(n), w.astype(int))
    assert D.lead_share(first, y, w) == pytest.approx(D.lead_share(first[rows], y[rows]))
    assert np.isnan(D.lead_share(first, np.ones(n))) and np.isnan(D.lead_share(np.ones((n, 3)), y))
    with pytest.raises(ValueError, match="same rows"):
        D.lead_share(first, y[:10])

    # in query_geometry: the same read either way, but only one question puts its task first
    enc = _FixedEncoder({"asks": first, "generic": last})
    users = [f"u{i}" for i in range(n)]
    g = D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={"asks": y})
    asks = g["per_query"][0]
    assert abs(asks["task_r2"] - asks["task_r2_reference"]) < 0.02              # the same content
    assert asks["task_lead_share"] > 0.8 and asks["task_lead_share_reference"] < 0.1
    assert g["task_lead_gain_mean"] == pytest.approx(asks["task_lead_share"] - asks["task_lead_share_reference"])
    assert 0.5 < g["task_lead_gain_low"] < g["task_lead_gain_mean"] < g["task_lead_gain_high"]
    same = D.query_geometry(_FixedEncoder({"asks": first, "generic": first[:, ::-1]}), None, users,
                            ["asks", "generic"], reference_query="generic", targets={"asks": y})
    assert same["task_lead_gain_mean"] == pytest.approx(0.0, abs=1e-9)          # columns reordered: nothing
    assert same["task_lead_gain_low"] == pytest.approx(0.0, abs=1e-9) == same["task_lead_gain_high"]
    assert D.lead_gain_interval(first[:, None], last, y[:, None], seed=2) == \
        D.lead_gain_interval(first[:, None], last, y[:, None], seed=2)          # seeded
    assert np.isnan(D.lead_gain_interval(first[:, None], last, np.ones((n, 1)))).all()
    # a task whose target is constant (a label no user has) is left out, as the read gain's interval leaves it out
    both = np.stack([first, first], axis=1)                                     # (n, 2, d)
    assert D.lead_gain_interval(both, last, np.column_stack([y, np.ones(n)])) == \
        pytest.approx(D.lead_gain_interval(first[:, None], last, y[:, None]))
    with pytest.raises(ValueError, match="same n users"):
        D.lead_gain_interval(first, last, y[:, None])


def test_lead_gain_interval_holds_its_estimate_where_leading_directions_nearly_tie():
    """Three groups of correlated columns, the task's and another nearly tied for the second principal direction:
    the full sample ranks the task's group ahead, resamples often reorder the two. The basic interval alone excluded the
    estimate (and passed 1, beyond any share difference); the interval holds it and says the lead may be smaller."""
    rng = np.random.default_rng(0)
    n = 300
    f = rng.normal(size=(n, 3))
    X = np.hstack([f[:, [0]] + 0.3 * rng.normal(size=(n, 4)), f[:, [1]] + 0.30 * rng.normal(size=(n, 3)),
                   f[:, [2]] + 0.33 * rng.normal(size=(n, 3))])                 # (n, 10)
    y, reference = f[:, 1], rng.normal(size=(n, 10))
    gain = D.lead_share(X, y) - D.lead_share(reference, y)
    low, high = D.lead_gain_interval(X[:, None], reference, y[:, None])
    assert gain > 0.9 and low <= gain <= high <= 1.0
    assert low < 0.6                                                             # resamples read less lead


def test_task_query_targets_follow_the_tasks_queries(small_world):
    users = _tune(small_world, 30)
    targets = D.task_query_targets(small_world, users)
    assert list(targets) == list(range(len(small_world.tasks)))      # each task's query position
    oracle = D.oracle_targets(small_world, users)
    for k, task_id in enumerate(small_world.tasks["task_id"]):
        np.testing.assert_array_equal(targets[k], oracle[task_id].to_numpy())
    # two tasks asking alike (the schema allows it) each keep their own target
    tasks = small_world.tasks.copy()
    tasks.loc[tasks.index[1], "query"] = tasks["query"].iloc[0]
    alike = D.task_query_targets(replace(small_world, tasks=tasks), users)
    np.testing.assert_array_equal(alike[0], oracle[tasks["task_id"].iloc[0]].to_numpy())
    np.testing.assert_array_equal(alike[1], oracle[tasks["task_id"].iloc[1]].to_numpy())


def test_query_geometry_reads_each_task_at_its_own_position():
    """Two tasks asked with one wording share an embedding but not a target: each row is read against its own."""
    rng = np.random.default_rng(1)
    n = 200
    y, noise = rng.normal(size=n), rng.normal(size=n)
    asks = np.column_stack([rng.normal(size=(n, 4)), y])
    enc = _FixedEncoder({"asks": asks, "generic": rng.normal(size=(n, 5))})
    users = [f"u{i}" for i in range(n)]
    g = D.query_geometry(enc, None, users, ["asks", "asks", "generic"], reference_query="generic",
                         targets={0: y, 1: noise})
    first, second, generic = g["per_query"]
    assert first["task_r2"] > 0.9 and second["task_r2"] < 0.1 and "task_r2" not in generic
    with pytest.raises(ValueError, match="asked at positions"):    # a repeated wording does not say whose target
        D.query_geometry(enc, None, users, ["asks", "asks", "generic"], reference_query="generic",
                         targets={"asks": y})
    with pytest.raises(ValueError, match="position 3"):
        D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={3: y})
    with pytest.raises(ValueError, match="two targets for position 0"):
        D.query_geometry(enc, None, users, ["asks", "generic"], reference_query="generic", targets={0: y, "asks": y})


def testlinear_novelty_separates_a_linear_map_from_new_information():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    mixed = X @ rng.normal(size=(8, 8)) + 3.0                       # another view of the same user: nothing new
    fresh = rng.normal(size=(300, 8))                                # information X does not hold
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0]              # keeps the variance of the columns
    half = np.hstack([X[:, :4] @ rotation, fresh[:, :4]])          # half the variance is new
    assert D.linear_novelty(X, mixed) < 0.01
    assert D.linear_novelty(X, fresh) > 0.95
    assert 0.35 < D.linear_novelty(X, half) < 0.65


# ----- claims -----------------------------------------------------------------------------------------


def test_claim_rows_truth_matches_the_answer_wording(small_world):
    scored, train = D.claim_rows(small_world, max_pairs=50, seed=3)
    assert len(scored) == 50 and set(scored["split"]) == {"pretrain_val"} and set(train["split"]) == {"pretrain"}
    for intent, answer, claim in zip(scored["intent"], scored["answer"], scored["claim"]):
        assert answer in INTENTS[intent].answers[claim]
    assert scored.equals(D.claim_rows(small_world, max_pairs=50, seed=3)[0])
    with pytest.raises(ValueError, match="'test'"):
        D.claim_rows(small_world, split="test")


def _hand_world(world):
    """Seven age_band rows: pretrain says 25to39 twice and 60plus once; pretrain_val says 25to39 once and
    60plus three times. Majority claim (from pretrain) = 25to39, so majority accuracy on val = 1/4."""
    ans = INTENTS["age_band"].answers
    pre, val = world.users_in("pretrain")[:3], world.users_in("pretrain_val")[:4]
    rows = [(pre[0], "25to39"), (pre[1], "25to39"), (pre[2], "60plus"),
            (val[0], "25to39"), (val[1], "60plus"), (val[2], "60plus"), (val[3], "60plus")]
    qa = pd.DataFrame({"user_id": [u for u, _ in rows], "source": "uqa", "intent": "age_band",
                       "query": INTENTS["age_band"].queries[0], "answer": [ans[c][0] for _, c in rows]})
    return replace(world, qa=qa)


def test_claim_accuracy_majority_on_a_hand_checkable_case(tiny_model, small_world, tiny_store):
    world = _hand_world(small_world)
    table = D.claim_accuracy(tiny_model, world, store=tiny_store)
    row = table[table["intent"] == "age_band"].iloc[0]
    assert row["n"] == 4 and row["source"] == "uqa"
    assert row["majority_acc"] == pytest.approx(0.25)
    assert 0 <= row["model_acc"] <= 1 and 0 <= row["logreg_acc"] <= 1 and 0 <= row["gbdt_acc"] <= 1
    overall = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    assert overall["n"] == 4 and overall["majority_acc"] == pytest.approx(0.25)


def test_claim_accuracy_on_the_small_world(tiny_model, small_world, tiny_store):
    base = D.claim_baselines(small_world, tiny_store, max_pairs=120, seed=0)
    scored, train = D.claim_rows(small_world, max_pairs=120, seed=0)
    # majority = the most common pretrain claim of the intent, checked independently
    for intent, g in base.groupby("intent"):
        counts = Counter(train.loc[train["intent"] == intent, "claim"])
        top = max(counts.values())
        assert g["majority"].iloc[0] == sorted(c for c, n in counts.items() if n == top)[0]
    table = D.claim_accuracy(tiny_model, small_world, store=tiny_store, baselines=base)
    per_intent = table[table["intent"] != "overall"]
    assert set(per_intent["intent"]) == set(scored["intent"])
    assert set(per_intent["source"]) <= {"future", "uqa"}
    overall = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    assert overall["n"] == 120 == per_intent["n"].sum()
    for col in ("model_acc", "majority_acc", "logreg_acc", "gbdt_acc"):
        assert overall[col] == pytest.approx((per_intent[col] * per_intent["n"]).sum() / 120)
        assert 0 <= overall[col] <= 1
    assert np.isfinite(overall["own_answer_margin"])
    # the yardstick reads the tabular input: better than the majority claim on the whole
    assert overall["gbdt_acc"] >= overall["majority_acc"] - 0.05


def test_model_claim_prediction_follows_the_nearest_wording(tiny_model, small_world, tiny_store, monkeypatch):
    """Make every answer embedding point at the anchor for one claim: the model must predict that claim."""
    scored, _ = D.claim_rows(small_world, max_pairs=30, seed=1)
    target = {i: sorted(INTENTS[i].answers)[-1] for i in scored["intent"].unique()}
    wanted = {w for i, c in target.items() for w in INTENTS[i].answers[c]}
    d = tiny_model.config.embed_dim
    anchor = F.normalize(torch.ones(d), dim=0)
    other = F.normalize(torch.arange(d, dtype=torch.float32) - d / 2, dim=0)
    monkeypatch.setattr(tiny_model, "embed", lambda batch, queries: anchor.expand(len(queries), d))
    monkeypatch.setattr(tiny_model, "embed_answers",
                        lambda texts: torch.stack([anchor if t in wanted else other for t in texts]))
    rows = D.model_claim_predictions(tiny_model, scored, tiny_store)
    assert rows["pred"].tolist() == [target[i] for i in scored["intent"]]


# ----- query selectivity ------------------------------------------------------------------------------


def _fake_encode_pairs(claim_of, informative: str):
    """A CachedEmbedder.encode_pairs replacement. Every user gets fixed noise under any query (the generic one
    included); with `informative="own"` a row's own-query embedding one-hot encodes the user's true claim of
    the intent."""
    intents_of: dict[str, list[str]] = {}
    for iid, it in INTENTS.items():  # a graded intent asks its counts twin's questions
        intents_of.setdefault(it.queries[0], []).append(iid)
    col = {(iid, c): k for iid, it in INTENTS.items() for k, c in enumerate(sorted(it.answers))}
    d = max(len(it.answers) for it in INTENTS.values())

    def noise(user):
        return np.random.default_rng(abs(hash(user)) % 2**32).normal(size=d).astype(np.float32)

    def encode_pairs(self, users, queries, *, batch_size=64, show_progress_bar=False):
        out = np.stack([noise(u) for u in users])                            # (N, d)
        if informative == "own":
            for i, (u, q) in enumerate(zip(users, queries)):
                for intent in intents_of.get(q, []):
                    c = claim_of.get((u, intent))
                    if c is not None:
                        out[i] = 0.0
                        out[i, col[(intent, c)]] = 1.0
        return out
    return encode_pairs


def _claims_by_user(world, max_pairs):
    scored, train = D.claim_rows(world, max_pairs=max_pairs, seed=0)
    rows = pd.concat([scored, train])
    return {(u, i): c for u, i, c in zip(rows["user_id"], rows["intent"], rows["claim"])}


def test_query_selectivity_finds_an_informative_question_and_nothing_else(tiny_model, small_world, tiny_store,
                                                                          monkeypatch):
    from qanchor_lab.embedder import CachedEmbedder

    claim_of = _claims_by_user(small_world, 120)
    monkeypatch.setattr(CachedEmbedder, "encode_pairs", _fake_encode_pairs(claim_of, "own"))
    table = D.query_selectivity(tiny_model, small_world, max_pairs=120, store=tiny_store)
    top = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    # the probe can only name claims it saw among the pretrain rows of the intent
    scored, train = D.claim_rows(small_world, max_pairs=120, seed=0)
    kept = set(table.loc[table["intent"] != "overall", "intent"])
    seen = train.groupby("intent")["claim"].agg(set)
    rows = scored[scored["intent"].isin(kept)]
    reachable = np.mean([c in seen[i] for i, c in zip(rows["intent"], rows["claim"])])
    assert top["own_acc"] >= reachable - 0.05 and top["own_acc"] - top["generic_acc"] > 0.3
    assert top["selectivity"] == pytest.approx(top["own_acc"] - top["generic_acc"])
    assert top["selectivity_low"] > 0 and top["selectivity_low"] < top["selectivity"] < top["selectivity_high"]
    monkeypatch.setattr(CachedEmbedder, "encode_pairs", _fake_encode_pairs(claim_of, "neither"))
    flat = D.query_selectivity(tiny_model, small_world, max_pairs=120, store=tiny_store)
    assert (flat["selectivity"] == 0).all() and (flat["own_acc"] == flat["generic_acc"]).all()


def test_query_selectivity_on_the_small_world(tiny_model, small_world, tiny_store):
    scored, train = D.claim_rows(small_world, max_pairs=120, seed=0)
    table = D.query_selectivity(tiny_model, small_world, max_pairs=120, store=tiny_store)
    per_intent = table[table["intent"] != "overall"]
    fit_counts = train["intent"].value_counts()
    assert set(per_intent["intent"]) == {i for i in scored["intent"].unique() if fit_counts.get(i, 0) >= D.MIN_FIT_ROWS}
    overall = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    assert overall["n"] == per_intent["n"].sum()
    for c in ("own_acc", "generic_acc", "majority_acc", "selectivity"):
        assert overall[c] == pytest.approx((per_intent[c] * per_intent["n"]).sum() / overall["n"])
    assert table.equals(D.query_selectivity(tiny_model, small_world, max_pairs=120, store=tiny_store))  # deterministic
    with pytest.raises(ValueError, match="MIN_FIT_ROWS|pretrain QA rows"):
        D.query_selectivity(tiny_model, small_world, max_pairs=120, store=tiny_store, max_train_per_intent=5)


def test_tune_selectivity_finds_an_informative_question_and_nothing_else(tiny_model, small_world, tiny_store,
                                                                         monkeypatch):
    from qanchor_lab.embedder import CachedEmbedder

    users = small_world.users_in("tune")[:120]
    claims, _ = D._uqa_claims(small_world, users)
    claim_of = {(u, i): c for i in claims.columns for u, c in zip(users, claims[i].astype(str))}
    monkeypatch.setattr(CachedEmbedder, "encode_pairs", _fake_encode_pairs(claim_of, "own"))
    table = D.tune_selectivity(tiny_model, small_world, users, store=tiny_store)
    top = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    kept = table.loc[table["intent"] != "overall", "intent"]
    assert set(kept) == {i for i in claims.columns if claims[i].nunique() > 1}
    assert top["n"] == len(users) * len(kept)                  # every user answers every kept question
    assert top["own_acc"] > 0.9 and top["selectivity"] > 0.3 and top["selectivity_low"] > 0
    assert top["majority_acc"] < top["own_acc"]
    monkeypatch.setattr(CachedEmbedder, "encode_pairs", _fake_encode_pairs(claim_of, "neither"))
    flat = D.tune_selectivity(tiny_model, small_world, users, store=tiny_store)
    assert (flat["selectivity"] == 0).all() and (flat["own_acc"] == flat["generic_acc"]).all()


def test_tune_selectivity_on_the_small_world(tiny_model, small_world, tiny_store):
    table = D.tune_selectivity(tiny_model, small_world, max_users=60, store=tiny_store, folds=3)
    per_intent = table[table["intent"] != "overall"]
    overall = table[(table["intent"] == "overall") & (table["source"] == "all")].iloc[0]
    assert set(per_intent["source"]) == {"uqa"} and overall["n"] == 60 * len(per_intent)
    for c in ("own_acc", "generic_acc", "majority_acc", "selectivity"):
        assert overall[c] == pytest.approx((per_intent[c] * per_intent["n"]).sum() / overall["n"])
    assert table.equals(D.tune_selectivity(tiny_model, small_world, max_users=60, store=tiny_store, folds=3))
    with pytest.raises(ValueError, match="test users stay unseen"):
        D.tune_selectivity(tiny_model, small_world, small_world.users_in("test")[:20], store=tiny_store)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        D.tune_selectivity(tiny_model, small_world, max_users=60, store=tiny_store, folds=1)
    with pytest.raises(ValueError, match="cannot be split into folds=5"):
        D.tune_selectivity(tiny_model, small_world, small_world.users_in("tune")[:3], store=tiny_store)
    with pytest.raises(ValueError, match="tune_selectivity_users must be >= 0"):
        D.diagnose(tiny_model, small_world, tune_selectivity_users=-1)


# ----- perfect QA learner -----------------------------------------------------------------------------


def test_perfect_qa_learner_r2_runs_on_tune_users(small_world):
    out = D.perfect_qa_learner_r2(small_world, "tune")
    assert out["n_users"] == len(small_world.users_in("tune"))
    assert set(out["left_out_intents"]) == {i for i, it in INTENTS.items() if it.source == "future"}
    assert out["n_intents"] == sum(it.source == "uqa" for it in INTENTS.values())
    assert "future window" in out["note"]
    assert np.isfinite(out["claims_r2"]) and out["claims_r2"] > 0.1
    assert np.isfinite(out["features_r2"]) and out["features_r2"] > 0.2
    assert [r["task_id"] for r in out["per_task"]] == small_world.tasks["task_id"].tolist()
    with pytest.raises(ValueError, match="split"):
        D.perfect_qa_learner_r2(small_world, "test")
    with pytest.raises(ValueError, match="labels"):
        D.perfect_qa_learner_r2(small_world, "pretrain_val")


@pytest.fixture(scope="module")
def derived_world(small_world):
    """The small world with its QA derived from the log and no declared window, as a dataset of one's own: the
    feature window, inferred from the pre-training users, ends at their cutoff, 30 days before the tune users'."""
    from qanchor_lab.derive_qa import DeriveQAConfig, derive_world_qa

    manifest = {k: v for k, v in small_world.manifest.items() if k not in ("config", "history_window")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the inferred window leaves the tune users' last days out, and says so
        return derive_world_qa(replace(small_world, manifest=manifest), DeriveQAConfig(future_days=30, seed=3))


def _without_days_after(world, end) -> object:
    """`world` without the downstream users' events at or after `end`: days no feature window ending there reads."""
    ev = world.events
    late = (ev["timestamp"] >= end) & ~ev["user_id"].isin(world.users_in("pretrain", "pretrain_val"))
    assert late.any()
    return replace(world, events=ev[~late].reset_index(drop=True))


def test_derived_claims_read_only_the_days_the_model_reads(derived_world):
    """A derived world's tune users have a cutoff at the end of the log, the features a window that ends 30 days
    earlier: the perfect-QA claims must not read days the features (and the model) never see."""
    from qanchor_lab.features import FeatureSpec

    w = derived_world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = FeatureSpec.fit(w.events, w.profiles, user_ids=w.users_in("pretrain"), modalities=w.modality_specs)
    end = spec.window[1]
    assert (w.users.set_index("user_id").loc[w.users_in("tune"), "cutoff"] > end).all()
    cut = _without_days_after(w, end)
    full, clipped = (D.perfect_qa_learner_r2(x, "tune", feature_spec=spec) for x in (w, cut))
    assert full["features_r2"] == clipped["features_r2"]      # the features never read those days
    assert full["claims_r2"] == clipped["claims_r2"] and full["per_task"] == clipped["per_task"]
    users = w.users_in("tune")[:50]
    claims = D._uqa_claims(w, users, window=spec.window)[0]
    pd.testing.assert_frame_equal(claims, D._uqa_claims(cut, users, window=spec.window)[0])
    assert not claims.equals(D._uqa_claims(w, users)[0])     # each user's own cutoff reads the later days


def test_tune_selectivity_reads_the_days_the_model_reads(derived_world):
    from qanchor_lab.model import QAnchorModel

    w = derived_world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, w.users_in("pretrain"))
    users = w.users_in("tune")[:40]
    store = model.behaviour(w.events, w.profiles, users)
    cut = _without_days_after(w, model.feature_spec.window[1])
    table = D.tune_selectivity(model, w, users, store=store, folds=3)
    assert table.equals(D.tune_selectivity(model, cut, users, store=store, folds=3))


# ----- diagnose, rendering, CLI -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_diag(_tiny_model_session, small_world):
    import copy

    trained = copy.deepcopy(_tiny_model_session)
    untrained = copy.deepcopy(_tiny_model_session)
    with torch.no_grad():  # make "trained" differ: perturb the head
        noise = torch.randn(trained.head[2].weight.shape, generator=torch.Generator().manual_seed(0))
        trained.head[2].weight.add_(0.5 * noise)
    return D.diagnose(trained, small_world, untrained=untrained, max_users=100, max_pairs=80, geometry_users=40,
                      tune_selectivity_users=40)


@pytest.mark.slow
def test_diagnose_is_jsonable_and_complete(small_diag, small_world):
    diag = json.loads(json.dumps(small_diag, allow_nan=False))  # no NaN / numpy leftovers
    assert diag["models"] == ["trained", "untrained"]
    assert diag["query"] == small_world.tasks["query"].iloc[0] and diag["n_users"] == 100
    for name in diag["models"]:
        assert diag["stages"][name][-1]["stage"] == "embedding"
        assert len(diag["geometry"][name]["per_query"]) == len(small_world.tasks) + 1
        assert diag["summary"][name]["claim_acc"] is not None
        assert diag["selectivity"][name][-1]["intent"] == "overall"
        assert diag["summary"][name]["query_selectivity"] == diag["selectivity"][name][-1]["selectivity"]
        assert diag["tune_selectivity"][name][-1]["intent"] == "overall"
        assert diag["summary"][name]["tune_query_selectivity"] == diag["tune_selectivity"][name][-1]["selectivity"]
        rows = diag["geometry"][name]["per_query"]
        assert all("task_r2" in r for r in rows[:-1]) and "task_r2" not in rows[-1]   # the generic query is the reference
        assert diag["summary"][name]["task_read_gain"] == pytest.approx(
            np.mean([r["task_r2"] - r["task_r2_reference"] for r in rows[:-1]]))
        summary = diag["summary"][name]
        assert summary["task_read_gain_low"] <= summary["task_read_gain"] <= summary["task_read_gain_high"]
        assert summary["task_lead_gain"] == pytest.approx(
            np.mean([r["task_lead_share"] - r["task_lead_share_reference"] for r in rows[:-1]]))
        assert summary["task_lead_gain_low"] <= summary["task_lead_gain"] <= summary["task_lead_gain_high"]
    # the inputs do not depend on the model; the head perturbation changes only the embedding stage
    t, u = diag["stages"]["trained"], diag["stages"]["untrained"]
    assert t[0]["oracle_r2"] == u[0]["oracle_r2"]
    assert t[-2]["oracle_r2"] == u[-2]["oracle_r2"] and t[-1]["oracle_r2"] != u[-1]["oracle_r2"]
    assert diag["perfect_qa"]["n_users"] == 100


@pytest.mark.slow
def test_markdown_report_section_and_figure(small_diag, tmp_path):
    from qanchor_lab.report import diagnostics_section

    md = D.diagnostics_markdown(small_diag)
    for heading in ("## Headline", "## Oracle-score R² per stage", "## Query geometry", "## Claim accuracy",
                    "## Query selectivity", "## Query selectivity on tune users", "## Perfect QA learner"):
        assert heading in md
    assert "prefix_layer_0" in md and "acc_untrained" in md
    fig = D.figure_stage_r2(small_diag)
    assert [tr.name for tr in fig.data] == ["untrained", "trained"]
    assert list(fig.data[1].x) == [r["stage"] for r in small_diag["stages"]["trained"]]
    section = diagnostics_section(small_diag)
    assert section.startswith("<h2>Representation diagnostics</h2>") and "fig-diagnostics-stages" in section
    assert section == diagnostics_section(small_diag)  # deterministic
    for heading in ("Query selectivity on held-out pre-training users", "Query selectivity on tune users"):
        assert heading in section
        assert heading not in diagnostics_section({**small_diag, "selectivity": {}, "tune_selectivity": {}})
    js, mdp = D.save_diagnostics(small_diag, tmp_path / "out")
    assert json.loads(js.read_text())["models"] == ["trained", "untrained"] and mdp.read_text() == md


@pytest.fixture(scope="module")
def sparse_world(small_world):
    """The small world as a small dataset of one's own might be: no oracle (the 0/1 labels are the target), fewer
    pretrain QA rows per intent than query_selectivity fits a probe on, two tasks asking alike and one asking the
    generic question."""
    from qanchor_lab.pipeline import GENERIC_QUERY

    qa = small_world.qa
    pre = qa["user_id"].isin(small_world.users_in("pretrain"))
    thin = pd.concat([qa[~pre], qa[pre].groupby("intent").head(D.MIN_FIT_ROWS - 1)], ignore_index=True)
    tasks = small_world.tasks.copy()
    tasks.loc[tasks.index[1], "query"] = tasks["query"].iloc[0]
    tasks.loc[tasks.index[2], "query"] = GENERIC_QUERY
    return replace(small_world, qa=thin, tasks=tasks, labels=small_world.labels.assign(oracle_prob=np.nan))


@pytest.fixture(scope="module")
def sparse_diag(_tiny_model_session, sparse_world):
    import copy

    return D.diagnose(copy.deepcopy(_tiny_model_session), sparse_world, max_users=60, max_pairs=40, geometry_users=30)


def test_diagnose_skips_query_selectivity_where_the_world_has_too_few_qa_rows(sparse_diag):
    from qanchor_lab.report import diagnostics_section

    why = sparse_diag["selectivity_skipped"]
    assert why.startswith(f"query_selectivity: no intent has {D.MIN_FIT_ROWS} or more pretrain QA rows")
    assert sparse_diag["selectivity"] == {} and "query_selectivity" not in sparse_diag["summary"]["trained"]
    assert sparse_diag["summary"]["trained"]["claim_acc"] is not None          # the rest was measured
    md = D.diagnostics_markdown(sparse_diag)
    assert f"## Query selectivity (pretrain_val QA rows)\n\nSkipped: {why}." in md
    assert f"Skipped: {why}." in diagnostics_section(sparse_diag)


def test_renderings_name_the_task_label_target(sparse_diag):
    """Without an oracle the probes read the 0/1 task label: no rendering may call their R² an oracle score's."""
    from qanchor_lab.report import diagnostics_section

    assert sparse_diag["stage_target"] == sparse_diag["perfect_qa"]["target"] == "label"
    md, section = D.diagnostics_markdown(sparse_diag), diagnostics_section(sparse_diag)
    assert "## Task-label R² per stage" in md and "ridge R² against the 0/1 task label on" in md
    assert "Retention is a stage's task-label R²" in section and "claims explain task-label R²" in section
    for text in (md, section):
        assert "oracle score" not in text.lower() and "oracle-score" not in text.lower()
    fig = D.figure_stage_r2(sparse_diag)
    assert fig.layout.yaxis.title.text == "task-label R²" and "oracle" not in fig.layout.title.text
    assert D.figure_stage_r2(sparse_diag, "retention").layout.yaxis.title.text == \
        "retention (task-label R² / input_tabular's)"
    assert D.figure_stage_r2(sparse_diag, target="oracle_logit").layout.yaxis.title.text == "oracle-score R²"
    assert D.figure_stage_r2(sparse_diag["stages"]).layout.yaxis.title.text == "oracle_r2"   # a bare mapping: unknown
    assert D.target_words("oracle_logit").r2 == "oracle-score R²" and D.target_words(None).noun == "oracle score"
    with pytest.raises(ValueError, match="'logit'"):
        D.target_words("logit")


def test_diagnose_reads_tasks_that_share_a_query_and_notes_a_generic_one(sparse_diag, sparse_world):
    rows = sparse_diag["geometry"]["trained"]["per_query"]
    tasks = sparse_world.tasks["task_id"].tolist()
    assert rows[0]["query"] == rows[1]["query"] and rows[0]["task_r2"] != rows[1]["task_r2"]   # their own targets
    assert "task_r2" not in rows[2] and tasks[2] in sparse_diag["geometry_note"]              # the generic question
    asked = [r for i, r in enumerate(rows[:-1]) if i != 2]
    assert sparse_diag["summary"]["trained"]["task_read_gain"] == pytest.approx(
        np.nanmean([np.nan if r["task_r2"] is None else r["task_r2"] - r["task_r2_reference"] for r in asked]))
    assert any(r.get("task_r2", 0.0) is None for r in rows)   # a task whose 0/1 label is constant here: no R²
    md = D.diagnostics_markdown(sparse_diag)                  # ... which the per-query table shows as "–"
    assert f"Note: {sparse_diag['geometry_note']}." in md


def _stands_metrics(**extra) -> dict:
    """A hand-made metrics dict: Q-Anchor with an AUC interval and one method it cannot be told apart from."""
    def entry(auc, **more):
        return {"avg_auc": auc, "avg_ks": 0.3, "domains": {}, "tasks": {}, **more}

    return {"methods": {"qanchor_base": entry(0.72, avg_auc_ci=[0.70, 0.74]),
                        "gbdt_features": entry(0.721, vs_reference={"auc_diff": 0.001, "auc_low": -0.01,
                                                                    "auc_high": 0.012})},
            "reference": "qanchor_base", **extra}


def test_where_qanchor_stands_claims_no_level_the_metrics_lack():
    from qanchor_lab.report import where_qanchor_stands

    for metrics in (_stands_metrics(), _stands_metrics(bootstrap=None)):
        text = where_qanchor_stands(metrics)
        assert "(CI 0.700–0.740)" in text and "the CI of the AUC difference spans zero" in text and "%" not in text
    text = where_qanchor_stands(_stands_metrics(bootstrap={"ci": 0.9, "n_boot": 10, "seed": 0}))
    assert "(90% CI 0.700–0.740)" in text and "the 90% CI of the AUC difference spans zero" in text


def test_report_has_one_diagnostics_heading(sparse_diag, tmp_path):
    from qanchor_lab.report import write_report

    metrics = _stands_metrics(bootstrap={"ci": 0.95, "n_boot": 10, "seed": 0})
    page = write_report(tmp_path / "report.html", metrics, diagnostics=sparse_diag).read_text()
    assert page.count("Representation diagnostics") == 1 and "<h2>Representation diagnostics</h2>" in page


def test_resolve_run_finds_model_and_world(tmp_path, monkeypatch):
    from qanchor_lab import pipeline
    from qanchor_lab.model import CONFIG_NAME

    with pytest.raises(FileNotFoundError, match="neither"):
        D.resolve_run(tmp_path)
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / CONFIG_NAME).write_text("{}")
    with pytest.raises(ValueError, match="--data"):
        D.resolve_run(tmp_path / "run")
    (tmp_path / "run" / "demo_config.json").write_text(json.dumps({"n_users": 777, "seed": 3}))
    monkeypatch.setattr(pipeline, "DATA_ROOT", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="world-777-seed3"):
        D.resolve_run(tmp_path / "run")
    (tmp_path / "data" / "world-777-seed3").mkdir(parents=True)
    assert D.resolve_run(tmp_path / "run") == (tmp_path / "run" / "model", tmp_path / "data" / "world-777-seed3")
    assert D.resolve_run(tmp_path / "run" / "model")[0] == tmp_path / "run" / "model"


def test_diagnose_as_report_refuses_flags_it_would_override_and_a_run_without_its_config(tmp_path, capsys):
    from qanchor_lab.cli import main
    from qanchor_lab.model import CONFIG_NAME

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / CONFIG_NAME).write_text("{}")
    (tmp_path / "data").mkdir()
    run = ["diagnose", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--as-report"]
    for extra in (["--fast"], ["--seed", "0"], ["--max-users", "50"], ["--tune-selectivity-users", "0"],
                  ["--query", "q?"]):
        named = extra[0]
        assert main(run + extra) == 2
        err = capsys.readouterr().err
        assert f"drop {named}" in err and "Traceback" not in err
    assert main(run) == 2       # a bare model directory: nothing says what the report read
    err = capsys.readouterr().err
    assert "no demo_config.json found" in err and "--max-users and --seed" in err
    assert not (tmp_path / "run" / "diagnostics.json").exists()


def test_run_demo_config_reads_the_runs_marker(tmp_path):
    from qanchor_lab.model import CONFIG_NAME
    from qanchor_lab.pipeline import DemoConfig

    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / CONFIG_NAME).write_text("{}")
    assert D.run_demo_config(tmp_path / "run") is None
    with pytest.raises(ValueError, match="give it"):
        D.run_demo_config(tmp_path / "run", missing="give it")
    # a marker keeps the training fields and the resolved configs (pipeline.run_key); the rest are defaults
    (tmp_path / "run" / "demo_config.json").write_text(json.dumps({"n_users": 800, "seed": 3, "model_config": {}}))
    for where in (tmp_path / "run", tmp_path / "run" / "model"):
        cfg = D.run_demo_config(where)
        assert (cfg.n_users, cfg.seed, cfg.n_boot) == (800, 3, DemoConfig.n_boot)
    # a marker cut short by an interrupted write, or not an object, is named rather than failing inside json
    for text in ('{"n_users": 80', "[1, 2]"):
        (tmp_path / "run" / "demo_config.json").write_text(text)
        with pytest.raises(ValueError, match=r"demo_config.json is not a readable run marker.*, or give it"):
            D.run_demo_config(tmp_path / "run", missing="give it")


@pytest.mark.slow
def test_cli_diagnose_as_report_reads_the_demos_sizes_and_seed(tiny_model, small_world, tmp_path, capsys):
    from qanchor_lab.cli import main
    from qanchor_lab.data import save_world
    from qanchor_lab.pipeline import DemoConfig

    tiny_model.save_pretrained(tmp_path / "run" / "model")
    save_world(small_world, tmp_path / "data")
    cfg = DemoConfig(n_users=len(small_world.users), seed=5)
    (tmp_path / "run" / "demo_config.json").write_text(json.dumps({"n_users": cfg.n_users, "seed": cfg.seed}))
    assert main(["diagnose", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--as-report",
                 "--no-untrained"]) == 0
    capsys.readouterr()
    diag = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    size = cfg.diagnostics_size()
    tune = small_world.users_in("tune")
    assert diag["seed"] == 5 and diag["n_users"] == min(size["max_users"], len(tune))
    assert diag["max_pairs"] == size["max_pairs"] and diag["geometry_users"] == size["geometry_users"]
    assert diag["selectivity"] == {}    # the demo's quick look asks tune users, not pretrain_val rows
    rows = diag["tune_selectivity"]["trained"]
    assert rows[-1]["n"] == size["tune_selectivity_users"] * sum(r["intent"] != "overall" for r in rows)


@pytest.mark.slow
def test_cli_diagnose_on_a_saved_tiny_model(tiny_model, small_world, tmp_path, capsys):
    from qanchor_lab.cli import main
    from qanchor_lab.data import save_world

    tiny_model.save_pretrained(tmp_path / "run" / "model")
    save_world(small_world, tmp_path / "data")
    rc = main(["diagnose", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--fast", "--max-users", "60",
               "--tune-selectivity-users", "30"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "# Representation diagnostics" in out and "wrote" in out and "## Query selectivity on tune users" in out
    diag = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert diag["n_users"] == 60 and diag["models"] == ["trained", "untrained"]
    tune_sel = diag["tune_selectivity"]["trained"]
    assert tune_sel[-1]["n"] == 30 * sum(r["intent"] != "overall" for r in tune_sel) > 0   # 30 users x the questions
    # the saved model and the rebuilt untrained one are the same weights: identical numbers
    assert diag["summary"]["trained"] == diag["summary"]["untrained"]
    assert (tmp_path / "run" / "diagnostics.md").read_text().startswith("# Representation diagnostics")
    # a second look must not replace the first unasked: refused before any probe runs, the files untouched
    before = (tmp_path / "run" / "diagnostics.json").read_bytes()
    assert main(["diagnose", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--fast"]) == 2
    err = capsys.readouterr().err
    assert "already holds diagnostics.json and diagnostics.md" in err and "--overwrite" in err
    assert (tmp_path / "run" / "diagnostics.json").read_bytes() == before
    assert main(["diagnose", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--fast", "--max-users", "40",
                 "--no-untrained", "--overwrite"]) == 0
    assert json.loads((tmp_path / "run" / "diagnostics.json").read_text())["n_users"] == 40
    capsys.readouterr()
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    assert "neither" in capsys.readouterr().err
