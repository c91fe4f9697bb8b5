"""The data contract: table names, columns, dtypes and the World container.

Every table is a long-format pandas DataFrame, stored as Parquet. The same schema is used for the
synthetic UserU world and for a user's own logs (data/README.md documents it for people).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

SCHEMA_VERSION = 1

# Behaviour modalities that are event sequences, in their canonical order.
SEQUENCE_MODALITIES: tuple[str, ...] = ("bill", "miniprogram", "search", "click")
# The tabular profile is a modality too, but one row per user (profiles table), not events.
TABULAR_MODALITY = "profile"
MODALITIES: tuple[str, ...] = SEQUENCE_MODALITIES + (TABULAR_MODALITY,)

POPULATIONS = ("pretrain", "downstream")
SPLITS = ("pretrain", "pretrain_val", "tune", "test")
DOMAINS = ("engagement", "risk", "marketing")
QA_SOURCES = ("future", "uqa")

# column -> dtype kind: "str", "datetime", "float", "int".  `required` columns must be present;
# optional ones are filled with their default when a user's own table lacks them.
EVENT_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "modality": "str",      # one of SEQUENCE_MODALITIES
    "timestamp": "datetime",  # naive UTC, inside the history window
    "category": "str",      # merchant category / service / page section; "" when none
    "channel": "str",       # payment channel for bills, "app" otherwise
    "text": "str",          # short description, non-empty; amounts live in `amount`, not here
    "amount": "float",      # bill amount (CNY), 0.0 for other modalities
    "duration_s": "float",  # dwell time (s) for mini-program opens and clicks, 0.0 otherwise
}
EVENT_REQUIRED = ("user_id", "modality", "timestamp", "text")
EVENT_DEFAULTS: dict[str, Any] = {"category": "", "channel": "app", "amount": 0.0, "duration_s": 0.0}

QA_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "source": "str",   # "future" (D_future) or "uqa" (D_uqa)
    "intent": "str",   # the question's intent id, shared by its paraphrases
    "query": "str",
    "answer": "str",
}
QA_REQUIRED = ("user_id", "query", "answer")
QA_DEFAULTS: dict[str, Any] = {"source": "uqa", "intent": ""}

TASK_COLUMNS: dict[str, str] = {
    "task_id": "str",
    "domain": "str",   # one of DOMAINS
    "query": "str",    # the natural-language scenario query
    "description": "str",
}
TASK_REQUIRED = ("task_id", "query")
TASK_DEFAULTS: dict[str, Any] = {"domain": "engagement", "description": ""}

LABEL_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "task_id": "str",
    "label": "int",          # 0/1
    "oracle_prob": "float",  # the true P(label=1) in the synthetic world; NaN-free
}
LABEL_REQUIRED = ("user_id", "task_id", "label")
LABEL_DEFAULTS: dict[str, Any] = {"oracle_prob": float("nan")}

# Users: user_id, population, split, persona, trait_* columns (latent truth: never a model input).
USER_REQUIRED = ("user_id", "population", "split")
# Profiles: user_id plus numeric profile columns (the observed tabular modality).
PROFILE_REQUIRED = ("user_id",)

TABLES = ("events", "profiles", "users", "qa", "tasks", "labels")


@dataclass
class World:
    """All tables of one dataset plus its manifest (a JSON-able dict)."""

    events: pd.DataFrame
    profiles: pd.DataFrame
    users: pd.DataFrame
    qa: pd.DataFrame
    tasks: pd.DataFrame
    labels: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)

    def users_in(self, *splits: str) -> list[str]:
        """User ids whose split is one of `splits`, in table order."""
        return self.users.loc[self.users["split"].isin(splits), "user_id"].tolist()

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; valid tables: {', '.join(TABLES)}")
        return getattr(self, name)
