"""The event catalogue: what each modality's events can be, how they are worded, which traits drive them."""

from __future__ import annotations

from dataclasses import dataclass

from qanchor_lab.sources.synthetic.config import _F, Timing

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
