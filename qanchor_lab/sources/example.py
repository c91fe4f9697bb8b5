"""A small hand-built shop log in the bring-your-own format: the worked example of notebook 11 and the
end-to-end test of a dataset that does not come from the synthetic generator.

Written by hand with a few readable rules, not simulated: each user has a return habit and an activity
level; orders (amount in USD, refunds negative), reviews (no amounts) and support tickets follow from
them. It has what real logs have and the synthetic world has not: its own modality names, exact repeated
rows, refunds, users quiet in some modality or in all of them (profile only), events outside the declared
window, and no oracle column. Two tasks: will the user return an item next month, and will they spend
more than USD 150 next month. `shop_log()` returns the tables as DataFrames plus the manifest
(`byo.load(tables, manifest=manifest)` validates them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# The dataset's declarations (data/README.md): modalities with their units and sign rules, and the window.
SHOP_MANIFEST: dict[str, Any] = {
    "name": "example_shop",
    "modalities": [
        {"name": "order", "title": "Orders", "unit": "USD", "amount": "any", "description": "a purchase or a refund"},
        {"name": "review", "title": "Reviews", "amount": "zero", "description": "a product review"},
        {"name": "support", "title": "Support tickets", "amount": "zero", "description": "a message to support"},
    ],
    "history_window": {"start": "2025-01-01", "end": "2025-04-01"},
}
ITEMS = (("headphones", 59.0), ("running shoes", 89.0), ("coffee beans", 14.0), ("desk lamp", 32.0),
         ("phone case", 12.0), ("backpack", 45.0), ("novel", 11.0), ("yoga mat", 25.0))
TASKS = pd.DataFrame({
    "task_id": ["returns_next_month", "big_spender_next_month"],
    "domain": ["risk", "marketing"],
    "query": ["Will this user send an item back next month?", "Will this user spend more than 150 dollars next month?"],
    "description": ["returns at least one item in the month after the window", "spends over USD 150 next month"],
})
# (intent, source, paraphrases): questions about the window (uqa) and the following month (future)
QUESTIONS = (
    ("n_orders", "uqa", ("How many orders did this user place?", "How often does this user buy?")),
    ("returns", "uqa", ("Does this user return items?", "Has this user sent anything back?")),
    ("top_item", "uqa", ("What does this user buy most?", "Which product does this user order most often?")),
    ("support", "uqa", ("Has this user contacted support?", "Did this user complain to customer service?")),
    ("next_orders", "future", ("Will this user keep ordering next month?", "Will this user buy again soon?")),
)


def shop_log(n_users: int = 120, seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """(tables, manifest) of the example shop: users, profiles, events, qa, tasks, labels."""
    if n_users < 40:
        raise ValueError(f"n_users must be >= 40 so every split has both label classes; got {n_users}")
    rng = np.random.default_rng(seed)
    ids = [f"c{i:04d}" for i in range(n_users)]
    returner = rng.uniform(0, 1, n_users)   # how often the user sends items back
    activity = rng.gamma(2.0, 2.0, n_users)  # orders per month, roughly
    start = pd.Timestamp(SHOP_MANIFEST["history_window"]["start"])
    n_pre = n_users * 2 // 5
    # The first n_pre users pre-train. Within each population the splits are shuffled, from a stream of their
    # own so that nothing else drawn here changes: the habits below cycle with the user's index (favourite
    # item i % 8, ...), and splits that cycled with it too (tune, test, tune, ...) would give tune and test
    # users disjoint favourite items.
    order = np.random.default_rng([seed, 1])
    pre_splits = order.permutation(["pretrain"] * (n_pre - n_pre // 5) + ["pretrain_val"] * (n_pre // 5))
    n_down = n_users - n_pre
    down_splits = order.permutation(["tune"] * (n_down - n_down // 2) + ["test"] * (n_down // 2))
    split = [str(s) for s in np.concatenate([pre_splits, down_splits])]
    population = ["pretrain"] * n_pre + ["downstream"] * n_down
    users = pd.DataFrame({"user_id": ids, "population": population, "split": split})

    rows: list[tuple] = []
    summary = []
    for i, uid in enumerate(ids):
        profile_only = i % 17 == 5          # a registered customer who never did anything
        n_orders = 0 if profile_only else int(rng.poisson(3 * activity[i])) + (i % 3 == 0)
        favourite = ITEMS[i % len(ITEMS)]
        returns, spent, tickets = 0, 0.0, 0
        for _ in range(n_orders):
            item, price = favourite if rng.uniform() < 0.5 else ITEMS[int(rng.integers(len(ITEMS)))]
            day = start + pd.Timedelta(days=int(rng.integers(0, 90)), hours=int(rng.integers(8, 22)))
            returned = rng.uniform() < returner[i] * 0.6
            status = "returned" if returned else "delivered"
            rows.append((uid, "order", day, item, f"Ordered {item}, {status}", price))
            spent += price
            if returned:
                returns += 1
                rows.append((uid, "order", day + pd.Timedelta(days=5), item, f"Refund for {item}", -price))
                if rng.uniform() < 0.5:
                    tickets += 1
                    rows.append((uid, "support", day + pd.Timedelta(days=3), "returns", f"Asked how to return the {item}", 0.0))
            elif rng.uniform() < 0.3:
                stars = 5 if rng.uniform() > returner[i] else 2
                rows.append((uid, "review", day + pd.Timedelta(days=7), item, f"Rated {item} {stars} stars", 0.0))
        if n_orders and i % 7 == 0:  # the same order logged twice: an exact repeat, kept as two events
            rows.append(next(r for r in reversed(rows) if r[0] == uid and r[1] == "order"))
        if i % 11 == 3 and not profile_only:  # activity before and after the declared window
            rows.append((uid, "order", start - pd.Timedelta(days=20), "novel", "Ordered novel, delivered", 11.0))
            rows.append((uid, "support", start + pd.Timedelta(days=95), "delivery", "Asked where the parcel is", 0.0))
        summary.append((n_orders, returns, spent, tickets, favourite[0]))

    events = pd.DataFrame(rows, columns=["user_id", "modality", "timestamp", "category", "text", "amount"])
    profiles = pd.DataFrame({"user_id": ids, "age": rng.integers(18, 75, n_users).astype(float),
                             "member_years": np.round(rng.uniform(0, 8, n_users), 1)})

    # next month, from the same habits (the month itself is not in the events table)
    p_return = 1 / (1 + np.exp(-(4.0 * returner - 3.0 + 0.3 * np.log1p(activity))))
    p_big = 1 / (1 + np.exp(-(1.2 * activity - 4.0)))
    down = np.array([p == "downstream" for p in population])
    labels = pd.concat([
        pd.DataFrame({"user_id": np.array(ids)[down], "task_id": t,
                      "label": (rng.uniform(0, 1, int(down.sum())) < p[down]).astype(int)})
        for t, p in zip(TASKS["task_id"], (p_return, p_big))
    ], ignore_index=True)

    qa_rows = []
    for i, uid in enumerate(ids):
        if population[i] != "pretrain":
            continue
        n_orders, returns, spent, tickets, top = summary[i]
        answers = {
            "n_orders": ("No orders." if n_orders == 0 else f"{'Few' if n_orders < 6 else 'Many'} orders: "
                         f"{n_orders} in three months, USD {spent:.0f} in all."),
            "returns": "No returns." if returns == 0 else f"Yes: {returns} item(s) sent back.",
            "top_item": "Nothing yet." if n_orders == 0 else f"Mostly {top}.",
            "support": "No support contact." if tickets == 0 else f"Yes: {tickets} ticket(s) about returns.",
            "next_orders": "Unlikely to order." if activity[i] < 2 else "Yes: more orders are expected.",
        }
        for intent, source, phrasings in QUESTIONS:
            for q in phrasings:
                qa_rows.append((uid, source, intent, q, answers[intent]))
    qa = pd.DataFrame(qa_rows, columns=["user_id", "source", "intent", "query", "answer"])
    tables = {"users": users, "profiles": profiles, "events": events, "qa": qa, "tasks": TASKS.copy(), "labels": labels}
    return tables, dict(SHOP_MANIFEST)
