"""The data contract: table names, columns, dtypes and the World container.

Every table is a long-format pandas DataFrame, stored as Parquet. The same schema is used for the
synthetic UserU world and for a user's own logs (data/README.md documents it for people).
"""

from __future__ import annotations

import datetime
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Sequence, get_args

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1

# The tabular profile is a modality too, but one row per user (profiles table), not events.
TABULAR_MODALITY = "profile"

# How `amount` may be signed in one modality (the dataset declares it per modality):
#   "positive": every event has amount > 0 (payments); "nonnegative": >= 0;
#   "any": refunds / credits may be negative; "zero": the modality carries no amounts (all 0.0).
AmountSign = Literal["positive", "nonnegative", "any", "zero"]
_MODALITY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")  # a name becomes the special tokens <name_start>/<name_end>


@dataclass(frozen=True)
class ModalitySpec:
    """One behaviour modality as a dataset declares it (manifest["modalities"], docs in data/README.md)."""

    name: str                  # the value of events.modality; letters, digits, "_" or "-"
    title: str = ""            # heading in serialised text ("Bills"); default: the name, title-cased
    unit: str = ""             # unit of `amount` in this modality ("CNY", "USD", "stars"); "" prints it bare
    amount: AmountSign = "any"  # sign rule for `amount`, checked by data.validate_events
    description: str = ""      # what one event is, for people

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MODALITY_NAME.match(self.name):
            raise ValueError(f"modality name {self.name!r} invalid: use letters, digits, '_' or '-' (no spaces)")
        if self.name == TABULAR_MODALITY:
            raise ValueError(f"modality name {TABULAR_MODALITY!r} is reserved for the tabular profile")
        if self.amount not in get_args(AmountSign):
            raise ValueError(f"modality {self.name!r}: amount={self.amount!r}; valid choices: "
                             f"{', '.join(map(repr, get_args(AmountSign)))}")
        for key in ("title", "unit", "description"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"modality {self.name!r}: {key} must be a string, got {getattr(self, key)!r}")

    @property
    def display_title(self) -> str:
        return self.title or self.name.replace("_", " ").replace("-", " ").title()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str) -> "ModalitySpec":
        """A spec from its dict (or a bare name: no unit, any sign)."""
        if isinstance(d, str):
            return cls(name=d)
        if not isinstance(d, Mapping):
            raise ValueError(f"a modality declaration must be a name or a dict, got {type(d).__name__} {d!r}")
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"modality {d.get('name')!r}: unknown key(s) {extra}; valid keys: {sorted(known)}")
        if "name" not in d:
            raise ValueError(f"modality declaration {dict(d)!r} lacks 'name'")
        return cls(**dict(d))


def modality_specs(declared: Sequence[ModalitySpec | Mapping[str, Any] | str]) -> tuple[ModalitySpec, ...]:
    """Normalise a modality declaration (specs, dicts or names) into specs; names must be unique."""
    if isinstance(declared, (str, Mapping)) or not declared:
        raise ValueError(f"modalities must be a non-empty list of names or specs, got {declared!r}")
    specs = tuple(s if isinstance(s, ModalitySpec) else ModalitySpec.from_dict(s) for s in declared)
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"modalities declared more than once: {repeated}")
    return specs


# The synthetic UserU world's declaration (qanchor_lab.sources.synthetic writes it into its manifest). Other
# datasets declare their own; nothing downstream assumes these names.
SYNTHETIC_MODALITY_SPECS: tuple[ModalitySpec, ...] = (
    ModalitySpec("bill", "Bills", unit="CNY", amount="positive", description="a payment"),
    ModalitySpec("miniprogram", "Mini-programs", amount="zero", description="a mini-program opened"),
    ModalitySpec("search", "Searches", amount="zero", description="an in-app search query"),
    ModalitySpec("click", "Clicks", amount="zero", description="a page section viewed"),
)
# The synthetic world's modality names, in prefix order (also QAnchorConfig's default).
SEQUENCE_MODALITIES: tuple[str, ...] = tuple(s.name for s in SYNTHETIC_MODALITY_SPECS)

POPULATIONS = ("pretrain", "downstream")
SPLITS = ("pretrain", "pretrain_val", "tune", "test")
DOMAINS = ("engagement", "risk", "marketing")
QA_SOURCES = ("future", "uqa")

# column -> dtype kind: "str", "datetime", "float", "int".  `required` columns must be present;
# optional ones are filled with their default when a user's own table lacks them.
EVENT_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "modality": "str",      # one of the dataset's declared modalities
    "timestamp": "datetime",  # naive UTC
    "category": "str",      # merchant category / service / page section; "" when none
    "channel": "str",       # payment channel for bills, "app" otherwise
    "text": "str",          # short description, non-empty; amounts live in `amount`, not here
    "amount": "float",      # in the modality's declared unit, signed per its `amount` rule; 0.0 when none
    "duration_s": "float",  # dwell time (s) for mini-program opens and clicks, 0.0 otherwise
}
EVENT_REQUIRED = ("user_id", "modality", "timestamp", "text")
EVENT_DEFAULTS: dict[str, Any] = {"category": "", "channel": "app", "amount": 0.0, "duration_s": 0.0}

QA_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "source": "str",   # "future" (D_future) or "uqa" (D_uqa)
    "intent": "str",   # the question's intent id, shared by its paraphrases
    "query": "str",
    "answer": "str",
}
QA_REQUIRED = ("user_id", "query", "answer")
QA_DEFAULTS: dict[str, Any] = {"source": "uqa", "intent": ""}

TASK_COLUMNS: dict[str, str] = {
    "task_id": "str",
    "domain": "str",   # one of DOMAINS
    "query": "str",    # the natural-language scenario query
    "description": "str",
}
TASK_REQUIRED = ("task_id", "query")
TASK_DEFAULTS: dict[str, Any] = {"domain": "engagement", "description": ""}

LABEL_COLUMNS: dict[str, str] = {
    "user_id": "str",
    "task_id": "str",
    "label": "int",          # 0/1
    "oracle_prob": "float",  # the true P(label=1) in the synthetic world; NaN-free
}
LABEL_REQUIRED = ("user_id", "task_id", "label")
LABEL_DEFAULTS: dict[str, Any] = {"oracle_prob": float("nan")}

# Users: user_id, population, split, persona, trait_* columns (latent truth: never a model input).
USER_REQUIRED = ("user_id", "population", "split")
# Profiles: user_id plus numeric profile columns (the observed tabular modality).
PROFILE_REQUIRED = ("user_id",)

TABLES = ("events", "profiles", "users", "qa", "tasks", "labels")


@dataclass
class World:
    """All tables of one dataset plus its manifest (a JSON-able dict)."""

    events: pd.DataFrame
    profiles: pd.DataFrame
    users: pd.DataFrame
    qa: pd.DataFrame
    tasks: pd.DataFrame
    labels: pd.DataFrame
    manifest: dict[str, Any] = field(default_factory=dict)

    def users_in(self, *splits: str) -> list[str]:
        """User ids whose split is one of `splits`, in table order."""
        return self.users.loc[self.users["split"].isin(splits), "user_id"].tolist()

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; valid tables: {', '.join(TABLES)}")
        return getattr(self, name)

    @property
    def modality_specs(self) -> tuple[ModalitySpec, ...]:
        """The dataset's declared modalities (see `declared_modalities`)."""
        return declared_modalities(self.manifest, self.events)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The declared modality names, in prefix order."""
        return tuple(s.name for s in self.modality_specs)

    @property
    def history_window(self) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
        """(start, end) of the history window the dataset declares; None where it declares none (then the
        features use all history, ending the midnight after the last event)."""
        return declared_window(self.manifest)


def is_synthetic(manifest: Mapping[str, Any]) -> bool:
    """Whether a dataset's manifest is the synthetic generator's (it records the generator's version)."""
    return "generator_version" in manifest


def declared_modalities(manifest: Mapping[str, Any], events: pd.DataFrame | None = None) -> tuple[ModalitySpec, ...]:
    """A dataset's modalities: `manifest["modalities"]` when declared; the synthetic world's four for a
    synthetic manifest written before worlds declared them; else the names found in `events`, by name
    (the same order whatever the row order), with no unit and any sign."""
    if manifest.get("modalities"):
        try:
            return modality_specs(manifest["modalities"])
        except ValueError as exc:
            raise ValueError(f"manifest 'modalities': {exc}") from None
    if is_synthetic(manifest):
        return SYNTHETIC_MODALITY_SPECS
    if events is None or "modality" not in getattr(events, "columns", ()) or len(events) == 0:
        raise ValueError("no modalities: the manifest declares none and there are no events to infer them from")
    return modality_specs(sorted(str(m) for m in pd.unique(events["modality"].astype("str"))))


def declared_window(manifest: Mapping[str, Any]) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """(start, end) from `manifest["history_window"]` ({"start": ISO, "end": ISO}, either optional; naive UTC
    like the events, an aware value converted), or from a synthetic config's start_date/history_days; (None,
    None) when undeclared."""
    win = manifest.get("history_window")
    if win:
        if not isinstance(win, Mapping) or set(win) - {"start", "end"}:
            raise ValueError(f"manifest 'history_window' must be {{'start': ISO, 'end': ISO}}, got {win!r}")
        start, end = (_window_bound(win, k) for k in ("start", "end"))
        if start is not None and end is not None and not start < end:
            raise ValueError(f"manifest 'history_window': start {start} must be before end {end}")
        return start, end
    cfg = manifest.get("config") or {}
    if "start_date" in cfg and "history_days" in cfg:
        start = pd.Timestamp(cfg["start_date"])
        return start, start + pd.Timedelta(days=int(cfg["history_days"]))
    return None, None


def _window_bound(win: Mapping[str, Any], key: str) -> pd.Timestamp | None:
    """One end of a declared history window as naive UTC, None where left out. Events store naive UTC,
    so an aware bound is converted to UTC the same way (compared as given it would fail deep in pandas)."""
    value = win.get(key)
    if value is None or value == "":
        return None
    where = f"manifest 'history_window.{key}'"
    # a number is no date: pd.Timestamp would read 20250101 as nanoseconds after 1970
    if not isinstance(value, (str, datetime.date, np.datetime64)):
        raise ValueError(f"{where} must be an ISO date string such as '2025-01-01', got {type(value).__name__} {value!r}")
    try:
        t = pd.Timestamp(value)
        # a non-ISO string such as '03/01/2025' reads as 1 March or 3 January: refuse it rather than guess
        iso = not isinstance(value, str) or pd.notna(pd.to_datetime(value, format="ISO8601", errors="coerce"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pandas' note that the string is not day-first
            ambiguous = not iso and pd.to_datetime(value, dayfirst=True) != t
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{where}: cannot read {value!r} as a date ({exc})") from None
    if pd.isna(t) or ambiguous:
        raise ValueError(f"{where}: {value!r} is not an unambiguous date; write it as ISO 8601, e.g. '2025-01-01' "
                         f"or '2025-01-01T00:00:00+08:00'")
    return naive_utc(t)


def naive_utc(t: str | datetime.date | np.datetime64 | pd.Timestamp) -> pd.Timestamp:
    """A timestamp as naive UTC, how validated events store theirs (an aware one converted, a naive one kept)."""
    t = pd.Timestamp(t)
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def string_list(values: Any, name: str, *, allow_empty: bool = True, unique: bool = False) -> list[str]:
    """`values` (user ids, queries, event texts) as a list of strings, or an error that names `name`.

    One check for every public entry point that takes several strings: a lone string would otherwise be
    read as one item per character ("Will this user ...?" as 45 queries, "u000002" as 7 users), a number
    among user ids would match no user, and an empty list would fail deep inside a tokenizer or a fit.
    A wrong type is a TypeError; an empty or (with `unique`) repeating list is a ValueError."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of strings, not a single string: pass [{values[:40]!r}]")
    try:
        out = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] is {type(v).__name__} {v!r}; expected a string")
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty: give at least one")
    dup = [v for v, n in Counter(out).items() if n > 1] if unique else []
    if dup:
        raise ValueError(f"{name} repeats {len(dup)} value(s): {dup[:5]}")
    return out
