"""Rules every built-in source follows the same way: when a saved world may be reused, and that no split is empty.

- `ensure_saved`: the saved world in a directory is reused only when its manifest records this package's
  schema version, the source's own version and the same config; otherwise the world is built and saved
  there. One rule for every source, so that a schema bump rebuilds a saved world instead of failing to
  read it (load_world refuses another schema version).
- `check_split_sizes`: extreme share settings can round a split down to no user at all; pre-training,
  retrieval checks, fitting or scoring would then fail far from the cause, so the source refuses up front
  and names the settings and the counts they give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qanchor_lab.data import load_world, save_world, saved_manifest
from qanchor_lab.schema import SCHEMA_VERSION, World

SPLITS = ("pretrain", "pretrain_val", "tune", "test")


def saved_matches(out_dir: str | Path, expected: Mapping[str, Any]) -> bool:
    """Whether `out_dir` holds a complete saved world whose manifest has this package's schema_version and,
    for every key of `expected` (the source's version, its config as a dict), the same value."""
    manifest = saved_manifest(Path(out_dir))
    want = {"schema_version": SCHEMA_VERSION, **expected}
    return bool(manifest) and all(manifest.get(k) == v for k, v in want.items())


def ensure_saved(out_dir: str | Path, expected: Mapping[str, Any], build: Callable[[], World]) -> World:
    """The world saved in `out_dir` when `saved_matches(out_dir, expected)`, else `build()` saved there."""
    root = Path(out_dir)
    if saved_matches(root, expected):
        return load_world(root)
    world = build()
    save_world(world, root)
    return world


def check_split_sizes(counts: Mapping[str, int], settings: Mapping[str, Any], *, owner: str) -> None:
    """Raise ValueError when a split of `counts` (split -> number of users) is empty, naming `settings` (the
    values that produced the counts, e.g. n_users and the shares) and every split's count."""
    empty = [s for s in SPLITS if counts.get(s, 0) <= 0]
    if empty:
        given = ", ".join(f"{k}={v}" for k, v in settings.items())
        sizes = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in SPLITS)
        raise ValueError(f"{owner}: {given} leave split(s) {', '.join(empty)} without users ({sizes}); "
                         "every split needs at least one user: change these shares")
