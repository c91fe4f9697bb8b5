"""Simulation of latents, event logs and the noisy tabular profile from one seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pyarrow as pa

from qanchor_lab.schema import EVENT_COLUMNS, SEQUENCE_MODALITIES
from qanchor_lab.sources.synthetic.catalogue import _CHANNEL_WEIGHTS, _CLICK_KINDS, _MISSING, _MODALITY_SHARE, _MODALITY_TRAIT, catalogue_texts, CHANNELS, EVENT_KINDS
from qanchor_lab.sources.synthetic.config import _F, _PERSONA_MEANS, _PERSONA_PEAK_HOUR, _T, _TRAIT_CHOL, FEATURES, PERSONA_SHARES, PERSONAS, TRAIT_SCALE, TRAITS, WorldConfig

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


def _someone_else(perm: np.ndarray) -> np.ndarray:
    """Each user's other person from a permutation, never the user: a fixed point takes the next user's entry
    instead, which is not itself (the permutation gave it to the next user). Only those users change, and no fresh
    draw is made, so every other user's person and the rest of the stream stay as they were. (A world of one user
    keeps its one entry: there is no one else.)"""
    users = np.arange(len(perm))
    return np.where(perm == users, perm[(users + 1) % len(perm)], perm)


def _simulate(rng: np.random.Generator, lat: _Latents, days: int, config: WorldConfig, *, future: bool,
              user_mask: np.ndarray | None = None, other: np.ndarray | None = None) -> tuple[_Events, np.ndarray]:
    """Poisson counts per (user, kind), then one row per event with wording, time, amount and dwell.

    Returns the events and `other`: whose traits drive each user's search/click view (used for shared-device
    users). Pass the history's `other` to the future window so a shared device keeps the same second person."""
    n = lat.feats.shape[0]
    active = np.ones(n, bool) if user_mask is None else user_mask
    activity = np.exp(lat.feats[:, _F["log_activity"]])
    b_liq = _slope(lat.feats[:, _F["trend_liquidity"]])
    b_eng = _slope(lat.feats[:, _F["trend_engagement"]])
    # The search/click view of a shared-device user is someone else's: modalities disagree. The permutation is
    # drawn even when `other` is given, so the rest of this stream (and every event drawn from it) is unchanged.
    drawn = _someone_else(rng.permutation(n))
    other = drawn if other is None else np.asarray(other)
    if other.shape != (n,):
        raise ValueError(f"_simulate: other must hold one user index per user ({n}), got shape {other.shape}")
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
    return _Events(*(getattr(ev, f.name)[~dup] for f in fields(_Events))), other


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
