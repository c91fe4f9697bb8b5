"""Shared fixtures: one small world and one tiny model per test session (tests copy the model)."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_world():
    from qanchor_lab.world import WorldConfig, generate_world

    return generate_world(WorldConfig(n_users=1200, seed=11))


def tiny_config(**overrides):
    from qanchor_lab.backbone import BackboneConfig
    from qanchor_lab.model import QAnchorConfig

    kw = dict(backbone=BackboneConfig(name="tiny", tiny_size="xs", seed=0), text_encoder="hashing",
              max_events=6, adapter_hidden=64, head_hidden=64, embed_dim=32)
    kw.update(overrides)
    return QAnchorConfig(**kw)


@pytest.fixture(scope="session")
def _tiny_model_session(small_world):
    from qanchor_lab.model import QAnchorModel

    w = small_world
    return QAnchorModel.from_data(tiny_config(), w.events, w.profiles, w.users_in("pretrain"))


@pytest.fixture()
def tiny_model(_tiny_model_session):
    """A fresh copy of the session's tiny model (tests may train or modify it)."""
    return copy.deepcopy(_tiny_model_session)


@pytest.fixture(scope="session")
def tiny_store(_tiny_model_session, small_world):
    w = small_world
    users = w.users_in("pretrain", "pretrain_val", "tune", "test")
    return _tiny_model_session.behaviour(w.events, w.profiles, users)


def searchers(model, store, n: int = 120):
    """(prefix cache, labels) of the store's first n users, labelled by a fact the behaviour determines: any
    search events. The prompt-tuning tests learn it."""
    from qanchor_lab.embedder import build_prefix_cache

    batch = store.batch(store.indices(store.user_ids[:n]))
    labels = batch.masks["search"].any(1).numpy().astype(int)
    if labels.min() == labels.max():
        pytest.skip("fixture world has no users without search")
    return build_prefix_cache(model, batch), labels
