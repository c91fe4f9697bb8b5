"""Compatibility module: the synthetic UserU generator now lives in `qanchor_lab.sources.synthetic`
(split by concern). Everything public is re-exported here so `from qanchor_lab.world import ...` keeps
working; `read_world` is data.load_world, the one reader of every world."""

from __future__ import annotations

from qanchor_lab.data import MANIFEST_FILE, save_world  # noqa: F401
from qanchor_lab.data import load_world as read_world  # noqa: F401
from qanchor_lab.sources.synthetic import *  # noqa: F401,F403
from qanchor_lab.sources.synthetic.simulation import _sample_latents  # noqa: F401  (tests reach for it)
