"""Data sources: every source returns the same validated tables, a `schema.World`.

- `synthetic`: the UserU generator (qanchor_lab.sources.synthetic), with its modalities and window declared.
- `byo`: your own tables from Parquet, CSV or pandas DataFrames (the contract: data/README.md).
- `movielens`: MovieLens-100K read offline from the recbole wheel (qanchor_lab.sources.movielens).

What the built-in sources share lives in `common`: when a saved world is reused (`ensure_saved`) and the
refusal of share settings that leave a split empty (`check_split_sizes`).

`load_source(name, **kw)` picks one by name; sources are imported only when used, so a source with
heavy or optional dependencies costs nothing until asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from qanchor_lab.schema import World

# name -> "module:function" returning a World; add a source by adding a line.
SOURCES: dict[str, str] = {
    "synthetic": "qanchor_lab.sources.synthetic:load",
    "byo": "qanchor_lab.sources.byo:load",
    "movielens": "qanchor_lab.sources.movielens:load",
}


def load_source(name: str, **kwargs: Any) -> World:
    """The World of source `name` (see SOURCES); `kwargs` go to that source's `load`."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}")
    module, func = SOURCES[name].split(":")
    return getattr(import_module(module), func)(**kwargs)
