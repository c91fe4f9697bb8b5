"""Pre-training question/answer pairs derived from any event log in the data contract (no QA table needed).

A dataset that brings no `qa` table still gets both kinds of pre-training pairs (docs/design.md §1.4):

- D_uqa-style pairs about a user's *history* (the input window before their cutoff): activity level,
  volume per modality, the dominant modality and category, breadth of categories, typical and total
  amounts, trend inside the window, active days, time of day, recency, most repeated item; and about
  their profile (each one-hot group or numeric column of the profiles table), so pre-training also
  teaches the embedding to keep the tabular modality.
- D_future-style pairs about the user's *next window* after the cutoff: will they be active and how much,
  when they come back, which modality and category, new categories, typical amount, how many active days.

Every intent has three paraphrased questions and GRADED answers: counts and amounts are cut into
none/low/medium/high by terciles fitted on the population of users the pairs are derived for (so each level
holds about a third of the active users), categorical intents name the top value. An intent whose majority
claim covers more than `max_majority` of the users says almost nothing about a user and is dropped (the
`DerivedQA.intents` table reports every intent, kept or not, with its claim distribution).

Each claim has exactly one answer wording, and no two claims of an intent share one, so the claim of a row
is "intent|answer": `world.answer_claims` falls back to exactly that key for intents it does not know, and the
false-negative masking by (intent, claim) of `pretrain.PretrainConfig.false_negatives="claim"` works
unchanged. The fitted cut points are JSON-able (`QAFit`), so the same claims can be re-derived for other
users (`claims_for`, used by `diagnostics.perfect_qa_learner_r2`).

Windows: a user's input is `[cutoff - history_days, cutoff)`, their future window `[cutoff, cutoff +
future_days)`. `check_no_leakage` proves that no input event lies at or after a user's cutoff and that no
label/future window starts before it. `derive_world_qa` applies a global or per-user cutoff to a World
without QA: pre-training users' events after the cutoff become their future window and leave the inputs.
Everything is deterministic given the config's seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Literal, Sequence, get_args

import numpy as np
import pandas as pd

from qanchor_lab.configs import DictConfig
from qanchor_lab.data import DataValidationError

CutoffKind = Literal["global", "per_user"]
NONE = "none"
OTHER = "(other)"  # a categorical claim outside the fitted vocabulary (a real value may be called "other")
LEVEL_NAMES = {1: ("some",), 2: ("low", "high"), 3: ("low", "medium", "high")}
DAY_PARTS = ("night", "morning", "afternoon", "evening")  # hours 0-5, 6-11, 12-17, 18-23
MIN_TREND_EVENTS = 4       # fewer input events than this: too few to call a trend
TREND_RATIO = 1.5          # second half vs first half: "up" above x1.5, "down" below /1.5, else "flat"


class LeakageError(DataValidationError):
    """An input event lies at or after its user's cutoff, or a label/future window overlaps the input."""


@dataclass
class DeriveQAConfig(DictConfig):
    """How QA pairs are derived from a log; JSON-able via to_dict/from_dict."""

    future_days: float = 30.0          # length of the D_future window after each user's cutoff
    history_days: float | None = None  # input window before the cutoff; None: everything before it
    cutoff: CutoffKind = "global"      # derive_world_qa: one cutoff for all ("global") or first event + input_days
    input_days: float | None = None    # per_user cutoff: days of input after a user's first event
    max_majority: float = 0.8          # drop an intent whose most common claim covers more of the users
    max_categories: int = 12           # categorical claims name the population's top values; the rest is OTHER
    levels: int = 3                    # count/amount levels among users with some activity (terciles)
    seed: int = 0                      # paraphrase choice per (user, intent)
    event_noun: tuple[str, str] = ("event", "events")  # singular, plural: "rating", "ratings"
    category_noun: tuple[str, str] = ("category", "categories")  # "genre", "genres"
    amount_noun: str = "amount"        # what `amount` measures: "amount", "rating"
    amount_unit: str = ""              # printed after amounts: "", "stars", "EUR"
    amounts_add_up: bool = True        # totals make sense (money); False for ratings or scores
    history_phrase: str = "in the observed period"  # how answers name the input window
    modality_phrases: dict[str, str] = field(default_factory=dict)  # modality -> "ratings of 4-5 stars" etc.
    profile_intents: bool = True       # also ask about the profile table's columns (occupation, income band, ...)

    def __post_init__(self) -> None:
        self.event_noun = tuple(self.event_noun)
        self.category_noun = tuple(self.category_noun)
        if self.cutoff not in get_args(CutoffKind):
            raise ValueError(f"cutoff={self.cutoff!r}; valid choices: {', '.join(map(repr, get_args(CutoffKind)))}")
        if self.cutoff == "per_user" and (self.input_days is None or self.input_days <= 0):
            raise ValueError(f"cutoff='per_user' needs input_days > 0, got {self.input_days!r}")
        if self.future_days <= 0:
            raise ValueError(f"future_days must be > 0, got {self.future_days!r}")
        if self.history_days is not None and self.history_days <= 0:
            raise ValueError(f"history_days must be > 0 or None, got {self.history_days!r}")
        if not 0.0 < self.max_majority <= 1.0:
            raise ValueError(f"max_majority must lie in (0, 1], got {self.max_majority!r}")
        if self.levels not in LEVEL_NAMES:
            raise ValueError(f"levels must be one of {sorted(LEVEL_NAMES)}, got {self.levels!r}")
        if self.max_categories < 1:
            raise ValueError(f"max_categories must be >= 1, got {self.max_categories!r}")
        for name in ("event_noun", "category_noun"):
            v = getattr(self, name)
            if len(v) != 2 or not all(isinstance(s, str) and s for s in v):
                raise ValueError(f"{name} must be (singular, plural) non-empty strings, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["event_noun"], d["category_noun"] = list(self.event_noun), list(self.category_noun)
        return d



# ----------------------------------------------------------------------------------------------
# windows and the leakage check


def window_frame(users: Sequence[str], cutoffs: pd.Series | pd.Timestamp, future_days: float | None) -> pd.DataFrame:
    """One row per user: `cutoff` (end of the input, exclusive) and the later window [window_start,
    window_end) that labels or D_future answers come from (NaT without `future_days`)."""
    idx = pd.Index(list(users), name="user_id")
    if isinstance(cutoffs, pd.Series):
        cut = pd.to_datetime(cutoffs.reindex(idx))
        missing = idx[cut.isna().to_numpy()]
        if len(missing):
            raise DataValidationError(f"cutoffs: no cutoff for {len(missing)} user(s), e.g. {missing[:5].tolist()}")
    else:
        cut = pd.Series(pd.Timestamp(cutoffs), index=idx)
    start = cut if future_days is not None else pd.Series(pd.NaT, index=idx)
    end = cut + pd.Timedelta(days=float(future_days)) if future_days is not None else start
    return pd.DataFrame({"cutoff": cut.to_numpy(), "window_start": start.to_numpy(), "window_end": end.to_numpy()},
                        index=idx)


def check_no_leakage(inputs: pd.DataFrame, windows: pd.DataFrame, *, future: pd.DataFrame | None = None) -> dict:
    """Prove the inputs hold nothing from a user's label/future window; raise LeakageError otherwise.

    `windows` (index user_id; columns cutoff, window_start, window_end, see `window_frame`): every input
    event must lie strictly before its user's cutoff, every window must start at or after the cutoff (so
    windows never overlap the input), and every `future` event must lie inside its user's window. An input
    event of a user without a cutoff is an error too. Returns counts of what was checked."""
    for col in ("cutoff", "window_start", "window_end"):
        if col not in windows.columns:
            raise LeakageError(f"windows: missing column {col!r} (see derive_qa.window_frame)")
    cut = windows["cutoff"]
    strangers = pd.Index(inputs["user_id"].unique()).difference(windows.index)
    if len(strangers):
        raise LeakageError(f"events: {len(strangers)} user(s) have input events but no cutoff, e.g. "
                           f"{strangers[:5].tolist()}")
    ts = inputs["timestamp"].to_numpy()
    user_cut = cut.reindex(inputs["user_id"]).to_numpy()
    late = ts >= user_cut
    if late.any():
        rows = inputs.loc[late].head(5)
        shown = "; ".join(f"user {u!r}: event at {t} >= cutoff {cut[u]}" for u, t in zip(rows["user_id"], rows["timestamp"]))
        raise LeakageError(f"events: {int(late.sum())} input event(s) at or after their user's cutoff: {shown}")
    has_window = windows["window_start"].notna().to_numpy()
    early = has_window & (windows["window_start"].to_numpy() < cut.to_numpy())
    if early.any():
        bad = windows.loc[early].head(5)
        shown = "; ".join(f"user {u!r}: window starts {s} < cutoff {c}" for u, s, c in
                          zip(bad.index, bad["window_start"], bad["cutoff"]))
        raise LeakageError(f"windows: {int(early.sum())} label/future window(s) overlap the input: {shown}")
    n_future = 0
    if future is not None and len(future):
        w = windows.reindex(future["user_id"])
        ft = future["timestamp"].to_numpy()
        outside = ~((ft >= w["window_start"].to_numpy()) & (ft < w["window_end"].to_numpy()))
        if outside.any():
            rows = future.loc[outside].head(5)
            shown = "; ".join(f"user {u!r}: event at {t}" for u, t in zip(rows["user_id"], rows["timestamp"]))
            raise LeakageError(f"future: {int(outside.sum())} event(s) outside their user's window: {shown}")
        n_future = len(future)
    return {"users": int(len(windows)), "input_events": int(len(inputs)), "future_events": n_future,
            "windows": int(has_window.sum())}


def split_log(events: pd.DataFrame, windows: pd.DataFrame, history_days: float | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(inputs, future) of the users in `windows`: inputs are their events in [cutoff - history_days,
    cutoff), future their events in [window_start, window_end); events in neither are left out."""
    ev = events[events["user_id"].isin(windows.index)]
    w = windows.reindex(ev["user_id"])
    ts = ev["timestamp"].to_numpy()
    cut = w["cutoff"].to_numpy()
    inp = ts < cut
    if history_days is not None:
        inp &= ts >= cut - np.timedelta64(int(round(history_days * 86400)), "s")
    fut = (ts >= w["window_start"].to_numpy()) & (ts < w["window_end"].to_numpy())
    return ev.loc[inp].reset_index(drop=True), ev.loc[fut].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# per-user statistics


def _stats(events: pd.DataFrame, windows: pd.DataFrame, *, days: float | None, future: bool) -> pd.DataFrame:
    """Per-user aggregates of one window (index: user_id of `windows`, zeros for users without events).

    Columns: n, n_mod:<modality>, cat:<category> counts, n_categories, amount_sum, amount_mean, days_active,
    h1/h2 (events in each half of the window), part:<day part> counts, days_since_last (input) or
    days_to_first (future), top_text and top_text_n (the most repeated text and its count)."""
    users = windows.index
    ev = events[events["user_id"].isin(users)]
    g = ev.groupby("user_id", sort=False)
    out = pd.DataFrame(index=users)
    out["n"] = g.size().reindex(users, fill_value=0).astype(float)
    for m, n in ev.groupby(["user_id", "modality"]).size().unstack(fill_value=0).items():
        out[f"n_mod:{m}"] = n.reindex(users, fill_value=0).astype(float)
    cats = ev[ev["category"].astype(str) != ""]
    for c, n in cats.groupby(["user_id", "category"]).size().unstack(fill_value=0).items():
        out[f"cat:{c}"] = n.reindex(users, fill_value=0).astype(float)
    out["n_categories"] = cats.groupby("user_id")["category"].nunique().reindex(users, fill_value=0).astype(float)
    out["amount_sum"] = g["amount"].sum().reindex(users, fill_value=0.0)
    out["amount_mean"] = g["amount"].mean().reindex(users)
    active_days = ev["timestamp"].dt.normalize().groupby(ev["user_id"]).nunique()
    out["days_active"] = active_days.reindex(users, fill_value=0).astype(float)
    cut = windows["cutoff"].reindex(ev["user_id"]).to_numpy()
    rel_days = (ev["timestamp"].to_numpy() - cut) / np.timedelta64(1, "D")         # < 0 input, >= 0 future
    if future:
        out["days_to_first"] = pd.Series(rel_days, index=ev.index).groupby(ev["user_id"]).min().reindex(users)
    else:
        out["days_since_last"] = (-pd.Series(rel_days, index=ev.index)).groupby(ev["user_id"]).min().reindex(users)
        span = days if days is not None else float(max(1.0, -rel_days.min())) if len(rel_days) else 1.0
        out["span_days"] = float(span)
        second = rel_days >= -span / 2
        out["h1"] = pd.Series(~second, index=ev.index).groupby(ev["user_id"]).sum().reindex(users, fill_value=0).astype(float)
        out["h2"] = pd.Series(second, index=ev.index).groupby(ev["user_id"]).sum().reindex(users, fill_value=0).astype(float)
    part = np.asarray(DAY_PARTS, dtype=object)[ev["timestamp"].dt.hour.to_numpy() // 6]
    for p, n in pd.Series(part, index=ev.index).groupby([ev["user_id"], part]).size().unstack(fill_value=0).items():
        out[f"part:{p}"] = n.reindex(users, fill_value=0).astype(float)
    texts = ev.groupby(["user_id", "text"]).size().rename("k").reset_index()
    texts = texts.sort_values(["user_id", "k", "text"], ascending=[True, False, True], kind="stable")
    top = texts.drop_duplicates("user_id").set_index("user_id")
    out["top_text"] = top["text"].reindex(users).fillna("").astype(str)
    out["top_text_n"] = top["k"].reindex(users, fill_value=0).astype(float)
    return out


def _cols(stats: pd.DataFrame, prefix: str) -> list[str]:
    return [c for c in stats.columns if c.startswith(prefix)]


# ----------------------------------------------------------------------------------------------
# fitted cut points and claims


@dataclass
class QAFit:
    """What the claims of a derivation were fitted to: level cut points per intent and the categorical
    vocabularies. JSON-able (to_dict/from_dict), stored in a world's manifest as `derived_qa`."""

    config: dict[str, Any]
    bounds: dict[str, list[float]]        # intent -> cut points between levels (ascending)
    vocab: dict[str, list[str]]           # intent -> values a categorical claim may name (else OTHER)
    modalities: list[str]
    has_amounts: bool                     # the log carries amounts (amount intents exist)
    profile: dict[str, list[str]]         # profile subjects asked about: name -> its columns (see profile_subjects)
    kept: list[str]                       # intents kept (the rest were too uninformative)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QAFit":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def _fit_bounds(values: np.ndarray, levels: int) -> list[float]:
    """Cut points between `levels` quantile groups of the positive values (fewer where values tie)."""
    v = values[np.isfinite(values) & (values > 0)]
    if len(v) == 0:
        return []
    q = np.quantile(v, np.arange(1, levels) / levels, method="lower")
    return [float(b) for b in np.unique(q) if b < v.max()]


def _level_claims(values: np.ndarray, bounds: Sequence[float], active: np.ndarray) -> np.ndarray:
    names = np.asarray(LEVEL_NAMES[len(bounds) + 1], dtype=object)
    lv = names[np.searchsorted(np.asarray(bounds, dtype=float), np.nan_to_num(values), side="left")]
    return np.where(active, lv, NONE).astype(object)


def _top_claims(counts: pd.DataFrame, vocab: Sequence[str]) -> np.ndarray:
    """The column with the largest count (first on ties, in sorted column order); OTHER when it is not
    in `vocab`; "none" when every count is zero."""
    if counts.shape[1] == 0:
        return np.full(len(counts), NONE, dtype=object)
    c = counts[sorted(counts.columns)]
    names = np.asarray([str(x).split(":", 1)[1] for x in c.columns], dtype=object)
    best = names[c.to_numpy().argmax(1)]
    best = np.where(np.isin(best, list(vocab)), best, OTHER)
    return np.where(c.to_numpy().sum(1) > 0, best, NONE).astype(object)


def _fmt_num(x: float, integer: bool) -> str:
    return f"{int(round(x))}" if integer else f"{x:.2f}".rstrip("0").rstrip(".")


def _level_answer(claim: str, bounds: Sequence[float], *, integer: bool, what: str, none: str) -> str:
    """One wording per level: "Medium: 21 to 55 ratings in their first week." (ranges from the fitted bounds)."""
    if claim == NONE:
        return none
    names = LEVEL_NAMES[len(bounds) + 1]
    i = names.index(claim)
    lo = bounds[i - 1] if i > 0 else None
    hi = bounds[i] if i < len(bounds) else None
    step = 1.0 if integer else 0.0
    if lo is None and hi is None:
        rng = "some"
    elif lo is None:
        rng = f"at most {_fmt_num(hi, integer)}"
    elif hi is None:
        rng = f"more than {_fmt_num(lo, integer)}"
    else:
        rng = f"{_fmt_num(lo + step, integer)} to {_fmt_num(hi, integer)}" if integer else \
            f"between {_fmt_num(lo, integer)} and {_fmt_num(hi, integer)}"
    return f"{claim.capitalize()}: {rng} {what}."


@dataclass(frozen=True)
class _Intent:
    intent_id: str
    source: str                           # "uqa" (history) or "future"
    queries: tuple[str, str, str]
    kind: str                             # "level" (bounds fitted on positive values, 0 = none), "plevel" (bounds
                                          # on all values: profile numbers), "top" (vocabulary), "fixed" (own claims)
    value: Callable[[pd.DataFrame], Any]  # stats -> values (level), counts frame (top) or claims (fixed)
    answer: Callable[[str, "QAFit"], str]


def profile_subjects(profiles: pd.DataFrame | None) -> dict[str, list[str]]:
    """The profile's columns as question subjects: binary columns that share the prefix before their first
    "_" and hold at most one 1 per user form one categorical subject (a one-hot group such as occupation_*);
    every other column is a subject of its own."""
    if profiles is None:
        return {}
    cols = [c for c in profiles.columns if c != "user_id"]
    binary = {c for c in cols if profiles[c].isin([0, 1]).all()}
    groups: dict[str, list[str]] = {}
    for c in cols:
        key = c.split("_", 1)[0] if c in binary and "_" in c else c
        groups.setdefault(key, []).append(c)
    onehot = {key for key, members in groups.items() if len(members) > 1 and profiles[members].sum(axis=1).le(1).all()}
    singles = {c for key, members in groups.items() if key not in onehot for c in members}
    out: dict[str, list[str]] = {}
    for key, members in groups.items():
        if key not in onehot:
            out.update({c: [c] for c in members})
            continue
        tokens = [m.split("_") for m in members]          # name: the "_"-words all members share
        shared = [t[0] for t in zip(*tokens) if len(set(t)) == 1]
        name = "_".join(shared[: min(len(t) for t in tokens) - 1]) or key
        # a column of its own may hold that name (job_type beside job_type_a, job_type_b): the group then takes its
        # first word, which no other subject can hold (a column named so would have joined the group)
        out[key if name in singles else name] = members
    return out


def _with_profile(stats: pd.DataFrame, profiles: pd.DataFrame | None, fit_profile: dict[str, list[str]]) -> pd.DataFrame:
    """History stats plus `prof:<column>` for the profile subjects (NaN for users without a profile row)."""
    cols = [c for members in fit_profile.values() for c in members]
    if not cols or profiles is None:
        return stats
    prof = profiles.set_index("user_id")[cols].reindex(stats.index)
    return stats.join(prof.add_prefix("prof:"))


def _intents(cfg: DeriveQAConfig, modalities: Sequence[str], has_amounts: bool,
             profile: dict[str, list[str]] | None = None) -> list[_Intent]:
    """The intent catalogue for a log with these modalities (amount intents only when amounts exist) and
    these profile subjects."""
    ev1, ev = cfg.event_noun
    cat1, cats = cfg.category_noun
    hist = cfg.history_phrase
    fut = f"in the next {_fmt_num(cfg.future_days, True)} days"
    unit = f" {cfg.amount_unit}" if cfg.amount_unit else ""
    amt = cfg.amount_noun
    I: list[_Intent] = []

    def level(iid, source, queries, value, what, none, integer=True):
        I.append(_Intent(iid, source, queries, "level", value,
                         lambda c, fit, iid=iid: _level_answer(c, fit.bounds[iid], integer=integer, what=what, none=none)))

    def top(iid, source, queries, counts, say, none):
        I.append(_Intent(iid, source, queries, "top", counts,
                         lambda c, fit: none if c == NONE else say(c)))

    def fixed(iid, source, queries, claims, answers: dict[str, str]):
        I.append(_Intent(iid, source, queries, "fixed", claims, lambda c, fit: answers[c]))

    # --- D_uqa: the history before the cutoff
    level("activity", "uqa", ("How active is this user?", f"How many {ev} does this user have {hist}?",
                              "What is this user's overall activity level?"),
          lambda s: s["n"].to_numpy(), f"{ev} {hist}", f"None: no {ev} {hist}.")
    for m in modalities:
        phrase = cfg.modality_phrases.get(m, f"{m} {ev}")
        level(f"volume:{m}", "uqa", (f"How many {phrase} does this user have?",
                                     f"How often does this user produce {phrase}?",
                                     f"What is this user's volume of {phrase}?"),
              lambda s, m=m: s.get(f"n_mod:{m}", pd.Series(0.0, index=s.index)).to_numpy(),
              f"{phrase} {hist}", f"None: no {phrase} {hist}.")
    top("top_modality", "uqa", (f"What kind of {ev1} is most common for this user?",
                                "Which type of activity dominates this user's history?", "What does this user mostly do?"),
        lambda s: s[_cols(s, "n_mod:")], lambda c: f"Mostly {cfg.modality_phrases.get(c, f'{c} {ev}')}.",
        f"Nothing: no {ev} {hist}.")
    top("top_category", "uqa", (f"Which {cat1} does this user engage with most?", f"What is this user's favourite {cat1}?",
                                "Where is most of this user's activity concentrated?"),
        lambda s: s[_cols(s, "cat:")], lambda c: f"Mostly {c}." if c != OTHER else f"Mostly a less common {cat1}.",
        f"No {cat1} on record {hist}.")
    level("category_breadth", "uqa", ("How varied are this user's interests?",
                                      f"How many different {cats} does this user engage with?",
                                      f"Does this user stick to a few {cats} or explore many?"),
          lambda s: s["n_categories"].to_numpy(), f"different {cats}", f"None: no {cats} on record.")
    if has_amounts:
        level("amount_typical", "uqa", (f"What is this user's typical {amt}?", f"How high is an average {amt} of this user?",
                                        f"Does this user tend to give a high or a low {amt}?"),
              lambda s: s["amount_mean"].to_numpy(), f"{amt}{unit} on average", f"None: no {amt} on record.", integer=False)
        if cfg.amounts_add_up:
            level("amount_total", "uqa", ("How much in total does this user spend?", f"What is this user's total {amt}?",
                                          f"How large is this user's overall {amt}?"),
                  lambda s: s["amount_sum"].to_numpy(), f"{amt}{unit} in total {hist}", f"None: no {amt} {hist}.",
                  integer=False)
    fixed("trend", "uqa", ("Is this user's activity rising or falling?",
                           "How did this user's activity change over the observed period?",
                           "Is this user becoming more or less active?"),
          lambda s: np.select([s["n"].to_numpy() < MIN_TREND_EVENTS, s["h2"].to_numpy() > TREND_RATIO * s["h1"].to_numpy(),
                               s["h1"].to_numpy() > TREND_RATIO * s["h2"].to_numpy()], ["few", "up", "down"], "flat"),
          {"few": f"Too few {ev} to tell.", "up": f"Rising: more {ev} in the later half.",
           "down": f"Falling: fewer {ev} in the later half.", "flat": "Steady over the period."})
    level("active_days", "uqa", ("On how many days was this user active?", "How regular is this user?",
                                 "How many distinct days does this user show up?"),
          lambda s: s["days_active"].to_numpy(), f"active days {hist}", f"None: no active day {hist}.")
    top("time_of_day", "uqa", ("At what time of day is this user usually active?", "When during the day does this user act?",
                               "Is this user a morning or an evening person?"),
        lambda s: s[_cols(s, "part:")], lambda c: f"Mostly in the {c} (UTC).", f"No activity {hist}.")
    level("recency", "uqa", ("How recently was this user active?", "When did this user last act before now?",
                             f"How long ago was this user's latest {ev1}?"),
          lambda s: s["days_since_last"].to_numpy() + 1e-9, f"days since the last {ev1}",
          f"Never: no {ev} {hist}.", integer=False)
    top("top_item", "uqa", (f"Which {ev1} does this user repeat most?", "What does this user do again and again?",
                            f"Which of this user's {ev} recurs most often?"),
        lambda s: pd.DataFrame({f"t:{t}": (s["top_text"] == t) & (s["top_text_n"] >= 2) for t in
                                sorted(set(s["top_text"]) - {""})}, index=s.index),
        lambda c: f"Most often: {c}." if c != OTHER else f"A less common {ev1}, repeated.", f"No repeated {ev1}.")

    for name, members in (profile or {}).items():
        phrase = name.replace("_", " ")
        if len(members) > 1:   # a one-hot group: the column that is 1 names the claim
            prefix = len(name) + 1
            top(f"profile:{name}", "uqa", (f"What is this user's {phrase}?", f"Which {phrase} does this user have?",
                                           f"What {phrase} is on this user's profile?"),
                lambda s, members=members, prefix=prefix: s[[f"prof:{c}" for c in members]].fillna(0).set_axis(
                    [f"p:{c[prefix:]}" for c in members], axis=1),
                lambda c, phrase=phrase: f"{phrase.capitalize()}: {c.replace('_', ' ')}." if c != OTHER
                else f"A less common {phrase}.", f"No {phrase} on the profile.")
        else:                  # a number: levels fitted on every user's value
            col = f"prof:{members[0]}"
            I.append(_Intent(f"profile:{name}", "uqa", (f"What is this user's {phrase}?",
                                                        f"How high is this user's {phrase}?",
                                                        f"Is this user's {phrase} high or low?"),
                             "plevel", lambda s, col=col: s[col].to_numpy(dtype=float),
                             lambda c, fit, iid=f"profile:{name}", phrase=phrase: _level_answer(
                                 c, fit.bounds[iid], integer=False, what=f"{phrase}", none=f"No {phrase} on the profile.")))

    # --- D_future: the window after the cutoff
    level("future_activity", "future", (f"How active will this user be {fut}?", f"Will this user come back {fut}?",
                                        f"How many {ev} should we expect from this user {fut}?"),
          lambda s: s["n"].to_numpy(), f"{ev} {fut}", f"None: no {ev} expected {fut}.")
    fixed("future_return", "future", ("When will this user next be active?", "How soon will this user return?",
                                       f"How long until this user's next {ev1}?"),
          lambda s: np.select([s["days_to_first"].isna().to_numpy(), s["days_to_first"].to_numpy() < 7,
                               s["days_to_first"].to_numpy() < 30], [NONE, "week", "month"], "later"),
          {NONE: f"Not {fut}.", "week": "Within a week.", "month": "Within a month, after the first week.",
           "later": "Only after a month."})
    top("future_modality", "future", (f"What kind of {ev1} will this user mostly produce {fut}?",
                                      f"Which activity will dominate this user's next {_fmt_num(cfg.future_days, True)} days?",
                                      f"What will this user mostly do {fut}?"),
        lambda s: s[_cols(s, "n_mod:")], lambda c: f"Mostly {cfg.modality_phrases.get(c, f'{c} {ev}')} {fut}.",
        f"Nothing: no {ev} {fut}.")
    top("future_category", "future", (f"Which {cat1} will this user engage with most {fut}?",
                                      f"What {cat1} will lead this user's activity {fut}?",
                                      f"Where will most of this user's activity go {fut}?"),
        lambda s: s[_cols(s, "cat:")], lambda c: f"Mostly {c} {fut}." if c != OTHER else f"A less common {cat1} {fut}.",
        f"No {cat1} {fut}.")
    level("future_active_days", "future", (f"On how many days will this user be active {fut}?",
                                           f"How regularly will this user show up {fut}?",
                                           f"How many distinct days will this user be active {fut}?"),
          lambda s: s["days_active"].to_numpy(), f"active days {fut}", f"None: no active day {fut}.")
    level("future_new_categories", "future", (f"Will this user try {cats} new to them {fut}?",
                                              f"How many {cats} this user has not engaged with before will they try {fut}?",
                                              f"Will this user explore new {cats} {fut}?"),
          lambda s: s["new_categories"].to_numpy(), f"new {cats} {fut}", f"None: no new {cat1} {fut}.")
    fixed("future_trend", "future", (f"Will this user be more or less active {fut} than before?",
                                     f"How will this user's activity {fut} compare with their history?",
                                     f"Is this user's activity going up or down {fut}?"),
          lambda s: np.select([s["n"].to_numpy() == 0,
                               s["n"].to_numpy() / cfg.future_days > TREND_RATIO * s["hist_per_day"].to_numpy(),
                               s["n"].to_numpy() / cfg.future_days * TREND_RATIO < s["hist_per_day"].to_numpy()],
                              [NONE, "up", "down"], "flat"),
          {NONE: f"Inactive {fut}.", "up": "More active than before.", "down": "Less active than before.",
           "flat": "About as active as before."})
    if has_amounts:
        level("future_amount", "future", (f"What {amt} will this user typically give {fut}?",
                                          f"How high will this user's average {amt} be {fut}?",
                                          f"Will this user's {amt} be high or low {fut}?"),
              lambda s: s["amount_mean"].to_numpy(), f"{amt}{unit} on average {fut}", f"None: no {amt} {fut}.",
              integer=False)
    return I


def _with_history(fut: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """Future stats plus what the D_future intents compare with the history: `new_categories` (distinct
    categories in the window that the user's input lacks) and `hist_per_day` (input events per day)."""
    fut = fut.copy()
    new = np.zeros(len(fut))
    for c in _cols(fut, "cat:"):
        had = hist[c].reindex(fut.index, fill_value=0).to_numpy() if c in hist.columns else np.zeros(len(fut))
        new += (fut[c].to_numpy() > 0) & (had == 0)
    fut["new_categories"] = new
    fut["hist_per_day"] = (hist["n"] / hist["span_days"]).reindex(fut.index).to_numpy()
    return fut


def _claims(it: _Intent, stats: pd.DataFrame, fit: QAFit) -> np.ndarray:
    v = it.value(stats)
    if it.kind == "level":
        v = np.asarray(v, dtype=float)
        return _level_claims(v, fit.bounds[it.intent_id], np.nan_to_num(v) > 0)   # zero or no events: "none"
    if it.kind == "plevel":
        v = np.asarray(v, dtype=float)
        names = np.asarray(LEVEL_NAMES[len(fit.bounds[it.intent_id]) + 1], dtype=object)
        lv = names[np.searchsorted(np.asarray(fit.bounds[it.intent_id], dtype=float), np.nan_to_num(v), side="left")]
        return np.where(np.isfinite(v), lv, NONE).astype(object)
    if it.kind == "top":
        return _top_claims(v, fit.vocab[it.intent_id])
    return np.asarray(v, dtype=object)


def _fit(it: _Intent, stats: pd.DataFrame, cfg: DeriveQAConfig) -> tuple[list[float], list[str]]:
    v = it.value(stats)
    if it.kind == "level":
        return _fit_bounds(np.asarray(v, dtype=float), cfg.levels), []
    if it.kind == "plevel":    # profile numbers: quantiles of every value, zero and negative included
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        q = np.quantile(v, np.arange(1, cfg.levels) / cfg.levels, method="lower") if len(v) else []
        return [float(b) for b in np.unique(q) if b < v.max()], []
    if it.kind == "top":
        names = [str(c).split(":", 1)[1] for c in v.columns]
        wins = pd.Series(_top_claims(v, names))
        wins = wins[wins != NONE].value_counts()
        return [], sorted(wins.index[: cfg.max_categories].tolist())
    return [], []


# ----------------------------------------------------------------------------------------------
# derivation


@dataclass
class DerivedQA:
    """The derived QA table (schema.QA_COLUMNS), the fit that produced it, and a per-intent report."""

    qa: pd.DataFrame
    fit: QAFit
    intents: pd.DataFrame   # intent, source, kept, majority_claim, majority_share, n_claims, none_share, claims
    claims: pd.DataFrame    # (users, kept intents) claim of each user; NaN where a user has no future window


def derive_qa(inputs: pd.DataFrame, windows: pd.DataFrame, config: DeriveQAConfig, *,
              future: pd.DataFrame | None = None, modalities: Sequence[str] | None = None,
              profiles: pd.DataFrame | None = None) -> DerivedQA:
    """QA pairs for the users of `windows` (index user_id; see `window_frame`): D_uqa from `inputs` (and the
    `profiles` table, when given and `config.profile_intents`), D_future from `future` for users whose window
    is known (`window_start` not NaT). Levels and vocabularies are fitted on these users. Runs
    `check_no_leakage` first."""
    check_no_leakage(inputs, windows, future=future)
    if modalities is None:
        modalities = sorted(set(inputs["modality"]) | (set(future["modality"]) if future is not None else set()))
    has_amounts = bool((inputs["amount"] != 0).any())
    profile = profile_subjects(profiles) if config.profile_intents else {}
    catalogue = _intents(config, modalities, has_amounts, profile)
    hist = _stats(inputs, windows, days=config.history_days, future=False)
    fut_users = windows.index[windows["window_start"].notna().to_numpy()]
    fut = None
    if future is not None:
        fut = _with_history(_stats(future, windows.loc[fut_users], days=config.future_days, future=True), hist)
    hist = _with_profile(hist, profiles, profile)
    fit = QAFit(config=config.to_dict(), bounds={}, vocab={}, modalities=list(modalities), has_amounts=has_amounts,
                profile=profile, kept=[])
    report, claim_cols = [], {}
    for it in catalogue:
        stats = hist if it.source == "uqa" else fut
        if stats is None or len(stats) == 0:
            continue
        fit.bounds[it.intent_id], fit.vocab[it.intent_id] = _fit(it, stats, config)
        c = pd.Series(_claims(it, stats, fit), index=stats.index)
        share = c.value_counts(normalize=True)
        keep = len(share) > 1 and share.iloc[0] <= config.max_majority
        report.append({"intent": it.intent_id, "source": it.source, "kept": keep, "majority_claim": share.index[0],
                       "majority_share": float(share.iloc[0]), "n_claims": int(len(share)),
                       "none_share": float(share.get(NONE, 0.0)), "claims": share.round(4).to_dict()})
        if keep:
            fit.kept.append(it.intent_id)
            claim_cols[it.intent_id] = c
    claims = pd.DataFrame(claim_cols, index=windows.index)
    qa = _render(claims, catalogue, fit, config)
    return DerivedQA(qa=qa, fit=fit, intents=pd.DataFrame(report), claims=claims)


def _render(claims: pd.DataFrame, catalogue: Sequence[_Intent], fit: QAFit, config: DeriveQAConfig) -> pd.DataFrame:
    """One row per (user, kept intent) with a claim: a seeded paraphrase and the claim's one wording."""
    rng = np.random.default_rng(config.seed)
    by_id = {it.intent_id: it for it in catalogue}
    pick = rng.integers(0, 3, size=claims.shape)                                   # (users, intents)
    rows = {"user_id": [], "source": [], "intent": [], "query": [], "answer": []}
    for j, iid in enumerate(claims.columns):
        it = by_id[iid]
        words = {c: it.answer(c, fit) for c in claims[iid].dropna().unique()}
        for i, (u, c) in enumerate(claims[iid].items()):
            if pd.isna(c):
                continue
            rows["user_id"].append(u)
            rows["source"].append(it.source)
            rows["intent"].append(iid)
            rows["query"].append(it.queries[pick[i, j]])
            rows["answer"].append(words[c])
    qa = pd.DataFrame({k: pd.array(v, dtype="str") for k, v in rows.items()})
    return qa.sort_values(["user_id", "intent"], kind="stable").reset_index(drop=True)


def claims_for(inputs: pd.DataFrame, windows: pd.DataFrame, fit: QAFit | dict,
               profiles: pd.DataFrame | None = None) -> pd.DataFrame:
    """(users, kept D_uqa intents) claims of other users under a stored fit, from their inputs alone: what a
    model that learned every derived history answer perfectly would know (diagnostics.perfect_qa_learner_r2).
    D_future claims need a future window, which downstream users do not have."""
    fit = QAFit.from_dict(fit) if isinstance(fit, dict) else fit
    cfg = DeriveQAConfig.from_dict(fit.config)
    if fit.profile and profiles is None:
        raise ValueError(f"claims_for: the fit asks about profile subjects {sorted(fit.profile)}; pass the profiles table")
    catalogue = [it for it in _intents(cfg, fit.modalities, fit.has_amounts, fit.profile)
                 if it.intent_id in fit.kept and it.source == "uqa"]
    stats = _stats(inputs[inputs["user_id"].isin(windows.index)], windows, days=cfg.history_days, future=False)
    stats = _with_profile(stats, profiles, fit.profile)
    return pd.DataFrame({it.intent_id: _claims(it, stats, fit) for it in catalogue}, index=windows.index)


def qa_summary(derived: DerivedQA) -> dict[str, Any]:
    """Headline figures: rows per source, intents kept/dropped, share of "none" answers, claims per intent."""
    kept = derived.intents[derived.intents["kept"]]
    none_rows = sum(derived.claims[c].eq(NONE).sum() for c in derived.claims.columns)
    n = int(derived.claims.notna().to_numpy().sum())
    return {"rows": int(len(derived.qa)), "by_source": derived.qa["source"].value_counts().to_dict(),
            "intents_kept": kept["intent"].tolist(),
            "intents_dropped": derived.intents.loc[~derived.intents["kept"], "intent"].tolist(),
            "none_share": float(none_rows / max(n, 1)),
            "claims_per_intent": dict(zip(kept["intent"], kept["n_claims"].astype(int)))}


# ----------------------------------------------------------------------------------------------
# a World without QA


def derive_world_qa(world, config: DeriveQAConfig):
    """The World with a derived `qa` table for its pre-training users, their events cut at the cutoff.

    Cutoffs: "global": the midnight after the last event minus `future_days`, one date for everyone;
    "per_user": each user's first event + `input_days`. Pre-training users keep only events before their
    cutoff as input; the events of their window [cutoff, cutoff + future_days) answer the D_future
    questions. Downstream users keep all their events (their labels come from the dataset), but the features
    and sequences read every user through one history window: undeclared, it is inferred from the pre-training
    users and so ends at a global cutoff, and the downstream users' later days are left out, with an
    OutsideWindowWarning from FeatureSpec.fit that counts them. The users table gains `cutoff`, `window_start`,
    `window_end` columns, the manifest a `derived_qa` entry (config, fit, per-intent report) so the claims can be
    re-derived (`claims_for`)."""
    ev = world.events
    pre = world.users_in("pretrain", "pretrain_val")
    if not pre:
        raise DataValidationError("users: no pretrain/pretrain_val users to derive QA pairs for")
    if config.cutoff == "global":
        end = ev["timestamp"].max().normalize() + pd.Timedelta(days=1)
        cut = pd.Series(end - pd.Timedelta(days=config.future_days), index=pd.Index(pre))
    else:
        first = ev.groupby("user_id")["timestamp"].min()
        cut = (first.reindex(pre) + pd.Timedelta(days=float(config.input_days))).dropna()
    if cut.empty or cut.isna().any():
        raise DataValidationError("events: no pretrain/pretrain_val user has an event to set a cutoff from, so there "
                                  "is no history to derive QA pairs about")
    taken = sorted({"cutoff", "window_start", "window_end"} & set(world.users.columns))
    if taken and "derived_qa" not in world.manifest:   # a derivation's own columns are replaced by this one's
        raise DataValidationError(f"users: column(s) {taken} are where derive_qa writes each user's cutoff and "
                                  "windows; rename them, or give a qa table of your own")
    windows = window_frame(cut.index, cut, config.future_days)
    inputs, future = split_log(ev, windows, config.history_days)
    derived = derive_qa(inputs, windows, config, future=future, modalities=sorted(ev["modality"].unique()),
                        profiles=world.profiles)
    down = world.users.loc[~world.users["user_id"].isin(pre), "user_id"]
    down_end = ev["timestamp"].max().normalize() + pd.Timedelta(days=1)
    all_windows = pd.concat([windows, window_frame(down, down_end, None)])
    events = pd.concat([inputs, ev[~ev["user_id"].isin(pre)]], ignore_index=True)
    events = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    check_no_leakage(events, all_windows)
    users = world.users.drop(columns=taken).merge(all_windows.reset_index(), on="user_id", how="left")
    manifest = {**world.manifest, "derived_qa": {"fit": derived.fit.to_dict(), "summary": qa_summary(derived),
                                                 "intents": derived.intents.to_dict("records")}}
    return replace(world, events=events, users=users, qa=derived.qa, manifest=manifest)
