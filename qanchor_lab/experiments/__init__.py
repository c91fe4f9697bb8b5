"""Experiments as a library layer: one nested run config (config.py), cached runs (runner.py), variant
comparison over seeds with paired bootstrap CIs (core.py), the experiment families (ablations.py,
sweeps.py, scaling.py) and plotly figures for their tables (figures.py).

    from qanchor_lab.experiments import get_config, run_ablations
    exp = run_ablations(fast=True)
    exp.summary
"""

from qanchor_lab.experiments import ablations, scaling, sweeps
from qanchor_lab.experiments.ablations import run_ablations
from qanchor_lab.experiments.config import EvalConfig, RunConfig, get_config
from qanchor_lab.experiments.core import Experiment, run_experiment
from qanchor_lab.experiments.runner import RunResult, ensure_model, run
from qanchor_lab.experiments.scaling import run_scaling
from qanchor_lab.experiments.sweeps import run_sweep

EXPERIMENTS = ("ablations", "prompt_tokens", "tuning_epochs", "prompt_init", "prototypes", "scaling")


def _family(name: str):
    """The module of one experiment by its CLI name (see EXPERIMENTS): ablations, scaling, or the prompt sweeps."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return ablations if name == "ablations" else scaling if name == "scaling" else sweeps


def base_config_for(name: str, fast: bool = False) -> RunConfig:
    """The reference config of one experiment by its CLI name: what its variants change one setting of."""
    return _family(name).base_config(fast)


def run_named(name: str, **kw) -> Experiment:
    """One experiment by its CLI name (see EXPERIMENTS)."""
    family = _family(name)
    if family is ablations:
        return run_ablations(**kw)
    if family is scaling:
        return run_scaling(**kw)
    return run_sweep(name, **kw)


__all__ = ["EXPERIMENTS", "EvalConfig", "Experiment", "RunConfig", "RunResult", "base_config_for", "ensure_model",
           "get_config", "run", "run_ablations", "run_experiment", "run_named", "run_scaling", "run_sweep"]
