"""Latent traits, personas and the WorldConfig of the synthetic UserU world (docs/design.md §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import get_args, Literal

import numpy as np
import pandas as pd
from qanchor_lab.configs import DictConfig
from qanchor_lab.sources.common import check_split_sizes

# ----------------------------------------------------------------------------------------------
# latent traits and personas

TRAITS: tuple[str, ...] = (
    "spending_power",
    "price_sensitivity",
    "liquidity_stress",
    "credit_risk",
    "digital_engagement",
    "investment_interest",
    "travel_mobility",
    "life_stage",          # low: student age, high: retired
    "protection_need",     # interest in insurance and health cover
    "repayment_worry",     # shows only in search wording
    "abroad_plan",         # shows mostly in search wording (visas, exchange rates)
)
_T = {name: i for i, name in enumerate(TRAITS)}

Persona = Literal["student", "young_professional", "family", "small_business", "retiree", "frequent_traveller"]
PERSONAS: tuple[str, ...] = get_args(Persona)
PERSONA_SHARES = np.array([0.14, 0.25, 0.22, 0.12, 0.14, 0.13])
# Persona centres in trait units (order of TRAITS); within-persona spread is TRAIT_SCALE.
_PERSONA_MEANS = np.array([
    # sp    ps    ls    cr    de    ii    tm   life   pn    rw    ap
    [-1.0, 0.8, 0.3, 0.2, 0.9, -0.5, 0.0, -1.6, -0.6, 0.2, 0.0],   # student
    [0.3, 0.0, 0.0, 0.0, 0.7, 0.3, 0.2, -0.6, -0.2, 0.0, 0.2],     # young_professional
    [0.1, 0.4, 0.3, 0.0, 0.0, 0.0, -0.3, 0.4, 0.7, 0.1, -0.2],     # family
    [0.5, -0.2, 0.5, 0.4, 0.2, 0.1, 0.1, 0.3, 0.0, 0.3, 0.0],      # small_business
    [-0.1, 0.5, -0.5, -0.4, -1.2, 0.4, -0.2, 1.8, 0.8, -0.3, -0.1],  # retiree
    [0.8, -0.4, -0.2, -0.1, 0.4, 0.4, 1.6, 0.0, 0.0, -0.1, 1.2],   # frequent_traveller
])
TRAIT_SCALE = 0.8
# Within-persona trait correlations (pairs not listed are 0).
_TRAIT_CORR = {
    ("spending_power", "price_sensitivity"): -0.4,
    ("spending_power", "liquidity_stress"): -0.35,
    ("spending_power", "investment_interest"): 0.4,
    ("spending_power", "travel_mobility"): 0.35,
    ("liquidity_stress", "credit_risk"): 0.55,
    ("liquidity_stress", "repayment_worry"): 0.35,
    ("credit_risk", "repayment_worry"): 0.45,
    ("liquidity_stress", "investment_interest"): -0.25,
    ("price_sensitivity", "liquidity_stress"): 0.2,
    ("travel_mobility", "abroad_plan"): 0.5,
    ("digital_engagement", "life_stage"): -0.3,
    ("protection_need", "life_stage"): 0.2,
}


def _trait_cholesky() -> np.ndarray:
    corr = np.eye(len(TRAITS))
    for (a, b), r in _TRAIT_CORR.items():
        corr[_T[a], _T[b]] = corr[_T[b], _T[a]] = r
    return np.linalg.cholesky(corr)  # raises if the matrix above stops being positive definite


_TRAIT_CHOL = _trait_cholesky()
# Hour of day around which each persona is active (local time).
_PERSONA_PEAK_HOUR = np.array([21.0, 20.5, 19.0, 13.0, 9.5, 17.0])

# Features that event-kind preferences and task probabilities may use, besides the traits.
_EXTRA_FEATURES = ("trend_liquidity", "trend_engagement", "log_activity") + tuple(f"persona:{p}" for p in PERSONAS)
FEATURES: tuple[str, ...] = TRAITS + _EXTRA_FEATURES
_F = {name: i for i, name in enumerate(FEATURES)}

# ----------------------------------------------------------------------------------------------
# config

Timing = Literal["flat", "stress", "app"]
QAStyle = Literal["counts", "graded"]
QA_STYLES: tuple[str, ...] = ("counts", "graded")


@dataclass
class WorldConfig(DictConfig):
    """Size, seed and realism knobs of the synthetic UserU world."""

    n_users: int = 6000              # total users (pre-training + downstream); default size used by the demo
    seed: int = 0                    # every random draw derives from this seed
    pretrain_share: float = 0.5      # share of users in the pre-training population (the rest are downstream)
    val_share: float = 0.1           # share of pre-training users held out as split "pretrain_val"
    test_share: float = 0.5          # share of downstream users in split "test" (the rest are "tune")
    start_date: str = "2026-01-01"   # first day of the history window (ISO date)
    history_days: int = 90           # behaviour window fed to models (the events table)
    future_days: int = 30            # following window: grounds D_future answers, never in the events table
    difficulty: float = 1.0          # divides the task logit scale; 1.0 gives oracle AUC ~0.75-0.90 per task
    events_per_user: float = 40.0    # events over 90 days of a median-activity user (the realised median is close)
    activity_sigma: float = 0.85     # spread of the lognormal per-user activity level (heavier tail when larger)
    noise_event_share: float = 0.15  # share of events drawn regardless of traits (uniform over event kinds)
    shared_device_share: float = 0.08  # users whose search and clicks come from someone else (modalities disagree)
    hallucination_rate: float = 0.15   # share of synthesised answers grounded in wrong evidence
    qa_per_user_min: int = 4         # fewest QA pairs generated per pre-training user (before self-reflection)
    qa_per_user_max: int = 8         # most QA pairs generated per pre-training user
    future_qa_weight: float = 2.0    # sampling weight of a D_future intent relative to a D_uqa intent
    salient_qa_boost: float = 3.0    # weight multiplier for intents whose answer is not a null claim ("none")
    # What the QA synthesiser asks about the following month (docs/design.md §7.6). "counts": how many of a rare
    # event kind happen next month (mostly "none"); "graded": how likely each kind is, judged from the history
    # and the next month together, plus how app use and money troubles change next month. Only the QA table
    # depends on it: events, profiles, users and labels come from their own random streams.
    qa_style: QAStyle = "counts"
    # Share of answers written as a short answer that intents of one family share ("No.", "Yes, a few times.",
    # "Likely.", "Less."), where the intent has one (docs/design.md §7.14). 0 writes every answer in its intent's
    # own words. Only the QA table depends on it. Pre-training's claim masking joins rows that share a text, so a
    # shared short answer also masks the claims it states across intents (§7.14 measures both ways; neither helped).
    terse_answer_share: float = 0.0
    # Independent side interests per user that no task depends on, up to 160 ("fishing gear", "piano lessons", ...):
    # each one noisy profile column and D_uqa questions about it for pre-training users (docs/design.md §7.41). A
    # richer user than the embedding needs for the tasks, to test whether the task's question then chooses. 0 adds
    # nothing; events, core profile columns, users, tasks and labels never depend on it (a random stream of its own).
    side_interests: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want_int = f.type in ("int", int)
            if f.name == "qa_style":
                continue
            ok = isinstance(value, str) if f.name == "start_date" else (
                isinstance(value, (int, np.integer) if want_int else (int, float, np.integer, np.floating))
                and not isinstance(value, bool))
            if not ok:
                kind = "a date string" if f.name == "start_date" else ("an integer" if want_int else "a number")
                raise ValueError(f"WorldConfig.{f.name} must be {kind}, got {value!r}")
            if f.name not in ("start_date", "qa_style"):  # plain Python numbers keep to_dict/JSON identical for equal configs
                setattr(self, f.name, int(value) if want_int else float(value))
        if not isinstance(self.n_users, (int, np.integer)) or isinstance(self.n_users, bool) or self.n_users < 40:
            raise ValueError(f"WorldConfig.n_users must be an integer >= 40, got {self.n_users!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"WorldConfig.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("pretrain_share", "val_share", "test_share"):
            value = getattr(self, name)
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"WorldConfig.{name} must lie strictly between 0 and 1, got {value!r}")
        try:
            pd.Timestamp(self.start_date)
        except (ValueError, TypeError):
            raise ValueError(f"WorldConfig.start_date must be an ISO date like '2026-01-01', got {self.start_date!r}") from None
        if not isinstance(self.history_days, (int, np.integer)) or self.history_days < 14:
            raise ValueError(f"WorldConfig.history_days must be an integer >= 14, got {self.history_days!r}")
        if not isinstance(self.future_days, (int, np.integer)) or self.future_days < 7:
            raise ValueError(f"WorldConfig.future_days must be an integer >= 7, got {self.future_days!r}")
        if self.qa_style not in QA_STYLES:
            raise ValueError(f"WorldConfig.qa_style must be one of {', '.join(QA_STYLES)}; got {self.qa_style!r}")
        if not float(self.difficulty) > 0.0 or not math.isfinite(float(self.difficulty)):
            raise ValueError(f"WorldConfig.difficulty must be a positive number, got {self.difficulty!r}")
        if not 1.0 <= float(self.events_per_user) <= 2000.0:
            raise ValueError(f"WorldConfig.events_per_user must lie in [1, 2000], got {self.events_per_user!r}")
        if not 0.0 <= float(self.activity_sigma) <= 2.0:
            raise ValueError(f"WorldConfig.activity_sigma must lie in [0, 2], got {self.activity_sigma!r}")
        for name in ("noise_event_share", "shared_device_share", "hallucination_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"WorldConfig.{name} must lie in [0, 1), got {value!r}")
        from qanchor_lab.sources.synthetic.qa import INTENTS  # the intents depend on this config's module

        # The synthesiser asks each user distinct intents of qa_style only (qa._synthesise_qa), so a larger count
        # would be cut to that style's intents without a word: the bound is the style's count, not all intents'.
        n_style = sum(self.qa_style in it.styles for it in INTENTS.values())
        if not 1 <= self.qa_per_user_min <= self.qa_per_user_max <= n_style:
            raise ValueError(
                f"WorldConfig.qa_per_user_min/qa_per_user_max must satisfy 1 <= min <= max <= {n_style} "
                f"(the intents of qa_style={self.qa_style!r}; each user is asked distinct ones), "
                f"got {self.qa_per_user_min!r}/{self.qa_per_user_max!r}"
            )
        from qanchor_lab.sources.synthetic.interests import MAX_SIDE_INTERESTS

        if not 0 <= self.side_interests <= MAX_SIDE_INTERESTS:
            raise ValueError(f"WorldConfig.side_interests must lie in [0, {MAX_SIDE_INTERESTS}] (the named interests), "
                             f"got {self.side_interests!r}")
        if not 0.0 <= float(self.terse_answer_share) <= 1.0:
            raise ValueError(f"WorldConfig.terse_answer_share must lie in [0, 1], got {self.terse_answer_share!r}")
        for name in ("future_qa_weight", "salient_qa_boost"):
            if not float(getattr(self, name)) > 0.0:
                raise ValueError(f"WorldConfig.{name} must be positive, got {getattr(self, name)!r}")
        n_down = self.n_users - round(self.n_users * self.pretrain_share)
        if min(round(self.n_users * self.pretrain_share), n_down) < 10:
            raise ValueError(
                f"WorldConfig: n_users={self.n_users} with pretrain_share={self.pretrain_share} leaves fewer than "
                "10 users in the pre-training or the downstream population"
            )
        check_split_sizes(self.split_sizes(), {"n_users": self.n_users, "pretrain_share": self.pretrain_share,
                                               "val_share": self.val_share, "test_share": self.test_share},
                          owner="WorldConfig")

    def split_sizes(self) -> dict[str, int]:
        """Users per split (pretrain, pretrain_val, tune, test) that generate_world assigns: pretrain_share of
        the users pre-train, val_share of those are held out, test_share of the rest are scored."""
        n_pre = round(self.n_users * self.pretrain_share)
        n_val = max(1, round(n_pre * self.val_share))
        n_test = max(1, round((self.n_users - n_pre) * self.test_share))
        return {"pretrain": n_pre - n_val, "pretrain_val": n_val, "tune": self.n_users - n_pre - n_test, "test": n_test}

