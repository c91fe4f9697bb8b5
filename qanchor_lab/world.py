"""The synthetic UserU world: users with known latent traits, their behaviour logs, QA pairs and tasks.

Every experiment in qanchor_lab is compared with a known truth, so this module simulates users whose
behaviour comes from latent traits (docs/design.md §4):

- latents: 11 correlated traits drawn around 6 persona centres, a heavy-tailed activity level and two
  per-user trends (liquidity stress and app engagement rising or falling over the window);
- behaviour over a history window: bills, mini-program opens, search queries and click paths (the
  `events` table) plus a noisy tabular profile (`profiles`). Signal sits in counts, amounts, channels,
  search *wording* (two traits show only there) and *timing* (the trends show only there);
- a hidden future window, simulated the same way, that grounds the D_future answers;
- D_future and D_uqa question/answer pairs for pre-training users, with simulated synthesiser
  hallucinations and a self-reflection verifier (`verify_answers`) that drops unsupported answers;
- ten downstream tasks whose labels are Bernoulli draws from a known probability (`oracle_prob`), for a
  population that pre-training never sees.

Everything is vectorised numpy/pandas and driven by one seed; the same config gives byte-identical
Parquet tables and manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score, roc_curve

from qanchor_lab.data import save_world  # noqa: F401  (re-exported: the writer of every world)
from qanchor_lab.schema import (
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    SEQUENCE_MODALITIES,
    SYNTHETIC_MODALITY_SPECS,
    TABLES,
    World,
)

# Bump when the generator's output changes for a given config, so ensure_world regenerates old data.
GENERATOR_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Task calibration uses its own fixed sample so intercepts and scales do not depend on the world seed.
CALIBRATION_SEED = 20260214
CALIBRATION_USERS = 40_000

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
class WorldConfig:
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
        if not 1 <= self.qa_per_user_min <= self.qa_per_user_max <= len(INTENTS):
            raise ValueError(
                f"WorldConfig.qa_per_user_min/qa_per_user_max must satisfy 1 <= min <= max <= {len(INTENTS)} "
                f"(the number of intents), got {self.qa_per_user_min!r}/{self.qa_per_user_max!r}"
            )
        for name in ("future_qa_weight", "salient_qa_boost"):
            if not float(getattr(self, name)) > 0.0:
                raise ValueError(f"WorldConfig.{name} must be positive, got {getattr(self, name)!r}")
        n_down = self.n_users - round(self.n_users * self.pretrain_share)
        if min(round(self.n_users * self.pretrain_share), n_down) < 10:
            raise ValueError(
                f"WorldConfig: n_users={self.n_users} with pretrain_share={self.pretrain_share} leaves fewer than "
                "10 users in the pre-training or the downstream population"
            )

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (the manifest stores it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"WorldConfig: unknown field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# event catalogue: what each modality's events can be, how they are worded, which traits drive them


@dataclass(frozen=True)
class EventKind:
    """One kind of event: a merchant category, a mini-program service, a search topic or a page section."""

    kind_id: str
    modality: str
    category: str                   # value of the events.category column ("" for search)
    texts: tuple[str, ...]          # every wording this kind can take (bounded: no amounts, dates or ids)
    weights: dict[str, float]       # feature -> logit coefficient of choosing this kind within its modality
    intercept: float = 0.0
    timing: Timing = "app"          # "stress": follows the liquidity trend; "app": the engagement trend
    amount_median: float = 0.0      # bills: median amount (CNY) at average spending power
    dwell_median: float = 0.0       # mini-programs and clicks: median dwell (s)
    channel: str | None = None      # bills: forced payment channel (None: the user's own mix)


CHANNELS: tuple[str, ...] = ("credit_card", "debit_card", "balance", "pay_later", "bank_transfer")
_CHANNEL_WEIGHTS = {   # user-level channel preference logits
    "credit_card": ({"spending_power": 0.5, "life_stage": -0.1}, 0.3),
    "debit_card": ({"life_stage": 0.5, "spending_power": -0.2}, 0.0),
    "balance": ({"digital_engagement": 0.3, "price_sensitivity": 0.2}, 0.2),
    "pay_later": ({"liquidity_stress": 0.9, "digital_engagement": 0.4, "life_stage": -0.3}, -0.6),
    "bank_transfer": ({"life_stage": 0.2}, -1.6),
}

_BILL_TEMPLATES = ("Paid at {m}", "{L} - {m}", "{m} ({l})", "Payment to {m} for {l}")


def _bill(kind_id, label, merchants, weights, intercept, amount, timing="flat", templates=None, channel=None):
    templates = templates or _BILL_TEMPLATES
    texts = tuple(t.format(m=m, l=label, L=label[:1].upper() + label[1:]) for m in merchants for t in templates)
    return EventKind(kind_id, "bill", kind_id, texts, weights, intercept, timing, amount_median=amount, channel=channel)


_BILL_KINDS = (
    _bill("groceries", "groceries", ("FreshMart supermarket", "GreenLeaf Market", "DailyFresh grocery"),
          {"price_sensitivity": 0.3, "life_stage": 0.3, "persona:family": 0.5}, 1.2, 90),
    _bill("dining", "dining out", ("Golden Wok restaurant", "Noodle House", "Sunny Cafe"),
          {"spending_power": 0.4, "life_stage": -0.3}, 0.9, 70),
    _bill("food_delivery", "food delivery", ("QuickBite Delivery", "HungryGo", "FoodDash"),
          {"digital_engagement": 0.6, "life_stage": -0.5, "price_sensitivity": 0.1}, 1.0, 45),
    _bill("ride_hailing", "taxi rides", ("CityRide", "GoCab", "DiDa Taxi"),
          {"spending_power": 0.3, "digital_engagement": 0.3}, 0.5, 35),
    _bill("fuel", "fuel", ("Sino Fuel Station", "PetroMax", "RoadStar Gas"),
          {"life_stage": 0.3, "spending_power": 0.3, "persona:small_business": 0.5}, 0.0, 300),
    _bill("public_transit", "metro and bus fares", ("Metro Card top-up", "City Bus Pass"),
          {"price_sensitivity": 0.3, "life_stage": -0.3, "persona:student": 0.6}, 0.3, 50),
    _bill("utilities", "household utilities", ("State Grid electricity", "City Water Co", "GasHome"),
          {"life_stage": 0.6}, 0.3, 150),
    _bill("telecom", "phone plan", ("China Telecom", "MobileOne", "UniNet"), {}, 0.0, 88),
    _bill("rent", "rent", ("Homeland Apartments", "CozyLiving Rentals"),
          {"life_stage": -0.3, "persona:young_professional": 0.6}, -0.9, 3000),
    _bill("clothing", "clothing", ("UrbanThreads", "StyleHub", "ModaLine"),
          {"spending_power": 0.4, "price_sensitivity": -0.2}, 0.2, 250),
    _bill("electronics", "electronics", ("TechWorld", "Gadget Galaxy", "PhoneZone"),
          {"spending_power": 0.4, "digital_engagement": 0.3}, -1.0, 1200),
    _bill("luxury", "luxury goods", ("Maison Lumiere", "GoldenCrown Jewellery"),
          {"spending_power": 1.2, "price_sensitivity": -0.8}, -2.2, 5000),
    _bill("flight", "flights", ("SkyWing Airlines", "AirOrient", "FlyNow Tickets"), {"travel_mobility": 1.4}, -1.5, 1500,
          templates=("Flight booking - {m}", "{m} air ticket", "Paid {m} for a flight")),
    _bill("hotel", "hotels", ("Lotus Hotel", "StayWell Inn", "Harbour Grand Hotel"),
          {"travel_mobility": 1.2, "spending_power": 0.3}, -1.3, 600,
          templates=("Hotel stay - {m}", "{m} room booking", "Paid at {m}")),
    _bill("overseas", "shopping abroad", ("Tokyo Duty Free", "Bangkok Night Market", "Paris Boutique", "Seoul Beauty Store"),
          {"abroad_plan": 1.4, "travel_mobility": 0.6}, -2.2, 800,
          templates=("Paid abroad at {m}", "Overseas purchase - {m}", "{m} (foreign currency)")),
    _bill("education", "tuition and courses", ("BrightMind Tutoring", "Online Course Hub"),
          {"persona:family": 1.0, "persona:student": 0.8}, -1.2, 800),
    _bill("childcare", "baby and kids items", ("BabyCare Store", "KidsJoy"), {"persona:family": 2.2, "life_stage": -0.2}, -2.2, 200),
    _bill("healthcare", "pharmacy and clinic visits", ("HealthPlus Pharmacy", "City Clinic"),
          {"protection_need": 0.6, "life_stage": 0.4}, -0.8, 120),
    _bill("insurance_premium", "insurance premium", ("SafeLife", "GuardHealth", "PingSure Auto"),
          {"protection_need": 1.0, "spending_power": 0.3}, -1.3, 400,
          templates=("Insurance premium - {m}", "{m} insurance policy payment", "Paid {m} insurance premium")),
    _bill("fund_purchase", "funds", ("StableGrowth Index Fund", "BlueSky Balanced Fund", "Harvest Bond Fund", "Money Market Fund"),
          {"investment_interest": 1.5, "spending_power": 0.4, "liquidity_stress": -0.4}, -1.5, 2000,
          templates=("Bought {m}", "Fund purchase - {m}", "Invested in {m}"), channel="balance"),
    _bill("credit_card_repayment", "credit card repayment", ("Bank of Commerce card", "UnionPay credit card", "City Bank card"),
          {"spending_power": 0.2}, 0.0, 2000,
          templates=("Credit card repayment - {m}", "Repaid {m} bill", "{m} statement payment"), channel="debit_card"),
    _bill("loan_repayment", "loan repayment", ("QuickCash Loans", "MicroCredit Lender", "Consumer Instalment Plan"),
          {"liquidity_stress": 0.9, "credit_risk": 0.4}, -1.3, 800, timing="stress",
          templates=("Loan repayment to {m}", "{m} instalment paid", "Monthly instalment - {m}"), channel="bank_transfer"),
    _bill("cash_advance", "cash advance", ("credit card", "Emergency Cash Line", "Cash Reserve credit line"),
          {"liquidity_stress": 1.3, "credit_risk": 0.5}, -2.0, 1000, timing="stress",
          templates=("Cash advance from {m}", "Borrowed cash via {m}", "Cash drawn on {m}"), channel="credit_card"),
    _bill("late_fee", "late payment fee", ("Bank of Commerce card", "UnionPay credit card", "QuickCash Loans"),
          {"credit_risk": 1.2, "liquidity_stress": 0.5, "repayment_worry": 0.3}, -3.2, 60, timing="stress",
          templates=("Late payment fee - {m}", "{m} overdue charge", "Penalty for late repayment ({m})")),
    _bill("p2p_transfer", "transfer", ("a friend", "family", "a colleague"), {}, 0.0, 300,
          templates=("Transfer to {m}", "Sent money to {m}", "Red packet to {m}"), channel="balance"),
    _bill("entertainment", "entertainment", ("StarCinema", "KTV Party Box", "LiveHouse concert tickets"),
          {"life_stage": -0.5, "spending_power": 0.2}, -0.6, 120),
    _bill("gaming", "game credits", ("GameCenter top-up", "Mobile game store"),
          {"digital_engagement": 0.6, "life_stage": -0.8}, -1.6, 60),
    _bill("business_supplies", "wholesale supplies", ("WholesaleHub", "OfficeMart Supplies", "Packaging Direct"),
          {"persona:small_business": 3.2}, -2.8, 1500),
)

_MP_TEMPLATES = ("Opened {n}", "{n} mini-program", "Used the {n} mini-program", "Visited {n}")


def _mp(kind_id, name, weights, intercept, dwell, timing="app"):
    return EventKind(kind_id, "miniprogram", kind_id, tuple(t.format(n=name) for t in _MP_TEMPLATES),
                     weights, intercept, timing, dwell_median=dwell)


_MP_KINDS = (
    _mp("bike_sharing", "CityBike sharing", {"life_stage": -0.5, "price_sensitivity": 0.3, "persona:student": 0.5}, 0.3, 40),
    _mp("ride_hailing", "GoCab rides", {"spending_power": 0.3, "digital_engagement": 0.3}, 0.3, 60),
    _mp("food_delivery", "HungryGo food delivery", {"digital_engagement": 0.5, "life_stage": -0.4}, 0.8, 90),
    _mp("wealth", "Wealth Center funds", {"investment_interest": 1.5, "spending_power": 0.3}, -0.5, 150),
    _mp("insurance", "Insurance Mall", {"protection_need": 1.2}, -0.7, 120),
    _mp("credit_score", "Credit Score check", {"repayment_worry": 0.5, "credit_risk": 0.4, "liquidity_stress": 0.3}, -1.0, 50,
        timing="stress"),
    _mp("loan_center", "Quick Loan center", {"liquidity_stress": 1.2, "credit_risk": 0.4}, -1.2, 80, timing="stress"),
    _mp("cash_reserve", "Cash Reserve", {"liquidity_stress": 0.8, "life_stage": 0.2}, -1.3, 60, timing="stress"),
    _mp("repayment_assistant", "Credit Card Repayment assistant", {"credit_risk": 0.3, "spending_power": 0.2}, -0.6, 45),
    _mp("travel_booking", "Trip Planner flights", {"travel_mobility": 1.3}, -0.9, 180),
    _mp("hotel_booking", "Hotel Finder", {"travel_mobility": 1.2}, -1.1, 160),
    _mp("coupon_center", "Coupon Center", {"price_sensitivity": 1.4}, -0.2, 70),
    _mp("rewards", "Rewards Points", {"price_sensitivity": 0.5, "spending_power": 0.3}, -0.8, 50),
    _mp("health", "Health Services", {"protection_need": 0.8, "life_stage": 0.5}, -0.9, 100),
    _mp("kids_education", "Kids Education", {"persona:family": 1.6}, -1.5, 200),
    _mp("utility_payments", "Utility Payments", {"life_stage": 0.6}, -0.6, 40),
    _mp("citizen_services", "Citizen Services", {"life_stage": 0.4}, -1.2, 90),
    _mp("mini_games", "Mini Games", {"digital_engagement": 0.8, "life_stage": -0.8}, -0.8, 300),
    _mp("flash_sale", "Flash Sale Mall", {"price_sensitivity": 0.7, "digital_engagement": 0.4}, -0.4, 200),
    _mp("currency_exchange", "Currency Exchange", {"abroad_plan": 1.6}, -2.0, 60),
    _mp("merchant_tools", "Merchant Tools", {"persona:small_business": 2.8}, -2.2, 240),
)


def _search(kind_id, phrasings, weights, intercept, timing="app"):
    return EventKind(kind_id, "search", "", tuple(phrasings), weights, intercept, timing)


_SEARCH_KINDS = (
    _search("delay_repayment", (
        "how to delay credit card repayment", "credit card repayment extension", "what happens if i repay my credit card late",
        "minimum payment credit card penalty", "can i split my credit card bill into installments",
        "late repayment effect on credit score", "ask bank for more time to repay"),
        {"repayment_worry": 1.8, "credit_risk": 0.3}, -0.5, timing="stress"),
    _search("quick_loan", (
        "borrow money fast", "emergency cash loan same day", "small loan no collateral", "cash advance fee",
        "what is a cash reserve credit line", "payday loan interest rate"),
        {"liquidity_stress": 1.2, "repayment_worry": 0.3}, -0.8, timing="stress"),
    _search("overdraft", (
        "account overdrawn what to do", "overdraft fee bank", "not enough balance to pay bill",
        "what if i overdraw my account", "short of cash until payday", "run short of money before salary"),
        {"liquidity_stress": 1.1, "spending_power": -0.3}, -0.9, timing="stress"),
    _search("debt_help", (
        "consolidate credit card debt", "too many loans what to do", "debt relief options", "negotiate with debt collector"),
        {"repayment_worry": 0.9, "liquidity_stress": 0.6}, -1.5, timing="stress"),
    _search("credit_score", (
        "how to check my credit score", "improve credit score fast", "why was my credit limit lowered"),
        {"repayment_worry": 0.5, "credit_risk": 0.3}, -1.0),
    _search("index_fund", (
        "best index fund fees", "how to buy an etf", "index fund vs active fund", "low cost index fund for beginners",
        "fund management fee comparison"),
        {"investment_interest": 1.5}, -0.6),
    _search("savings", (
        "high yield savings account", "money market fund returns", "where to park cash safely", "fixed deposit rates this month"),
        {"investment_interest": 0.8, "spending_power": 0.3, "price_sensitivity": 0.3}, -0.8),
    _search("wealth", (
        "wealth management products comparison", "bond fund or stock fund", "how to invest 100k", "retirement savings plan"),
        {"investment_interest": 1.0, "spending_power": 0.8}, -1.0),
    _search("travel_abroad", (
        "visa for japan", "cheap flights to bangkok", "exchange rate yen today", "travel insurance abroad",
        "things to do in singapore", "best hotel in tokyo", "do i need a passport for hong kong"),
        {"abroad_plan": 2.0, "travel_mobility": 0.3}, -0.8),
    _search("domestic_travel", (
        "weekend trip ideas", "high speed train tickets", "hotel deals near the beach", "flight ticket discount",
        "hotel coupon code", "best time to book a flight"),
        {"travel_mobility": 1.3}, -0.7),
    _search("coupons", (
        "grocery coupons today", "food delivery discount code", "best cashback deals", "how to redeem a coupon",
        "free shipping voucher", "coupon for movie tickets"),
        {"price_sensitivity": 1.4}, -0.3),
    _search("price_compare", (
        "cheapest phone plan", "compare prices milk powder", "discount electronics sale", "is it cheaper to buy online"),
        {"price_sensitivity": 0.9}, -1.0),
    _search("insurance", (
        "critical illness insurance worth it", "medical insurance for parents", "buy insurance policy online",
        "car insurance renewal price", "life insurance for new parents"),
        {"protection_need": 1.4}, -0.8),
    _search("kids", (
        "baby formula reviews", "kindergarten enrollment", "children's books age 5", "summer camp for kids"),
        {"persona:family": 1.8}, -1.2),
    _search("jobs", (
        "part time jobs near me", "internship application tips", "how to write a resume", "salary negotiation tips"),
        {"persona:student": 1.2, "liquidity_stress": 0.4, "life_stage": -0.3}, -1.5),
    _search("business", (
        "invoice template small business", "wholesale supplier packaging", "how to register a small business",
        "business loan for shop", "accept card payments in my store"),
        {"persona:small_business": 2.2}, -1.5),
    _search("health", (
        "blood pressure normal range", "clinic near me open now", "vitamin d dosage", "how to sleep better"),
        {"protection_need": 0.6, "life_stage": 0.6}, -1.3),
    _search("entertainment", (
        "new movies this week", "concert tickets", "popular tv series", "karaoke near me"),
        {"life_stage": -0.6}, -0.9),
    _search("gaming", ("game top up discount", "mobile game guide", "new game release"),
            {"digital_engagement": 0.7, "life_stage": -0.8}, -1.3),
    _search("recipes", ("easy dinner recipes", "how to cook rice", "healthy lunch ideas"), {"life_stage": 0.3}, -1.0),
    _search("tech", ("new phone release", "best laptop for students", "phone screen repair price"),
            {"digital_engagement": 0.5, "spending_power": 0.3}, -1.2),
    _search("app_help", ("how to stop app notifications", "how to delete the app", "cancel membership", "how to close my account"),
            {"trend_engagement": -0.9, "digital_engagement": -0.3}, -1.4),
    _search("noise", ("weather tomorrow", "news today", "translate english", "calculator", "express delivery tracking",
                      "what time is it in london"), {}, 0.3, timing="flat"),
)

_CLICK_TEMPLATES = ("Viewed {p}", "Opened {p}", "Tapped {p}")


def _click(kind_id, pages, weights, intercept, dwell, timing="app"):
    return EventKind(kind_id, "click", kind_id, tuple(t.format(p=p) for p in pages for t in _CLICK_TEMPLATES),
                     weights, intercept, timing, dwell_median=dwell)


_CLICK_KINDS = (
    _click("home", ("home feed", "home > recommended for you"), {}, 1.0, 15),
    _click("bills_overview", ("monthly bill summary", "spending analysis"), {"spending_power": 0.2, "price_sensitivity": 0.3}, 0.0, 30),
    _click("credit_card", ("credit card page", "credit card points"), {"spending_power": 0.3}, -0.3, 20),
    _click("repayment", ("repayment page", "repayment page > minimum payment option", "repayment reminder settings"),
           {"repayment_worry": 0.8, "credit_risk": 0.5}, -0.7, 25, timing="stress"),
    _click("loan_offers", ("loan offers", "loan offers > interest calculator"), {"liquidity_stress": 1.0}, -0.9, 30, timing="stress"),
    _click("cash_reserve", ("cash reserve offer page", "cash reserve > apply now"), {"liquidity_stress": 0.7, "life_stage": 0.3},
           -1.8, 25, timing="stress"),
    _click("fund_market", ("fund market", "fund market > index funds", "fund detail > fees"), {"investment_interest": 1.4}, -0.4, 40),
    _click("insurance_mall", ("insurance mall", "insurance mall > health policy", "insurance > policy comparison"),
           {"protection_need": 1.2}, -0.7, 35),
    _click("travel", ("travel page > flights", "travel page > hotels", "travel page > abroad deals"),
           {"travel_mobility": 1.2, "abroad_plan": 0.5}, -0.6, 35),
    _click("coupons", ("coupon wallet", "coupon center > redeem"), {"price_sensitivity": 1.2}, -0.2, 15),
    _click("membership", ("membership rewards",), {"price_sensitivity": 0.3}, -0.8, 15),
    _click("settings", ("security settings", "account settings > close account"), {"trend_engagement": -0.6}, -1.5, 20),
    _click("customer_service", ("customer service chat", "customer service > request a phone call"),
           {"life_stage": 0.5, "digital_engagement": -0.5}, -1.8, 60),
    _click("transfer", ("transfer page",), {}, -0.3, 20),
    _click("savings", ("savings account", "savings account > interest"), {"spending_power": 0.3, "investment_interest": 0.5}, -1.0, 25),
    _click("messages", ("message center", "notifications"), {}, 0.0, 10, timing="flat"),
)

EVENT_KINDS: dict[str, tuple[EventKind, ...]] = {
    "bill": _BILL_KINDS, "miniprogram": _MP_KINDS, "search": _SEARCH_KINDS, "click": _CLICK_KINDS,
}
# Base daily event rate per modality (at median activity); the scale is set by WorldConfig.events_per_user.
_MODALITY_SHARE = {"bill": 0.33, "miniprogram": 0.22, "search": 0.18, "click": 0.27}
# How digital engagement and spending power scale each modality's volume.
_MODALITY_TRAIT = {
    "bill": {"spending_power": 0.2},
    "miniprogram": {"digital_engagement": 0.45},
    "search": {"digital_engagement": 0.35},
    "click": {"digital_engagement": 0.5},
}
# P(user lacks the modality entirely) = sigmoid(intercept + coefs . features)
_MISSING = {
    "bill": ({"digital_engagement": -0.3}, -3.6),
    "miniprogram": ({"digital_engagement": -0.7, "life_stage": 0.4}, -2.2),
    "search": ({"digital_engagement": -0.8, "life_stage": 0.3}, -1.3),
    "click": ({"digital_engagement": -0.5}, -3.0),
}


def _check_catalogue() -> None:
    for modality, kinds in EVENT_KINDS.items():
        ids = [k.kind_id for k in kinds]
        if len(set(ids)) != len(ids):
            raise AssertionError(f"duplicate kind ids in modality {modality!r}")
        seen: dict[str, str] = {}
        for k in kinds:
            for w in k.weights:
                if w not in _F:
                    raise AssertionError(f"kind {k.kind_id!r}: unknown feature {w!r}")
            for t in k.texts:
                if t in seen:
                    raise AssertionError(f"text {t!r} used by kinds {seen[t]!r} and {k.kind_id!r}")
                seen[t] = k.kind_id


_check_catalogue()
_SEARCH_TOPIC_OF_TEXT = {t: k.kind_id for k in _SEARCH_KINDS for t in k.texts}
STRESS_KINDS = frozenset((k.modality, k.kind_id) for ks in EVENT_KINDS.values() for k in ks if k.timing == "stress")
APP_KINDS = frozenset((k.modality, k.kind_id) for ks in EVENT_KINDS.values() for k in ks if k.timing == "app")


def catalogue_texts() -> list[str]:
    """Every event text the generator can emit (the distinct-text bound of an encoder cache)."""
    return [t for kinds in EVENT_KINDS.values() for k in kinds for t in k.texts]


# ----------------------------------------------------------------------------------------------
# downstream tasks


@dataclass(frozen=True)
class TaskSpec:
    """A downstream task: its query and the true label model (logit = a + s * standardised score)."""

    task_id: str
    domain: str
    query: str
    description: str
    weights: dict[str, float]                            # feature -> coefficient of the score
    interactions: tuple[tuple[str, str, float], ...]     # (feature, feature, coefficient) products
    target_rate: float                                   # positive rate the intercept is calibrated to
    target_auc: float                                    # expected oracle AUC the scale is calibrated to


TASK_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("dormancy_churn", "engagement", "Will this user stop using the app next month?",
             "No app activity in the month after the history window (churn / dormancy).",
             {"digital_engagement": -0.8, "trend_engagement": -1.0, "log_activity": -0.6, "life_stage": 0.3}, (),
             0.15, 0.82),
    TaskSpec("miniprogram_adoption", "engagement", "Will this user start using a new mini-program service next month?",
             "Opens a mini-program service not used in the history window.",
             {"digital_engagement": 0.8, "life_stage": -0.4, "price_sensitivity": 0.5, "trend_engagement": 0.4}, (),
             0.25, 0.78),
    TaskSpec("engagement_growth", "engagement", "Will this user be more active in the app next month than before?",
             "App activity next month grows by a quarter or more over the monthly average.",
             {"trend_engagement": 1.2, "digital_engagement": 0.3, "log_activity": -0.3}, (),
             0.30, 0.80),
    TaskSpec("credit_delinquency", "risk", "Is this user likely to repay the credit card bill late next month?",
             "Late repayment of the credit bill due next month.",
             {"credit_risk": 0.8, "liquidity_stress": 0.5, "repayment_worry": 0.7, "trend_liquidity": 0.5},
             (("liquidity_stress", "credit_risk", 0.3),), 0.09, 0.85),
    TaskSpec("liquidity_shortfall", "risk", "Will this user run short of cash and overdraw the account next month?",
             "Account balance falls below zero (overdraft) next month.",
             {"liquidity_stress": 1.0, "trend_liquidity": 0.7, "spending_power": -0.5, "credit_risk": 0.2}, (),
             0.12, 0.83),
    TaskSpec("cash_advance_uptake", "risk", "Will this user take a cash advance on the credit card next month?",
             "Draws a cash advance or a small emergency loan next month.",
             {"liquidity_stress": 0.8, "trend_liquidity": 0.5, "credit_risk": 0.4, "price_sensitivity": 0.3,
              "repayment_worry": 0.3}, (), 0.11, 0.81),
    TaskSpec("ivr_cash_reserve", "marketing", "Will this user take up a cash reserve offer made by phone call?",
             "Responds to an IVR outreach call for the cash-reserve product by drawing on it.",
             {"liquidity_stress": 0.7, "credit_risk": -0.7, "life_stage": 0.4, "digital_engagement": -0.3,
              "trend_liquidity": 0.3}, (("liquidity_stress", "credit_risk", -0.3),), 0.09, 0.80),
    TaskSpec("travel_coupon", "marketing", "Will this user redeem a hotel or flight coupon next month?",
             "Redeems a travel (hotel or flight) coupon next month.",
             {"travel_mobility": 1.0, "abroad_plan": 0.6, "price_sensitivity": 0.5},
             (("travel_mobility", "price_sensitivity", 0.4),), 0.13, 0.84),
    TaskSpec("wealth_fund_purchase", "marketing", "Will this user buy a wealth management fund next month?",
             "Buys a wealth-management fund product next month.",
             {"investment_interest": 1.0, "spending_power": 0.5, "liquidity_stress": -0.4},
             (("investment_interest", "spending_power", 0.3),), 0.11, 0.85),
    TaskSpec("insurance_purchase", "marketing", "Will this user buy an insurance policy next month?",
             "Buys a new insurance policy next month.",
             {"protection_need": 0.9, "spending_power": 0.35, "persona:family": 0.4},
             (("protection_need", "spending_power", 0.3),), 0.10, 0.81),
)
TASK_IDS: tuple[str, ...] = tuple(t.task_id for t in TASK_SPECS)


# ----------------------------------------------------------------------------------------------
# small numeric helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _linear(feats: np.ndarray, weights: dict[str, float], intercept: float = 0.0) -> np.ndarray:
    out = np.full(feats.shape[0], float(intercept))
    for name, w in weights.items():
        out += w * feats[:, _F[name]]
    return out


def _slope(trend: np.ndarray) -> np.ndarray:
    """Per-user slope b of the event density 1 + b (u - 1/2) over the window (|b| <= 1.8 keeps it positive)."""
    return np.clip(0.9 * trend, -1.8, 1.8)


def _inverse_linear_cdf(r: np.ndarray, b: np.ndarray) -> np.ndarray:
    """u in [0, 1) with density 1 + b (u - 1/2), from uniform r (vectorised inverse CDF)."""
    small = np.abs(b) < 1e-6
    bb = np.where(small, 1.0, b)
    c = 1.0 - bb / 2.0
    u = (-c + np.sqrt(np.maximum(c * c + 2.0 * bb * r, 0.0))) / bb
    return np.clip(np.where(small, r, u), 0.0, np.nextafter(1.0, 0.0))


def _future_multiplier(b: np.ndarray, history_days: int, future_days: int) -> np.ndarray:
    """Mean density over the future window when the history trend carries on (rate ratio vs history)."""
    return np.maximum(0.05, 1.0 + b * (0.5 + future_days / (2.0 * history_days)))


# ----------------------------------------------------------------------------------------------
# latents


@dataclass
class _Latents:
    persona: np.ndarray       # (n,) index into PERSONAS
    feats: np.ndarray         # (n, len(FEATURES)) traits, trends, log activity, persona one-hot
    peak_hour: np.ndarray     # (n,)
    shared_device: np.ndarray  # (n,) bool
    missing: dict[str, np.ndarray]  # modality -> (n,) bool

    @property
    def traits(self) -> np.ndarray:
        return self.feats[:, : len(TRAITS)]


def _sample_latents(rng: np.random.Generator, n: int, config: WorldConfig) -> _Latents:
    persona = rng.choice(len(PERSONAS), size=n, p=PERSONA_SHARES / PERSONA_SHARES.sum())
    z = rng.standard_normal((n, len(TRAITS)))
    traits = _PERSONA_MEANS[persona] + TRAIT_SCALE * z @ _TRAIT_CHOL.T
    feats = np.zeros((n, len(FEATURES)))
    feats[:, : len(TRAITS)] = traits
    ls_centred = (traits[:, _T["liquidity_stress"]] - 0.1) / 0.85
    feats[:, _F["trend_liquidity"]] = 0.5 * ls_centred + 0.85 * rng.standard_normal(n)
    feats[:, _F["trend_engagement"]] = rng.standard_normal(n)
    feats[:, _F["log_activity"]] = config.activity_sigma * rng.standard_normal(n) + 0.25 * traits[:, _T["digital_engagement"]]
    for i, p in enumerate(PERSONAS):
        feats[:, _F[f"persona:{p}"]] = persona == i
    peak = _PERSONA_PEAK_HOUR[persona] + 1.5 * rng.standard_normal(n)
    shared = rng.random(n) < config.shared_device_share
    missing = {}
    for m in SEQUENCE_MODALITIES:
        weights, intercept = _MISSING[m]
        missing[m] = rng.random(n) < _sigmoid(_linear(feats, weights, intercept))
    return _Latents(persona, feats, peak, shared, missing)


# ----------------------------------------------------------------------------------------------
# event simulation


@dataclass
class _Events:
    """Column arrays of simulated events (not yet a DataFrame)."""

    user: np.ndarray      # int user index
    modality: np.ndarray  # index into SEQUENCE_MODALITIES
    kind: np.ndarray      # index within the modality's kinds
    text: np.ndarray      # index into the global text table
    seconds: np.ndarray   # int64 seconds since window start
    amount: np.ndarray
    duration: np.ndarray
    channel: np.ndarray   # index into CHANNELS, or -1 ("app")


_TEXTS = catalogue_texts()
_TEXT_OFFSET: dict[str, np.ndarray] = {}
_offset = 0
for _m, _kinds in EVENT_KINDS.items():
    _TEXT_OFFSET[_m] = np.cumsum([0] + [len(k.texts) for k in _kinds])[:-1] + _offset
    _offset += sum(len(k.texts) for k in _kinds)
del _m, _kinds, _offset


def _simulate(rng: np.random.Generator, lat: _Latents, days: int, config: WorldConfig, *,
              future: bool, user_mask: np.ndarray | None = None) -> _Events:
    """Poisson counts per (user, kind), then one row per event with wording, time, amount and dwell."""
    n = lat.feats.shape[0]
    active = np.ones(n, bool) if user_mask is None else user_mask
    activity = np.exp(lat.feats[:, _F["log_activity"]])
    b_liq = _slope(lat.feats[:, _F["trend_liquidity"]])
    b_eng = _slope(lat.feats[:, _F["trend_engagement"]])
    # The search/click view of a shared-device user is someone else's: modalities disagree.
    other = rng.permutation(n)
    # Preferred wording per (user, kind): users return to the same merchant/phrasing most of the time.
    chan_logits = np.stack([_linear(lat.feats, w, c) for w, c in _CHANNEL_WEIGHTS.values()], axis=1)
    chan_p = np.exp(chan_logits - chan_logits.max(1, keepdims=True))
    chan_cum = np.cumsum(chan_p / chan_p.sum(1, keepdims=True), axis=1)
    parts: list[_Events] = []
    per_day = config.events_per_user / 90.0
    for mi, m in enumerate(SEQUENCE_MODALITIES):
        kinds = EVENT_KINDS[m]
        feats = lat.feats
        if m in ("search", "click"):
            feats = np.where(lat.shared_device[:, None], lat.feats[other], lat.feats)
        logits = np.stack([_linear(feats, k.weights, k.intercept) for k in kinds], axis=1)
        logits += 0.3 * rng.standard_normal(logits.shape)  # idiosyncratic taste beyond the traits
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p = (1.0 - config.noise_event_share) * p + config.noise_event_share / len(kinds)
        volume = per_day * days * _MODALITY_SHARE[m] * activity * np.exp(_linear(feats, _MODALITY_TRAIT[m]))
        volume = np.where(lat.missing[m] | ~active, 0.0, volume)
        rate = volume[:, None] * p
        if future:
            timing = np.array([k.timing for k in kinds])
            rate = rate * np.where(timing == "stress", _future_multiplier(b_liq, config.history_days, days)[:, None],
                                   np.where(timing == "app", _future_multiplier(b_eng, config.history_days, days)[:, None], 1.0))
        counts = rng.poisson(rate)
        flat = counts.ravel()
        cell = np.repeat(np.arange(flat.size), flat)
        user, kind = cell // len(kinds), cell % len(kinds)
        n_ev = user.size
        # wording
        n_var = np.array([len(k.texts) for k in kinds])
        pref = (rng.random((n, len(kinds))) * n_var).astype(np.int64)
        loyal = rng.random(n_ev) < 0.6
        variant = np.where(loyal, pref[user, kind], (rng.random(n_ev) * n_var[kind]).astype(np.int64))
        text = _TEXT_OFFSET[m][kind] + variant
        # timing within the window: trends tilt stress and app events towards the start or the end
        timing = np.array([k.timing for k in kinds])[kind]
        b = np.where(timing == "stress", b_liq[user], np.where(timing == "app", b_eng[user], 0.0))
        if future:
            b = np.zeros_like(b)  # the future window only grounds counts; its timing is not used
        u = _inverse_linear_cdf(rng.random(n_ev), b)
        day = np.minimum((u * days).astype(np.int64), days - 1)
        hour = np.mod(lat.peak_hour[user] + 3.5 * rng.standard_normal(n_ev), 24.0)
        seconds = day * 86400 + (hour * 3600.0).astype(np.int64)
        amount = np.zeros(n_ev)
        duration = np.zeros(n_ev)
        channel = np.full(n_ev, -1, dtype=np.int64)
        if m == "bill":
            med = np.array([k.amount_median for k in kinds])[kind]
            amount = np.round(med * np.exp(0.35 * lat.feats[user, _T["spending_power"]] + 0.55 * rng.standard_normal(n_ev)), 2)
            amount = np.maximum(amount, 0.01)
            chan = (rng.random(n_ev)[:, None] > chan_cum[user]).sum(1)
            forced = np.array([CHANNELS.index(k.channel) if k.channel else -1 for k in kinds])[kind]
            channel = np.where(forced >= 0, forced, np.minimum(chan, len(CHANNELS) - 1))
        elif m in ("miniprogram", "click"):
            med = np.array([k.dwell_median for k in kinds])[kind]
            duration = np.round(med * np.exp(0.15 * lat.feats[user, _T["digital_engagement"]] + 0.8 * rng.standard_normal(n_ev)), 1)
            duration = np.maximum(duration, 1.0)
        parts.append(_Events(user, np.full(n_ev, mi), kind, text, seconds, amount, duration, channel))
    ev = _Events(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Events)))
    if not future:
        # Every user opened the app at least once: a lone home-feed view for users with no events at all.
        silent = np.setdiff1d(np.flatnonzero(active), np.unique(ev.user))
        if silent.size:
            ci = SEQUENCE_MODALITIES.index("click")
            k = [k.kind_id for k in _CLICK_KINDS].index("home")
            sec = rng.integers(0, days * 86400, silent.size)
            extra = _Events(silent, np.full(silent.size, ci), np.full(silent.size, k),
                            np.full(silent.size, _TEXT_OFFSET["click"][k]), sec, np.zeros(silent.size),
                            np.full(silent.size, 15.0), np.full(silent.size, -1))
            ev = _Events(*(np.concatenate([getattr(ev, f.name), getattr(extra, f.name)]) for f in fields(_Events)))
    order = np.lexsort((ev.text, ev.modality, ev.seconds, ev.user))
    ev = _Events(*(getattr(ev, f.name)[order] for f in fields(_Events)))
    # Exact repeats (same user, second and wording) would be duplicate rows: keep the first.
    dup = np.zeros(ev.user.size, bool)
    dup[1:] = (ev.user[1:] == ev.user[:-1]) & (ev.seconds[1:] == ev.seconds[:-1]) & (ev.text[1:] == ev.text[:-1])
    return _Events(*(getattr(ev, f.name)[~dup] for f in fields(_Events)))


_CATEGORY_OF_TEXT = np.array(
    [k.category for kinds in EVENT_KINDS.values() for k in kinds for _ in k.texts], dtype=object)


def _str_take(values: Sequence[str], codes: np.ndarray) -> pd.Series:
    """pandas `str` column of values[codes], built through Arrow (much faster than from Python objects)."""
    taken = pa.array(list(values), type=pa.large_string()).take(pa.array(np.asarray(codes, dtype=np.int64)))
    return pd.Series(taken, dtype="str")


def _events_frame(ev: _Events, user_ids: np.ndarray, start: pd.Timestamp) -> pd.DataFrame:
    ts = start.to_datetime64().astype("datetime64[ns]") + ev.seconds.astype("timedelta64[s]").astype("timedelta64[ns]")
    channel = np.where(ev.channel < 0, len(CHANNELS), ev.channel)
    frame = pd.DataFrame({
        "user_id": _str_take(list(user_ids), ev.user),
        "modality": _str_take(SEQUENCE_MODALITIES, ev.modality),
        "timestamp": pd.Series(ts, dtype="datetime64[ns]"),
        "category": _str_take(list(_CATEGORY_OF_TEXT), ev.text),
        "channel": _str_take(CHANNELS + ("app",), channel),
        "text": _str_take(_TEXTS, ev.text),
        "amount": ev.amount.astype(np.float64),
        "duration_s": ev.duration.astype(np.float64),
    })
    return frame[list(EVENT_COLUMNS)]


# ----------------------------------------------------------------------------------------------
# profile (the tabular modality): observed with noise


def _profiles(rng: np.random.Generator, lat: _Latents, user_ids: np.ndarray) -> pd.DataFrame:
    n = len(user_ids)
    t = lat.traits
    sp, ls, cr, de, life = (t[:, _T[k]] for k in ("spending_power", "liquidity_stress", "credit_risk",
                                                  "digital_engagement", "life_stage"))
    noise = rng.standard_normal((n, 10))
    age = np.clip(np.round(40.0 + 12.0 * life + 4.0 * noise[:, 0]), 18, 85)
    tenure = np.clip(np.round(rng.gamma(2.0, 6.0 + 6.0 * np.clip(life + 1.8, 0.2, None))), 1, 200)
    credit_limit = np.round(np.exp(9.0 + 0.5 * sp - 0.4 * cr + 0.3 * noise[:, 1]), -2)
    city_tier = np.clip(np.round(2.5 - 0.6 * sp - 0.4 * de + 0.7 * noise[:, 2]), 1, 4)
    income_band = np.clip(np.round(3.0 + 0.9 * sp + 0.6 * noise[:, 3]), 1, 5)
    n_cards = rng.poisson(np.exp(0.4 + 0.3 * sp + 0.1 * cr))
    utilisation = np.round(_sigmoid(-0.6 + 0.9 * ls + 0.5 * cr + 0.5 * noise[:, 4]), 3)
    balance = np.round(np.exp(8.0 + 0.7 * sp - 0.6 * ls + 0.6 * noise[:, 5]), 2)
    mortgage = rng.random(n) < _sigmoid(0.8 * life + 0.5 * sp - 1.0)
    bureau = np.round(np.clip(650.0 - 45.0 * cr - 20.0 * ls + 35.0 * noise[:, 6], 350, 950))
    logins = np.clip(np.round(np.exp(1.8 + 0.5 * de + 0.5 * lat.feats[:, _F["log_activity"]] + 0.4 * noise[:, 7])), 0, 30)
    frame = pd.DataFrame({
        "user_id": pd.array(user_ids, dtype="str"),
        "age": age, "tenure_months": tenure, "credit_limit": credit_limit, "city_tier": city_tier,
        "income_band": income_band, "n_linked_cards": n_cards.astype(np.float64), "credit_utilisation": utilisation,
        "avg_balance": balance, "has_mortgage": mortgage.astype(np.float64), "bureau_score": bureau,
        "active_days_last_30": logins,
    })
    return frame


# ----------------------------------------------------------------------------------------------
# evidence: per-user aggregates the synthesiser and the verifier read


def build_evidence(events: pd.DataFrame, profiles: pd.DataFrame, *, start_date: str, history_days: int,
                   future_events: pd.DataFrame | None = None, future_days: int | None = None) -> pd.DataFrame:
    """Per-user evidence aggregates (index: user_id) that QA answers are grounded in and checked against.

    Columns: `n:<modality>:<kind>` event counts, `amt:bill:<kind>` amounts, `chan:<channel>` bill counts,
    `app_h1`/`app_h2` and `stress_h1`/`stress_h2` counts in each half of the window, `night` events
    between 23:00 and 05:00, `n_events`, `profile:<column>`, `days` (the window length), and
    `fut_n:...`/`fut_amt:...`/`future_days` from the future window. Kinds are recognised by category (bills, mini-programs, clicks) or wording (search);
    unrecognised events count only towards the totals.
    """
    users = pd.Index(sorted(set(profiles["user_id"].unique()) | set(events["user_id"].unique())), name="user_id")
    out: dict[str, np.ndarray] = {}
    out.update(_aggregate(events, users, "", start_date=start_date, days=history_days))
    out["days"] = np.full(len(users), float(history_days))
    if future_events is not None:
        if future_days is None:
            raise ValueError("build_evidence: future_days is required with future_events")
        out.update(_aggregate(future_events, users, "fut_", start_date=None, days=None))
        out["future_days"] = np.full(len(users), float(future_days))
    prof = profiles.set_index("user_id").reindex(users)
    for c in prof.columns:
        out[f"profile:{c}"] = prof[c].to_numpy(dtype=np.float64)
    return pd.DataFrame(out, index=users)


def _codes(column: pd.Series) -> tuple[np.ndarray, list]:
    """Dictionary-encode a string column through Arrow: (codes, distinct values)."""
    enc = pa.chunked_array([pa.array(column.to_numpy(dtype=object), type=pa.large_string())]).combine_chunks().dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def _kind_codes(events: pd.DataFrame) -> np.ndarray:
    """Index into _ALL_KIND_KEYS of each event's kind (-1 when unrecognised). Kinds are named by the
    category, except search, whose topic is read from the wording; only the few distinct
    (modality, category, text) combinations are looked up in Python."""
    mod, mods = _codes(events["modality"])
    cat, cats = _codes(events["category"])
    txt, txts = _codes(events["text"])
    search = np.array([m == "search" for m in mods] + [False])[mod]
    txt = np.where(search, txt, -1)
    combo = (mod * (len(cats) + 1) + cat) * (len(txts) + 1) + txt + 1
    uniq, inverse = np.unique(combo, return_inverse=True)
    lookup = {k: i for i, k in enumerate(_ALL_KIND_KEYS)}
    codes = np.empty(uniq.size, dtype=np.int64)
    for j, c in enumerate(uniq):
        t = int(c % (len(txts) + 1)) - 1
        rest = int(c // (len(txts) + 1))
        m, k = mods[rest // (len(cats) + 1)], cats[rest % (len(cats) + 1)]
        if t >= 0:
            k = _SEARCH_TOPIC_OF_TEXT.get(txts[t], "")
        codes[j] = lookup.get(f"{m}:{k}", -1)
    return codes[inverse]


_ALL_KIND_KEYS = [f"{m}:{k.kind_id}" for m, ks in EVENT_KINDS.items() for k in ks]
_IS_APP_KEY = np.array([tuple(key.split(":")) in APP_KINDS for key in _ALL_KIND_KEYS] + [False])
_IS_STRESS_KEY = np.array([tuple(key.split(":")) in STRESS_KINDS for key in _ALL_KIND_KEYS] + [False])


def _aggregate(events: pd.DataFrame, users: pd.Index, prefix: str, *, start_date, days) -> dict[str, np.ndarray]:
    n = len(users)
    uidx = users.get_indexer(events["user_id"])
    keep = uidx >= 0
    ev = events.loc[keep]
    uidx = uidx[keep]
    key_codes = _kind_codes(ev) if len(ev) else np.zeros(0, np.int64)
    known = key_codes >= 0
    nk = len(_ALL_KIND_KEYS)
    counts = np.bincount(uidx[known] * nk + key_codes[known], minlength=n * nk).reshape(n, nk)
    amounts = np.bincount(uidx[known] * nk + key_codes[known], weights=ev["amount"].to_numpy()[known],
                          minlength=n * nk).reshape(n, nk)
    out: dict[str, np.ndarray] = {}
    for j, key in enumerate(_ALL_KIND_KEYS):
        out[f"{prefix}n:{key}"] = counts[:, j].astype(np.float64)
        if key.startswith("bill:"):
            out[f"{prefix}amt:{key}"] = amounts[:, j]
    out[f"{prefix}n_events"] = np.bincount(uidx, minlength=n).astype(np.float64)
    if prefix:
        return out
    bill = (ev["modality"] == "bill").to_numpy()
    ch = pd.Index(CHANNELS).get_indexer(ev["channel"].to_numpy()[bill])
    ok = ch >= 0
    chan = np.bincount(uidx[bill][ok] * len(CHANNELS) + ch[ok], minlength=n * len(CHANNELS)).reshape(n, len(CHANNELS))
    for j, c in enumerate(CHANNELS):
        out[f"chan:{c}"] = chan[:, j].astype(np.float64)
    ts = ev["timestamp"].to_numpy()
    half = np.datetime64(pd.Timestamp(start_date)) + np.timedelta64(int(days * 43200), "s")
    second = ts >= half
    is_app = _IS_APP_KEY[key_codes]  # code -1 picks the trailing False
    is_stress = _IS_STRESS_KEY[key_codes]
    for name, mask in (("app", is_app), ("stress", is_stress)):
        out[f"{name}_h1"] = np.bincount(uidx[mask & ~second], minlength=n).astype(np.float64)
        out[f"{name}_h2"] = np.bincount(uidx[mask & second], minlength=n).astype(np.float64)
    hour = pd.DatetimeIndex(ts).hour.to_numpy()
    night = (hour >= 23) | (hour < 5)
    out["night"] = np.bincount(uidx[night], minlength=n).astype(np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# QA intents: paraphrased queries, claims re-derivable from evidence, answers rendered from claims


@dataclass(frozen=True)
class Intent:
    """A question intent: its paraphrases, and answers keyed by the claim the evidence supports.

    `claim(evidence)` returns one claim key per evidence row; `answers[claim]` lists every wording an
    answer stating that claim may take. No wording belongs to two claims, so an answer can be checked by
    re-deriving the claim from the evidence (the self-reflection verifier does exactly that).
    """

    intent_id: str
    source: str                                   # "future" (D_future) or "uqa" (D_uqa)
    queries: tuple[str, ...]
    answers: dict[str, tuple[str, ...]]
    claim: Callable[[pd.DataFrame], np.ndarray] = field(repr=False)
    null_claims: frozenset[str] = frozenset({"none", "few", "0|0"})  # "nothing to report" claims
    styles: tuple[str, ...] = QA_STYLES           # the WorldConfig.qa_style values that ask this intent


_COUNT_WORDS = {"one": "one", "two": "two", "few": "a few", "many": "many"}
_HIST_YES = ("Yes: {n} {noun} in the observed period.", "Yes, the records show {n} {noun}.", "{N} {noun} on record, so yes.")
_FUT_YES = ("Yes: {n} {noun} {be} expected next month.", "Likely yes, about {n} {noun} in the coming month.",
            "{N} {noun} {be} expected.")


def _col(ev: pd.DataFrame, keys: Sequence[str], prefix: str = "n:") -> np.ndarray:
    return np.sum([ev[f"{prefix}{k}"].to_numpy(dtype=np.float64) for k in keys], axis=0)


def _bucket(x: np.ndarray) -> np.ndarray:
    return np.select([x < 0.5, x < 1.5, x < 2.5, x < 5.5], ["none", "one", "two", "few"], "many").astype(object)


def _count_intent(intent_id, source, queries, keys, noun, no_answers, prefix=None, yes=None) -> Intent:
    prefix = prefix or ("fut_n:" if source == "future" else "n:")
    yes = yes or (_FUT_YES if source == "future" else _HIST_YES)
    answers = {"none": tuple(no_answers)}
    for b, word in _COUNT_WORDS.items():
        answers[b] = tuple(t.format(n=word, N=word[:1].upper() + word[1:], noun=noun[0] if b == "one" else noun[1],
                                    be="is" if b == "one" else "are") for t in yes)
    return Intent(intent_id, source, tuple(queries), answers, lambda ev: _bucket(_col(ev, keys, prefix)))


def _top_intent(intent_id, source, queries, options, none_answers, prefix) -> Intent:
    """Claim: the option with the largest evidence value (first on ties), or "none" when all are zero."""
    names = list(options)

    def claim(ev):
        values = np.stack([_col(ev, options[o][0], prefix) for o in names], axis=1)
        best = np.asarray(names, dtype=object)[values.argmax(1)]
        return np.where(values.max(1) > 0, best, "none").astype(object)

    answers = {o: tuple(options[o][1]) for o in names}
    answers["none"] = tuple(none_answers)
    return Intent(intent_id, source, tuple(queries), answers, claim)


def _templated(templates, phrase):
    return tuple(t.format(x=phrase, X=phrase[:1].upper() + phrase[1:]) for t in templates)


_SPEND_PHRASES = {
    "groceries": "groceries", "dining": "dining out", "food_delivery": "food delivery", "ride_hailing": "taxi rides",
    "fuel": "fuel", "public_transit": "metro and bus fares", "utilities": "household utilities", "telecom": "the phone plan",
    "rent": "rent", "clothing": "clothing", "electronics": "electronics", "luxury": "luxury goods", "flight": "flights",
    "hotel": "hotels", "overseas": "shopping abroad", "education": "tuition and courses", "childcare": "baby and kids items",
    "healthcare": "healthcare", "insurance_premium": "insurance premiums", "entertainment": "entertainment",
    "gaming": "game credits", "business_supplies": "wholesale supplies for a business",
}
_SPEND_KEYS = [f"bill:{k}" for k in _SPEND_PHRASES]
_CHANNEL_PHRASES = {"credit_card": "credit card", "debit_card": "debit card", "balance": "account balance",
                    "pay_later": "pay-later credit", "bank_transfer": "bank transfer"}
_APP_SEARCH_KEYS = [f"search:{k.kind_id}" for k in _SEARCH_KINDS]
_APP_KEYS = [f"miniprogram:{k.kind_id}" for k in _MP_KINDS] + [f"click:{k.kind_id}" for k in _CLICK_KINDS]
_MP_NAMES = {"bike_sharing": "CityBike sharing", "ride_hailing": "GoCab rides", "food_delivery": "HungryGo food delivery",
             "wealth": "Wealth Center", "insurance": "Insurance Mall", "credit_score": "Credit Score check",
             "loan_center": "Quick Loan center", "cash_reserve": "Cash Reserve",
             "repayment_assistant": "the repayment assistant", "travel_booking": "Trip Planner",
             "hotel_booking": "Hotel Finder", "coupon_center": "Coupon Center", "rewards": "Rewards Points",
             "health": "Health Services", "kids_education": "Kids Education", "utility_payments": "Utility Payments",
             "citizen_services": "Citizen Services", "mini_games": "Mini Games", "flash_sale": "Flash Sale Mall",
             "currency_exchange": "Currency Exchange", "merchant_tools": "Merchant Tools"}
_TOPIC_PHRASES = {"delay_repayment": "ways to delay credit card repayment", "quick_loan": "quick loans and cash",
                  "overdraft": "overdrafts and running short of cash", "debt_help": "help with debt",
                  "credit_score": "credit scores", "index_fund": "index funds", "savings": "savings rates",
                  "wealth": "wealth management", "travel_abroad": "trips abroad and visas",
                  "domestic_travel": "domestic trips and hotels", "coupons": "coupons and discounts",
                  "price_compare": "price comparisons", "insurance": "insurance cover", "kids": "children and schools",
                  "jobs": "jobs and internships", "business": "running a small business", "health": "health questions",
                  "entertainment": "movies and shows", "gaming": "games", "recipes": "recipes", "tech": "phones and gadgets",
                  "app_help": "closing the account or stopping notifications", "noise": "everyday look-ups like weather and news"}
_PAGE_PHRASES = {"home": "the home feed", "bills_overview": "the bill summary", "credit_card": "the credit card page",
                 "repayment": "the repayment page", "loan_offers": "loan offers", "cash_reserve": "the cash reserve offer",
                 "fund_market": "the fund market", "insurance_mall": "the insurance mall", "travel": "travel deals",
                 "coupons": "the coupon wallet", "membership": "membership rewards", "settings": "account settings",
                 "customer_service": "customer service", "transfer": "the transfer page", "savings": "the savings account",
                 "messages": "the message center"}


def _levels(values: np.ndarray, valid: np.ndarray, bounds: Sequence[float], names: Sequence[str], none: str = "none"):
    out = np.asarray(names, dtype=object)[np.searchsorted(np.asarray(bounds), values, side="right")]
    return np.where(valid, out, none).astype(object)


def _per_month(ev: pd.DataFrame, x: np.ndarray, days_col: str = "days") -> np.ndarray:
    return x * 30.0 / ev[days_col].to_numpy(dtype=np.float64)


def _change(a: np.ndarray, b: np.ndarray, enough: np.ndarray, up: str, down: str, flat: str, few: str) -> np.ndarray:
    """Claim for the second amount b vs the first a: up/down when it moves by > 30%, else flat."""
    return np.select([~enough, b > 1.3 * a, a > 1.3 * b], [few, up, down], flat).astype(object)


def _breadth(ev: pd.DataFrame) -> np.ndarray:
    used = np.stack([ev[f"n:miniprogram:{k.kind_id}"].to_numpy() > 0 for k in _MP_KINDS], axis=1).sum(1)
    return _levels(used, used > 0, [2.5, 5.5], ["few", "several", "many"])


def _new_services(ev: pd.DataFrame) -> np.ndarray:
    new = np.stack([(ev[f"fut_n:miniprogram:{k.kind_id}"].to_numpy() > 0) & (ev[f"n:miniprogram:{k.kind_id}"].to_numpy() == 0)
                    for k in _MP_KINDS], axis=1).sum(1)
    return _bucket(new.astype(np.float64))


def _travel_claim(ev: pd.DataFrame) -> np.ndarray:
    f = np.minimum(ev["fut_n:bill:flight"].to_numpy(), 3).astype(int)
    h = np.minimum(ev["fut_n:bill:hotel"].to_numpy(), 3).astype(int)
    return np.char.add(np.char.add(f.astype(str), "|"), h.astype(str)).astype(object)


def _travel_answers() -> dict[str, tuple[str, ...]]:
    fl = {1: "a flight booking", 2: "two flight bookings", 3: "several flight bookings"}
    ho = {1: "a hotel stay", 2: "two hotel stays", 3: "several hotel stays"}
    out = {"0|0": ("No travel spending is expected.", "No trips are expected next month.",
                   "Unlikely: no flights or hotels ahead.")}
    for f in range(4):
        for h in range(4):
            if f == h == 0:
                continue
            items = [x for x in (fl.get(f), ho.get(h)) if x]
            phrase = " and ".join(items)
            be = "is" if len(items) == 1 and (f == 1 or h == 1) else "are"
            out[f"{f}|{h}"] = (f"Yes: {phrase} {be} expected.", f"Likely: {phrase} next month.",
                               f"A trip is likely, with {phrase}.")
    return out


_STRESS_KEYS = [f"{m}:{k}" for m, k in sorted(STRESS_KINDS)]


def _likelihood_intent(intent_id: str, queries, keys, what: str) -> Intent:
    """Graded D_future: how likely `what` is next month, from the monthly rate over history and next month."""
    answers = {
        "none": (f"Very unlikely: no {what} so far and none next month.", f"No: {what} never show up."),
        "unlikely": (f"Unlikely: {what} are rare for this user.", f"Only a small chance of {what} next month."),
        "possible": (f"Possible: {what} happen now and then.", f"There is a fair chance of {what} next month."),
        "likely": (f"Likely: {what} are a regular habit.", f"Yes, {what} are expected next month as usual."),
    }

    def claim(ev: pd.DataFrame) -> np.ndarray:
        n = _col(ev, keys, "n:") + _col(ev, keys, "fut_n:")
        rate = n * 30.0 / (ev["days"].to_numpy(dtype=np.float64) + ev["future_days"].to_numpy(dtype=np.float64))
        return _levels(rate, n > 0, [0.35, 1.0], ["unlikely", "possible", "likely"])

    return Intent(intent_id, "future", tuple(queries), answers, claim, styles=("graded",))


def _change_intent(intent_id: str, queries, keys, what: str, *, min_total: int) -> Intent:
    """Graded D_future: next month's rate of `what` against the history's monthly rate (up/down by > 30%)."""
    answers = {
        "none": (f"No {what} before or next month.", f"Nothing to compare: no {what} at all."),
        "few": (f"Too little {what} to tell a change.", f"Hardly any {what}, so no clear change."),
        "quiet": (f"It stops: no {what} next month.", f"Goes quiet next month, with no {what}."),
        "up": (f"More: {what} rises next month.", f"Yes, {what} increases over the usual level."),
        "down": (f"Less: {what} falls next month.", f"No, {what} drops below the usual level."),
        "flat": (f"About the same {what} as usual.", f"No big change in {what} next month."),
    }

    def claim(ev: pd.DataFrame) -> np.ndarray:
        past = _per_month(ev, _col(ev, keys, "n:"))
        fut_n = _col(ev, keys, "fut_n:")
        nxt = _per_month(ev, fut_n, "future_days")
        total = _col(ev, keys, "n:") + fut_n
        out = _change(past, nxt, total >= min_total, "up", "down", "flat", "few")
        out = np.where((fut_n == 0) & (past > 0) & (total >= min_total), "quiet", out)
        return np.where(total == 0, "none", out).astype(object)

    return Intent(intent_id, "future", tuple(queries), answers, claim, styles=("graded",))


def _build_intents() -> dict[str, Intent]:
    I: list[Intent] = []
    top_spend = {k: ([f"bill:{k}"], _templated(("Mostly {x}.", "The largest share goes to {x}.",
                                                 "{X} takes the biggest part of the budget."), p))
                 for k, p in _SPEND_PHRASES.items()}
    I.append(_top_intent("top_spend", "uqa", (
        "What does this user spend most on?", "Where does most of this user's money go?",
        "Which spending category is largest for this user?", "What is this user's biggest expense type?"),
        top_spend, ("No spending is recorded.", "There are no purchases to go on."), "amt:"))
    chan = {c: ([c], _templated(("Mostly by {x}.", "Usually pays with {x}.", "The preferred method is {x}."), p))
            for c, p in _CHANNEL_PHRASES.items()}
    I.append(_top_intent("payment_channel", "uqa", (
        "How does this user usually pay?", "Which payment method does this user prefer?",
        "What is this user's main way of paying bills?"), chan, ("No payments are recorded.",), "chan:"))
    level_answers = {
        "none": ("No spending is recorded.", "Nothing was spent in the period."),
        "low": ("Low: under 1,500 a month.", "Modest spending, below 1,500 per month.", "A light spender."),
        "moderate": ("Moderate: between 1,500 and 5,000 a month.", "Mid-range spending of a few thousand a month.",
                     "A moderate spender."),
        "high": ("High: over 5,000 a month.", "A big spender, above 5,000 monthly.", "Heavy spending every month."),
    }
    I.append(Intent("spend_level", "uqa", (
        "How much does this user spend in a typical month?", "Is this user a big spender?",
        "What is this user's monthly spending level?"), level_answers,
        lambda ev: _levels(_per_month(ev, _col(ev, _SPEND_KEYS, "amt:")), _col(ev, _SPEND_KEYS, "amt:") > 0,
                           [1500.0, 5000.0], ["low", "moderate", "high"])))
    counts = [
        ("eats_out", ("Does this user often eat out or order delivery?",
                      "How often does this user buy meals from restaurants or delivery apps?",
                      "Is dining out a habit for this user?"),
         ["bill:dining", "bill:food_delivery"], ("restaurant or delivery payment", "restaurant or delivery payments"),
         ("Rarely: no restaurant or delivery payments.", "No, meals out do not show up.")),
        ("groceries", ("Does this user buy groceries regularly?", "How often does this user shop at supermarkets?",
                       "Does this user pay for groceries in the app?"),
         ["bill:groceries"], ("grocery purchase", "grocery purchases"),
         ("No grocery purchases are recorded.", "No, groceries are bought elsewhere.")),
        ("recent_travel", ("Has this user travelled recently?", "Did this user pay for flights or hotels recently?",
                           "Any recent trips for this user?"),
         ["bill:flight", "bill:hotel"], ("flight or hotel payment", "flight or hotel payments"),
         ("No flight or hotel spending in the period.", "No sign of recent trips.")),
        ("spent_abroad", ("Has this user spent money abroad?", "Any overseas purchases by this user?",
                          "Did this user pay in a foreign country recently?"),
         ["bill:overseas"], ("purchase abroad", "purchases abroad"),
         ("No spending abroad.", "No overseas purchases are recorded.")),
        ("invests", ("Does this user invest in funds?", "Has this user bought any investment products?",
                     "Does this user put money into funds?"),
         ["bill:fund_purchase"], ("fund purchase", "fund purchases"),
         ("No fund purchases are recorded.", "No, this user does not invest in funds here.")),
        ("pays_insurance", ("Does this user pay insurance premiums?", "Is this user paying for an insurance policy?",
                            "Any insurance payments from this user?"),
         ["bill:insurance_premium"], ("insurance premium payment", "insurance premium payments"),
         ("No insurance premiums are paid.", "No insurance payments are recorded.")),
        ("repays_loan", ("Is this user repaying a loan?", "Does this user have loan instalments to pay?",
                         "Any loan repayment activity for this user?"),
         ["bill:loan_repayment"], ("loan instalment", "loan instalments"),
         ("No loan repayments are recorded.", "No, there is no loan to repay.")),
        ("cash_advances", ("Has this user taken cash advances?", "Did this user withdraw cash on credit?",
                           "Any emergency cash borrowing by this user?"),
         ["bill:cash_advance"], ("cash advance", "cash advances"),
         ("No cash advances are recorded.", "No borrowing of cash on credit.")),
        ("late_fees", ("Has this user paid any late fees?", "Were there late payment charges on this user's account?",
                       "Did this user miss a payment deadline?"),
         ["bill:late_fee"], ("late payment fee", "late payment fees"),
         ("No late fees: payments were on time.", "No late payment charges are recorded.")),
        ("coupon_hunter", ("Does this user hunt for coupons or discounts?", "Is this user a deal seeker?",
                           "How much does this user use coupons?"),
         ["miniprogram:coupon_center", "click:coupons", "search:coupons"], ("coupon action", "coupon actions"),
         ("No interest in coupons shows up.", "Not a deal seeker: no coupon activity.")),
        ("luxury", ("Does this user buy luxury goods?", "Any high-end shopping by this user?",
                    "Does this user spend on jewellery or designer brands?"),
         ["bill:luxury"], ("luxury purchase", "luxury purchases"),
         ("No luxury purchases.", "No high-end shopping is recorded.")),
        ("has_kids", ("Does this user spend on children?", "Is there evidence this user has kids?",
                      "Does this user pay for baby or school items?"),
         ["bill:childcare", "bill:education", "miniprogram:kids_education"], ("child-related payment or visit",
                                                                              "child-related payments or visits"),
         ("No spending on children shows up.", "No sign of children in the records.")),
        ("runs_business", ("Does this user buy supplies for a business?", "Does this user run a small shop or business?",
                           "Any wholesale purchases by this user?"),
         ["bill:business_supplies", "miniprogram:merchant_tools"], ("business purchase or tool use",
                                                                     "business purchases or tool uses"),
         ("No business activity shows up.", "No wholesale purchases are recorded.")),
        ("pays_utilities", ("Does this user pay household bills through the app?", "Are utility bills paid from this account?",
                            "Does this user pay electricity or water bills here?"),
         ["bill:utilities", "bill:telecom"], ("utility or phone bill", "utility or phone bills"),
         ("No household bills are paid here.", "No utility payments are recorded.")),
        ("money_worries", ("Does this user search about borrowing or repayment problems?",
                           "Has this user looked up ways to borrow or delay repayment?",
                           "Any signs of money worries in this user's searches?"),
         ["search:delay_repayment", "search:quick_loan", "search:overdraft", "search:debt_help"],
         ("worried money search", "worried money searches"),
         ("No searches about borrowing or repayment.", "No money worries show in searches.")),
        ("trip_research", ("Is this user researching trips?", "Has this user searched for flights, hotels or visas?",
                           "Is travel planning visible in this user's searches?"),
         ["search:travel_abroad", "search:domestic_travel"], ("travel search", "travel searches"),
         ("No travel searches.", "No sign of trip planning in searches.")),
        ("browses_funds", ("Does this user browse investment products?", "Has this user looked at funds in the app?",
                           "Does this user check the fund market?"),
         ["click:fund_market", "miniprogram:wealth"], ("fund market visit", "fund market visits"),
         ("No fund browsing.", "The fund market is never visited.")),
        ("healthcare", ("Does this user spend on healthcare?", "Any pharmacy or clinic payments by this user?",
                        "Does this user pay for medical care?"),
         ["bill:healthcare"], ("pharmacy or clinic payment", "pharmacy or clinic payments"),
         ("No healthcare spending.", "No pharmacy or clinic payments are recorded.")),
        ("leisure", ("Does this user spend on entertainment or games?", "Does this user pay for movies, concerts or games?",
                     "Is leisure spending visible for this user?"),
         ["bill:entertainment", "bill:gaming"], ("entertainment or game payment", "entertainment or game payments"),
         ("No entertainment or game spending.", "No leisure spending is recorded.")),
        ("insurance_interest", ("Is this user interested in insurance?", "Has this user looked at insurance products?",
                                "Does this user browse policies or coverage?"),
         ["click:insurance_mall", "miniprogram:insurance", "search:insurance"], ("insurance visit or search",
                                                                                 "insurance visits or searches"),
         ("No interest in insurance shows up.", "Insurance products are never viewed.")),
        ("contacts_service", ("Does this user contact customer service?",
                              "Has this user made a call or chat request to customer service?",
                              "How often does this user reach out to the service centre?"),
         ["click:customer_service"], ("customer service contact", "customer service contacts"),
         ("Never contacts customer service.", "No customer service contact is recorded.")),
        ("cash_reserve_interest", ("Has this user looked at the cash reserve product?",
                                   "Is this user aware of the cash reserve credit line?",
                                   "Did this user check emergency credit options?"),
         ["click:cash_reserve", "miniprogram:cash_reserve"], ("cash reserve visit", "cash reserve visits"),
         ("The cash reserve offer was never viewed.", "No interest in emergency credit shows up.")),
    ]
    for intent_id, queries, keys, noun, nos in counts:
        I.append(_count_intent(intent_id, "uqa", queries, keys, noun, nos))
    transport = {
        "taxi": (["bill:ride_hailing"], ("Mostly by taxi or ride-hailing.", "Takes taxis most of the time.", "Usually books rides.")),
        "car": (["bill:fuel"], ("Drives: regular fuel purchases.", "Mostly by car, judging by fuel spending.",
                                "Fills up the car often, so drives.")),
        "metro": (["bill:public_transit"], ("Mostly by metro and bus.", "Public transport is the main way.",
                                            "Pays metro and bus fares most.")),
        "bike": (["miniprogram:bike_sharing"], ("Mostly by shared bike.", "Rides shared bikes most often.",
                                                "Bike sharing is the main way around.")),
    }
    I.append(_top_intent("transport", "uqa", (
        "How does this user usually get around?", "What is this user's main way of travelling in the city?",
        "Does this user drive, take taxis or use the metro?"), transport,
        ("No transport activity is recorded.", "Unclear: no rides, fuel or fares."), "n:"))
    I.append(Intent("night_owl", "uqa", (
        "Is this user active late at night?", "Does this user use the app at night?", "Is this user a night owl?"),
        {"none": ("No activity to judge from.",),
         "rarely": ("Rarely: almost everything happens during the day.", "No, activity is in daytime hours."),
         "sometimes": ("Sometimes: a share of activity comes after 11 pm.", "Occasionally active late at night."),
         "often": ("Yes, often active between 11 pm and 5 am.", "A night owl: much of the activity is late at night.")},
        lambda ev: _levels(ev["night"].to_numpy() / np.maximum(ev["n_events"].to_numpy(), 1.0), ev["n_events"].to_numpy() > 0,
                           [0.08, 0.2], ["rarely", "sometimes", "often"])))
    mp_top = {k: ([f"miniprogram:{k}"], _templated(("{X} is opened most.", "Mostly {x}.", "The favourite is {x}."), name))
              for k, name in _MP_NAMES.items()}
    I.append(_top_intent("top_miniprogram", "uqa", (
        "Which mini-program does this user open most?", "What is this user's favourite mini-program?",
        "Which service does this user use most often?"), mp_top, ("No mini-programs are used.",), "n:"))
    I.append(Intent("miniprogram_breadth", "uqa", (
        "How many different mini-programs does this user use?", "Does this user use many services?",
        "How broad is this user's mini-program use?"),
        {"none": ("None: no mini-programs are opened.",),
         "few": ("Only one or two mini-programs.", "A narrow set: one or two services."),
         "several": ("Several: three to five mini-programs.", "A handful of services, three to five."),
         "many": ("Many: six or more mini-programs.", "A broad user of six or more services.")}, _breadth))
    I.append(Intent("activity_level", "uqa", (
        "How active is this user in the app?", "How often does this user open the app?", "Is this user a heavy app user?"),
        {"rarely": ("Rarely active: less than once a week.", "Barely uses the app."),
         "occasionally": ("Occasionally: a few times a week.", "A light user, a few sessions a week."),
         "regularly": ("Regularly: most days of the week.", "An active user, several times a week."),
         "daily": ("Very active: many sessions every day.", "A heavy user, in the app daily.")},
        lambda ev: _levels(_col(ev, _APP_KEYS + _APP_SEARCH_KEYS) * 7.0 / ev["days"].to_numpy(), np.ones(len(ev), bool),
                           [1.0, 5.0, 15.0], ["rarely", "occasionally", "regularly", "daily"])))
    I.append(Intent("activity_trend", "uqa", (
        "Is this user's app activity rising or falling?", "Has this user been using the app more or less lately?",
        "How has this user's engagement changed over the period?"),
        {"rising": ("Rising: more app use in recent weeks.", "Using the app more lately."),
         "falling": ("Falling: app use has dropped off lately.", "Using the app less and less."),
         "stable": ("Stable: about the same throughout.", "No clear change in app use."),
         "few": ("Too little app use to tell.",)},
        lambda ev: _change(ev["app_h1"].to_numpy(), ev["app_h2"].to_numpy(), ev["app_h1"].to_numpy() + ev["app_h2"].to_numpy() >= 6,
                           "rising", "falling", "stable", "few")))
    I.append(Intent("borrowing_trend", "uqa", (
        "Are this user's borrowing-related actions increasing?", "Is this user turning to credit more often lately?",
        "Has borrowing activity picked up recently for this user?"),
        {"rising": ("Yes: borrowing and repayment activity cluster late in the period.",
                    "Increasing: more loan and repayment actions recently."),
         "falling": ("No, borrowing activity has eased off lately.", "Decreasing: fewer loan actions recently."),
         "stable": ("Steady: borrowing activity is spread evenly.", "About the same over the period."),
         "few": ("Too little borrowing activity to tell.", "Hardly any borrowing activity at all.")},
        lambda ev: _change(ev["stress_h1"].to_numpy(), ev["stress_h2"].to_numpy(),
                           ev["stress_h1"].to_numpy() + ev["stress_h2"].to_numpy() >= 3, "rising", "falling", "stable", "few")))
    topics = {k: ([f"search:{k}"], _templated(("Mostly {x}.", "Searches focus on {x}.", "Often looks up {x}."), p))
              for k, p in _TOPIC_PHRASES.items()}
    I.append(_top_intent("top_search", "uqa", (
        "What does this user search for most?", "What topics does this user look up?",
        "What is this user most curious about in search?"), topics, ("No searches are recorded.", "This user never searches."), "n:"))
    pages = {k: ([f"click:{k}"], _templated(("Mostly {x}.", "Spends the most time on {x}.", "{X} is visited most."), p))
             for k, p in _PAGE_PHRASES.items()}
    I.append(_top_intent("top_page", "uqa", (
        "Which part of the app does this user browse most?", "Which page does this user visit most?",
        "Where does this user spend time in the app?"), pages, ("No page views are recorded.",), "n:"))
    I.append(Intent("age_band", "uqa", (
        "What age group is this user in?", "How old is this user roughly?", "Which age bracket does this user fall into?"),
        {"under25": ("Under 25.", "Probably a young adult under 25."), "25to39": ("Between 25 and 39.", "In their late twenties or thirties."),
         "40to59": ("Between 40 and 59.", "Middle-aged, 40 to 59."), "60plus": ("60 or older.", "Probably retired, 60 plus.")},
        lambda ev: _levels(ev["profile:age"].to_numpy(), np.ones(len(ev), bool), [24.5, 39.5, 59.5],
                           ["under25", "25to39", "40to59", "60plus"])))
    I.append(Intent("credit_limit", "uqa", (
        "How large is this user's credit limit?", "What credit line does this user have?", "Is this user's credit limit high or low?"),
        {"low": ("Low: under 5,000.", "A small credit line below 5,000."),
         "medium": ("Medium: 5,000 to 20,000.", "A mid-sized credit line."),
         "high": ("High: above 20,000.", "A large credit line over 20,000.")},
        lambda ev: _levels(ev["profile:credit_limit"].to_numpy(), np.ones(len(ev), bool), [4999.0, 20000.0],
                           ["low", "medium", "high"])))
    I.append(Intent("credit_use", "uqa", (
        "How much of the credit line does this user use?", "Is this user close to the credit limit?",
        "How heavily does this user use available credit?"),
        {"low": ("Lightly: under 30% of the limit.", "Far from the limit."),
         "moderate": ("Moderately: 30% to 70% of the limit.", "Uses a fair part of the credit line."),
         "high": ("Heavily: over 70% of the limit.", "Close to the credit limit.")},
        lambda ev: _levels(ev["profile:credit_utilisation"].to_numpy(), np.ones(len(ev), bool), [0.3, 0.7],
                           ["low", "moderate", "high"])))

    # D_future: grounded in the following window
    travel_queries = (
        "Will this user book travel next month?", "Is a trip likely for this user in the coming month?",
        "Will this user pay for flights or hotels next month?", "Any travel bookings expected for this user next month?")
    I.append(Intent("future_travel", "future", travel_queries, _travel_answers(), _travel_claim, styles=("counts",)))
    fut_no = "No {x} is expected next month."
    future_counts = [
        ("future_abroad", ("Will this user spend money abroad next month?",
                           "Is overseas spending expected from this user in the next 30 days?",
                           "Will this user make purchases in another country next month?"),
         ["bill:overseas"], ("purchase abroad", "purchases abroad"), (fut_no.format(x="spending abroad"), "Unlikely to spend abroad.")),
        ("future_fund", ("Will this user buy a fund next month?", "Is this user going to invest in funds in the coming month?",
                         "Will there be fund purchases from this user in the next 30 days?"),
         ["bill:fund_purchase"], ("fund purchase", "fund purchases"), (fut_no.format(x="fund purchase"), "Unlikely to buy funds.")),
        ("future_insurance", ("Will this user pay for insurance next month?", "Is an insurance payment expected from this user next month?",
                              "Will this user buy or renew a policy in the coming month?"),
         ["bill:insurance_premium"], ("insurance payment", "insurance payments"),
         (fut_no.format(x="insurance payment"), "Unlikely to pay for a policy.")),
        ("future_borrowing", ("Will this user borrow money next month?", "Will this user take out a loan or cash advance next month?",
                              "Is this user likely to draw on credit in the next month?", "Will this user need emergency cash next month?"),
         ["bill:cash_advance"], ("cash advance", "cash advances"), (fut_no.format(x="borrowing"), "Unlikely to need a cash advance.")),
        ("future_loan_repayment", ("Will this user make loan repayments next month?",
                                   "Are loan instalments expected from this user next month?",
                                   "Will this user pay back a loan in the coming month?"),
         ["bill:loan_repayment"], ("loan instalment", "loan instalments"),
         (fut_no.format(x="loan repayment"), "No instalments are due.")),
        ("future_late_fee", ("Will this user incur a late payment charge in the coming month?",
                             "Is a late fee expected on this user's account next month?",
                             "Will this user miss a payment deadline next month?"),
         ["bill:late_fee"], ("late payment fee", "late payment fees"),
         (fut_no.format(x="late fee"), "Payments should be on time next month.")),
        ("future_coupons", ("Will this user use coupons next month?", "Is this user going to claim discounts in the coming month?",
                            "Will this user redeem any deals next month?"),
         ["miniprogram:coupon_center", "click:coupons"], ("coupon redemption", "coupon redemptions"),
         (fut_no.format(x="coupon use"), "Unlikely to redeem coupons.")),
    ]
    for intent_id, queries, keys, noun, nos in future_counts:
        I.append(replace(_count_intent(intent_id, "future", queries, keys, noun, nos), styles=("counts",)))
    # "graded" style: the same questions answered with a likelihood read from both windows, not a count of next
    # month's rare events (mostly "none"), plus how app use and money troubles change next month.
    likely = [(iid, queries, keys, noun[1]) for iid, queries, keys, noun, _ in future_counts]
    likely.append(("future_travel", travel_queries, ["bill:flight", "bill:hotel"], "flight or hotel payments"))
    for intent_id, queries, keys, what in likely:
        I.append(_likelihood_intent(f"{intent_id}_graded", queries, keys, what))
    I.append(_change_intent("future_app_change", (
        "Will this user use the app more or less next month?", "How will this user's app use change next month?",
        "Is this user's engagement with the app going up or down next month?"),
        _APP_KEYS + _APP_SEARCH_KEYS, "app use", min_total=4))
    I.append(_change_intent("future_money_troubles", (
        "Will this user's money troubles get worse next month?", "Is this user heading into financial difficulty next month?",
        "Will this user need more loans, advances or repayment help next month than before?"),
        _STRESS_KEYS, "borrowing, repayment and cash-shortage activity", min_total=2))
    new_answers = {"none": ("No new mini-programs are expected.", "Will stick to the usual services.")}
    for b, word in _COUNT_WORDS.items():
        noun = "new mini-program" if b == "one" else "new mini-programs"
        new_answers[b] = (f"Yes: {word} {noun} will be tried.", f"Likely to try {word} {noun}.")
    I.append(Intent("future_new_miniprogram", "future", (
        "Will this user try a new mini-program next month?", "Is this user likely to open a service they have not used before?",
        "Will this user start opening any new mini-program in the coming month?"), new_answers, _new_services))
    I.append(Intent("future_activity", "future", (
        "How active will this user be in the app next month?", "Will this user keep using the app next month?",
        "What app usage should we expect from this user in the coming month?"),
        {"dormant": ("No app use is expected next month.", "The user is expected to go quiet."),
         "low": ("Light use: a few sessions next month.", "Only occasional app use is expected."),
         "moderate": ("Moderate use is expected next month.", "Regular but not heavy app use ahead."),
         "high": ("Heavy use: many sessions next month.", "Very active in the app next month.")},
        lambda ev: _levels(_per_month(ev, _col(ev, _APP_KEYS, "fut_n:"), "future_days"), np.ones(len(ev), bool),
                           [0.5, 4.0, 20.0], ["dormant", "low", "moderate", "high"])))
    fut_spend = {k: ([f"bill:{k}"], _templated(("Mostly {x} next month.", "{X} will lead spending.",
                                                 "Expect the biggest outlay on {x}."), p)) for k, p in _SPEND_PHRASES.items()}
    I.append(_top_intent("future_top_spend", "future", (
        "What will this user spend most on next month?", "Which category will lead this user's spending next month?",
        "Where will most of this user's money go in the next 30 days?"), fut_spend,
        ("No spending is expected next month.", "Nothing is expected to be spent."), "fut_amt:"))
    I.append(Intent("future_spend_change", "future", (
        "Will this user spend more next month than usual?", "How will this user's spending next month compare with recent months?",
        "Is this user's spending going up next month?"),
        {"up": ("More: spending is expected to rise.", "Yes, higher spending than usual."),
         "down": ("Less: spending is expected to fall.", "No, spending will drop below the usual level."),
         "flat": ("About the same as usual.", "Spending should stay at its usual level."),
         "few": ("No spending to compare.",)},
        lambda ev: _change(_per_month(ev, _col(ev, _SPEND_KEYS, "amt:")),
                           _per_month(ev, _col(ev, _SPEND_KEYS, "fut_amt:"), "future_days"),
                           _col(ev, _SPEND_KEYS, "amt:") + _col(ev, _SPEND_KEYS, "fut_amt:") > 0, "up", "down", "flat", "few")))
    intents = {i.intent_id: i for i in I}
    if len(intents) != len(I):
        raise AssertionError("duplicate intent ids")
    for it in I:
        seen: dict[str, str] = {}
        for c, answers in it.answers.items():
            for a in answers:
                if a in seen:
                    raise AssertionError(f"intent {it.intent_id!r}: answer {a!r} belongs to claims {seen[a]!r} and {c!r}")
                seen[a] = c
    return intents


INTENTS: dict[str, Intent] = _build_intents()


# ----------------------------------------------------------------------------------------------
# QA synthesis and self-reflection


def _synthesise_qa(rng: np.random.Generator, evidence: pd.DataFrame, config: WorldConfig) -> pd.DataFrame:
    """Draw intents per user, render a paraphrased query and an answer from the evidence's claim; a
    `hallucination_rate` share of answers state a wrong claim (the synthesiser read wrong evidence).
    Like an LLM asked to write about salient behaviour, the synthesiser prefers intents where the
    user has something to report (`salient_qa_boost`) but still asks the rest.
    Returns the qa columns plus a `hallucinated` flag, before self-reflection."""
    intents = [it for it in INTENTS.values() if config.qa_style in it.styles]
    n, n_int = len(evidence), len(intents)
    claims = [it.claim(evidence) for it in intents]
    weights = np.array([config.future_qa_weight if it.source == "future" else 1.0 for it in intents])[None, :]
    salient = np.stack([~np.isin(c, list(it.null_claims)) for c, it in zip(claims, intents)], axis=1)
    weights = weights * np.where(salient, config.salient_qa_boost, 1.0)
    k = rng.integers(config.qa_per_user_min, config.qa_per_user_max + 1, size=n)
    scores = np.log(weights) + rng.gumbel(size=(n, n_int))
    order = np.argsort(-scores, axis=1, kind="stable")
    user, rank = np.nonzero(np.arange(n_int)[None, :] < k[:, None])
    intent_idx = order[user, rank]
    n_rows = user.size
    halluc = rng.random(n_rows) < config.hallucination_rate
    shift = rng.random(n_rows)
    q_pick = rng.random(n_rows)
    a_pick = rng.random(n_rows)
    uids = evidence.index.to_numpy()
    rows = {"user_id": [], "source": [], "intent": [], "query": [], "answer": []}
    for r in range(n_rows):
        it = intents[intent_idx[r]]
        claim = claims[intent_idx[r]][user[r]]
        if halluc[r]:
            domain = list(it.answers)
            claim = domain[(domain.index(claim) + 1 + int(shift[r] * (len(domain) - 1))) % len(domain)]
        answers = it.answers[claim]
        rows["user_id"].append(uids[user[r]])
        rows["source"].append(it.source)
        rows["intent"].append(it.intent_id)
        rows["query"].append(it.queries[int(q_pick[r] * len(it.queries))])
        rows["answer"].append(answers[int(a_pick[r] * len(answers))])
    qa = pd.DataFrame({c: pd.array(v, dtype="str") for c, v in rows.items()})
    qa["hallucinated"] = halluc
    return qa


def verify_answers(qa: pd.DataFrame, evidence: pd.DataFrame) -> np.ndarray:
    """Self-reflection: True where the answer states the claim the user's evidence supports.

    For each row the claim of its intent is re-derived from `evidence` (see `build_evidence`) and the
    answer must be one of that claim's wordings; an answer grounded in other evidence fails. Raises
    ValueError naming an unknown intent or a user missing from the evidence.
    """
    for col in ("user_id", "intent", "answer"):
        if col not in qa.columns:
            raise ValueError(f"verify_answers: qa lacks column {col!r}")
    unknown = sorted(set(qa["intent"]) - set(INTENTS))
    if unknown:
        raise ValueError(f"verify_answers: unknown intent(s) {unknown[:5]}; known intents: {', '.join(INTENTS)}")
    missing = pd.Index(qa["user_id"].unique()).difference(evidence.index)
    if len(missing):
        raise ValueError(f"verify_answers: user(s) {missing[:5].tolist()} have no evidence rows")
    ok = np.zeros(len(qa), bool)
    intent_col = qa["intent"].to_numpy()
    answers = qa["answer"].to_numpy()
    for iid in pd.unique(intent_col):
        rows = np.flatnonzero(intent_col == iid)
        it = INTENTS[iid]
        sub = evidence.loc[qa["user_id"].to_numpy()[rows]]
        claims = it.claim(sub)
        ok[rows] = [a in it.answers[c] for a, c in zip(answers[rows], claims)]
    return ok


def answer_claims(qa: pd.DataFrame) -> np.ndarray:
    """The claim each QA row's answer states ("intent|claim"), read back from the intents' wordings.

    Paraphrased answers of one claim share a key, so pre-training can treat them as one positive class
    (false-negative masking by claim, not by exact text). Rows of an unknown intent, or whose answer is no
    wording of it (a dataset's own QA), fall back to "intent|answer text"."""
    lookup = {(iid, a): c for iid, it in INTENTS.items() for c, wordings in it.answers.items() for a in wordings}
    intents = qa["intent"].astype(str).to_numpy() if "intent" in qa.columns else np.full(len(qa), "", object)
    answers = qa["answer"].astype(str).to_numpy()
    return np.array([f"{i}|{lookup.get((i, a), a)}" for i, a in zip(intents, answers)], dtype=object)


# ----------------------------------------------------------------------------------------------
# task labels: calibrated true probabilities


def _task_scores(spec: TaskSpec, feats: np.ndarray) -> np.ndarray:
    raw = _linear(feats, spec.weights)
    for a, b, c in spec.interactions:
        raw = raw + c * feats[:, _F[a]] * feats[:, _F[b]]
    return raw


def _expected_auc(p_sorted: np.ndarray) -> float:
    """Expected AUC of Bernoulli(p) labels scored by p itself (p sorted ascending, no ties)."""
    neg = 1.0 - p_sorted
    below = np.cumsum(neg) - neg
    den = p_sorted.sum() * neg.sum() - (p_sorted * neg).sum()
    return float((p_sorted * below).sum() / den)


def _intercept_for(z: np.ndarray, scale: float, rate: float, start: float | None = None) -> float:
    """Newton's method (steps clipped to +-2, which keeps it from overshooting on flat tails) for the
    intercept a with mean(sigmoid(a + scale z)) = rate."""
    a = math.log(rate / (1.0 - rate)) if start is None else start
    for _ in range(100):
        p = _sigmoid(a + scale * z)
        step = float(np.clip((p.mean() - rate) / max((p * (1.0 - p)).mean(), 1e-12), -2.0, 2.0))
        a -= step
        if abs(step) < 1e-9:
            break
    return a


_CALIBRATION_CACHE: dict[tuple, dict[str, tuple[float, float, float, float]]] = {}


def calibrate_tasks(config: WorldConfig) -> dict[str, tuple[float, float, float, float]]:
    """Per task: (score mean, score std, intercept, scale) so that on a fixed large calibration sample
    the positive rate equals the task's target rate and the expected oracle AUC its target AUC (at
    difficulty 1; larger difficulty divides the scale). Independent of the world seed and size."""
    key = (float(config.activity_sigma), float(config.difficulty))
    if key in _CALIBRATION_CACHE:
        return _CALIBRATION_CACHE[key]
    lat = _sample_latents(np.random.default_rng(CALIBRATION_SEED), CALIBRATION_USERS, config)
    out = {}
    for spec in TASK_SPECS:
        raw = _task_scores(spec, lat.feats)
        mu, sd = float(raw.mean()), float(raw.std())
        z = np.sort((raw - mu) / sd)
        state = {"a": None}

        def gap(scale: float) -> float:
            state["a"] = _intercept_for(z, scale, spec.target_rate, state["a"])
            return _expected_auc(_sigmoid(state["a"] + scale * z)) - spec.target_auc

        scale = brentq(gap, 0.05, 12.0, xtol=1e-6) / float(config.difficulty)
        out[spec.task_id] = (mu, sd, _intercept_for(z, scale, spec.target_rate, state["a"]), scale)
    _CALIBRATION_CACHE[key] = out
    return out


def _tasks_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "task_id": pd.array([t.task_id for t in TASK_SPECS], dtype="str"),
        "domain": pd.array([t.domain for t in TASK_SPECS], dtype="str"),
        "query": pd.array([t.query for t in TASK_SPECS], dtype="str"),
        "description": pd.array([t.description for t in TASK_SPECS], dtype="str"),
    })


def oracle_probabilities(feats: np.ndarray, config: WorldConfig) -> np.ndarray:
    """(n_users, n_tasks) true label probabilities from latent features (columns in TASK_IDS order)."""
    cal = calibrate_tasks(config)
    out = np.empty((feats.shape[0], len(TASK_SPECS)))
    for j, spec in enumerate(TASK_SPECS):
        mu, sd, a, s = cal[spec.task_id]
        out[:, j] = _sigmoid(a + s * (_task_scores(spec, feats) - mu) / sd)
    return out


# ----------------------------------------------------------------------------------------------
# the world


def _ks(y: np.ndarray, s: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.max(tpr - fpr))


def _task_metrics(labels: pd.DataFrame, users: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    ids = users.loc[users["split"] == split, "user_id"]
    sub = labels[labels["user_id"].isin(ids)]
    rows = []
    for task_id, g in sub.groupby("task_id", sort=False):
        y = g["label"].to_numpy()
        s = g["oracle_prob"].to_numpy()
        both = 0 < y.sum() < len(y)
        rows.append({"task_id": task_id, "positive_rate": float(y.mean()) if len(y) else float("nan"),
                     "oracle_auc": float(roc_auc_score(y, s)) if both else float("nan"),
                     "oracle_ks": _ks(y, s) if both else float("nan"), "n_test": int(len(y))})
    return pd.DataFrame(rows, columns=["task_id", "positive_rate", "oracle_auc", "oracle_ks", "n_test"])


def world_summary(world: World) -> pd.DataFrame:
    """One row per task: task_id, domain, positive_rate, oracle_auc, oracle_ks and n_test on the test split."""
    m = _task_metrics(world.labels, world.users)
    m = world.tasks[["task_id", "domain"]].merge(m, on="task_id", how="left")
    return m[["task_id", "domain", "positive_rate", "oracle_auc", "oracle_ks", "n_test"]]


def _round(x: float) -> float:
    return float(round(float(x), 6))


def generate_world(config: WorldConfig, *, show_progress: bool = False) -> World:
    """Simulate the whole world for `config`: users, events, profiles, QA (after self-reflection),
    tasks and labels, plus a manifest. Deterministic in `config` (seed included)."""
    if not isinstance(config, WorldConfig):
        raise TypeError(f"generate_world: config must be a WorldConfig, got {type(config).__name__}")
    steps = ("latents", "history events", "profiles", "future window", "QA + self-reflection", "labels")
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(steps), desc="UserU world", unit="step")

    def tick(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)

    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(7)]
    rng_lat, rng_split, rng_hist, rng_prof, rng_fut, rng_qa, rng_lab = streams
    n = config.n_users
    start = pd.Timestamp(config.start_date)
    width = max(6, len(str(n - 1)))
    user_ids = np.array([f"u{i:0{width}d}" for i in range(n)], dtype=object)

    lat = _sample_latents(rng_lat, n, config)
    perm = rng_split.permutation(n)
    n_pre = round(n * config.pretrain_share)
    n_val = max(1, round(n_pre * config.val_share))
    n_test = max(1, round((n - n_pre) * config.test_share))
    split = np.empty(n, dtype=object)
    split[perm[:n_val]] = "pretrain_val"
    split[perm[n_val:n_pre]] = "pretrain"
    split[perm[n_pre:n_pre + n_test]] = "test"
    split[perm[n_pre + n_test:]] = "tune"
    pretrain = np.isin(split, ("pretrain", "pretrain_val"))
    tick(steps[0])

    events = _events_frame(_simulate(rng_hist, lat, config.history_days, config, future=False), user_ids, start)
    tick(steps[1])
    profiles = _profiles(rng_prof, lat, user_ids)
    tick(steps[2])
    future = _events_frame(_simulate(rng_fut, lat, config.future_days, config, future=True, user_mask=pretrain),
                           user_ids, start + pd.Timedelta(days=config.history_days))
    tick(steps[3])

    pre_ids = pd.Index(user_ids[pretrain])
    evidence = build_evidence(events[events["user_id"].isin(pre_ids)], profiles[profiles["user_id"].isin(pre_ids)],
                              start_date=config.start_date, history_days=config.history_days,
                              future_events=future, future_days=config.future_days)
    generated = _synthesise_qa(rng_qa, evidence, config)
    kept = verify_answers(generated, evidence)
    qa = generated.loc[kept, ["user_id", "source", "intent", "query", "answer"]].reset_index(drop=True)
    tick(steps[4])

    down = np.flatnonzero(~pretrain)
    probs = oracle_probabilities(lat.feats[down], config)
    draws = (rng_lab.random(probs.shape) < probs).astype(np.int64)
    labels = pd.DataFrame({
        "user_id": pd.array(np.repeat(user_ids[down], len(TASK_SPECS)), dtype="str"),
        "task_id": pd.array(np.tile(np.array(TASK_IDS, dtype=object), down.size), dtype="str"),
        "label": draws.ravel(),
        "oracle_prob": probs.ravel(),
    })
    tasks = _tasks_frame()

    users = pd.DataFrame({
        "user_id": pd.array(user_ids, dtype="str"),
        "population": pd.array(np.where(pretrain, "pretrain", "downstream").astype(object), dtype="str"),
        "split": pd.array(split, dtype="str"),
        "persona": pd.array(np.array(PERSONAS, dtype=object)[lat.persona], dtype="str"),
    })
    for name in TRAITS:
        users[f"trait_{name}"] = lat.feats[:, _F[name]]
    for name in ("trend_liquidity", "trend_engagement", "log_activity"):
        users[name] = lat.feats[:, _F[name]]
    users["shared_device"] = lat.shared_device
    for m in SEQUENCE_MODALITIES:
        users[f"missing_{m}"] = lat.missing[m]
    tick(steps[5])
    if bar is not None:
        bar.close()

    world = World(events=events, profiles=profiles, users=users, qa=qa, tasks=tasks, labels=labels)
    metrics = _task_metrics(labels, users).set_index("task_id")
    cal = calibrate_tasks(config)
    n_gen, n_kept = len(generated), int(kept.sum())
    world.manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": int(config.seed),
        "config": config.to_dict(),
        # the dataset's declarations (data/README.md): its modalities and its history window
        "modalities": [spec.to_dict() for spec in SYNTHETIC_MODALITY_SPECS],
        "history_window": {"start": start.isoformat(), "end": (start + pd.Timedelta(days=config.history_days)).isoformat()},
        "counts": {
            "users": {s: int((split == s).sum()) for s in ("pretrain", "pretrain_val", "tune", "test")},
            "events": {m: int((events["modality"] == m).sum()) for m in SEQUENCE_MODALITIES},
            "events_total": int(len(events)),
            "distinct_event_texts": int(events["text"].nunique()),
            "qa": {s: int((qa["source"] == s).sum()) for s in ("future", "uqa")},
            "labels": int(len(labels)),
        },
        "tasks": {t: {"domain": spec.domain,
                      "positive_rate": _round(metrics.loc[t, "positive_rate"]),
                      "oracle_auc": _round(metrics.loc[t, "oracle_auc"]),
                      "oracle_ks": _round(metrics.loc[t, "oracle_ks"]),
                      "n_test": int(metrics.loc[t, "n_test"]),
                      "intercept": _round(cal[t][2]), "scale": _round(cal[t][3])}
                  for t, spec in zip(TASK_IDS, TASK_SPECS)},
        "self_reflection": {"generated": n_gen, "kept": n_kept, "dropped": n_gen - n_kept,
                            "drop_share": _round((n_gen - n_kept) / max(n_gen, 1))},
    }
    return world


def read_world(out_dir: str | Path) -> World:
    """Read a world written by `save_world` back as is (no validation: see qanchor_lab.data.load_world)."""
    root = Path(out_dir)
    missing = [f"{t}.parquet" for t in TABLES if not (root / f"{t}.parquet").is_file()]
    if missing or not (root / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"world directory {root} lacks {', '.join(missing + [MANIFEST_FILE])}")
    tables = {t: pd.read_parquet(root / f"{t}.parquet") for t in TABLES}
    return World(**tables, manifest=json.loads((root / MANIFEST_FILE).read_text()))


def ensure_world(out_dir: str | Path, config: WorldConfig, *, show_progress: bool = False) -> World:
    """Reuse the world in `out_dir` when its manifest records this config (and this generator and
    schema version); otherwise generate it, save it there and return it."""
    root = Path(out_dir)
    path = root / MANIFEST_FILE
    if path.is_file() and all((root / f"{t}.parquet").is_file() for t in TABLES):
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if (manifest.get("config") == config.to_dict() and manifest.get("schema_version") == SCHEMA_VERSION
                and manifest.get("generator_version") == GENERATOR_VERSION):
            return read_world(root)
    world = generate_world(config, show_progress=show_progress)
    save_world(world, root)
    return world


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
