"""The main job, step by step: world -> model -> pre-training -> retrieval check (-> evaluation).

Each step is an idempotent helper that notebooks call too; the demo chains them and writes its
artefacts under one run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qanchor_lab.backbone import BackboneConfig, write_directory_atomically
from qanchor_lab.data import DataValidationError
from qanchor_lab.embedder import build_prefix_cache_in_chunks
from qanchor_lab.model import CONFIG_NAME, QAnchorConfig, QAnchorModel
from qanchor_lab.parallel import Jobs, torch_jobs
from qanchor_lab.pretrain import PretrainConfig, heldout_queries, pretrain
from qanchor_lab.prompt_tuning import PromptTuningConfig, tune_task
from qanchor_lab.retrieval import answer_retrieval
from qanchor_lab.schema import World
from qanchor_lab.world import WorldConfig, ensure_world

# The static-embedding baseline asks every user the same task-agnostic question.
GENERIC_QUERY = "Summarise this user's overall behaviour and needs."


class Stopwatch(dict):
    """Wall seconds per named stage, summed over repeats: `with watch("prompt_tuning"): ...`. The demo records
    where its time goes (metrics.json "stage_seconds" and "evaluation_seconds"), so a slow run can be read stage
    by stage."""

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def line(self) -> str:
        """The stages, slowest first: "text_embedding 186 s, prompt_tuning 142 s, ..."."""
        return ", ".join(f"{k} {v:.0f} s" for k, v in sorted(self.items(), key=lambda kv: -kv[1]))


def project_root() -> Path:
    """The checkout this package was installed from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


DATA_ROOT = Path(os.environ.get("QANCHOR_DATA", project_root() / "data"))
RUNS_ROOT = Path(os.environ.get("QANCHOR_RUNS", project_root() / "runs"))


DATASETS = ("synthetic", "movielens")  # what `dataset` may name: the UserU world or a named real source
OVERRIDE_SECTIONS = ("model", "pretrain", "tuning")  # the stage configs DemoConfig.overrides may change


def _is_count(value: Any, floor: int) -> bool:
    """Whether `value` is an integer (not a bool) of at least `floor`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= floor


@dataclass
class DemoConfig:
    dataset: str = "synthetic"     # synthetic (UserU, n_users) | movielens (MovieLens-100K, sources/movielens.py)
    n_users: int = 6000            # synthetic world size
    seed: int = 7                  # world seed; model and training seeds derive from it
    backbone: str = "tiny"         # tiny | smollm2 | HF id / local dir
    tiny_size: str = "xs"          # xs learned faster per second than s at the same lr (sweep_pretrain)
    max_events: int = 8           # events per modality: half the prefix, twice the steps, better (docs/design.md §7)
    epochs: float = 1.5
    batch_size: int = 32
    text_encoder: str = "minilm"
    retrieval_pairs: int = 600
    n_prompt: int = 6              # soft prompt tokens per task
    tune_epochs: int = 10          # upper bound; early stopping on a held-out part of the tune split
    n_boot: int = 1000             # bootstrap resamples for the CIs
    # the report's few-label read: labelled tune users a task, the task query against the generic query and the
    # features (where the question pays, docs/design.md §7.43), and draws of them; None leaves it out
    few_labels: int | None = 100
    few_label_draws: int = 10
    max_steps: int | None = None   # cap on pre-training steps (fast mode)
    text_max_chars: int = 800      # serialised-behaviour length for the text-embedding baseline (MiniLM reads <= 256 word pieces)
    text_max_events: int | None = None  # latest events per modality in that text; None: 3 on the synthetic world, where
                                        # it lets every modality in (chosen on tune users, docs/design.md §7.20), and the
                                        # serialiser's 20 on other data, where it was not measured (text_serialization)
    # Any other setting of the model, pre-training or prompt-tuning config by dotted key, as an experiment's
    # (experiments.config.RunConfig.override), e.g. {"model.embed_dim": 16, "pretrain.reconstruction": 1.0}: the CLI's
    # --set KEY=VALUE. Applied over the fields above; the world stays the one `n_users` and `seed` name.
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}; valid choices: {', '.join(map(repr, DATASETS))}")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict of dotted keys, got {self.overrides!r}")
        bad = [k for k in self.overrides if not isinstance(k, str) or k.split(".", 1)[0] not in OVERRIDE_SECTIONS
               or "." not in k]
        if bad:
            raise ValueError(f"override key(s) {bad} name no setting of the demo's stages; a key is SECTION.NAME "
                             f"with SECTION one of {', '.join(OVERRIDE_SECTIONS)} (e.g. model.embed_dim, "
                             "pretrain.reconstruction, tuning.lr)")
        self.overrides = dict(self.overrides)
        if self.few_labels is not None and not _is_count(self.few_labels, 2):
            raise ValueError(f"few_labels must be an integer >= 2 or None (no few-label read); got {self.few_labels!r}")
        if not _is_count(self.few_label_draws, 1):
            raise ValueError(f"few_label_draws must be an integer >= 1; got {self.few_label_draws!r}")
        if self.overrides:
            self._stage_configs()  # a bad key or value fails here, not after the world is generated
        if self.text_max_events is not None and not _is_count(self.text_max_events, 1):
            raise ValueError(f"text_max_events must be None or an integer >= 1 (latest events per modality in the "
                             f"text baseline); got {self.text_max_events!r}")

    @classmethod
    def fast(cls) -> "DemoConfig":
        return cls(n_users=1200, tiny_size="xs", max_events=8, epochs=1.0, batch_size=32, retrieval_pairs=200,
                   tune_epochs=4, n_boot=200, max_steps=40, text_max_chars=200)

    def diagnostics_size(self) -> dict:
        """Users and QA rows the demo's diagnostics read (a quick look; `diagnose` CLI does the full one).

        Query selectivity is asked of tune users (every D_uqa question each, cross-validated) rather than of
        pretrain_val QA rows: 400 tune users cost about what 400 rows did and give 37x the rows, a CI about 7x
        narrower (fast mode: 100 users against 200 rows, 3x); the rows' mean had moved by a few hundredths with
        the draw (docs/design.md §7.27-§7.28)."""
        if self.n_users <= 1200:
            return dict(max_users=300, max_pairs=200, geometry_users=200, selectivity=False, tune_selectivity_users=100)
        return dict(max_users=800, max_pairs=400, geometry_users=300, selectivity=False, tune_selectivity_users=400)

    def world_config(self) -> WorldConfig:
        return WorldConfig(n_users=self.n_users, seed=self.seed)

    def _stage_configs(self) -> tuple[QAnchorConfig, PretrainConfig, PromptTuningConfig]:
        """(model, pre-training, prompt-tuning) configs: this config's fields, then `overrides` through the experiment
        layer's override (each stage's __post_init__ checks the new value; an unknown key names the valid ones)."""
        model = QAnchorConfig(backbone=BackboneConfig(name=self.backbone, tiny_size=self.tiny_size, seed=self.seed),
                              max_events=self.max_events, text_encoder=self.text_encoder)
        pretrain = PretrainConfig(epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, max_steps=self.max_steps)
        tuning = PromptTuningConfig(n_prompt=self.n_prompt, epochs=self.tune_epochs, seed=self.seed)
        if not self.overrides:
            return model, pretrain, tuning
        from qanchor_lab.experiments.config import RunConfig

        try:
            run = RunConfig(model=model, pretrain=pretrain, tuning=tuning).override(self.overrides)
        except ValueError as e:  # a stage's own check names the field, not the override that set it
            raise ValueError(f"overrides {self.overrides}: {e}") from None
        return run.model, run.pretrain, run.tuning

    def model_config(self) -> QAnchorConfig:
        return self._stage_configs()[0]

    def pretrain_config(self) -> PretrainConfig:
        return self._stage_configs()[1]

    def tuning_config(self) -> PromptTuningConfig:
        return self._stage_configs()[2]


SYNTHETIC_TEXT_EVENTS = 3  # text_max_events=None on the synthetic world (docs/design.md §7.20)


def text_serialization(cfg: DemoConfig, world) -> dict:
    """serialize_users' arguments for the text-embedding baseline on `world`: `cfg.text_max_chars` characters and
    `cfg.text_max_events` latest events per modality; when that is None, SYNTHETIC_TEXT_EVENTS on a world of the
    synthetic generator (schema.is_synthetic) and the serialiser's default elsewhere."""
    from qanchor_lab.features import MAX_EVENTS_PER_MODALITY
    from qanchor_lab.schema import is_synthetic

    events = cfg.text_max_events
    if events is None:
        events = SYNTHETIC_TEXT_EVENTS if is_synthetic(world.manifest) else MAX_EVENTS_PER_MODALITY
    return {"max_chars": cfg.text_max_chars, "max_events_per_modality": events}


def world_dir(cfg: DemoConfig) -> Path:
    """Where the demo's dataset lives (diagnose finds a run's data through this too)."""
    if cfg.dataset == "movielens":
        return DATA_ROOT / f"movielens-100k-seed{cfg.seed}"
    return DATA_ROOT / f"world-{cfg.n_users}-seed{cfg.seed}"


def _world_version(cfg: DemoConfig) -> dict:
    """The versions that decide whether `ensure_demo_world` reuses a saved world: the schema's and the source's."""
    from qanchor_lab.schema import SCHEMA_VERSION

    if cfg.dataset == "movielens":
        from qanchor_lab.sources.movielens import SOURCE_VERSION

        return {"schema": SCHEMA_VERSION, "movielens": SOURCE_VERSION}
    from qanchor_lab.world import GENERATOR_VERSION

    return {"schema": SCHEMA_VERSION, "generator": GENERATOR_VERSION}


def ensure_demo_world(cfg: DemoConfig):
    """The World of this config, generated (or fetched) once under `world_dir(cfg)` and read back after: the
    synthetic UserU world of `n_users`, or a named source (its seed is `seed`). Every notebook of one mode
    (DemoConfig.fast() or DemoConfig()) and the demo share it through this."""
    if cfg.dataset == "movielens":
        from qanchor_lab.sources.movielens import MovieLensConfig, ensure_movielens

        return ensure_movielens(world_dir(cfg), MovieLensConfig(seed=cfg.seed))
    return ensure_world(world_dir(cfg), cfg.world_config())


def dataset_note(world, cfg: DemoConfig) -> str:
    """One line naming the data of a run for the report."""
    if cfg.dataset == "synthetic":
        return f"world: {cfg.n_users} users, seed {cfg.seed}"
    counts = world.manifest.get("counts", {}).get("users", {})
    return f"dataset: {cfg.dataset} ({', '.join(f'{k} {v}' for k, v in counts.items())} users), seed {cfg.seed}"


def build_model(world, cfg: DemoConfig) -> QAnchorModel:
    """A fresh model for this dataset: its declared modalities and history window, the config's settings."""
    start, end = world.history_window
    config = replace(cfg.model_config(), modalities=world.modalities)
    return QAnchorModel.from_data(config, world.events, world.profiles, world.users_in("pretrain"),
                                  window_start=start, window_end=end)


def untrained_beside(model: QAnchorModel, world, cfg: DemoConfig) -> QAnchorModel:
    """A fresh model of this config, the comparison the demo and the diagnostics score beside `model`: on its device
    (a GPU's too, where the trained model is), in eval mode."""
    return build_model(world, cfg).to(model.device).eval()


def pretrain_run(data_dir, out_dir, cfg: DemoConfig, *, resume_from=None, overwrite: bool = False,
                 show_progress: bool = True) -> dict:
    """`python -m qanchor_lab pretrain`: load a dataset (a saved world, or a directory of your own tables:
    `load_dataset`), build (or resume) the model, pre-train it into `out_dir`, and report retrieval before/after.
    A directory that already holds a pre-trained model is replaced only with `overwrite` (or continued with
    `resume_from`), as Hugging Face's Trainer keeps an output directory unless told to overwrite it. A demo's run
    directory, or its model/, is refused. The run marker left in `out_dir` (`pretrain_marker`) names the data, so
    that diagnose, tune-splits, label-curve and refit-intervals need no --data."""
    out_dir = Path(out_dir)
    marker = out_dir / RUN_MARKER
    if _demo_marker(marker):
        # a demo's run (its model in model/): replacing its marker would leave model/ undescribed, and the next
        # `demo --out` there would pre-train it again
        raise ValueError(f"{out_dir} is a demo's run directory ({marker} describes its model/); pre-train into "
                         "another --out")
    if out_dir.name == "model" and _demo_marker(out_dir.parent / RUN_MARKER):
        # its model/ itself: with --overwrite the demo's marker would go on describing the model replaced
        raise ValueError(f"{out_dir} is the model of a demo's run ({out_dir.parent / RUN_MARKER} describes it); "
                         "pre-train into another --out")
    if resume_from is None and not overwrite and (out_dir / CONFIG_NAME).exists():
        raise ValueError(f"{out_dir} already holds a pre-trained model; give another --out, --overwrite to replace it, "
                         f"or --resume {out_dir} to go on training it")
    world = load_dataset(data_dir, seed=cfg.seed, for_evaluation=False)
    summary = pretrain_world(world, out_dir, cfg, resume_from=resume_from, show_progress=show_progress)[1]
    marker.write_text(json.dumps(pretrain_marker(cfg, data_dir, resume_from), indent=2))
    return summary


def pretrain_marker(cfg: DemoConfig, data_dir, resume_from=None) -> dict:
    """The run marker `pretrain_run` leaves beside its model: the demo's key (`run_key`, which names the dataset
    under "data") tagged written_by="pretrain", so that it never equals the key `ensure_pretrained` compares with.
    A match there would reuse RUN/model as the demo's model, but `pretrain_run` writes its model in RUN itself, and a
    resumed model's history is more than its config says."""
    key = {**run_key(cfg, data_dir), "written_by": "pretrain"}
    if resume_from is not None:
        key["resumed_from"] = str(Path(resume_from).resolve())
    return key


def _demo_marker(marker: Path) -> bool:
    """Whether `marker` is a demo's run marker (one `pretrain_run` wrote carries written_by="pretrain"); an unreadable
    one counts as a demo's: whoever wrote it, its run is not pretrain_run's to replace."""
    held = _read_marker(marker)
    return held is not None and held.get("written_by") != "pretrain"


def _read_marker(marker: Path):
    """A run marker as JSON; None when there is none, {} when it is cut short or not a JSON object (it matches no
    key). The one reader of run markers: the demo's reuse check, pretrain_run's refusals and `diagnostics.run_marker`."""
    if not marker.is_file():
        return None
    try:
        held = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return held if isinstance(held, dict) else {}


def pretrain_world(world, out_dir, cfg: DemoConfig, *, resume_from=None, show_progress: bool = True) -> tuple[QAnchorModel, dict]:
    out_dir = Path(out_dir)
    model = QAnchorModel.from_pretrained(resume_from) if resume_from else build_model(world, cfg)
    pcfg = cfg.pretrain_config()
    heldout = heldout_queries(world.qa, pcfg.seed) if pcfg.holdout_paraphrases else set()
    val_store = model.behaviour(world.events, world.profiles, world.users_in("pretrain_val"))
    kw = dict(max_pairs=cfg.retrieval_pairs, heldout=heldout, seed=cfg.seed, store=val_store)
    before = answer_retrieval(model, world, **kw) if resume_from is None else None
    summary = pretrain(model, world, pcfg, out_dir, resume_from=resume_from, show_progress=show_progress)
    after = answer_retrieval(model, world, **kw)
    summary["retrieval"] = {"untrained": before, "trained": after}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    return model, summary


def load_dataset(data_dir, *, seed: int = 0, for_evaluation: bool = True) -> World:
    """A dataset directory (a saved world, or your own tables: data/README.md) checked for what the demo needs:
    QA pairs for pre-training (derived from the event log by derive_qa when the dataset has none), and users,
    tasks and labels for evaluation. `for_evaluation=False` (`pretrain --data`) needs only the pre-training
    users: no tune or test users, tasks or labels."""
    from qanchor_lab.derive_qa import DeriveQAConfig, derive_world_qa
    from qanchor_lab.sources.byo import load, without_task_queries

    world = load(data_dir)
    counts = world.users["split"].value_counts()
    needed = ("pretrain", "pretrain_val", "tune", "test") if for_evaluation else ("pretrain", "pretrain_val")
    short = [s for s in needed if not counts.get(s)]
    if short:
        why = ("the demo pre-trains on pretrain, checks retrieval on pretrain_val, fits on tune, scores test"
               if for_evaluation else "pre-training trains on pretrain users and checks retrieval on pretrain_val users")
        raise DataValidationError(f"dataset {data_dir}: users: no user in split(s) {', '.join(short)}; {why}")
    if for_evaluation and (world.tasks.empty or world.labels.empty):
        raise DataValidationError(f"dataset {data_dir}: the demo evaluates downstream tasks: add a tasks table "
                                  "(task_id, query) and a labels table (user_id, task_id, label)")
    if for_evaluation:   # said now, not after pre-training, where the first probe would find it
        split = world.labels["user_id"].map(world.users.set_index("user_id")["split"])
        classes = world.labels.groupby([world.labels["task_id"], split])["label"].unique()
        for task_id in world.tasks["task_id"]:
            for s in ("tune", "test"):
                found = sorted(int(v) for v in classes.get((task_id, s), []))
                if len(found) < 2:
                    raise DataValidationError(
                        f"dataset {data_dir}: task {task_id!r}: the {s} users' labels are {found or 'missing'}; the "
                        "demo fits on tune users and scores test users, which needs both classes in each")
    if world.qa.empty:
        # no QA table: D_uqa/D_future pairs from the log, the pre-training users' last 30 days as their future
        units = {m.unit for m in world.modality_specs if m.amount != "zero"}
        qa_cfg = DeriveQAConfig(seed=seed, amount_unit=units.pop() if len(units) == 1 else "")
        world = derive_world_qa(world, qa_cfg)
        # pre-training must never ask a task's own question (docs/design.md §2): a template that words one is left out
        qa, dropped = without_task_queries(world.qa, world.tasks)
        world = replace(world, qa=qa)
        print(f"dataset {data_dir}: no qa table; derived {len(world.qa)} QA pairs from the event log "
              f"(global cutoff, {qa_cfg.future_days:g}-day future window; derive_qa)"
              + (f"; left out {dropped} that asked a task's query verbatim" if dropped else ""))
    return world


RUN_MARKER = "demo_config.json"  # in a run directory: the key of the model it holds (run_key), read by diagnostics

# DemoConfig fields only the evaluation reads (prompt tuning, the text baseline, the bootstrap): a run whose config
# differs in these alone reuses its pre-trained model.
EVALUATION_FIELDS = ("n_prompt", "tune_epochs", "n_boot", "text_max_chars", "text_max_events", "few_labels",
                     "few_label_draws")


def _training_fields(config: dict) -> dict:
    """A demo config (or run marker) as a dict without its EVALUATION_FIELDS."""
    return {k: v for k, v in config.items() if k not in EVALUATION_FIELDS}


def run_key(cfg: DemoConfig, data_dir=None) -> dict:
    """What a demo's pre-trained model depends on, as JSON: the demo config without its EVALUATION_FIELDS, the model
    and pre-training configs it resolves to (library defaults included, so that a changed default retrains rather
    than reusing an older model), and the dataset directory when it is a user's own."""
    # overrides reach the key through the configs they resolve to: one that changes only prompt tuning keeps the model
    training = {k: v for k, v in _training_fields(asdict(cfg)).items() if k != "overrides"}
    key = {**training, "model_config": asdict(cfg.model_config()), "pretrain_config": asdict(cfg.pretrain_config())}
    if data_dir is not None:
        key["data"] = str(Path(data_dir).resolve())
    else:   # a new generator or source version rebuilds the world, so a model trained on the old one must not serve
        key["world_version"] = _world_version(cfg)
    return json.loads(json.dumps(key, default=str))  # tuples as lists: what the marker file gives back


def ensure_pretrained(run_dir, cfg: DemoConfig, *, show_progress: bool = True, data_dir=None, reuse_from=None
                      ) -> tuple[QAnchorModel, object, dict]:
    """(model, world, pretrain summary) for this config: loaded from `run_dir` when it was trained with the
    same config (EVALUATION_FIELDS aside: `run_key`) and dataset, else generated/trained there. Notebooks share
    models through this.
    `data_dir`: a user's own dataset (load_dataset) instead of the synthetic world.
    `reuse_from`: a directory of demo runs (the command line passes RUNS_ROOT). When `run_dir` has no model for this
    key and a run there has one, that model is copied rather than pre-trained again: a run that changes only prompt
    tuning or the evaluation (`demo --set tuning.n_prompt=4`, its own run directory) costs no pre-training."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).is_file():
        # `pretrain --out` saves its model in the run directory itself; a demo's beside it in model/ would leave the
        # run's readers (diagnose, tune-splits, ...: diagnostics.run_model_dir) reading one model with the other's marker
        raise ValueError(f"{run_dir} holds a model of its own ({CONFIG_NAME}, from `pretrain --out`); give the demo "
                         "another run directory")
    if data_dir is None:
        world = ensure_demo_world(cfg)
        key = run_key(cfg)
    else:
        world = load_dataset(data_dir, seed=cfg.seed)
        key = run_key(cfg, data_dir)
    marker = run_dir / RUN_MARKER
    model_dir = run_dir / "model"
    stored = _held_key(run_dir)
    if stored != key:
        source = _run_holding(key, reuse_from, besides=run_dir)
        if stored is not None:   # a finished model with other settings is replaced: said, never silent
            from qanchor_lab.experiments.config import flatten

            old, new = flatten(stored), flatten(key)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            adapters = run_dir / "adapters"
            stale = adapters.is_dir() and any(adapters.iterdir())
            warnings.warn(f"{run_dir} holds a model pre-trained with other settings ({', '.join(changed[:5])}"
                          f"{', ...' if len(changed) > 5 else ''}); "
                          + (f"copying {source}'s model, pre-trained with these," if source else "pre-training a new one")
                          + " in its place"
                          + (" and removing the prompts tuned for the old one (adapters/)" if stale else "")
                          + " (give another run directory to keep them)", stacklevel=2)
            if stale:   # tuned on the old model's embeddings: loaded beside the new one they would score wrongly
                shutil.rmtree(adapters)
        if source is None:
            model, summary = pretrain_world(world, model_dir, cfg, show_progress=show_progress)
            marker.write_text(json.dumps(key, indent=2))
            return model, world, summary
        print(f"{run_dir}: pre-trained model copied from {source} (same model, pre-training and data: run_key)")
        shutil.rmtree(model_dir, ignore_errors=True)   # the old model, replaced (said above)
        # through a temporary sibling: an interrupted copy never looks like a finished model
        write_directory_atomically(model_dir, lambda tmp: shutil.copytree(source / "model", tmp, dirs_exist_ok=True))
        marker.write_text(json.dumps(key, indent=2))
    summary = json.loads((model_dir / "pretrain_summary.json").read_text())
    return QAnchorModel.from_pretrained(model_dir), world, summary


def _held_key(run_dir: Path):
    """The key of the model a demo's run directory holds (its marker, EVALUATION_FIELDS aside), None when it holds
    no finished model or no marker. A marker that is not a demo key (a `pretrain` marker, {} for an unreadable one)
    comes back as read, and matches no key."""
    if not (run_dir / "model" / "pretrain_summary.json").is_file():  # none, or pre-training stopped before it finished
        return None
    stored = _read_marker(run_dir / RUN_MARKER)   # one cut short matches no key, so its model is replaced (said)
    # a marker written before run_key left out the evaluation fields still matches
    return None if stored is None else _training_fields(stored)


def _run_holding(key: dict, runs_root, *, besides: Path) -> Path | None:
    """The first run directory under `runs_root` (sorted by name) whose finished model was pre-trained with `key`,
    `besides` excluded; None when there is none or `runs_root` is None. A `pretrain` command's marker never matches
    (its written_by tag: its model is not in model/)."""
    if runs_root is None or not Path(runs_root).is_dir():
        return None
    for marker in sorted(Path(runs_root).glob(f"*/{RUN_MARKER}")):
        run = marker.parent
        if run.resolve() != besides.resolve() and _held_key(run) == key:
            return run
    return None


def run_demo(out_dir, cfg: DemoConfig, *, show_progress: bool = True, data_dir=None, n_jobs: int | None = None,
             reuse_from=None) -> dict:
    """data -> pre-training -> prompt tuning -> evaluation of every method -> report.html + metrics.json.
    `reuse_from`: a directory of runs whose model may be copied when it was pre-trained with this config's key
    (ensure_pretrained; the command line passes RUNS_ROOT).
    `data_dir`: run on a user's own dataset (data/README.md) instead of the synthetic world. `n_jobs`: worker
    processes for the evaluation's and the diagnostics' scikit-learn fits (parallel.fit_map) and threads for the
    evaluation's torch jobs (parallel.torch_jobs; see evaluate_run). None: this process, one stage after the other;
    -1: every core; the same numbers for any integer. `python -m qanchor_lab demo` uses every core."""
    from qanchor_lab.evaluate import results_markdown, write_metrics
    from qanchor_lab.parallel import resolve_n_jobs
    from qanchor_lab.report import write_report

    resolve_n_jobs(n_jobs)  # a bad value fails now, not after pre-training
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    stages = Stopwatch()
    with stages("world_and_pretraining"):
        model, world, summary = ensure_pretrained(out_dir, cfg, show_progress=show_progress, data_dir=data_dir,
                                                  reuse_from=reuse_from)
    if data_dir is not None:
        print(f"dataset {data_dir}: modalities {', '.join(world.modalities)}; counts {json.dumps(world.manifest['counts'])}")
    r = summary["retrieval"]
    print(f"\nheld-out answer retrieval, top-1 among {r['trained']['n_candidates']} candidates "
          f"(chance {r['trained']['chance_top1']:.0%}): untrained {r['untrained']['top1']:.3f} -> "
          f"pre-trained {r['trained']['top1']:.3f}  (top-5 {r['untrained']['top5']:.3f} -> {r['trained']['top5']:.3f})")
    print(f"pre-training: {summary['steps']} steps, {summary['tokens_per_second']:.0f} tokens/s, {summary['seconds']:.0f} s")
    with stages("evaluation"):
        metrics = evaluate_run(model, world, cfg, out_dir, show_progress=show_progress, n_jobs=n_jobs)
    notes = [f"not evaluated: {name}: {why}" for name, why in metrics["skipped_methods"].items()]
    # on real data (no oracle, no latent traits) the stage probes read the task labels and the claims come from the
    # QA table itself (docs/design.md §7.1)
    with stages("diagnostics"):
        diag = run_diagnostics(model, world, cfg, out_dir, show_progress=show_progress, n_jobs=n_jobs)
    if world.manifest.get("derived_qa"):  # model-free: how much the derived D_uqa claims could tell at best
        pq = metrics["perfect_qa"] = diag["perfect_qa"]
        notes.append(f"perfect QA learner (derived D_uqa claims, {pq['n_intents']} intents) vs the features, ridge "
                     f"R² against the {pq['target']} on {pq['n_users']} tune users: claims {pq['claims_r2']:.3f}, "
                     f"features {pq['features_r2']:.3f}")
    wall = time.perf_counter() - t0
    metrics["stage_seconds"] = dict(stages)
    loss_log = [json.loads(line) for line in (out_dir / "model" / "log.jsonl").read_text().splitlines()]
    write_metrics(metrics, out_dir / "metrics.json", config=asdict(cfg), wall_seconds=wall)
    backbone = cfg.model_config().backbone
    write_report(out_dir / "report.html", metrics, loss_log=loss_log, retrieval=r, diagnostics=diag,
                 notes=[(dataset_note(world, cfg) if data_dir is None else
                         f"dataset: {data_dir} ({len(world.users)} users, modalities {', '.join(world.modalities)})")
                        + f"; backbone {backbone.name} ({backbone.tiny_size}); "
                        + (f"settings changed: {json.dumps(cfg.overrides)}; " if cfg.overrides else "")
                        + f"{summary['steps']} pre-training steps; wall time {wall:.0f} s ({stages.line()})", *notes])
    print("\n" + results_markdown(metrics))
    print(f"\ntime: {stages.line()}; evaluation: {Stopwatch(metrics['evaluation_seconds']).line()}")
    print(f"wrote {out_dir / 'report.html'} and {out_dir / 'metrics.json'}; demo wall time {wall:.0f} s")
    return {"metrics": metrics, "pretrain": summary, "wall_seconds": wall}


def run_diagnostics(model: QAnchorModel, world, cfg: DemoConfig, out_dir, *, show_progress: bool = True,
                    n_jobs: int | None = None) -> dict:
    """The representation diagnostics of the trained model beside an untrained one of the same config
    (tune and pretrain_val users only), saved as diagnostics.json / .md in `out_dir`; `n_jobs` as in run_demo."""
    from qanchor_lab.diagnostics import diagnose, save_diagnostics

    size = cfg.diagnostics_size()
    diag = diagnose(model, world, untrained=untrained_beside(model, world, cfg), seed=cfg.seed,
                    show_progress=show_progress, n_jobs=n_jobs, **size)
    save_diagnostics(diag, out_dir)
    return diag


def _long_scores(task_ids, users, matrix: np.ndarray) -> pd.DataFrame:
    """(users, tasks) score matrix -> long user_id, task_id, score frame."""
    return pd.DataFrame({"user_id": np.repeat(users, len(task_ids)), "task_id": np.tile(task_ids, len(users)),
                         "score": matrix.reshape(-1)})


def query_embeddings(model: QAnchorModel, world, users: Sequence[str], *, store=None,
                     show_progress: bool = True) -> np.ndarray:
    """(U, T+1, d) embeddings of `users` under each task's query (world.tasks order), then GENERIC_QUERY: what
    the probe methods (qanchor_base, static_embedding, qanchor_plus_features) and the label curve read."""
    store = store if store is not None else model.behaviour(world.events, world.profiles, list(users))
    queries = world.tasks["query"].tolist() + [GENERIC_QUERY]
    return model.encode(store, queries, user_ids=list(users), batch_size=64, show_progress_bar=show_progress)


def qanchor_scores(model: QAnchorModel, world, *, tuning: PromptTuningConfig | None, show_progress: bool = True,
                   adapters_dir: Path | None = None, with_features: bool = True,
                   with_probes: bool = True, watch: Stopwatch | None = None,
                   n_jobs: int | None = None, jobs: Jobs | None = None,
                   embeddings: np.ndarray | None = None, seed: int = 0, feature_spec=None
                   ) -> tuple[dict[str, pd.DataFrame], dict]:
    """Static, base (task query + probe), plus_features (the same task-query embeddings next to the
    hand-crafted features, one probe) and prompt-tuned scores of one model on the downstream users.
    `with_probes=False` skips the three probe methods (prompt-tuned scores only). `watch` (a Stopwatch) gets
    the seconds of query_embeddings, probes, plus_features and prompt_tuning. `n_jobs`: worker processes for
    the probes' fits (parallel.fit_map) and threads for the tasks' prompt tuning (parallel.torch_jobs: None tunes
    one task after the other with torch's threads as they are; an integer, one torch thread per task, the same
    numbers for any value). `jobs`: an open torch_jobs to tune in instead (evaluate_run shares one).
    `embeddings`: the probes' `query_embeddings` of the tune then test users, when the caller has them already.
    `seed`: the probes' CV folds (ProbeConfig.seed), the run's seed as for the feature baselines.
    `feature_spec`: plus_features' FeatureSpec, when the caller has fitted it (else fitted on the pre-training users)."""
    from qanchor_lab.baselines import ProbeConfig, combined_probe_scores, embedding_probe_scores

    watch = watch if watch is not None else Stopwatch()
    tune, test = world.users_in("tune"), world.users_in("test")
    users = tune + test
    store = model.behaviour(world.events, world.profiles, users)
    tasks = world.tasks
    queries = tasks["query"].tolist()
    out = {}
    if with_probes:
        if embeddings is None:
            with watch("query_embeddings"):
                embeddings = query_embeddings(model, world, users, store=store, show_progress=show_progress)
        elif np.shape(embeddings)[:2] != (len(users), len(queries) + 1):
            raise ValueError(f"embeddings: expected (tune + test users, tasks + 1, d) = ({len(users)}, "
                             f"{len(queries) + 1}, d) as query_embeddings gives them; got {np.shape(embeddings)}")
        emb = embeddings  # (U, T+1, d)
        by_query = {q: emb[:, i] for i, q in enumerate(queries)}
        row = {u: i for i, u in enumerate(users)}

        def embed_fn(ids, query):
            idx = [row[u] for u in ids]
            return (by_query[query] if query is not None else emb[:, -1])[idx]

        probe = ProbeConfig(seed=seed)
        with watch("probes"):
            out["base"] = embedding_probe_scores(embed_fn, tune, test, world.labels, tasks, probe, n_jobs=n_jobs)
            out["static"] = embedding_probe_scores(embed_fn, tune, test, world.labels, tasks, probe,
                                                   query_dependent=False, n_jobs=n_jobs)
        if with_features:
            with watch("plus_features"):
                out["plus_features"] = combined_probe_scores(embed_fn, world, tune, test, probe=probe, n_jobs=n_jobs,
                                                             feature_spec=feature_spec)
    if tuning is None:
        return out, {}

    with watch("prompt_tuning"), (torch_jobs(n_jobs) if jobs is None else nullcontext(jobs)) as jobs:
        return _prompt_tuned(model, world, store, tuning, out, show_progress=show_progress, adapters_dir=adapters_dir,
                             jobs=jobs)


def _tune_and_score(model, tune_cache, test_cache, labels: np.ndarray, query: str, tuning: PromptTuningConfig):
    """One task's prompt tuning and its test scores: a torch job (each task reads the shared caches, writes nothing
    shared, and seeds its own generators, so tasks can run side by side)."""
    result = tune_task(model, tune_cache, labels, query, tuning)
    return result, result.adapter.score(model, test_cache)


def _prompt_tuned(model, world, store, tuning: PromptTuningConfig, out: dict, *, show_progress: bool,
                  adapters_dir: Path | None, jobs: Jobs) -> tuple[dict[str, pd.DataFrame], dict]:
    """qanchor_scores' prompt-tuned method: one adapter per task over cached tune prefixes, scored on test; the
    tasks are torch jobs of `jobs`."""
    tune, test = world.users_in("tune"), world.users_in("test")
    tasks = world.tasks
    queries = tasks["query"].tolist()
    labels = world.labels.pivot(index="user_id", columns="task_id", values="label")
    tune_cache = build_prefix_cache_in_chunks(model, store, tune)
    test_cache = build_prefix_cache_in_chunks(model, store, test)
    matrix = np.zeros((len(test), len(tasks)))
    info = {}
    model.eval()
    for p in model.parameters():  # once here, before the tasks run side by side (tune_task does the same)
        p.requires_grad_(False)
    handles = [jobs.submit(_tune_and_score, model, tune_cache, test_cache,
                           labels.loc[tune, task_id].to_numpy().astype(int), query, tuning)
               for task_id, query in zip(tasks["task_id"], queries)]
    for k, (task_id, handle) in enumerate(tqdm(list(zip(tasks["task_id"], handles)), desc="prompt tuning",
                                               disable=not show_progress)):
        result, matrix[:, k] = handle.result()
        info[task_id] = {"best_epoch": result.best_epoch, "val_auc": result.val_auc, "history": result.history}
        if adapters_dir is not None:
            result.adapter.save(Path(adapters_dir) / task_id)
    out["prompt_tuned"] = _long_scores(tasks["task_id"].tolist(), test, matrix)
    return out, info


def restrict_tasks(world, task_ids: Sequence[str] | None):
    """The world with only these tasks (and their labels); `None` keeps every task."""
    if task_ids is None:
        return world
    task_ids = list(task_ids)  # a list, a tuple or a pandas Series alike
    unknown = sorted(set(task_ids) - set(world.tasks["task_id"]))
    if unknown or not task_ids:
        raise ValueError(f"task_ids: unknown task(s) {unknown or task_ids}; valid: {', '.join(world.tasks['task_id'])}")
    return replace(world, tasks=world.tasks[world.tasks["task_id"].isin(task_ids)].reset_index(drop=True),
                   labels=world.labels[world.labels["task_id"].isin(task_ids)].reset_index(drop=True))


# The methods evaluate_run can leave out (`skip_methods`): every reference method. Q-Anchor's own four come from one
# set of embeddings and always run together.
SKIPPABLE_METHODS: tuple[str, ...] = ("oracle", "gbdt_features", "logreg_features", "tfidf_features", "text_embedding",
                                      "untrained")
SKIPPED_BY_CALLER = "left out by the caller (evaluate_run(skip_methods=...))"


def _check_skip(skip_methods: Sequence[str]) -> set[str]:
    """`skip_methods` as a set, or a clear error for a bare string or a method that cannot be left out."""
    if isinstance(skip_methods, str):
        raise TypeError(f"skip_methods must be a sequence of method names, not the string {skip_methods!r}; "
                        f"wrap it in a list")
    skip = set(skip_methods)
    wrong = sorted(skip - set(SKIPPABLE_METHODS))
    if wrong:
        raise ValueError(f"skip_methods: cannot leave out {', '.join(map(repr, wrong))}; methods that can be left out: "
                         f"{', '.join(SKIPPABLE_METHODS)} (Q-Anchor's own methods always run)")
    return skip


def _timed(fn, *args, **kwargs):
    """(fn's value, its own seconds), wherever it runs (a module-level function: it goes to another process)."""
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0


def evaluate_run(model: QAnchorModel, world, cfg: DemoConfig, out_dir, *, task_ids: Sequence[str] | None = None,
                 skip_methods: Sequence[str] = (), show_progress: bool = True, n_jobs: int | None = None) -> dict:
    """Every method of the evaluation protocol on the downstream test users; tune split for all fitting.
    `task_ids` restricts the evaluation to some tasks (the notebooks' fast mode); default: all. `skip_methods`
    leaves out reference methods (any of SKIPPABLE_METHODS; e.g. notebook 04's fast mode skips the text-embedding
    baseline, MiniLM over every tune and test user); the metrics list them under `skipped_methods`. `n_jobs`:
    worker processes for every method's per-task fits (parallel.fit_map) and threads for the torch jobs
    (parallel.torch_jobs: the text baseline's MiniLM runs beside the other methods, in a process of its own, the
    tasks' prompt tunings beside each other). None: one process, one stage after the other, torch's threads as they
    are; an integer: one torch thread per job, the same metrics for any value. "evaluation_seconds" gives
    text_embedding as MiniLM's own time plus its probes'; with jobs side by side the entries overlap (prompt_tuning
    is then the wait for every task) and may sum to more than the evaluation's wall time, which they never do with
    None."""
    from qanchor_lab.baselines import (ProbeConfig, _feature_matrix, _world_feature_spec, feature_scores, oracle_scores,
                                       text_embedding_scores, text_embedding_vectors, tfidf_feature_scores)
    from qanchor_lab.evaluate import NO_ORACLE, evaluate_methods, oracle_available
    from qanchor_lab.label_budget import few_label_read

    skip = _check_skip(skip_methods)
    world = restrict_tasks(world, task_ids)
    out_dir = Path(out_dir)
    tune, test = world.users_in("tune"), world.users_in("test")
    scores: dict[str, pd.DataFrame] = {}
    skipped: dict[str, str] = {name: SKIPPED_BY_CALLER for name in SKIPPABLE_METHODS if name in skip}
    watch = Stopwatch()
    spec = _world_feature_spec(world)   # fitted once: every feature method reads the same one (it was fitted in each)
    if "oracle" not in skip:
        if oracle_available(world.labels, test):
            scores["oracle"] = oracle_scores(world.labels, test)
        else:  # real data: no known truth; the results table and report say so
            skipped["oracle"] = NO_ORACLE

    with torch_jobs(n_jobs) as jobs:
        # the longest torch job first, so that it runs beside everything below; MiniLM pins its own two torch threads
        # (batch-invariant), a process-wide setting, hence a process of its own beside the one-thread jobs
        text = None if "text_embedding" in skip else jobs.submit_process(
            _timed, text_embedding_vectors, world, tune + test, serialize_kw=text_serialization(cfg, world),
            feature_spec=spec, show_progress=show_progress)

        def untrained_scores() -> pd.DataFrame:
            return qanchor_scores(untrained_beside(model, world, cfg), world, tuning=None, show_progress=show_progress,
                                  with_features=False, n_jobs=n_jobs, jobs=jobs, seed=cfg.seed)[0]["base"]

        references = {  # every skippable method but the oracle and the text baseline's MiniLM, in the order they run
            "gbdt_features": lambda: feature_scores(world, tune, test, model="gbdt", seed=cfg.seed, feature_spec=spec,
                                                    n_jobs=n_jobs),
            "logreg_features": lambda: feature_scores(world, tune, test, model="logreg", seed=cfg.seed,
                                                      feature_spec=spec, n_jobs=n_jobs),
            "tfidf_features": lambda: tfidf_feature_scores(world, tune, test, seed=cfg.seed, feature_spec=spec,
                                                           show_progress=show_progress, n_jobs=n_jobs),
            "untrained": untrained_scores,
        }
        for name, run in references.items():
            if name not in skip:
                with watch(name):
                    scores[name] = run()
        with watch("query_embeddings"):     # read by the probes and the few-label read alike
            emb = query_embeddings(model.eval(), world, tune + test, show_progress=show_progress)  # (U, T+1, d)
        trained, tuning_info = qanchor_scores(model.eval(), world, tuning=cfg.tuning_config(),
                                              show_progress=show_progress, adapters_dir=out_dir / "adapters",
                                              watch=watch, n_jobs=n_jobs, jobs=jobs, embeddings=emb, seed=cfg.seed,
                                              feature_spec=spec)
        if text is not None:
            vectors, seconds = text.result()    # MiniLM's own seconds, not the wait for them
            with watch("text_embedding"):       # and its probes'
                scores["text_embedding"] = text_embedding_scores(world, tune, test, seed=cfg.seed, vectors=vectors,
                                                                 n_jobs=n_jobs)
            watch["text_embedding"] += seconds
    scores["static_embedding"] = trained["static"]
    scores["qanchor_base"] = trained["base"]
    scores["qanchor_prompt_tuned"] = trained["prompt_tuned"]
    scores["qanchor_plus_features"] = trained["plus_features"]
    order = (*SKIPPABLE_METHODS, "static_embedding", "qanchor_base", "qanchor_prompt_tuned",
             "qanchor_plus_features")
    scores = {name: scores[name] for name in order if name in scores}  # scores.parquet's rows as before
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([s.assign(method=name) for name, s in scores.items()], ignore_index=True).to_parquet(
        out_dir / "scores.parquet", index=False)  # every method's test scores, to recompute any comparison
    with watch("bootstrap"):
        metrics = evaluate_methods(scores, world.labels, world.tasks, test, n_boot=cfg.n_boot, seed=cfg.seed)
    if cfg.few_labels is not None:
        with watch("few_labels"):
            metrics["few_labels"] = few_label_read(
                {"qanchor_base": emb[:, :-1], "static_embedding": emb[:, -1],
                 **({} if "logreg_features" in skip else {"logreg_features": _feature_matrix(world, tune + test,
                                                                                             spec)[1]})},
                world.labels, world.tasks, tune, test, budget=cfg.few_labels, draws=cfg.few_label_draws, seed=cfg.seed,
                n_boot=cfg.n_boot, config=ProbeConfig(seed=cfg.seed), n_jobs=n_jobs)
    metrics["prompt_tuning"] = {t: {k: v for k, v in i.items() if k != "history"} for t, i in tuning_info.items()}
    metrics["skipped_methods"] = skipped
    metrics["evaluation_seconds"] = dict(watch)   # where the time went: each reference method, Q-Anchor's stages
    return metrics


def sweep_pretrain(world, grid: list[dict], base: DemoConfig, out_dir, *, show_progress: bool = False) -> pd.DataFrame:
    """Pre-train one model per grid point (DemoConfig overrides, e.g. {"tiny_size": "xs", "lr": 3e-3}) and
    score held-out answer retrieval on the pretrain_val users: how the tiny backbone's defaults were chosen.
    Downstream labels are never read."""
    rows = []
    for point in grid:
        point = dict(point)
        lr = point.pop("lr", None)
        cfg = replace(base, **point)
        model = build_model(world, cfg)
        pcfg = cfg.pretrain_config()
        pcfg.lr = lr
        name = "-".join(f"{k}={v}" for k, v in sorted({**point, "lr": lr}.items()))
        summary = pretrain(model, world, pcfg, Path(out_dir) / name, show_progress=show_progress)
        heldout = heldout_queries(world.qa, pcfg.seed)
        r = answer_retrieval(model, world, max_pairs=cfg.retrieval_pairs, heldout=heldout, seed=cfg.seed)
        rows.append({**point, "lr": summary["lr"], "steps": summary["steps"], "seconds": summary["seconds"],
                     "tokens_per_second": summary["tokens_per_second"], "final_loss": summary["last"]["loss"],
                     "final_contrastive": summary["last"]["contrastive"], **{f"val_{k}": v for k, v in r.items()}})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)
