"""Ablations: the full model against each of its mechanisms switched off (docs/design.md §1.8).

Variants (each one dotted-key override of the same base config, same world, same seeds):
full (reference), no_user_token, no_modality_tokens, neither (no user and no modality tokens),
no_contrastive, no_generative (pre-training losses), no_reconstruction (without our input-reconstruction term,
docs/design.md §7.8), no_answer_set (without our answer-set term, §7.12; with both off: the paper's objective),
no_pretraining (the initialised model).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qanchor_lab.experiments.config import RunConfig, get_config
from qanchor_lab.experiments.core import Experiment, run_experiment, seeds_for, variant_params

REFERENCE = "full"
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_user_token": {"model.use_user_token": False},
    "no_modality_tokens": {"model.use_modality_tokens": False},
    "neither": {"model.use_user_token": False, "model.use_modality_tokens": False},
    "no_contrastive": {"pretrain.use_contrastive": False},
    "no_generative": {"pretrain.use_generative": False},
    "no_reconstruction": {"pretrain.reconstruction": 0.0},
    "no_answer_set": {"pretrain.answer_set": 0.0},
    "no_pretraining": {"pretrained": False},
}
# The paper's qualitative claims (docs/design.md §1.8), as (variant, expected sign of AUC - full AUC, claim).
PAPER_CLAIMS: tuple[tuple[str, int, str], ...] = (
    ("no_user_token", -1, "removing the user token costs a little"),
    ("no_modality_tokens", -1, "removing the modality tokens costs a little"),
    ("neither", -1, "removing user and modality tokens costs (a little)"),
    ("no_contrastive", -1, "removing contrastive learning costs the most of all ablations"),
    ("no_generative", -1, "(not listed in §1.8) the joint objective implies the next-token loss helps"),
    ("no_reconstruction", -1, "(ours, not the paper's) the reconstruction term keeps the user's input in the embedding"),
    ("no_answer_set", -1, "(ours, not the paper's) the answer-set term teaches each anchor its own question's answers"),
    ("no_pretraining", -1, "without pre-training performance collapses"),
)


# Fast mode: a smoke run of every variant (two pre-training steps, one task). The fast scaling grid's reference
# cell is its reference run and the fast sweeps tune prompts on its model, so notebooks 07 and 08 reuse 06's cache.
FAST_STEPS = 2
FAST_TASK_IDS = ["dormancy_churn"]


def base_config(fast: bool) -> RunConfig:
    """The reference run. Fast mode: two steps, one task, the task query + probe only (prompt tuning off)."""
    cfg = get_config(fast)
    if fast:
        cfg = cfg.override({"pretrain.max_steps": FAST_STEPS, "eval.methods": ["qanchor_base"],
                            "eval.task_ids": FAST_TASK_IDS})
    return cfg


def variants(base: RunConfig, names=None) -> dict[str, RunConfig]:
    names = list(names or ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; valid: {', '.join(ABLATIONS)}")
    return {n: base.override(ABLATIONS[n]) for n in names}


def run_ablations(*, fast: bool = False, seeds: int | None = None, base: RunConfig | None = None, names=None,
                  out: Path | None = None, root: Path | None = None, device: str = "cpu", jobs: int = 1,
                  show_progress: bool = True, world=None) -> Experiment:
    """Every ablation at every seed; the tidy table and the summary against the full model."""
    vs = variants(base or base_config(fast), names)
    if REFERENCE not in vs:
        raise ValueError(f"names must include the reference {REFERENCE!r}")
    return run_experiment("ablations" + ("-fast" if fast else ""), vs, reference=REFERENCE,
                          seeds=seeds_for(fast, seeds), out=out, root=root, device=device, jobs=jobs,
                          show_progress=show_progress, params=variant_params(vs, REFERENCE), world=world)


def paper_check(summary: pd.DataFrame, method: str | None = None) -> pd.DataFrame:
    """Each ablation beside the paper's claim: the measured difference, its CI, and whether the claim
    reproduces here ("yes": CI on the claimed side of 0; "no": CI on the other side; "not resolved":
    within noise). For no_contrastive the drop must also be the largest of the other ablations, no_pretraining
    left out: it removes contrastive learning with everything else, so it could only cost as much or more."""
    method = method or ("qanchor_prompt_tuned" if "qanchor_prompt_tuned" in set(summary["method"]) else "qanchor_base")
    s = summary[summary["method"] == method].set_index("variant")
    rows = []
    for v, sign, claim in PAPER_CLAIMS:
        if v not in s.index:
            continue
        r = s.loc[v]
        lo, hi = sign * r["auc_diff_low"], sign * r["auc_diff_high"]
        if min(lo, hi) > 0:
            status = "yes"
        elif max(lo, hi) < 0:
            status = "no (opposite, CI excludes 0)"
        else:
            status = "not resolved (within noise)"
        others = s.drop(index=[v, REFERENCE, "no_pretraining"], errors="ignore")
        if v == "no_contrastive" and status == "yes" and len(others) and r["auc_diff"] > others["auc_diff"].min():
            status = f"partly (a drop, but {others['auc_diff'].idxmin()} costs more)"
        rows.append({"variant": v, "paper_claim": claim, "auc_diff": r["auc_diff"], "auc_diff_low": r["auc_diff_low"],
                     "auc_diff_high": r["auc_diff_high"], "verdict": r["verdict"], "reproduces": status})
    return pd.DataFrame(rows)
