"""One nested run configuration made of the stage configs, overridable by dotted key.

As minGPT's `get_config()` composes each component's defaults into one tree, `RunConfig` holds a
WorldConfig (world.py), a QAnchorConfig with its BackboneConfig (model.py, backbone.py), a
PretrainConfig (pretrain.py), a PromptTuningConfig (prompt_tuning.py) and an EvalConfig (here), plus
the few run-level knobs no stage owns (the pre-training seed, the share of pre-training users, whether
to pre-train at all). A sweep changes one leaf without popping keys by hand:

    cfg = get_config(fast=True).override({"pretrain.lr": 1e-3, "model.use_user_token": False})

`override` rebuilds every stage config from its dict, so each stage's own `__post_init__` validates the
new value, and an unknown key is an error naming the valid keys at that level.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, get_args

from qanchor_lab.backbone import BackboneConfig
from qanchor_lab.model import QAnchorConfig
from qanchor_lab.pretrain import PretrainConfig
from qanchor_lab.prompt_tuning import PromptTuningConfig
from qanchor_lab.world import GENERATOR_VERSION, WorldConfig

Method = Literal["qanchor_base", "qanchor_prompt_tuned"]
METHODS: tuple[str, ...] = get_args(Method)
# Four tasks, at least one per domain, for fast mode (as notebook 04's fast mode).
FAST_TASKS: tuple[str, ...] = ("dormancy_churn", "credit_delinquency", "liquidity_shortfall", "ivr_cash_reserve")
STAGES: tuple[str, ...] = ("world", "model", "pretrain", "tuning", "eval")
# Fields of the run that never change the scores a run produces (kept out of its cache key).
NOT_HASHED: dict[str, tuple[str, ...]] = {"eval": ("n_boot", "ci", "boot_seed")}


@dataclass
class EvalConfig:
    """What a run scores on the downstream users and how experiments compare runs."""

    task_ids: tuple[str, ...] | None = None  # tasks scored (None: every task of the world)
    methods: tuple[Method, ...] = METHODS     # qanchor_base: task query + logistic probe; qanchor_prompt_tuned: soft prompt
    n_boot: int = 1000                        # paired user-bootstrap resamples for the CIs
    ci: float = 0.95                          # CI level
    boot_seed: int = 0                        # bootstrap draws (the same for every variant: paired)

    def __post_init__(self):
        if self.task_ids is not None:
            # one task id given alone (--set eval.task_ids=dormancy_churn) is one task, not one per character
            self.task_ids = (self.task_ids,) if isinstance(self.task_ids, str) else tuple(self.task_ids)
            if not self.task_ids:
                raise ValueError("eval.task_ids must be None (all tasks) or name at least one task")
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"eval.methods {bad or '()'} invalid; valid choices: {', '.join(METHODS)}")
        if self.n_boot < 1:
            raise ValueError(f"eval.n_boot must be >= 1, got {self.n_boot}")
        if not 0 < self.ci < 1:
            raise ValueError(f"eval.ci must lie strictly between 0 and 1, got {self.ci}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task_ids"] = None if self.task_ids is None else list(self.task_ids)
        d["methods"] = list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalConfig":
        return cls(**d)


def _pretrain_to_dict(c: PretrainConfig) -> dict:
    d = asdict(c)
    return {**d, "negatives": list(c.negatives), "answer_mask_kinds": list(c.answer_mask_kinds)}


@dataclass
class RunConfig:
    """Every setting of one run: world -> model -> pre-training -> prompt tuning -> evaluation."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: QAnchorConfig = field(default_factory=QAnchorConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0                  # pre-training seed: model init, batch order, held-out paraphrases, prompt init
    pretrained: bool = True        # ablation switch: False scores the model as initialised (no pre-training)
    pretrain_users: float = 1.0    # share of the pre-training users (and so of their QA pairs) that train the model

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not 0 < self.pretrain_users <= 1:
            raise ValueError(f"pretrain_users must lie in (0, 1], got {self.pretrain_users!r}")
        if not isinstance(self.pretrained, bool):
            raise ValueError(f"pretrained must be True or False, got {self.pretrained!r}")

    # ----- dict round trip -----
    def to_dict(self) -> dict:
        return {"world": self.world.to_dict(), "model": self.model.to_dict(), "pretrain": _pretrain_to_dict(self.pretrain),
                "tuning": asdict(self.tuning), "eval": self.eval.to_dict(), "seed": self.seed,
                "pretrained": self.pretrained, "pretrain_users": self.pretrain_users}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        _check_keys(d, _template(), "")
        return cls(world=WorldConfig.from_dict(d["world"]), model=QAnchorConfig.from_dict(d["model"]),
                   pretrain=PretrainConfig(**d["pretrain"]), tuning=PromptTuningConfig(**d["tuning"]),
                   eval=EvalConfig.from_dict(d["eval"]),
                   **{k: d[k] for k in ("seed", "pretrained", "pretrain_users") if k in d})

    # ----- overrides -----
    def override(self, changes: Mapping[str, Any]) -> "RunConfig":
        """A new config with dotted keys replaced, e.g. {"pretrain.lr": 1e-3, "model.backbone.tiny_size": "s"}.
        A section given as a mapping ({"world": {"n_users": 2000}}) changes the keys it names and keeps the others.
        Unknown keys raise a ValueError naming the valid keys at that level."""
        d = copy.deepcopy(self.to_dict())
        for key, value in flatten(changes).items():
            parts = key.split(".")
            node = d
            for depth, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    where = ".".join(parts[:depth]) or "the run config"
                    valid = sorted(node) if isinstance(node, dict) else []
                    raise ValueError(f"unknown config key {key!r}: {where} has no {part!r}; "
                                     f"valid keys there: {', '.join(valid)}")
                if depth == len(parts) - 1:
                    if isinstance(node[part], dict) and not isinstance(value, Mapping):
                        raise ValueError(f"config key {key!r} is a section; override one of its keys: "
                                         f"{', '.join(sorted(node[part]))}")
                    node[part] = _check_type(key, node[part], value)
                else:
                    node = node[part]
        return RunConfig.from_dict(d)

    def with_seed(self, seed: int) -> "RunConfig":
        """This config at another pre-training seed (the backbone and prompt-tuning seeds follow it)."""
        return self.override({key: seed for key in SEED_KEYS})

    def diff(self, other: "RunConfig") -> dict[str, tuple[Any, Any]]:
        """{dotted key: (this value, other value)} for every leaf that differs."""
        a, b = flatten(self.to_dict()), flatten(other.to_dict())
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}

    # ----- cache keys -----
    def key(self) -> str:
        """Hash of every field that shapes the run's scores (bootstrap settings excluded; prompt tuning too when the
        run scores no prompt-tuned method, which is the only one that reads it: runner.run)."""
        d = self.to_dict()
        for stage, names in NOT_HASHED.items():
            d[stage] = {k: v for k, v in d[stage].items() if k not in names}
        if "qanchor_prompt_tuned" not in self.eval.methods:
            del d["tuning"]
        return _hash({**d, "generator_version": GENERATOR_VERSION})

    def model_key(self) -> str:
        """Hash of what the pre-trained model depends on: world (its config and the generator's version: a new
        version rebuilds the world, whose runs must not be served from the cache), model, pre-training, seed, data
        share."""
        d = self.to_dict()
        return _hash({**{k: d[k] for k in ("world", "model", "pretrain", "seed", "pretrained", "pretrain_users")},
                      "generator_version": GENERATOR_VERSION})

    # ----- defaults -----
    @classmethod
    def fast(cls) -> "RunConfig":
        """A small, quick run (CI, notebooks' fast mode): 1200 users, the xs backbone, hashing text encoder,
        a few dozen pre-training steps, four tasks, a short prompt tuning."""
        return cls(
            world=WorldConfig(n_users=1200, seed=7),
            model=QAnchorConfig(backbone=BackboneConfig(name="tiny", tiny_size="xs", seed=0), text_encoder="hashing",
                                max_events=6, adapter_hidden=128, head_hidden=128, embed_dim=64),
            pretrain=PretrainConfig(epochs=1.0, batch_size=32, max_steps=20, seed=0),
            tuning=PromptTuningConfig(n_prompt=6, epochs=2, patience=1, head_epochs=10, seed=0),
            eval=EvalConfig(task_ids=FAST_TASKS, n_boot=200),
        )


def from_demo(demo) -> RunConfig:
    """The run the demo makes of a pipeline.DemoConfig: its world, model, pre-training and tuning configs
    (the demo's seed is the world's and the training seed)."""
    return RunConfig(world=demo.world_config(), model=demo.model_config(), pretrain=demo.pretrain_config(),
                     tuning=demo.tuning_config(), eval=EvalConfig(n_boot=demo.n_boot)).with_seed(demo.seed)


def get_config(fast: bool = False) -> RunConfig:
    """The default run: the demo's (pipeline.DemoConfig) world, model, pre-training and prompt tuning at
    pre-training seed 0, or the fast variant (RunConfig.fast)."""
    if fast:
        return RunConfig.fast()
    from qanchor_lab.pipeline import DemoConfig

    return from_demo(DemoConfig()).with_seed(0)


# the keys `RunConfig.with_seed` sets: an experiment runs every variant at its own seeds, so these come from them
SEED_KEYS = ("seed", "model.backbone.seed", "pretrain.seed", "tuning.seed")


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _template() -> dict:
    return RunConfig().to_dict()


def _check_keys(d: Mapping, template: Mapping, where: str) -> None:
    """Every key of `d` exists in the default tree (QAnchorConfig.from_dict alone would drop unknown keys)."""
    for k, v in d.items():
        if k not in template:
            raise ValueError(f"unknown config key {where + k!r}; valid keys at {where.rstrip('.') or 'top level'}: "
                             f"{', '.join(sorted(template))}")
        if isinstance(template[k], dict) and isinstance(v, Mapping) and k != "feature_spec":
            _check_keys(v, template[k], f"{where}{k}.")


def _check_type(key: str, old: Any, new: Any) -> Any:
    """`new` if it has its setting's kind (a number, a whole number, a switch, a word), a whole number given for a
    number as a float: a stage config's own checks compare values and would fail on the wrong kind with a TypeError
    from deep inside, and 1 stored for 1.0 would give the same setting another cache key and make the setting
    read as whole-numbered to a later override (e.g. an ablation's 0.0 over --set pretrain.reconstruction=1)."""
    def kind(v):
        if isinstance(v, bool):
            return "true or false"
        if isinstance(v, int):
            return "an integer"
        return "a number" if isinstance(v, float) else "a string" if isinstance(v, str) else None

    want, got = kind(old), kind(new)
    ok = want is None or got == want or (want == "a number" and got == "an integer")
    if not ok:
        raise ValueError(f"config key {key!r} takes {want} (now {old!r}), got {new!r}")
    return float(new) if want == "a number" and got == "an integer" else new


def _hash(d: Mapping) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]
