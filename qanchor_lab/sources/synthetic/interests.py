"""Side interests: a richer user, made of independent traits that no task depends on (docs/design.md §7.41).

The default user is a few correlated traits that a 128-d embedding holds whole, so a probe refitted per task reads
the same from every query's embedding. Q-Anchor's premise is a user richer than any embedding, where the
scenario's question decides what the embedding keeps. `WorldConfig.side_interests = K` adds K such traits (a hobby
and a facet of it: "fishing gear", "piano lessons", ...), each shown as one noisy profile column
(`interest_fishing_gear`) and asked about in D_uqa pairs ("How keen is this user on fishing gear?"). Nothing else
changes: the events, the core profile columns, the users, tasks and labels of a seed are byte-identical to the
world without them, and every task still depends on the core traits only. The interests come from a random stream
of their own (the world seed's eighth child), so K = 0 draws nothing.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

HOBBIES = ("fishing", "piano", "yoga", "photography", "gardening", "cats", "dogs", "cycling", "hiking", "chess",
           "baking", "knitting", "camping", "skiing", "painting", "coffee", "wine", "board games", "anime",
           "football", "basketball", "tennis", "golf", "swimming", "running", "aquariums", "birdwatching",
           "calligraphy", "pottery", "dancing", "jazz", "opera", "poetry", "astronomy", "woodworking", "surfing",
           "climbing", "martial arts", "magic tricks", "tea")
FACETS = ("gear", "lessons", "clubs", "shows")
# Facet-major: the first 40 interests are one facet of every hobby, so a small K still spans many hobbies.
SIDE_INTEREST_NAMES: tuple[str, ...] = tuple(f"{h} {f}" for f in FACETS for h in HOBBIES)
MAX_SIDE_INTERESTS = len(SIDE_INTEREST_NAMES)
PROFILE_NOISE = 0.3          # sd of the profile's observation noise around the interest (the interest has sd 1)
QA_PER_USER = 4              # side-interest questions per pre-training user (fewer when K is smaller)
QUERY_TEMPLATES = ("How keen is this user on {n}?", "Does this user care about {n}?",
                   "How interested is this user in {n}?")
# claim -> (the interest's upper bound, the answer); one wording per claim, so claim masking is text masking
CLAIMS = (("none", -0.5, "Shows no interest in {n}."), ("some", 0.7, "Some interest in {n}."),
          ("keen", np.inf, "A keen fan of {n}."))


def column_name(name: str) -> str:
    """The profile column of one interest: "fishing gear" -> "interest_fishing_gear"."""
    return "interest_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def side_interests(rng: np.random.Generator, n_users: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(interests (n, k), what the profile shows of them (n, k)): independent standard normals, observed with
    PROFILE_NOISE and rounded to two decimals."""
    values = rng.standard_normal((n_users, k))                                  # (n, k)
    shown = np.round(values + PROFILE_NOISE * rng.standard_normal((n_users, k)), 2)  # (n, k)
    return values, shown


def interest_profiles(profiles: pd.DataFrame, shown: np.ndarray) -> pd.DataFrame:
    """`profiles` (one row per user, in the order of `shown`'s rows) with one column per side interest appended."""
    cols = {column_name(SIDE_INTEREST_NAMES[j]): shown[:, j] for j in range(shown.shape[1])}
    return pd.concat([profiles.reset_index(drop=True), pd.DataFrame(cols)], axis=1)


def interest_qa(rng: np.random.Generator, values: np.ndarray, user_ids: np.ndarray, asked: np.ndarray) -> pd.DataFrame:
    """D_uqa pairs about the side interests of the users where `asked` (pre-training users): min(K, QA_PER_USER)
    distinct interests each, a query template drawn per pair, the answer stating the interest's level; the
    intent is named by the interest's profile column. The answers come from the interest itself, not from the
    noisy profile column, as a synthesiser that read more of the user would write them."""
    k = values.shape[1]
    per_user = min(k, QA_PER_USER)
    rows: dict[str, list[str]] = {"user_id": [], "source": [], "intent": [], "query": [], "answer": []}
    for u in np.flatnonzero(asked):
        for j in rng.choice(k, size=per_user, replace=False):
            name = SIDE_INTEREST_NAMES[j]
            answer = next(text for _, upper, text in CLAIMS if values[u, j] < upper)
            rows["user_id"].append(user_ids[u])
            rows["source"].append("uqa")
            rows["intent"].append(column_name(name))
            rows["query"].append(QUERY_TEMPLATES[rng.integers(len(QUERY_TEMPLATES))].format(n=name))
            rows["answer"].append(answer.format(n=name))
    return pd.DataFrame({c: pd.array(v, dtype="str") for c, v in rows.items()})
