"""Pack users' event logs into fixed-size tensors the hierarchical encoder reads.

Each distinct event text is encoded once (cached on disk by the text encoder); an event's vector is
`[text vector, signed log1p(amount), log1p(days since previous event of that modality), recency]`. Per user and
modality the `max_events` most recent events inside the feature spec's history window are kept, oldest
first; a modality a user never used (or a user with no events at all) is all padding, so such users get
an embedding from what they have. The tabular modality is the standardised hand-crafted feature vector
of features.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from qanchor_lab.event_encoder import TextEncoder
from qanchor_lab.features import FeatureSpec, events_in_window
from qanchor_lab.schema import string_list

NUMERIC_EVENT_FEATURES = ("log_amount", "log_gap_days", "recency")


@dataclass
class UserBatch:
    """Behaviour of B users as tensors (what the hierarchical encoder consumes)."""

    events: dict[str, torch.Tensor]  # modality -> (B, N, D_event) float32, zero where masked
    masks: dict[str, torch.Tensor]   # modality -> (B, N) bool, True = real event
    tabular: torch.Tensor            # (B, F) standardised aggregate features

    def __len__(self) -> int:
        return self.tabular.shape[0]

    def to(self, device) -> "UserBatch":
        return UserBatch(
            {m: t.to(device) for m, t in self.events.items()},
            {m: t.to(device) for m, t in self.masks.items()},
            self.tabular.to(device),
        )


def sorted_events(events: pd.DataFrame, user_ids, modalities: Sequence[str],
                  window: tuple[pd.Timestamp, pd.Timestamp] | None = None) -> pd.DataFrame:
    """These users' events of these modalities, sorted by (user, modality, time): the order numeric
    fields are computed in. `window` (start, end) keeps only events in [start, end): the feature spec's
    history window, so the sequences and the tabular features see the same days and a later (label)
    window never reaches the model."""
    ev = events_in_window(events, window)
    ev = ev.loc[ev["user_id"].isin(set(user_ids)) & ev["modality"].isin(modalities),
                ["user_id", "modality", "timestamp", "text", "amount"]]
    return ev.sort_values(["user_id", "modality", "timestamp"], kind="stable")


def event_numeric_fields(ev: pd.DataFrame, feature_spec: FeatureSpec) -> np.ndarray:
    """(E, 3) numeric fields of events sorted by `sorted_events`: sign(amount) log1p(|amount|), log1p(days since the
    previous event of the same user and modality), and days before the window end / window length."""
    amount = ev["amount"].to_numpy(dtype=np.float64)                 # (E,) negative for refunds / credits
    window_end = pd.Timestamp(feature_spec.window_end)
    days_before_end = (window_end - ev["timestamp"]).dt.total_seconds().to_numpy() / 86400.0
    same_group = (ev["user_id"].to_numpy() == np.roll(ev["user_id"].to_numpy(), 1)) & (
        ev["modality"].to_numpy() == np.roll(ev["modality"].to_numpy(), 1))
    same_group[:1] = False
    gap = np.where(same_group, np.roll(days_before_end, 1) - days_before_end, feature_spec.history_days)
    return np.stack([
        np.sign(amount) * np.log1p(np.abs(amount)),  # signed: a refund stays a refund
        np.log1p(np.clip(gap, 0, None)),
        days_before_end / feature_spec.history_days,
    ], axis=1).astype(np.float32)                                     # (E, 3)


class BehaviourStore:
    """All users of one table set, packed once; `batch(indices)` gathers a UserBatch cheaply."""

    def __init__(
        self,
        user_ids: Sequence[str],
        text_vectors: np.ndarray,             # (T, D_text) one row per distinct text
        event_text: dict[str, np.ndarray],    # modality -> (U, N) int index into text_vectors, -1 = pad
        event_numeric: dict[str, np.ndarray],  # modality -> (U, N, 3) float32
        tabular: np.ndarray,                  # (U, F) float32
    ):
        self.user_ids = list(user_ids)
        self.index = {u: i for i, u in enumerate(self.user_ids)}
        self.modalities = list(event_text)
        # Row 0 is the padding vector so that index -1 -> 0 gathers zeros.
        self._text = torch.from_numpy(np.vstack([np.zeros((1, text_vectors.shape[1]), np.float32),
                                                 text_vectors.astype(np.float32)]))
        self._event_text = {m: torch.from_numpy(a.astype(np.int64) + 1) for m, a in event_text.items()}
        self._event_numeric = {m: torch.from_numpy(a.astype(np.float32)) for m, a in event_numeric.items()}
        self._tabular = torch.from_numpy(tabular.astype(np.float32))

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def event_dim(self) -> int:
        return self._text.shape[1] + len(NUMERIC_EVENT_FEATURES)

    @property
    def tabular_dim(self) -> int:
        return self._tabular.shape[1]

    @property
    def tabular(self) -> torch.Tensor:
        """(U, F) every user's tabular vector, in store order (read-only: a view of the store's own)."""
        return self._tabular

    def indices(self, user_ids: Sequence[str]) -> list[int]:
        missing = [u for u in user_ids if u not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} user(s) not in this behaviour store, e.g. {missing[:5]}")
        return [self.index[u] for u in user_ids]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> UserBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        events, masks = {}, {}
        for m in self.modalities:
            text_idx = self._event_text[m][idx]                       # (B, N)
            vec = self._text[text_idx]                                # (B, N, D_text)
            num = self._event_numeric[m][idx]                         # (B, N, 3)
            events[m] = torch.cat([vec, num], dim=-1)                 # (B, N, D_event)
            masks[m] = text_idx > 0
        return UserBatch(events, masks, self._tabular[idx])

    @classmethod
    def build(
        cls,
        events: pd.DataFrame,
        profiles: pd.DataFrame | None,
        user_ids: Sequence[str],
        *,
        text_encoder: TextEncoder,
        feature_spec: FeatureSpec,
        modalities: Sequence[str],
        max_events: int,
    ) -> "BehaviourStore":
        """Pack `user_ids` (in this order, each once) from validated events/profiles tables."""
        # one row per user (`index` maps an id to its row): a repeated id named here, not as a shape mismatch below
        user_ids = string_list(user_ids, "user_ids", unique=True)
        pos = pd.Series(np.arange(len(user_ids)), index=pd.Index(user_ids, name="user_id"))
        ev = sorted_events(events, user_ids, modalities, feature_spec.window)

        texts, text_idx = np.unique(ev["text"].to_numpy(dtype=object).astype(str), return_inverse=True)
        text_vectors = text_encoder.encode(list(texts)) if len(texts) else np.zeros((0, text_encoder.dim), np.float32)

        numeric = event_numeric_fields(ev, feature_spec)                   # (E, 3)

        # Keep the `max_events` most recent per (user, modality), oldest first in slots 0..k-1.
        from_end = ev.groupby(["user_id", "modality"], sort=False).cumcount(ascending=False).to_numpy()
        keep = from_end < max_events
        counts = ev.groupby(["user_id", "modality"], sort=False)["text"].transform("size").to_numpy()
        slot = (np.minimum(counts, max_events) - 1 - from_end)[keep]
        rows = pos.loc[ev["user_id"].to_numpy()[keep]].to_numpy()
        mods = ev["modality"].to_numpy()[keep]

        U = len(user_ids)
        event_text, event_numeric = {}, {}
        for m in modalities:
            sel = mods == m
            t = np.full((U, max_events), -1, np.int64)
            n = np.zeros((U, max_events, len(NUMERIC_EVENT_FEATURES)), np.float32)
            t[rows[sel], slot[sel]] = text_idx[keep][sel]
            n[rows[sel], slot[sel]] = numeric[keep][sel]
            event_text[m], event_numeric[m] = t, n

        tabular = feature_spec.transform(events, profiles, user_ids, standardize=True)
        return cls(user_ids, text_vectors, event_text, event_numeric, tabular)
