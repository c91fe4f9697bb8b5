"""The synthetic UserU world as a data source (the generator itself lives in qanchor_lab.world)."""

from __future__ import annotations

from pathlib import Path

from qanchor_lab.schema import World


def load(n_users: int = 6000, seed: int = 7, out_dir: str | Path | None = None, **config) -> World:
    """Generate the world (or reuse it from `out_dir` when that holds the same config); `config` holds
    further WorldConfig fields (difficulty, history_days, ...)."""
    from qanchor_lab.world import WorldConfig, ensure_world, generate_world

    cfg = WorldConfig(n_users=n_users, seed=seed, **config)
    return ensure_world(out_dir, cfg) if out_dir is not None else generate_world(cfg)
