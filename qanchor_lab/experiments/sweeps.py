"""Prompt-tuning sweeps on one pre-trained model per seed: prompt tokens, tuning epochs, prompt
initialisation, prototypes per class (PromptTuningConfig, docs/design.md §1.6).

All variants of a sweep share the pre-trained model (same model_key, pre-trained once per seed) and
differ only in `tuning.*`; they are scored by the prompt-tuned method on the same test users. Early
stopping and every fit use the tune split only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from qanchor_lab.experiments import ablations
from qanchor_lab.experiments.config import RunConfig, flatten, get_config
from qanchor_lab.experiments.core import Experiment, run_experiment, seeds_for

# sweep name -> (dotted key, full-mode values, fast-mode values); the reference is the base config's value
SWEEPS: dict[str, tuple[str, tuple, tuple]] = {
    "prompt_tokens": ("tuning.n_prompt", (0, 1, 2, 4, 6, 8, 12, 16), (0, 1, 6, 16)),
    "tuning_epochs": ("tuning.epochs", (0, 1, 2, 5, 10, 20), (0,)),
    "prompt_init": ("tuning.prompt_init", ("random_words", "query"), ("random_words", "query")),
    "prototypes": ("tuning.prototypes_per_class", (1, 2, 4), (1, 3)),
}


def base_config(fast: bool) -> RunConfig:
    """The reference run, scored by prompt tuning only. Fast mode: the ablations' fast reference (two
    pre-training steps, one task; its pre-trained model is cached when notebook 06 ran first), 2 epochs."""
    if fast:
        return ablations.base_config(True).override({"eval.methods": ["qanchor_prompt_tuned"]})
    return get_config(False).override({"eval.methods": ["qanchor_prompt_tuned"]})


def variant_name(key: str, value) -> str:
    return f"{key.split('.')[-1]}={value}"


def sweep_variants(name: str, base: RunConfig, values: Sequence | None = None, *, fast: bool = False
                   ) -> tuple[dict[str, RunConfig], str, dict[str, dict]]:
    """({variant: config}, reference variant, {variant: {param: value}}) of one sweep."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid: {', '.join(SWEEPS)}")
    key, full, quick = SWEEPS[name]
    values = list(values if values is not None else (quick if fast else full))
    ref = flatten(base.to_dict())[key]
    if ref not in values:  # the reference is always run: every difference is measured against it
        values.append(ref)
    vs, params = {}, {}
    for v in values:
        over = {key: v}
        if name == "tuning_epochs":  # the epoch budget is spent (no early stop before it), the best epoch still chosen on validation
            over["tuning.patience"] = max(int(v), 1)
        vs[variant_name(key, v)] = base.override(over)
        params[variant_name(key, v)] = {key.split(".")[-1]: v}
    return vs, variant_name(key, ref), params


def run_sweep(name: str, *, fast: bool = False, seeds: int | None = None, values: Sequence | None = None,
              base: RunConfig | None = None, out: Path | None = None, root: Path | None = None,
              device: str = "cpu", jobs: int = 1, show_progress: bool = True, world=None) -> Experiment:
    vs, ref, params = sweep_variants(name, base or base_config(fast), values, fast=fast)
    return run_experiment(name + ("-fast" if fast else ""), vs, reference=ref, seeds=seeds_for(fast, seeds), out=out,
                          root=root, device=device, jobs=jobs, show_progress=show_progress, params=params, world=world)


def saturation(exp: Experiment, param: str, method: str = "qanchor_prompt_tuned") -> dict:
    """Where the gain saturates along a numeric sweep: the smallest value whose AUC is within noise of
    the best variant's (paired CI against the best includes 0). A reported figure, not a choice."""
    s = exp.summary[exp.summary["method"] == method]
    values = exp.table.drop_duplicates("variant").set_index("variant")[param]
    best = s.loc[s["auc"].idxmax(), "variant"]
    vs_best = exp.compare_to(best)
    vs_best = vs_best[vs_best["method"] == method].assign(value=lambda d: d["variant"].map(values)).sort_values("value")
    within = vs_best[(vs_best["variant"] == best) | (vs_best["auc_diff_high"] >= 0)]
    first = within.iloc[0]
    return {"param": param, "best": values[best], "best_auc": float(s.loc[s["variant"] == best, "auc"].iloc[0]),
            "saturates_at": first["value"], "auc_at_saturation": float(first["auc"]),
            "sentence": (f"best {param}={values[best]} (AUC {s['auc'].max():.4f}); from {param}={first['value']} on, "
                         f"the paired CI against the best includes 0: the gain saturates at {param}={first['value']}")}


def sweep_table(exp: Experiment, param: str) -> pd.DataFrame:
    """The summary with the swept value as a column, sorted by it (for line plots)."""
    values = exp.table.drop_duplicates("variant").set_index("variant")[param]
    return exp.summary.assign(**{param: exp.summary["variant"].map(values)}).sort_values(param).reset_index(drop=True)
