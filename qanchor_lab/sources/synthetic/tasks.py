"""Downstream tasks and their labels: calibrated true probabilities (the oracle) from latent traits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import brentq

from qanchor_lab.sources.synthetic.config import _F, WorldConfig
from qanchor_lab.sources.synthetic.simulation import _linear, _sample_latents, _sigmoid

# Task calibration uses its own fixed sample so intercepts and scales do not depend on the world seed.
CALIBRATION_SEED = 20260214
CALIBRATION_USERS = 40_000


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
