"""Evidence aggregates, QA intents, QA synthesis with simulated hallucinations, and the self-reflection verifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa

from qanchor_lab.sources.synthetic.catalogue import _CLICK_KINDS, _MP_KINDS, _SEARCH_KINDS, _SEARCH_TOPIC_OF_TEXT, APP_KINDS, CHANNELS, EVENT_KINDS, STRESS_KINDS
from qanchor_lab.sources.synthetic.config import QA_STYLES, WorldConfig

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
    # "Nothing to report" claims: the synthesiser asks these less (salient_qa_boost). "few" is not among them by
    # default: in the count intents it is a real answer ("Yes: a few late payment fees"); the change/trend
    # intents, whose "few" means "too little to tell", say so with null_claims=_TOO_LITTLE.
    null_claims: frozenset[str] = frozenset({"none", "0|0"})
    styles: tuple[str, ...] = QA_STYLES           # the WorldConfig.qa_style values that ask this intent

    @cached_property
    def terse(self) -> dict[str, str]:
        """claim -> a short answer shared by every intent of the same family ("No.", "Likely.", "More."): the
        wording WorldConfig.terse_answer_share draws; {} for intents whose claims name things (top_spend)."""
        return _terse_answers(self.answers)

    @property
    def wordings(self) -> dict[str, tuple[str, ...]]:
        """claim -> every wording an answer stating it may take: its own answers, then its short answer."""
        return {c: ws + ((self.terse[c],) if c in self.terse else ()) for c, ws in self.answers.items()}


# null_claims of the change/trend intents: "few" there is "too little activity to tell a change", not a count.
_TOO_LITTLE = frozenset({"none", "few"})
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


# Short answers shared across intents (WorldConfig.terse_answer_share). Long answers name their topic ("fund
# purchases are a regular habit"), so an embedding that ignores the question can still rank them: the answer
# carries the question. "Likely." does not: to put a user near "Likely." for the fund question and near
# "Unlikely." for the travel question, the embedding has to depend on the question (docs/design.md §7.14).
# One family per kind of claim; within a family every claim has its own word, and "none" reads "No."
# wherever the question is a yes/no one.
_TERSE_FAMILIES: tuple[dict[str, str], ...] = (
    {"none": "No.", "one": "Yes, once.", "two": "Yes, twice.", "few": "Yes, a few times.", "many": "Yes, many times."},
    {"none": "No.", "unlikely": "Unlikely.", "possible": "Possibly.", "likely": "Likely."},
    {"none": "Nothing to compare.", "few": "Too little to tell.", "quiet": "It stops.", "up": "More.",
     "down": "Less.", "flat": "About the same.", "rising": "More.", "falling": "Less.", "stable": "About the same."},
    {"none": "None.", "dormant": "None.", "low": "Low.", "moderate": "Moderate.", "medium": "Moderate.", "high": "High."},
)


def _terse_answers(answers: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The claim -> short answer map of the first family that words every claim of `answers` with distinct
    words; {} when none does."""
    for family in _TERSE_FAMILIES:
        if set(answers) <= set(family) and len({family[c] for c in answers}) == len(answers):
            return {c: family[c] for c in answers}
    return {}


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
    """names[i] for values in [bounds[i-1], bounds[i]): a value on a bound starts the next level (`_through` puts
    it in the level below, where the wording says "5,000 to 20,000")."""
    out = np.asarray(names, dtype=object)[np.searchsorted(np.asarray(bounds), values, side="right")]
    return np.where(valid, out, none).astype(object)


def _through(x: float) -> float:
    """A bound that keeps x itself in the level below: profile columns are rounded (credit limits to hundreds,
    utilisation to 0.001), so a user sits exactly on a level's stated upper edge."""
    return float(np.nextafter(x, np.inf))


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

    return Intent(intent_id, "future", tuple(queries), answers, claim, null_claims=_TOO_LITTLE, styles=("graded",))


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
                           "rising", "falling", "stable", "few"), null_claims=_TOO_LITTLE))
    I.append(Intent("borrowing_trend", "uqa", (
        "Are this user's borrowing-related actions increasing?", "Is this user turning to credit more often lately?",
        "Has borrowing activity picked up recently for this user?"),
        {"rising": ("Yes: borrowing and repayment activity cluster late in the period.",
                    "Increasing: more loan and repayment actions recently."),
         "falling": ("No, borrowing activity has eased off lately.", "Decreasing: fewer loan actions recently."),
         "stable": ("Steady: borrowing activity is spread evenly.", "About the same over the period."),
         "few": ("Too little borrowing activity to tell.", "Hardly any borrowing activity at all.")},
        lambda ev: _change(ev["stress_h1"].to_numpy(), ev["stress_h2"].to_numpy(),
                           ev["stress_h1"].to_numpy() + ev["stress_h2"].to_numpy() >= 3, "rising", "falling", "stable", "few"),
        null_claims=_TOO_LITTLE))
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
        lambda ev: _levels(ev["profile:credit_limit"].to_numpy(), np.ones(len(ev), bool), [5000.0, _through(20000.0)],
                           ["low", "medium", "high"])))
    I.append(Intent("credit_use", "uqa", (
        "How much of the credit line does this user use?", "Is this user close to the credit limit?",
        "How heavily does this user use available credit?"),
        {"low": ("Lightly: under 30% of the limit.", "Far from the limit."),
         "moderate": ("Moderately: 30% to 70% of the limit.", "Uses a fair part of the credit line."),
         "high": ("Heavily: over 70% of the limit.", "Close to the credit limit.")},
        lambda ev: _levels(ev["profile:credit_utilisation"].to_numpy(), np.ones(len(ev), bool), [0.3, _through(0.7)],
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
                           _col(ev, _SPEND_KEYS, "amt:") + _col(ev, _SPEND_KEYS, "fut_amt:") > 0, "up", "down", "flat", "few"),
        null_claims=_TOO_LITTLE))
    intents = {i.intent_id: i for i in I}
    if len(intents) != len(I):
        raise AssertionError("duplicate intent ids")
    for it in I:
        seen: dict[str, str] = {}
        for c, answers in it.wordings.items():
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
    stated: list[str] = []                          # the claim each row's answer states
    for r in range(n_rows):
        it = intents[intent_idx[r]]
        claim = claims[intent_idx[r]][user[r]]
        if halluc[r]:
            domain = list(it.answers)
            claim = domain[(domain.index(claim) + 1 + int(shift[r] * (len(domain) - 1))) % len(domain)]
        answers = it.answers[claim]
        stated.append(claim)
        rows["user_id"].append(uids[user[r]])
        rows["source"].append(it.source)
        rows["intent"].append(it.intent_id)
        rows["query"].append(it.queries[int(q_pick[r] * len(it.queries))])
        rows["answer"].append(answers[int(a_pick[r] * len(answers))])
    if config.terse_answer_share > 0:
        # drawn after every other draw of this stream, so a share of 0 leaves the QA table byte-identical
        terse = rng.random(n_rows) < config.terse_answer_share
        for r in np.flatnonzero(terse):
            short = intents[intent_idx[r]].terse.get(stated[r])
            if short is not None:
                rows["answer"][r] = short
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
        wordings = it.wordings
        ok[rows] = [a in wordings[c] for a, c in zip(answers[rows], claims)]
    return ok


def answer_claims(qa: pd.DataFrame) -> np.ndarray:
    """The claim each QA row's answer states ("intent|claim"), read back from the intents' wordings.

    Paraphrased answers of one claim share a key, so pre-training can treat them as one positive class
    (false-negative masking by claim, not by exact text). Rows of an unknown intent, or whose answer is no
    wording of it (a dataset's own QA), fall back to "intent|answer text"."""
    lookup = {(iid, a): c for iid, it in INTENTS.items() for c, wordings in it.wordings.items() for a in wordings}
    intents = qa["intent"].astype(str).to_numpy() if "intent" in qa.columns else np.full(len(qa), "", object)
    answers = qa["answer"].astype(str).to_numpy()
    return np.array([f"{i}|{lookup.get((i, a), a)}" for i, a in zip(intents, answers)], dtype=object)
