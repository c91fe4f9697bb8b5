"""Small views of a world for notebooks: events per user, one user's timeline, QA examples."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qanchor_lab.schema import SEQUENCE_MODALITIES, World

# ----------------------------------------------------------------------------------------------
# views for notebooks


def events_per_user(world: World) -> pd.DataFrame:
    """Events per user and modality (users x SEQUENCE_MODALITIES, zeros included) plus a `total` column."""
    counts = pd.crosstab(world.events["user_id"], world.events["modality"])
    counts = counts.reindex(index=world.users["user_id"], columns=list(SEQUENCE_MODALITIES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.columns.name = None
    return counts


def user_timeline(world: World, user_id: str) -> pd.DataFrame:
    """One user's events in time order with a `hover` column (text, category, amount or dwell) for plots."""
    ev = world.events[world.events["user_id"] == user_id]
    if ev.empty:
        known = world.users["user_id"]
        if not known.isin([user_id]).any():
            raise KeyError(f"user_timeline: unknown user_id {user_id!r} (e.g. {known.iloc[0]!r})")
    ev = ev.sort_values("timestamp", kind="stable").reset_index(drop=True)
    detail = np.where(ev["modality"] == "bill", "amount " + ev["amount"].map("{:,.2f}".format) + " via " + ev["channel"],
                      np.where(ev["duration_s"] > 0, "dwell " + ev["duration_s"].map("{:.0f}".format) + " s", ""))
    ev["hover"] = ev["text"] + " | " + ev["category"].where(ev["category"] != "", "(no category)") + " | " + detail
    return ev


def qa_examples(world: World, n: int = 3, seed: int = 0) -> pd.DataFrame:
    """`n` QA pairs of each source (D_future and D_uqa), drawn with `seed`."""
    parts = [g.sample(min(n, len(g)), random_state=seed) for _, g in world.qa.groupby("source", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else world.qa.head(0)
