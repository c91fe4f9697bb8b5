"""Hand-crafted per-user features (the tabular modality and the baselines' input) and text serialisation.

`FeatureSpec` is fitted once on a reference population (the pre-training users) and then turns any
users' events + profile into one fixed-width row: counts, amounts, dwell, recency, a recent-activity
share and active days per modality and per (modality, category), per-channel counts, counts of the
frequent words of the event text per modality (so a status written in the text, "refunded", "late",
counts even when `category` does not carry it), refund counts and sums where a modality has negative
amounts, and the profile columns. The history window comes from
the dataset's declaration or the caller (default: all history); the events of the reference users
that fall outside it are counted on the spec and warned about, never dropped silently. The same fitted spec feeds the model's tabular modality (standardised) and the GBDT /
logistic-regression baselines, so both see exactly the same numbers. It saves to plain JSON.

`serialize_user(s)` writes a user's behaviour as one text for the text-embedding baseline.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from qanchor_lab.data import DataValidationError
from qanchor_lab.schema import EVENT_COLUMNS, EVENT_DEFAULTS, EVENT_REQUIRED, ModalitySpec, naive_utc, string_list

FEATURE_SPEC_VERSION = 1
OTHER = "other"  # the pooled bucket for categories / channels not kept at fit time
RECENT_DAYS = 30  # the "recent" part of the window for the trend share
_STD_FLOOR = 1e-6  # a std below this (a constant column) is replaced by 1
_FEATURE_COLUMNS = ["user_id", "modality", "timestamp", "category", "channel", "text", "amount", "duration_s"]
_WORD = re.compile(r"[^\W_]{2,}")  # words of two or more letters/digits, any script
# A word in more than this share of a modality's events says little about anyone (e.g. "paid", "at").
MAX_WORD_SHARE = 0.5


def text_words(text: str) -> list[str]:
    """The distinct lower-cased words of one event text, in order of appearance."""
    return list(dict.fromkeys(_WORD.findall(text.lower())))


class OutsideWindowWarning(UserWarning):
    """Events of the reference users fall outside the feature window (counted on the FeatureSpec)."""


_WARNED: set[str] = set()  # messages already shown: one run fits the same spec several times


def _warn_once(message: str) -> None:
    """An OutsideWindowWarning, once per distinct message in this process (the counts stay on the spec).
    Python's own once-per-location registry is reset by every `warnings.catch_warnings` block, which
    pandas and this package use, so it would repeat."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, OutsideWindowWarning, stacklevel=3)


class FeatureInputError(DataValidationError):
    """Malformed events / profiles / user ids given to the feature code; the message names the culprit.

    A DataValidationError (so a ValueError), so callers can catch every data-contract error alike.
    """


# -- input validation ---------------------------------------------------------------------------------
def _require_frame(df: Any, what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise FeatureInputError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    return df


def _check_str_column(s: pd.Series, table: str) -> None:
    """Every value of `s` must be a non-null str."""
    bad = s.isna().to_numpy()
    if bad.any():
        raise FeatureInputError(f"{table}.{s.name} has a missing value at row {s.index[bad.argmax()]!r}")
    if len(s) == 0 or pd.api.types.infer_dtype(s, skipna=False) == "string":
        return
    not_str = (s.map(type) != str).to_numpy()
    if not_str.any():
        pos = int(not_str.argmax())
        raise FeatureInputError(
            f"{table}.{s.name} must hold strings; row {s.index[pos]!r} has "
            f"{type(s.iloc[pos]).__name__} {s.iloc[pos]!r}"
        )


def _check_user_ids(user_ids: Sequence[str]) -> list[str]:
    try:
        return string_list(user_ids, "user_ids")
    except TypeError as exc:  # a FeatureInputError, as every input error of this module
        raise FeatureInputError(str(exc)) from None


def events_in_window(events: pd.DataFrame, window: tuple[pd.Timestamp, pd.Timestamp] | None) -> pd.DataFrame:
    """The rows of `events` (naive UTC timestamps, as cleaned events hold them) in [start, end) of a history window
    (`FeatureSpec.window`; None: all): what the features, the behaviour sequences and the text baselines read, so
    that all describe the same days and a later (label) window reaches none of them."""
    if window is None:
        return events
    return events[(events["timestamp"] >= window[0]) & (events["timestamp"] < window[1])]


def _clean_events(events: Any, columns: Sequence[str]) -> pd.DataFrame:
    """The needed event columns, validated, with schema defaults filled in and naive timestamps."""
    events = _require_frame(events, "events")
    missing = [c for c in EVENT_REQUIRED if c not in events.columns]
    if missing:
        raise FeatureInputError(f"events lacks required column(s) {missing}; it has {list(events.columns)}")
    out = {}
    for c in columns:
        if c in events.columns:
            s = events[c]
        elif c in EVENT_DEFAULTS:
            s = pd.Series(EVENT_DEFAULTS[c], index=events.index, name=c)
        else:
            raise FeatureInputError(f"events lacks column {c!r}")
        kind = EVENT_COLUMNS[c]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.astype(object)
        if kind == "str":
            _check_str_column(s, "events")
        elif kind == "float":
            if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                raise FeatureInputError(f"events.{c} must be numeric, got dtype {s.dtype}")
            s = s.astype("float64").fillna(float(EVENT_DEFAULTS.get(c, 0.0)))
            if np.isinf(s).any():   # one would make every user's standardised features non-finite
                pos = int(np.flatnonzero(np.isinf(s.to_numpy()))[0])
                who = f" (user {events['user_id'].iloc[pos]!r})" if "user_id" in events.columns else ""
                raise FeatureInputError(f"events.{c} is {s.iloc[pos]} at row {s.index[pos]!r}{who}; it must be finite")
        elif kind == "datetime":
            if not pd.api.types.is_datetime64_any_dtype(s):
                raise FeatureInputError(
                    f"events.{c} must be a datetime column, got dtype {s.dtype}; "
                    "qanchor_lab.data.validate_events converts ISO strings"
                )
            if getattr(s.dt, "tz", None) is not None:
                s = s.dt.tz_convert("UTC").dt.tz_localize(None)
            if s.isna().any():
                raise FeatureInputError(f"events.{c} has a missing value at row {s.index[s.isna().argmax()]!r}")
            s = s.astype("datetime64[ns]")
        out[c] = s
    return pd.DataFrame(out, index=events.index)


def _clean_profiles(profiles: Any) -> pd.DataFrame:
    """Profiles indexed by user_id with float columns; duplicate users or non-numeric columns raise."""
    if profiles is None:
        return pd.DataFrame(index=pd.Index([], name="user_id", dtype=object))
    profiles = _require_frame(profiles, "profiles")
    if "user_id" not in profiles.columns:
        raise FeatureInputError(f"profiles lacks required column 'user_id'; it has {list(profiles.columns)}")
    _check_str_column(profiles["user_id"], "profiles")
    dup = profiles["user_id"].duplicated()
    if dup.any():
        raise FeatureInputError(f"profiles has more than one row for user {profiles['user_id'][dup].iloc[0]!r}")
    cols = [c for c in profiles.columns if c != "user_id"]
    if "missing" in cols:   # its feature would share a name with the indicator of users without a profile row
        raise FeatureInputError("profiles has a column named 'missing', whose feature would share the name "
                                "profile.missing with the flag of users without a profile row; rename it")
    for c in cols:
        s = profiles[c]
        if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
            raise FeatureInputError(
                f"profiles.{c} must be numeric (or boolean), got dtype {s.dtype}; encode it as numbers first"
            )
    out = profiles.set_index("user_id")[cols].astype("float64")
    inf = np.isinf(out.to_numpy())                                                   # (users, columns)
    if inf.any():   # a missing value is filled with the column's mean; an infinite one would make it infinite
        row, col = np.argwhere(inf)[0]
        raise FeatureInputError(f"profiles.{cols[col]} is {out.iat[row, col]} for user {out.index[row]!r}; profile "
                                "values must be finite (leave a value missing to have it filled)")
    return out


def _top_values(values: pd.Series, k: int) -> list[str]:
    """The k most frequent non-empty values, ties broken by name so the choice is deterministic."""
    counts = values[values != ""].value_counts()
    counts = counts.drop(labels=[OTHER], errors="ignore")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [v for v, _ in ranked[:k]]


# -- the fitted spec ----------------------------------------------------------------------------------
@dataclass
class FeatureSpec:
    """A fitted feature set: what columns exist, how events map onto them, and how to standardise them.

    Build with `FeatureSpec.fit(...)`; apply with `transform` / `frame`; store with `to_dict` / `save`.
    """

    modalities: list[str]  # sequence modalities, in column order
    categories: dict[str, list[str]]  # per modality, the categories kept; others pool into "other"
    channels: dict[str, list[str]]  # per modality with several channels, the channels kept (+ "other")
    amount_modalities: list[str]  # modalities whose events carry amounts (sum/mean features)
    duration_modalities: list[str]  # modalities whose events carry dwell time (mean dwell feature)
    profile_columns: list[str]  # numeric profile columns, as-is
    profile_fill: list[float]  # per profile column, the reference users' mean (fills missing users / NaN)
    window_end: str  # ISO timestamp: end of the history window (exclusive); recency is measured from here
    history_days: int  # window length in days; events outside [end - history_days, end) are ignored
    feature_names: list[str]  # the columns of transform(), in order
    mean: list[float]  # per feature, mean over the reference users (for standardize=True)
    std: list[float]  # per feature, std over the reference users, floored to 1 for constant columns
    version: int = FEATURE_SPEC_VERSION  # format version of to_dict()
    # per modality, the frequent words of the event text counted as features (specs saved before text
    # features existed have none and compute exactly what they did)
    words: dict[str, list[str]] = field(default_factory=dict)
    # reference users' events outside [end - history_days, end) at fit time: before the window / at or after its end
    events_before_window: int = 0
    events_after_window: int = 0
    # modalities with negative amounts (refunds, credits) among the reference events: they get a refund
    # count and refund sum; the amount features above sum the positive amounts only
    refund_modalities: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.history_days < 1:
            raise ValueError(f"history_days must be >= 1, got {self.history_days}")
        try:
            pd.Timestamp(self.window_end)
        except (ValueError, TypeError) as e:
            raise ValueError(f"window_end must be an ISO date/time string, got {self.window_end!r}") from e
        n = len(self.feature_names)
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"mean ({len(self.mean)}) and std ({len(self.std)}) must match {n} feature names")
        if len(self.profile_fill) != len(self.profile_columns):
            raise ValueError("profile_fill must hold one value per profile column")
        for name in ("categories", "words"):
            for m in getattr(self, name):
                if m not in self.modalities:
                    raise ValueError(f"{name} given for {m!r}, not one of the modalities {self.modalities}")
        if self.version != FEATURE_SPEC_VERSION:
            raise ValueError(f"FeatureSpec version {self.version} is not supported (expected {FEATURE_SPEC_VERSION})")

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def feature_groups(self) -> list[str]:
        """The group of each feature, in column order: the modality it describes, or "profile"."""
        # longest modality name first, so that a modality named like another's prefix ("bill", "bill_pay")
        # claims its own columns
        by_length = sorted(self.modalities, key=len, reverse=True)
        return [next((m for m in by_length if name.startswith(f"{m}.")), "profile") for name in self.feature_names]

    @property
    def window(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """(start, end) of the history window: events in [start, end) are read, others ignored."""
        end = pd.Timestamp(self.window_end)
        return end - pd.Timedelta(days=self.history_days), end

    # -- fitting --------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        events: pd.DataFrame,
        profiles: pd.DataFrame | None,
        *,
        user_ids: Sequence[str] | None = None,
        window_start: str | pd.Timestamp | None = None,
        window_end: str | pd.Timestamp | None = None,
        history_days: int | None = None,
        max_categories: int = 12,
        max_words: int = 8,
        modalities: Sequence[str | ModalitySpec] | None = None,
    ) -> "FeatureSpec":
        """Fit categories, channels, text words, profile fills and standardisation on the reference users.

        user_ids: the reference users (default: every user in events or profiles).
        window_end: end of the history window (default: the midnight after the reference users' last
            event). window_start / history_days: its start, given as a date or as a length in days (at
            most one of them); neither: all history, from the midnight before the reference users' first
            event. Reference events outside the window are counted (events_before_window /
            events_after_window) and warned about (OutsideWindowWarning), and so are the events of any other
            user in `events` that the window leaves out.
        max_categories: categories (and channels) kept per modality, by frequency.
        max_words: words of the event text counted per modality: the most frequent ones among the
            reference users' events, leaving out words in more than half of the modality's events.
        modalities: the dataset's declared modalities, in column order (World.modality_specs); default:
            the modalities found in `events`, by name.
        """
        if max_categories < 0:
            raise ValueError(f"max_categories must be >= 0, got {max_categories}")
        if max_words < 0:
            raise ValueError(f"max_words must be >= 0, got {max_words}")
        if history_days is not None and history_days < 1:
            raise ValueError(f"history_days must be >= 1, got {history_days}")
        if history_days is not None and window_start is not None:
            raise ValueError("give window_start or history_days, not both")
        ev = _clean_events(events, _FEATURE_COLUMNS)
        if modalities is None:
            modalities = sorted(pd.unique(ev["modality"]))  # by name: the same columns whatever the row order
        modalities = [m.name if isinstance(m, ModalitySpec) else m for m in modalities]
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {modalities}")
        prof = _clean_profiles(profiles)
        if user_ids is None:
            ref = sorted(set(ev["user_id"]).union(prof.index))
        else:
            ref = _check_user_ids(user_ids)
        if not ref:
            raise FeatureInputError("no reference users to fit on: events and profiles are empty")
        unknown = sorted(set(ev["modality"].unique()) - set(modalities))
        if unknown:
            raise FeatureInputError(f"events.modality has value(s) {unknown}; valid modalities: {modalities}")
        in_ref = ev["user_id"].isin(set(ref)).to_numpy()
        ref_ev = ev[in_ref]
        if window_end is None:
            if ref_ev.empty:
                raise FeatureInputError("window_end cannot be inferred: the reference users have no events")
            end = ref_ev["timestamp"].max().normalize() + pd.Timedelta(days=1)
        else:
            end = naive_utc(window_end)
        if window_start is not None:
            start = naive_utc(window_start)
            if not start < end:
                raise FeatureInputError(f"window_start {start} must be before window_end {end}")
            # the window is a whole number of days long (recency and active days count days)
            history_days = math.ceil((end - start) / pd.Timedelta(days=1))
        elif history_days is None:
            if ref_ev.empty:
                raise FeatureInputError("the window start cannot be inferred: the reference users have no events; "
                                        "give window_start or history_days")
            history_days = max(1, math.ceil((end - ref_ev["timestamp"].min().normalize()) / pd.Timedelta(days=1)))
        start = end - pd.Timedelta(days=history_days)
        before = int((ref_ev["timestamp"] < start).sum())
        after = int((ref_ev["timestamp"] >= end).sum())
        if before or after:
            _warn_once(
                f"FeatureSpec.fit: {before + after} of the reference users' {len(ref_ev)} events fall outside the "
                f"feature window [{start}, {end}) ({before} before, {after} at or after its end) and are not in the "
                "features; widen the window (window_start / history_days / window_end) to use them")
        # The other users' events given here (a dataset's tune and test users, say) are read through the same window
        # (transform, the behaviour sequences): an inferred window ends with the reference users' history, which can
        # leave out another user's later days. Said here, where all of them are seen, not silently at transform.
        other_ev = ev.loc[~in_ref, "timestamp"]
        outside = int(((other_ev < start) | (other_ev >= end)).sum())
        if outside:
            _warn_once(
                f"FeatureSpec.fit: {outside} of the other (non-reference) users' {len(other_ev)} events fall outside "
                f"the feature window [{start}, {end}) and will not be read for them "
                f"({int((other_ev < start).sum())} before, {int((other_ev >= end).sum())} at or after its end); "
                "declare a window that covers them (window_start / history_days / window_end, or the dataset's "
                "history_window) to use them")
        ref_ev = ref_ev[(ref_ev["timestamp"] >= start) & (ref_ev["timestamp"] < end)]

        categories: dict[str, list[str]] = {}
        words: dict[str, list[str]] = {}
        channels: dict[str, list[str]] = {}
        amount_mods: list[str] = []
        refund_mods: list[str] = []
        duration_mods: list[str] = []
        for m in modalities:
            sub = ref_ev[ref_ev["modality"] == m]
            categories[m] = _top_values(sub["category"], max_categories)
            words[m] = _top_words(sub["text"], max_words)
            if sub["channel"].nunique() > 1:
                channels[m] = _top_values(sub["channel"], max_categories)
            if (sub["amount"] != 0).any():
                amount_mods.append(m)
            if (sub["amount"] < 0).any():
                refund_mods.append(m)
            if (sub["duration_s"] > 0).any():
                duration_mods.append(m)

        prof_cols = list(prof.columns)
        ref_prof = prof.reindex([u for u in dict.fromkeys(ref) if u in prof.index])
        fill = []
        for c in prof_cols:
            v = ref_prof[c].mean() if len(ref_prof) else float("nan")
            fill.append(float(v) if pd.notna(v) else 0.0)

        spec = cls(
            modalities=modalities,
            categories=categories,
            channels=channels,
            amount_modalities=amount_mods,
            duration_modalities=duration_mods,
            profile_columns=prof_cols,
            profile_fill=fill,
            window_end=end.isoformat(),
            history_days=int(history_days),
            feature_names=[],
            mean=[],
            std=[],
            words={m: w for m, w in words.items() if w},
            events_before_window=before,
            events_after_window=after,
            refund_modalities=refund_mods,
        )
        spec.feature_names = spec._names()
        raw = spec._compute(ev, prof, ref)  # (n_ref, F) float64
        std = raw.std(axis=0)
        spec.mean = [float(x) for x in raw.mean(axis=0)]
        spec.std = [float(s) if s >= _STD_FLOOR else 1.0 for s in std]
        return spec

    @classmethod
    def fit_world(cls, world: Any, user_ids: Sequence[str] | None = None, **kw: Any) -> "FeatureSpec":
        """`fit` on a World with its declared modalities and history window (default reference users: the
        pre-training users); `kw` go to `fit`."""
        start, end = world.history_window
        ref = world.users_in("pretrain") if user_ids is None else list(user_ids)
        kw = {"modalities": world.modality_specs, "window_start": start, "window_end": end, **kw}
        return cls.fit(world.events, world.profiles, user_ids=ref, **kw)

    # -- column layout --------------------------------------------------------------------------------
    def _block_names(self, prefix: str, m: str) -> list[str]:
        names = [f"{prefix}.count_log1p", f"{prefix}.active_days", f"{prefix}.recency_days", f"{prefix}.recent30_share"]
        if m in self.amount_modalities:
            names += [f"{prefix}.amount_sum_log1p", f"{prefix}.amount_mean_log1p"]
        if m in self.duration_modalities:
            names += [f"{prefix}.dwell_mean_log1p"]
        return names

    def _groups(self, m: str) -> list[str]:
        """Category buckets of modality m: kept categories then "other" (none when nothing was kept)."""
        kept = self.categories.get(m, [])
        return kept + [OTHER] if kept else []

    def _names(self) -> list[str]:
        names: list[str] = []
        for m in self.modalities:
            names.append(f"{m}.has")
            names += self._block_names(m, m)
            for c in self._groups(m):
                names += self._block_names(f"{m}.cat={c}", m)
            for ch in self.channels.get(m, []) + ([OTHER] if self.channels.get(m) else []):
                names.append(f"{m}.channel={ch}.count_log1p")
            names += [f"{m}.word={w}.count_log1p" for w in self.words.get(m, [])]
            if m in self.refund_modalities:
                names += [f"{m}.refund.count_log1p", f"{m}.refund.amount_sum_log1p"]
        names += [f"profile.{c}" for c in self.profile_columns]
        names.append("profile.missing")
        return names

    # -- computing ------------------------------------------------------------------------------------
    def _compute(self, ev: pd.DataFrame, prof: pd.DataFrame, user_ids: list[str]) -> np.ndarray:
        """Raw (unstandardised) features, (len(user_ids), F) float64; `ev`/`prof` already cleaned."""
        uniq = pd.Index(pd.unique(pd.Series(user_ids, dtype=object)))
        n = len(uniq)
        unknown = sorted(set(ev["modality"].unique()) - set(self.modalities))
        if unknown:
            raise FeatureInputError(f"events.modality has value(s) {unknown}; this spec knows {self.modalities}")
        start, end = self.window
        ev = events_in_window(ev, (start, end))
        uidx = uniq.get_indexer(ev["user_id"])
        ev = ev[uidx >= 0]
        uidx = uidx[uidx >= 0]

        age = ((end - ev["timestamp"]).to_numpy() / np.timedelta64(1, "D")).astype(np.float64)  # (E,) days before end
        day = ((ev["timestamp"] - start).to_numpy() // np.timedelta64(1, "D")).astype(np.int64)  # (E,)
        recent = age <= RECENT_DAYS  # (E,)
        signed = ev["amount"].to_numpy(np.float64)  # (E,) refunds / credits negative
        amount = np.clip(signed, 0.0, None)  # (E,) the amount features sum what was paid; refunds apart below
        dur = ev["duration_s"].to_numpy(np.float64)  # (E,)
        mod = ev["modality"].to_numpy()
        cat = ev["category"].to_numpy()
        chan = ev["channel"].to_numpy()

        cols: list[np.ndarray] = []
        for m in self.modalities:
            in_m = mod == m
            u_m = uidx[in_m]
            groups = self._groups(m)  # category buckets; the whole-modality block comes first
            gid = np.zeros(int(in_m.sum()), dtype=np.int64)
            stats_mod = _group_stats(u_m, gid, 1, n, age[in_m], day[in_m], recent[in_m], amount[in_m], dur[in_m],
                                     self.history_days)
            cols.append((stats_mod["count"][:, 0] > 0).astype(np.float64))
            cols += self._block_columns(stats_mod, m, 0)
            if groups:
                lut = {c: i for i, c in enumerate(groups)}
                other = lut[OTHER]
                gid = pd.Series(cat[in_m], dtype=object).map(lut).fillna(other).to_numpy(np.int64)
                st = _group_stats(u_m, gid, len(groups), n, age[in_m], day[in_m], recent[in_m], amount[in_m],
                                  dur[in_m], self.history_days)
                for g in range(len(groups)):
                    cols += self._block_columns(st, m, g)
            kept_ch = self.channels.get(m, [])
            if kept_ch:
                buckets = kept_ch + [OTHER]
                lut = {c: i for i, c in enumerate(buckets)}
                cid = pd.Series(chan[in_m], dtype=object).map(lut).fillna(lut[OTHER]).to_numpy(np.int64)
                cnt = np.bincount(u_m * len(buckets) + cid, minlength=n * len(buckets)).reshape(n, len(buckets))
                cols += [np.log1p(cnt[:, g].astype(np.float64)) for g in range(len(buckets))]
            kept_w = self.words.get(m, [])
            if kept_w:
                cnt = _word_counts(ev["text"].to_numpy()[in_m], u_m, kept_w, n)  # (n, W) events containing each word
                cols += [np.log1p(cnt[:, j]) for j in range(len(kept_w))]
            if m in self.refund_modalities:
                neg = signed[in_m] < 0
                cols += [np.log1p(np.bincount(u_m[neg], minlength=n).astype(np.float64)),
                         np.log1p(np.bincount(u_m[neg], weights=-signed[in_m][neg], minlength=n))]

        fill = np.asarray(self.profile_fill, dtype=np.float64)  # (P,)
        if self.profile_columns:
            absent = [c for c in self.profile_columns if c not in prof.columns]
            if absent:
                raise FeatureInputError(
                    f"profiles lacks column(s) {absent} that this spec was fitted with; it has {list(prof.columns)}"
                )
            p = prof[self.profile_columns].reindex(uniq).to_numpy(np.float64)  # (n, P)
            p = np.where(np.isnan(p), fill[None, :], p)
            cols += [p[:, j] for j in range(p.shape[1])]
        cols.append((~uniq.isin(prof.index)).astype(np.float64))

        out = np.column_stack(cols) if cols else np.zeros((n, 0))  # (n_unique, F)
        if out.shape[1] != len(self.feature_names):
            raise RuntimeError(f"computed {out.shape[1]} features but the spec names {len(self.feature_names)}")
        return out[uniq.get_indexer(pd.Index(user_ids, dtype=object))]  # (len(user_ids), F)

    def _block_columns(self, st: dict[str, np.ndarray], m: str, g: int) -> list[np.ndarray]:
        cnt = st["count"][:, g]
        safe = np.maximum(cnt, 1)
        cols = [
            np.log1p(cnt),
            st["active_days"][:, g],
            st["recency"][:, g],
            np.where(cnt > 0, st["recent"][:, g] / safe, 0.0),
        ]
        if m in self.amount_modalities:
            cols += [np.log1p(np.maximum(st["amount"][:, g], 0.0)),
                     np.where(cnt > 0, np.log1p(np.maximum(st["amount"][:, g], 0.0) / safe), 0.0)]
        if m in self.duration_modalities:
            cols += [np.where(cnt > 0, np.log1p(np.maximum(st["duration"][:, g], 0.0) / safe), 0.0)]
        return cols

    # -- public transforms ----------------------------------------------------------------------------
    def transform(
        self, events: pd.DataFrame, profiles: pd.DataFrame | None, user_ids: Sequence[str], *, standardize: bool = False
    ) -> np.ndarray:  # (len(user_ids), F) float32
        """Feature rows for `user_ids`, in that order.

        Users without events get zero counts and recency = history_days; users missing from profiles
        get the fitted profile means and profile.missing = 1. Events outside the history window are
        ignored, so events from a later (label) window never leak into the features.
        """
        ids = _check_user_ids(user_ids)
        ev = _clean_events(events, _FEATURE_COLUMNS)
        x = self._compute(ev, _clean_profiles(profiles), ids)  # (n, F)
        if standardize:
            x = (x - np.asarray(self.mean)[None, :]) / np.asarray(self.std)[None, :]
        return x.astype(np.float32)

    def frame(
        self, events: pd.DataFrame, profiles: pd.DataFrame | None, user_ids: Sequence[str], *, standardize: bool = False
    ) -> pd.DataFrame:
        """`transform` as a DataFrame indexed by user_id with the feature names as columns."""
        x = self.transform(events, profiles, user_ids, standardize=standardize)
        return pd.DataFrame(x, index=pd.Index(list(user_ids), name="user_id", dtype=object), columns=self.feature_names)

    # -- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(d) - {"version", *_LATER_FIELDS})
        if missing:
            raise ValueError(f"FeatureSpec dict lacks key(s) {missing}")
        extra = sorted(set(d) - names)
        if extra:
            raise ValueError(f"FeatureSpec dict has unknown key(s) {extra}")
        return cls(**{k: d[k] for k in d})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the spec as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FeatureSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))


# Fields added after FEATURE_SPEC_VERSION 1 was first saved; their defaults reproduce the old features.
_LATER_FIELDS = ("words", "events_before_window", "events_after_window", "refund_modalities")


def _top_words(texts: pd.Series, k: int) -> list[str]:
    """The k words in most events of `texts` (ties by name), leaving out English stop words ("to", "at":
    they would take the slots of words that say something), words in more than MAX_WORD_SHARE of the
    events and words seen once."""
    if k == 0 or texts.empty:
        return []
    per_text = texts.value_counts()  # distinct texts repeat heavily: split each once
    counts: dict[str, int] = {}
    for text, n in per_text.items():
        for w in text_words(text):
            counts[w] = counts.get(w, 0) + int(n)
    limit = MAX_WORD_SHARE * len(texts)
    ranked = sorted(((w, c) for w, c in counts.items() if 2 <= c <= limit and w not in ENGLISH_STOP_WORDS),
                    key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:k]]


def _word_counts(texts: np.ndarray, users: np.ndarray, words: list[str], n_users: int) -> np.ndarray:
    """(n_users, len(words)) float64: per user, how many of their events' texts contain each word."""
    codes, uniq = pd.factorize(pd.Series(texts, dtype=object))
    lut = {w: j for j, w in enumerate(words)}
    has = np.zeros((len(uniq), len(words)), dtype=np.float64)  # (distinct texts, W)
    for i, text in enumerate(uniq):
        for w in text_words(text):
            j = lut.get(w)
            if j is not None:
                has[i, j] = 1.0
    occ = sp.csr_matrix((np.ones(len(codes)), (users, codes)), shape=(n_users, len(uniq)))  # (n_users, distinct texts)
    return np.asarray(occ @ has)  # (n_users, W)


def _group_stats(
    u: np.ndarray, g: np.ndarray, n_groups: int, n_users: int, age: np.ndarray, day: np.ndarray,
    recent: np.ndarray, amount: np.ndarray, dur: np.ndarray, history_days: int,
) -> dict[str, np.ndarray]:
    """Per (user, group) aggregates as (n_users, n_groups) arrays, by bincount over a joint key."""
    size = n_users * n_groups
    key = u * n_groups + g  # (E,)
    count = np.bincount(key, minlength=size).astype(np.float64)
    recency = np.full(size, float(history_days))
    if len(key):
        np.minimum.at(recency, key, age)
        days = np.unique(key * (history_days + 1) + day)  # distinct (key, day) pairs
        active = np.bincount(days // (history_days + 1), minlength=size).astype(np.float64)
    else:
        active = np.zeros(size)
    out = {
        "count": count,
        "recency": recency,
        "active_days": active,
        "recent": np.bincount(key, weights=recent.astype(np.float64), minlength=size),
        "amount": np.bincount(key, weights=amount, minlength=size),
        "duration": np.bincount(key, weights=dur, minlength=size),
    }
    return {k: v.reshape(n_users, n_groups) for k, v in out.items()}


# -- behaviour as text (text-embedding baseline) -------------------------------------------------------
def _spec_lookup(modalities: Sequence[str | ModalitySpec] | None) -> dict[str, ModalitySpec]:
    """name -> spec of a modality declaration (names become specs without unit); {} for None."""
    out: dict[str, ModalitySpec] = {}
    for m in modalities or ():
        spec = m if isinstance(m, ModalitySpec) else ModalitySpec(m)
        out[spec.name] = spec
    return out


def _fmt_number(v: float) -> str:
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.2f}".rstrip("0").rstrip(".")


def profile_flag_columns(profiles: pd.DataFrame | None) -> frozenset[str]:
    """The profile columns the text names when set and leaves out when not ("has mortgage", one-hot occupation
    columns): those of boolean dtype, and, when the table has two rows or more, the numeric ones whose every
    non-missing value in the whole table is 0 or 1.

    A property of the column over the table given, never of the users serialised together: a batch of a few users
    can hold only 0s and 1s in a count column ("income band 1" read as a set flag) where the population does not.
    One row cannot tell a 0/1 column from a count, so a one-row table names its boolean columns only. At serving
    time, compute this once on the reference population's table and pass it as `profile_flags`, so that a new user
    reads as the population's users do. A missing value is left out of the text and says nothing about the column,
    so it does not stop a 0/1 column being a flag."""
    if profiles is None:
        return frozenset()
    return _table_flags(profiles, _clean_profiles(profiles))


def _bool_columns(profiles: pd.DataFrame, prof: pd.DataFrame) -> frozenset[str]:
    """The boolean columns of `profiles`, whose `_clean_profiles` (float64, indexed by user) is `prof`: a flag
    whatever else is declared; the float64 copy no longer says so."""
    return frozenset(c for c in prof.columns if pd.api.types.is_bool_dtype(profiles[c]))


def _table_flags(profiles: pd.DataFrame, prof: pd.DataFrame) -> frozenset[str]:
    """profile_flag_columns of `profiles`, whose `_clean_profiles` is `prof`."""
    if len(prof) < 2:
        return _bool_columns(profiles, prof)
    return _bool_columns(profiles, prof) | {c for c in prof.columns if prof[c].dropna().isin([0.0, 1.0]).all()}


def _check_flags(profile_flags: Collection[str], columns: Sequence[str], where: str) -> frozenset[str]:
    """`profile_flags` as a set; each must name one of the profile `columns` (a misspelt one would print a number
    where a flag was meant, silently)."""
    if isinstance(profile_flags, str):
        raise FeatureInputError(f"profile_flags must be a collection of column names, got the string {profile_flags!r}")
    flags = frozenset(profile_flags)
    unknown = sorted(map(str, flags - set(columns)))
    if unknown:
        raise FeatureInputError(f"profile_flags names {unknown}, not profile column(s) of {where}: {list(columns)}")
    return flags


def _profile_text(row: dict[str, Any] | pd.Series | None, flags: frozenset[str] = frozenset(),
                  user: str = "") -> str:
    """ "Profile: age 34, city tier 2, occupation engineer": a flag column (one of `flags`, or any bool value) is
    named when set and left out when not, so a wide one-hot profile does not fill the text encoder's few hundred
    word pieces with zeros."""
    if row is None:
        return "Profile: unknown"
    parts = []
    for k, v in (row.items() if hasattr(row, "items") else []):
        if k == "user_id" or v is None or (pd.api.types.is_scalar(v) and pd.isna(v)):
            continue
        label = str(k).replace("_", " ")
        numeric = isinstance(v, (int, float, np.number, np.bool_))
        if k in flags or isinstance(v, (bool, np.bool_)):
            if not numeric or float(v) not in (0.0, 1.0):   # a declared flag column holding a count, say
                raise FeatureInputError(f"profile column {k!r} is a flag (0/1), but user {user!r} has {v!r}")
            if float(v) == 1.0:
                parts.append(label)
            continue
        parts.append(f"{label} {_fmt_number(float(v))}" if numeric else f"{label} {v}")
    return "Profile: " + (", ".join(parts) if parts else "unknown")


def _event_strings(ev: pd.DataFrame, specs: dict[str, ModalitySpec]) -> list[str]:
    """One short string per event row: text, then the amount in its modality's declared unit (bare when
    none is declared), the channel, and the dwell time."""
    out = []
    for mod, text, amount, channel, dur in zip(ev["modality"], ev["text"], ev["amount"], ev["channel"], ev["duration_s"]):
        s = text
        if amount:
            unit = specs[mod].unit if mod in specs else ""
            s += f" {amount:.1f} {unit}" if unit else f" {amount:.1f}"
        if channel and channel != "app":
            s += f" {channel}"
        if dur > 0:
            s += f" ({dur:.0f}s)"
        out.append(s)
    return out


def _modality_order(mods: Sequence[str], declared: Sequence[str]) -> list[str]:
    """The declared order first, then any other modality by name."""
    canon = [m for m in declared if m in mods]
    return canon + sorted(set(mods) - set(canon))


MAX_EVENTS_PER_MODALITY = 20  # serialize_user(s)' default: the latest events shown per modality


def _truncate(s: str, max_chars: int) -> str:
    return s if len(s) <= max_chars else s[: max_chars - 1] + "…"


def _serialize_many(
    ev: pd.DataFrame, profile_rows: dict[str, dict[str, Any]], user_ids: list[str],
    max_events_per_modality: int, max_chars: int, modalities: Sequence[str | ModalitySpec] | None,
    flags: frozenset[str],
) -> list[str]:
    if max_events_per_modality < 1:
        raise ValueError(f"max_events_per_modality must be >= 1, got {max_events_per_modality}")
    if max_chars < 16:
        raise ValueError(f"max_chars must be >= 16, got {max_chars}")
    uniq = pd.Index(pd.unique(pd.Series(user_ids, dtype=object)))
    uidx = uniq.get_indexer(ev["user_id"])  # (E,) position of each event's user, -1 if not asked for
    keep = uidx >= 0
    ev, uidx = ev[keep], uidx[keep]
    specs = _spec_lookup(modalities)
    mod_names = _modality_order(list(pd.unique(ev["modality"])), list(specs))
    midx = pd.Index(mod_names).get_indexer(ev["modality"])  # (E,)
    ts = ev["timestamp"].to_numpy().astype(np.int64)  # (E,)
    # by user, modality, then most recent first; lexsort is stable, so equal timestamps keep input order
    order = np.lexsort((-ts, midx, uidx))
    key = (uidx * max(len(mod_names), 1) + midx)[order]  # (E,) one id per (user, modality), sorted
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
    run_len = np.diff(np.r_[starts, len(key)])  # events per (user, modality)
    rank = np.arange(len(key)) - np.repeat(starts, run_len)  # position within its run
    sel = order[rank < max_events_per_modality]
    strings = _event_strings(ev.iloc[sel], specs)
    n_shown = np.minimum(run_len, max_events_per_modality)
    per_user: dict[str, list[tuple[str, int, str]]] = {}
    pos = 0
    for k, total, shown in zip(key[starts].tolist(), run_len.tolist(), n_shown.tolist()):
        u, m = divmod(k, max(len(mod_names), 1))
        per_user.setdefault(uniq[u], []).append((mod_names[m], total, "; ".join(strings[pos : pos + shown])))
        pos += shown
    out = []
    for u in user_ids:
        parts = [_profile_text(profile_rows.get(u), flags, u)]
        mods = per_user.get(u, [])
        for m, total, text in mods:
            title = (specs[m] if m in specs else ModalitySpec(m)).display_title
            parts.append(f"{title} ({total} event{'s' if total != 1 else ''}, most recent first): {text}")
        if not mods:
            parts.append("No recorded behaviour")
        out.append(_truncate(" | ".join(parts), max_chars))
    return out


_SER_COLUMNS = ["user_id", "modality", "timestamp", "text", "channel", "amount", "duration_s"]


def serialize_user(
    events_of_user: pd.DataFrame,
    profile_row: pd.Series | None,
    *,
    max_events_per_modality: int = MAX_EVENTS_PER_MODALITY,
    max_chars: int = 2000,
    modalities: Sequence[str | ModalitySpec] | None = None,
    profile_flags: Collection[str] | None = None,
) -> str:
    """One user's behaviour as text: profile, then per modality its event count and latest events.

    e.g. "Profile: age 34, city tier 2 | Bills (41 events, most recent first): Paid at FreshMart
    supermarket 58.0 CNY card; ... | Searches (3 events, most recent first): how to ...".
    `modalities`: the dataset's declaration (World.modality_specs): their order, titles and amount
    units; undeclared modalities are titled from their name and print amounts without a unit.
    `profile_flags`: the profile columns named when set and left out when not (`profile_flag_columns` of the
    population's table, for the text `serialize_users` writes for this user there); default: those whose value
    is a bool. One row cannot tell a 0/1 column from a count, so a float 0/1 column prints as a number unless
    named here.
    """
    ev = _clean_events(events_of_user, _SER_COLUMNS)
    users = ev["user_id"].unique()
    if len(users) > 1:
        raise FeatureInputError(f"events_of_user holds several users ({sorted(users)[:5]}); pass one user's events")
    uid = str(users[0]) if len(users) else "__user__"
    rows = {uid: dict(profile_row.items())} if profile_row is not None else {}
    flags: frozenset[str] = frozenset()
    if profile_flags is not None and rows:   # no row: "Profile: unknown", no flag to print
        flags = _check_flags(profile_flags, [k for k in rows[uid] if k != "user_id"], f"user {uid!r}'s row")
    return _serialize_many(ev, rows, [uid], max_events_per_modality, max_chars, modalities, flags)[0]


def serialize_users(
    events: pd.DataFrame,
    profiles: pd.DataFrame | None,
    user_ids: Sequence[str],
    *,
    max_events_per_modality: int = MAX_EVENTS_PER_MODALITY,
    max_chars: int = 2000,
    modalities: Sequence[str | ModalitySpec] | None = None,
    window: tuple[pd.Timestamp, pd.Timestamp] | None = None,
    profile_flags: Collection[str] | None = None,
) -> list[str]:
    """`serialize_user` for many users at once (one sort + groupby), in `user_ids` order; `window`: only the events
    of a history window (`FeatureSpec.window`), as the features read them. `profile_flags`: the profile columns
    named when set and left out when not; default: `profile_flag_columns(profiles)`, over the whole table
    whichever users are asked for, so a user's text is the same alone, in a batch or with everyone."""
    ids = _check_user_ids(user_ids)
    ev = events_in_window(_clean_events(events, _SER_COLUMNS), window)
    rows: dict[str, dict[str, Any]] = {}
    flags: frozenset[str] = frozenset()
    if profiles is not None:
        prof = _clean_profiles(profiles)
        sub = prof.reindex([u for u in dict.fromkeys(ids) if u in prof.index])
        rows = {u: r for u, r in zip(sub.index, sub.to_dict("records"))}
        flags = (_table_flags(profiles, prof) if profile_flags is None
                 else _check_flags(profile_flags, list(prof.columns), "profiles") | _bool_columns(profiles, prof))
    return _serialize_many(ev, rows, ids, max_events_per_modality, max_chars, modalities, flags)
