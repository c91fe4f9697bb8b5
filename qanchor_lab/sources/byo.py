"""Bring your own data: a user's tables from a directory of Parquet/CSV files or from pandas DataFrames,
validated against the data contract (data/README.md) into a `schema.World`.

Required: `events` and `users`. Optional: `profiles` (none: every user has an empty profile), `qa` (the
pre-training pairs; without it pre-training needs pairs derived from the log), `tasks` and `labels`
(downstream evaluation; `oracle_prob` left out on real data). The dataset's declarations go in a
manifest (a `manifest.json` next to the tables, or the `manifest` argument):

    {"name": "my_shop",
     "modalities": [{"name": "order", "unit": "USD", "amount": "any"},
                    {"name": "review", "amount": "zero"}],
     "history_window": {"start": "2025-01-01", "end": "2025-04-01"}}

Undeclared modalities are read from the events (by name, no unit, any sign); an undeclared window means
all history. Exact repeated event rows are kept as events; users without events are kept as users. The
returned manifest's `counts` says how many of each there are, and how many events fall outside the
declared window, so nothing is dropped or merged silently. A qa table that asks a task's query verbatim is
refused (`check_task_queries_unseen`): pre-training must not see the downstream questions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qanchor_lab.data import (
    CSV_SUFFIXES,
    PARQUET_SUFFIXES,
    DataValidationError,
    _shown,
    check_world,
    count_duplicate_events,
    read_frame,
    read_manifest,
    validate_events,
    validate_labels,
    validate_profiles,
    validate_qa,
    validate_tasks,
    validate_users,
)
from qanchor_lab.schema import (
    LABEL_COLUMNS,
    QA_COLUMNS,
    SCHEMA_VERSION,
    TABLES,
    TASK_COLUMNS,
    World,
    declared_modalities,
    declared_window,
)

REQUIRED_TABLES = ("events", "users")
OPTIONAL_TABLES = ("profiles", "qa", "tasks", "labels")
# Which splits belong to which population (the pre-training population never carries task labels).
POPULATION_SPLITS = {"pretrain": ("pretrain", "pretrain_val"), "downstream": ("tune", "test")}
_DTYPES = {"str": "str", "float": "float64", "int": "int64"}


def load(source: str | Path | Mapping[str, Any], *, manifest: Mapping[str, Any] | None = None) -> World:
    """Read and validate a dataset: `source` is a directory holding `<table>.parquet` / `.csv` files, or a
    mapping table name -> DataFrame. `manifest` (declarations, see the module docstring) overrides a
    `manifest.json` in the directory. Errors are DataValidationError naming table, column, user and value."""
    if isinstance(source, Mapping):
        frames, found = _from_frames(source), {}
        where = "tables"
    else:
        frames, found = _from_directory(Path(source))
        where = str(source)
    declared = dict(found)
    declared.update(manifest or {})
    return _assemble(frames, declared, where)


def _from_frames(source: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    unknown = sorted(set(source) - set(TABLES))
    if unknown:
        raise DataValidationError(f"unknown table name(s) {_shown(unknown)}; valid tables: {', '.join(TABLES)}")
    out = {}
    for name, df in source.items():
        if df is None:
            continue
        if not isinstance(df, pd.DataFrame):
            raise DataValidationError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
        out[name] = df
    return out


def _from_directory(root: Path) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Raw (unvalidated, except for file-level parsing) tables of a directory plus its manifest."""
    if not root.is_dir():
        raise DataValidationError(f"dataset directory not found: {root}")
    frames: dict[str, pd.DataFrame] = {}
    for name in TABLES:
        files = [root / f"{name}{suf}" for suf in PARQUET_SUFFIXES + CSV_SUFFIXES if (root / f"{name}{suf}").is_file()]
        if len(files) > 1:
            raise DataValidationError(f"{name}: more than one file in {root}: {_shown([f.name for f in files])}; keep one")
        if files:
            frames[name] = read_frame(files[0], name)  # validated in _assemble
    return frames, read_manifest(root)


def _empty(columns: Mapping[str, str]) -> pd.DataFrame:
    """A typed empty table (an optional table the dataset does not have)."""
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES[k]) for c, k in columns.items()})


def _assemble(frames: dict[str, pd.DataFrame], manifest: dict[str, Any], where: str) -> World:
    missing = [t for t in REQUIRED_TABLES if t not in frames]
    if missing:
        raise DataValidationError(
            f"{where}: missing required table(s) {_shown(missing)} (give events and users; "
            f"optional: {', '.join(OPTIONAL_TABLES)})"
        )
    version = manifest.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise DataValidationError(f"{where}: manifest schema_version {version!r}; this package reads {SCHEMA_VERSION}")
    try:
        specs = declared_modalities(manifest, frames["events"]) if manifest.get("modalities") else None
        start, end = declared_window(manifest)
    except ValueError as exc:
        raise DataValidationError(f"{where}: {exc}") from None

    users = validate_users(frames["users"])
    _check_populations(users)
    events = validate_events(frames["events"], modalities=specs, users=users)
    if specs is None:
        specs = declared_modalities({}, events)  # inferred: by name, no unit, any sign
    profiles = (validate_profiles(frames["profiles"]) if "profiles" in frames
                else pd.DataFrame({"user_id": pd.Series(dtype="str")}))  # no profile columns
    qa = validate_qa(frames["qa"]) if "qa" in frames else _empty(QA_COLUMNS)
    tasks = validate_tasks(frames["tasks"]) if "tasks" in frames else _empty(TASK_COLUMNS)
    if "labels" in frames:
        if "tasks" not in frames:
            raise DataValidationError(f"{where}: a labels table needs a tasks table (task_id, query)")
        labels = validate_labels(frames["labels"], tasks=tasks)
    else:
        labels = _empty(LABEL_COLUMNS)
    _check_split_use(users, qa, "qa", "pretrain")
    _check_split_use(users, labels, "labels", "downstream")
    check_task_queries_unseen(qa, tasks)

    ts = events["timestamp"]
    outside = np.zeros(len(events), dtype=bool)
    if start is not None:
        outside |= (ts < start).to_numpy()
    if end is not None:
        outside |= (ts >= end).to_numpy()
    have = set(events.loc[~outside, "user_id"])
    declared = {k: v for k, v in manifest.items() if k not in ("counts", "modalities", "schema_version")}
    world = World(events=events, profiles=profiles, users=users, qa=qa, tasks=tasks, labels=labels, manifest={
        "schema_version": SCHEMA_VERSION,
        "source": "byo",
        **declared,
        "modalities": [s.to_dict() for s in specs],
        "history_window": {"start": start.isoformat() if start is not None else None,
                           "end": end.isoformat() if end is not None else None},
        "counts": {
            "users": {s: int((users["split"] == s).sum()) for s in ("pretrain", "pretrain_val", "tune", "test")},
            "events": {s.name: int((events["modality"] == s.name).sum()) for s in specs},
            "events_total": int(len(events)),
            "duplicate_event_rows": count_duplicate_events(events),  # kept as events (data/README.md)
            "events_outside_window": int(outside.sum()),  # in the table, never in features or sequences
            "users_without_events_in_window": int((~users["user_id"].isin(have)).sum()),
            # their profile columns are the fitted means with profile.missing = 1 (FeatureSpec.transform)
            "users_without_profile_row": int((~users["user_id"].isin(profiles["user_id"])).sum()),
            "qa": int(len(qa)),
            "labels": int(len(labels)),
        },
    })
    check_world(world)
    return world


def _check_populations(users: pd.DataFrame) -> None:
    """Each user's split belongs to its population (pretrain/pretrain_val vs tune/test)."""
    ok = np.zeros(len(users), dtype=bool)
    for pop, splits in POPULATION_SPLITS.items():
        ok |= (users["population"] == pop).to_numpy() & users["split"].isin(splits).to_numpy()
    if not ok.all():
        bad = users.loc[~ok]
        pairs = [f"{u!r}: {p}/{s}" for u, p, s in zip(bad["user_id"], bad["population"], bad["split"])]
        raise DataValidationError(
            f"users: {len(pairs)} user(s) have a split outside their population ({'; '.join(pairs[:5])}"
            f"{' and more' if len(pairs) > 5 else ''}); the pretrain population uses splits pretrain/pretrain_val, "
            "the downstream population tune/test"
        )


def _normalised_queries(queries: pd.Series) -> pd.Series:
    """Queries compared as a reader would: case-folded, whitespace trimmed and runs of it read as one space."""
    return queries.astype(str).str.split().str.join(" ").str.casefold()


def _asks_task_query(qa: pd.DataFrame, tasks: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """(the qa rows' normalised queries, (len(qa),) bool: which ask a task's query verbatim)."""
    asked = _normalised_queries(qa["query"])
    return asked, asked.isin(set(_normalised_queries(tasks["query"]))).to_numpy()


def without_task_queries(qa: pd.DataFrame, tasks: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(qa without the rows that ask a task's query verbatim, how many were left out): for QA the library derived
    from a log, whose template wording may happen to equal a user's task query."""
    if qa.empty or tasks.empty:
        return qa, 0
    _, hit = _asks_task_query(qa, tasks)
    return qa.loc[~hit].reset_index(drop=True), int(hit.sum())


def check_task_queries_unseen(qa: pd.DataFrame, tasks: pd.DataFrame) -> None:
    """No pre-training query is a downstream task's query verbatim (docs/design.md §2, "No leakage"): a task
    asked at evaluation must be new to the model, or the benchmark measures recall of a seen question.
    Compared after case-folding and trimming whitespace. Raises DataValidationError naming each such query,
    its task and how many qa rows use it. Applies to the qa table as given; QA derived later from the log leaves
    such rows out instead (`without_task_queries`), since its wording is the library's, not the user's."""
    if qa.empty or tasks.empty:
        return
    asked, hit = _asks_task_query(qa, tasks)
    if hit.any():
        task_of = dict(zip(_normalised_queries(tasks["query"]), zip(tasks["task_id"], tasks["query"])))
        uses = asked[hit].value_counts(sort=False)
        found = [f"{task_of[q][1]!r} (task {task_of[q][0]!r}: {n} qa row(s))" for q, n in uses.items()]
        raise DataValidationError(
            f"qa: {int(hit.sum())} row(s) ask a downstream task's query verbatim: {'; '.join(found[:5])}"
            f"{' and more' if len(found) > 5 else ''}. Pre-training must not see the task queries (no leakage): "
            "reword or drop these qa rows"
        )


def _check_split_use(users: pd.DataFrame, table: pd.DataFrame, name: str, population: str) -> None:
    """QA pairs belong to pre-training users and labels to downstream users (no label reaches pre-training)."""
    if table.empty:
        return
    pop = users.set_index("user_id")["population"]
    wrong = table["user_id"].map(pop).ne(population).to_numpy() & table["user_id"].isin(pop.index).to_numpy()
    if wrong.any():
        ids = list(dict.fromkeys(table.loc[wrong, "user_id"]))
        raise DataValidationError(
            f"{name}: {int(wrong.sum())} row(s) belong to users outside the {population} population: {_shown(ids)}"
        )
