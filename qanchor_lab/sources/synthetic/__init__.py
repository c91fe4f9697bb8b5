"""The synthetic UserU world: users with known latent traits, their behaviour logs, QA pairs and tasks.

Every experiment in qanchor_lab is compared with a known truth, so this module simulates users whose
behaviour comes from latent traits (docs/design.md §4):

- latents: 11 correlated traits drawn around 6 persona centres, a heavy-tailed activity level and two
  per-user trends (liquidity stress and app engagement rising or falling over the window);
- behaviour over a history window: bills, mini-program opens, search queries and click paths (the
  `events` table) plus a noisy tabular profile (`profiles`). Signal sits in counts, amounts, channels,
  search *wording* (two traits show only there) and *timing* (the trends show only there);
- a hidden future window, simulated the same way, that grounds the D_future answers;
- D_future and D_uqa question/answer pairs for pre-training users, with simulated synthesiser
  hallucinations and a self-reflection verifier (`verify_answers`) that drops unsupported answers;
- ten downstream tasks whose labels are Bernoulli draws from a known probability (`oracle_prob`), for a
  population that pre-training never sees.

Everything is vectorised numpy/pandas and driven by one seed; the same config gives byte-identical
Parquet tables and manifest.

The package is split by concern: `config` (traits, personas, WorldConfig), `catalogue` (what events can
be), `simulation` (latents, events, profiles), `qa` (evidence, intents, synthesis, self-reflection),
`tasks` (tasks and calibrated labels), `interests` (optional side interests: a richer user), `generate`
(the world, its manifest, ensure_world) and `views` (for notebooks). Worlds are written and read by
qanchor_lab.data (save_world / load_world).
"""

from __future__ import annotations

from pathlib import Path

from qanchor_lab.data import save_world  # noqa: F401  (the writer of every world)
from qanchor_lab.schema import World
from qanchor_lab.sources.synthetic.config import (  # noqa: F401
    TRAITS,
    Persona,
    PERSONAS,
    PERSONA_SHARES,
    TRAIT_SCALE,
    FEATURES,
    Timing,
    QAStyle,
    QA_STYLES,
    WorldConfig,
)
from qanchor_lab.sources.synthetic.catalogue import (  # noqa: F401
    EventKind,
    CHANNELS,
    EVENT_KINDS,
    STRESS_KINDS,
    APP_KINDS,
    catalogue_texts,
)
from qanchor_lab.sources.synthetic.qa import (  # noqa: F401
    build_evidence,
    Intent,
    INTENTS,
    verify_answers,
    answer_claims,
)
from qanchor_lab.sources.synthetic.tasks import (  # noqa: F401
    CALIBRATION_SEED,
    CALIBRATION_USERS,
    TaskSpec,
    TASK_SPECS,
    TASK_IDS,
    calibrate_tasks,
    oracle_probabilities,
)
from qanchor_lab.sources.synthetic.generate import (  # noqa: F401
    GENERATOR_VERSION,
    world_summary,
    generate_world,
    ensure_world,
    world_is_saved,
)
from qanchor_lab.sources.synthetic.views import (  # noqa: F401
    events_per_user,
    user_timeline,
    qa_examples,
)


def load(n_users: int = 6000, seed: int = 7, out_dir: str | Path | None = None, **config) -> World:
    """The synthetic world as a data source: generated, or reused from `out_dir` when that holds the same
    config; `config` holds further WorldConfig fields (difficulty, history_days, qa_style, ...)."""
    cfg = WorldConfig(n_users=n_users, seed=seed, **config)
    return ensure_world(out_dir, cfg) if out_dir is not None else generate_world(cfg)


__all__ = [
    "TRAITS",
    "Persona",
    "PERSONAS",
    "PERSONA_SHARES",
    "TRAIT_SCALE",
    "FEATURES",
    "Timing",
    "QAStyle",
    "QA_STYLES",
    "WorldConfig",
    "EventKind",
    "CHANNELS",
    "EVENT_KINDS",
    "STRESS_KINDS",
    "APP_KINDS",
    "catalogue_texts",
    "build_evidence",
    "Intent",
    "INTENTS",
    "verify_answers",
    "answer_claims",
    "CALIBRATION_SEED",
    "CALIBRATION_USERS",
    "TaskSpec",
    "TASK_SPECS",
    "TASK_IDS",
    "calibrate_tasks",
    "oracle_probabilities",
    "GENERATOR_VERSION",
    "world_summary",
    "generate_world",
    "ensure_world",
    "world_is_saved",
    "events_per_user",
    "user_timeline",
    "qa_examples",
    "save_world",
    "load",
]
