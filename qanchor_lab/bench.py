"""Benchmarks that report measured ratios side by side in one run (these machines are noisy).

- `kv`: cached-prefix encoding vs full recomputation for 10 queries per user: speedup, the ideal
  speedup from token counts, and the largest embedding difference between the two paths.
- `prompt`: one soft-prompt tuning step over cached prefixes vs over full sequences: loss difference
  and speedup per step, for the prompt before the query (the query runs in every step) and after it
  (the query joins the cache once per task).
- `pretrain`: the demo's pre-training step in tokens/s, beside the same step with the batch's answers in a
  tower pass of their own and with AdamW's per-tensor loop (the step before docs/design.md §7.49), with the
  next-token softmax over the answers' tokens, and a bare backbone forward+backward on the same sequences, both
  as a plain causal LM (full-vocabulary head) and as the decoder body alone (the strict bound).
- `explorer`: the query explorer opened over 2,000 users: time to embed a new free-text query over the
  cached population and time from submitting it to the updated figure (embed + layout + restyle), medians
  of several new queries, beside the 1 s / 3 s targets (issue 9).
- `bootstrap`: the report's paired bootstrap at the demo's scale (1,500 test users, 10 tasks, 1,000 resamples), AUC
  (per task too) and KS, beside the 10 s goal of each, and the AUC's speedup over scikit-learn's roc_auc_score called
  per resample, task and method.
- `hugepages`: the demo's two heaviest torch workloads (pre-training steps at its sizes, MiniLM over serialised
  users) in child processes with torch's transparent huge pages off and on (THP_MEM_ALLOC_ENABLE, which importing
  qanchor_lab turns on): seconds, minor page faults and kernel seconds of each, and whether the weights and vectors
  come out bit-identical.
Timings alternate the two contenders and take medians.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Literal

import numpy as np
import torch

from qanchor_lab.backbone import BackboneConfig
from qanchor_lab.model import QAnchorConfig, QAnchorModel
from qanchor_lab.world import WorldConfig, generate_world

Bench = Literal["kv", "prompt", "pretrain", "explorer", "bootstrap", "hugepages"]
QUERIES = [
    "Is this user likely to repay the credit bill late next month?",
    "Will this user respond to a phone call about a cash reserve product?",
    "Is this user going to book a hotel abroad?",
    "Will this user stop using the app next month?",
    "Is this user interested in buying an index fund?",
    "Will this user redeem a travel coupon?",
    "Is this user short of cash this month?",
    "Will this user buy insurance?",
    "Does this user open mini-programs every day?",
    "Will this user take a cash advance?",
]


def _setup(fast: bool):
    """The demo's default model sizes (DemoConfig), or a quick smoke-test setting."""
    from qanchor_lab.pipeline import DemoConfig

    demo = DemoConfig()
    world = generate_world(WorldConfig(n_users=1000 if fast else 2000, seed=1))
    cfg = QAnchorConfig(backbone=BackboneConfig(name="tiny", tiny_size=demo.tiny_size),
                        max_events=8 if fast else demo.max_events, text_encoder="hashing" if fast else demo.text_encoder)
    model = QAnchorModel.from_data(cfg, world.events, world.profiles, world.users_in("pretrain")).eval()
    users = world.users_in("test")
    store = model.behaviour(world.events, world.profiles, users)
    return world, model, store, users


def _alternate(*fns: Callable[[], object], repeats: int) -> list[float]:
    """Median seconds of each function, run in turns (a, b, a, b, ...) after one warm-up each."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            start = time.perf_counter()
            f()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def bench_kv(fast: bool = False, n_users: int = 64, queries: list[str] = QUERIES) -> dict:
    from qanchor_lab.embedder import CachedEmbedder

    _, model, store, users = _setup(fast)
    users = users[:n_users]
    embedder = CachedEmbedder(model, store)
    batch = store.batch(store.indices(users))

    def full() -> np.ndarray:
        return np.stack([model.embed(batch, [q] * len(users)).numpy() for q in queries], 1)   # (U, Q, d)

    def cached() -> np.ndarray:
        return embedder.encode(users, queries, batch_size=len(users))

    t_full, t_cached = _alternate(full, cached, repeats=2 if fast else 3)
    diff = float(np.abs(full() - cached()).max())
    prefix_tokens = int(model.encode_prefix(batch).lengths.sum())
    suffix_tokens = int(model.make_suffix(queries).mask.sum()) * len(users)
    full_tokens = prefix_tokens * len(queries) + suffix_tokens
    return {"queries_per_user": len(queries), "users": len(users), "speedup": t_full / t_cached,
            "ideal_speedup": full_tokens / (prefix_tokens + suffix_tokens),
            "efficiency": (t_full / t_cached) / (full_tokens / (prefix_tokens + suffix_tokens)),
            "max_abs_diff": diff, "seconds_full": t_full, "seconds_cached": t_cached,
            "mean_prefix_tokens": prefix_tokens / len(users), "mean_suffix_tokens": suffix_tokens / len(users) / len(queries)}


@torch.no_grad()
def kv_scaling(model, world, user_ids, *, n_queries=(1, 2, 5, 10, 20), max_events=(4, 8, 16, 32), repeats: int = 2) -> "pd.DataFrame":
    """Cached vs full-recompute time as the number of queries per user and the prefix length grow."""
    import pandas as pd

    from qanchor_lab.embedder import CachedEmbedder

    model.eval()
    rows = []
    for n_ev in max_events:
        store = model.behaviour(world.events, world.profiles, user_ids, max_events=n_ev)
        batch = store.batch(list(range(len(store))))
        prefix_tokens = int(model.encode_prefix(batch).lengths.sum())
        embedder = CachedEmbedder(model, store)
        for q in n_queries:
            queries = (QUERIES * (q // len(QUERIES) + 1))[:q]
            full = lambda: [model.embed(batch, [x] * len(store)) for x in queries]  # noqa: E731
            cached = lambda: embedder.encode(store.user_ids, queries, batch_size=len(store))  # noqa: E731
            t_full, t_cached = _alternate(full, cached, repeats=repeats)
            suffix_tokens = int(model.make_suffix(queries).mask.sum()) * len(store)
            ideal = (prefix_tokens * q + suffix_tokens) / (prefix_tokens + suffix_tokens)
            rows.append({"max_events": n_ev, "mean_prefix_tokens": prefix_tokens / len(store), "queries_per_user": q,
                         "seconds_full": t_full, "seconds_cached": t_cached, "speedup": t_full / t_cached,
                         "ideal_speedup": ideal, "ms_per_query_cached": 1000 * t_cached / (q * len(store))})
    return pd.DataFrame(rows)


def bench_prompt(fast: bool = False, batch_size: int = 64) -> dict:
    """One prompt-tuning step (forward + backward) over cached prefixes vs full sequences, for both prompt
    positions; the top-level figures are for the default PromptTuningConfig."""
    from qanchor_lab.embedder import build_prefix_cache
    from qanchor_lab.losses import prototype_loss
    from qanchor_lab.prompt_tuning import PROMPT_POSITION, PromptTuningConfig, TaskAdapter

    _, model, store, users = _setup(fast)
    for p in model.parameters():
        p.requires_grad_(False)
    users = users[:batch_size]
    batch = store.batch(store.indices(users))
    cache = build_prefix_cache(model, batch)
    labels = torch.as_tensor(np.arange(len(users)) % 2)
    H = model.llm.get_input_embeddings().weight.shape[1]

    def measure(position: str) -> dict:
        cfg = PromptTuningConfig(prompt_position=position)
        adapter = TaskAdapter(cfg.n_prompt, H, model.config.embed_dim, 2, cfg.prototypes_per_class, QUERIES[0], cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            adapter.prompt.copy_(torch.randn(cfg.n_prompt, H, generator=g) * float(model.encoder.embed_scale))
            adapter.prototypes.copy_(torch.randn(adapter.prototypes.shape, generator=g))
        task_cache = adapter.task_cache(model, cache)          # once per task, as in tune_task
        after = position == "after_query"
        full_suffix = model.make_suffix([QUERIES[0]] * len(users), n_prompt=cfg.n_prompt, prompt_after_query=after)
        losses = {}

        def step(kind: str) -> None:
            adapter.zero_grad()
            if kind == "cached":
                emb = adapter.embed(model, task_cache, task_cache=True)
            else:
                prefix = model.encode_prefix(batch)
                hidden = model.run_full(prefix, model.suffix_embeddings(full_suffix, adapter.prompt), full_suffix.mask)
                emb = model.pool(hidden, full_suffix)
            loss = prototype_loss(emb, adapter.prototypes, labels, temperature=cfg.temperature,
                                  prototype_class=adapter.prototype_class)
            loss.backward()
            losses[kind] = loss.item()

        t_full, t_cached = _alternate(lambda: step("full"), lambda: step("cached"), repeats=3 if fast else 5)
        step_suffix = model.make_suffix([adapter.suffix_text()], n_prompt=cfg.n_prompt)
        return {"loss_full": losses["full"], "loss_cached": losses["cached"],
                "loss_abs_diff": abs(losses["full"] - losses["cached"]), "speedup": t_full / t_cached,
                "seconds_full": t_full, "seconds_cached": t_cached,
                "cached_tokens": float(task_cache.lengths.float().mean()), "step_tokens": int(step_suffix.mask.sum()),
                "full_tokens": float(cache.lengths.float().mean()) + int(full_suffix.mask[0].sum())}

    default = PromptTuningConfig()
    layouts = {position: measure(position) for position in PROMPT_POSITION}
    return {"batch_size": len(users), "n_prompt": default.n_prompt, "prompt_position": default.prompt_position,
            **layouts[default.prompt_position], "prefix_tokens": float(cache.lengths.float().mean()),
            "layouts": layouts}


def _step_batches(model, world, config, steps: int):
    """The world's pre-training pairs and the first `steps` batches of epoch 0, built as the trainer builds them:
    (store, pairs, [StepBatch])."""
    from qanchor_lab.pretrain import epoch_batches, make_pairs, make_step_batch

    store = model.behaviour(world.events, world.profiles, world.users_in("pretrain"))
    pairs = make_pairs(world.qa, store, false_negatives=config.false_negatives)
    batches = [make_step_batch(pairs, rows[0], store) for rows in epoch_batches(pairs, config, 0)[:steps]]
    if len(batches) < steps:
        raise ValueError(f"the world's {len(pairs)} pre-training pairs fill {len(batches)} batches of "
                         f"{config.batch_size}, fewer than the {steps} steps asked for")
    return store, pairs, batches


def _train_steps(module, optimizer, batches, grad_clip: float | None) -> int:
    """One `training_step` per batch, as the trainer takes it in one process; the tokens the steps trained on."""
    from qanchor_lab.pretrain import count_answer_tokens, training_step

    n = 0
    for b in batches:
        out = training_step(module, b, optimizer, grad_clip=grad_clip, ntp_normalizer=count_answer_tokens(module.model, b.answers))
        n += int(out.n_tokens)
    return n


def bench_pretrain(fast: bool = False, batch_size: int = 32, steps: int = 3) -> dict:
    """The demo's pre-training step (PretrainStep on `make_step_batch`'s batches, `make_optimizer`'s AdamW,
    `training_step`) against: the same step with a second answer-tower pass for the batch's answers and with
    AdamW's per-tensor loop (the step before docs/design.md §7.49); with the next-token softmax over the answers'
    tokens only (PretrainConfig.lm_vocabulary="answers"); and bare backbone steps on the same token sequences, as
    a plain causal LM (full-vocabulary head) and as the decoder body alone (the strict bound)."""
    from dataclasses import replace

    from qanchor_lab.pretrain import PretrainConfig, PretrainStep, make_optimizer
    from qanchor_lab.sequence import position_ids

    world, model, _, _ = _setup(fast)
    model.train()
    config = PretrainConfig(batch_size=batch_size)
    store, pairs, batches = _step_batches(model, world, config, steps)
    two_passes = [replace(b, answer_set=b.answer_set._replace(row_candidate=None)) for b in batches]
    modules = {"ours": PretrainStep(model, config),
               "ours_answer_vocab": PretrainStep(model, replace(config, lm_vocabulary="answers"), answers=pairs.answers)}
    opts = {name: make_optimizer(m, config, None)[0] for name, m in modules.items()}
    fused = opts["ours"]   # the per-tensor loop: make_optimizer's AdamW over the same tensors, fused off
    loop = torch.optim.AdamW(fused.param_groups[0]["params"], fused=False,
                             **{k: fused.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")})
    counts: dict[str, int] = {}

    def our_steps(name: str, module: str = "ours", optimizer=None, step_batches=batches) -> Callable[[], None]:
        def run() -> None:
            counts[name] = _train_steps(modules[module], optimizer or opts[module], step_batches, config.grad_clip)
        return run

    # the same anchor sequences, fed to the bare backbone as a plain causal LM (loss on every position)
    seqs = []
    with torch.no_grad():
        for b in batches:
            prefix = model.encode_prefix(store.batch(b.user_index))
            suffix = model.make_suffix(b.queries, answers=b.answers)
            embeds = torch.cat([prefix.embeds, model.suffix_embeddings(suffix)], 1).detach()
            mask = torch.cat([prefix.mask, suffix.mask], 1)
            labels = torch.randint(0, model.tokenizer.vocab_size, mask.shape, generator=torch.Generator().manual_seed(0))
            seqs.append((embeds, mask, labels))
    opt = opts["ours"]

    def bare_lm() -> None:
        n = 0
        for embeds, mask, labels in seqs:
            out = model.llm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids(mask))
            loss = torch.nn.functional.cross_entropy(out.logits[mask], labels[mask])
            loss.backward(); opt.step(); opt.zero_grad()
            n += int(mask.sum())
        counts["bare_lm"] = n

    def bare_body() -> None:
        n = 0
        for embeds, mask, _ in seqs:
            out = model.decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids(mask))
            loss = out.last_hidden_state[mask].pow(2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            n += int(mask.sum())
        counts["bare_body"] = n

    contenders = {"ours": our_steps("ours"), "two_answer_passes": our_steps("two_answer_passes", step_batches=two_passes),
                  "loop_adamw": our_steps("loop_adamw", optimizer=loop),
                  "answer_vocab": our_steps("answer_vocab", module="ours_answer_vocab"),
                  "bare_lm": bare_lm, "bare_body": bare_body}
    seconds = dict(zip(contenders, _alternate(*contenders.values(), repeats=2 if fast else 3)))
    tps = {name: counts[name] / seconds[name] for name in contenders}
    ours = tps["ours"]
    return {"batch_size": batch_size, "steps": steps, "tokens_per_step": counts["ours"] / steps,
            "tokens_per_second": ours, "seconds_per_step": seconds["ours"] / steps,
            # the step before §7.49: the batch's answers in a tower pass of their own, then the per-tensor AdamW loop
            "two_answer_passes_tokens_per_second": tps["two_answer_passes"],
            "shared_answer_pass_speedup": ours / tps["two_answer_passes"],
            "loop_adamw_tokens_per_second": tps["loop_adamw"], "fused_adamw_speedup": ours / tps["loop_adamw"],
            # the same step, next-token softmax over the answers' tokens (lm_vocabulary="answers")
            "answer_vocab_tokens_per_second": tps["answer_vocab"], "answer_vocab_speedup": tps["answer_vocab"] / ours,
            # bare causal-LM step (full-vocabulary logits at every position) on the same sequences
            "bare_lm_tokens_per_second": tps["bare_lm"], "ratio_vs_bare_lm": ours / tps["bare_lm"],
            # bare decoder body only (no LM head): the strictest comparison
            "bare_body_tokens_per_second": tps["bare_body"], "ratio_vs_bare_body": ours / tps["bare_body"]}


# new free-text questions (none is a task query): each timed query must be one the explorer has not seen
EXPLORER_QUERIES = [f"{ask} {topic}?" for ask in ("Will this user", "Is this user likely to", "Does this user plan to")
                    for topic in ("plan a wedding", "buy a new phone", "save for a house", "switch to another bank",
                                  "book a ski holiday", "open a savings account", "buy a car this year",
                                  "shop mostly at night")]
TARGET_EMBED_S, TARGET_UPDATE_S = 1.0, 3.0   # issue 9: embeddings in <= 1 s, figure updated in <= 3 s


def bench_explorer(fast: bool = False, n_users: int = 2000, method: str = "umap", repeats: int = 5) -> dict:
    """Open the explorer (the demo's default model sizes, untrained: speed does not depend on the weights)
    and time new free-text queries: embedding alone, and submit -> figure updated (embed + layout + restyle).

    Timed with the explorer's default of one torch thread and with torch's own setting (2 on the 2-core
    machines): on a shared machine two threads wait on each other whenever anything else runs, so both are
    reported; the top-level figures are for the explorer's default (ExplorerConfig.threads)."""
    from qanchor_lab.explorer import ExplorerConfig, embed_query, explore
    from qanchor_lab.parallel import torch_threads

    world, model, _, _ = _setup(fast)
    config = ExplorerConfig()
    start = time.perf_counter()
    ex = explore(model, world, n_users=n_users, method=method, config=config)
    open_s = time.perf_counter() - start
    queries = [q for q in EXPLORER_QUERIES if q not in ex.tasks.values()]
    settings = {"explorer_default": config.threads, "torch_default": None}
    if len(queries) < len(settings) * (2 * repeats + 1):
        raise ValueError(f"bench_explorer: at most {len(queries) // len(settings) // 2 - 1} repeats, got {repeats}")
    by_setting = {}
    for name, threads in settings.items():
        ex.config.threads = threads
        ex.show_text(queries.pop())            # warm-up (first-call costs of the layout code)
        embed, update, layout, figure = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch_threads(threads):
                embed_query(model, ex.population.cache, queries.pop(), batch_size=ex.config.batch_size)
            embed.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ex.show_text(queries.pop())         # a query never seen: embedded, placed and drawn
            update.append(time.perf_counter() - t0)
            layout.append(ex.timings["layout"])
            figure.append(ex.timings["figure"])
        with torch_threads(threads):
            used = torch.get_num_threads()
        med = statistics.median
        by_setting[name] = {"torch_threads": used, "embed_seconds": med(embed), "update_seconds": med(update),
                            "layout_seconds": med(layout), "figure_seconds": med(figure),
                            "embed_seconds_all": embed, "update_seconds_all": update,
                            "meets_embed_target": med(embed) <= TARGET_EMBED_S,
                            "meets_update_target": med(update) <= TARGET_UPDATE_S}
    ex.config.threads = config.threads
    main = by_setting["explorer_default"]
    return {"users": len(ex.population), "method": method, "repeats": repeats,
            "mean_prefix_tokens": float(ex.population.cache.lengths.float().mean()),
            "open_seconds": open_s, "prefix_cache_seconds": ex.population.seconds_cache,
            "embed_task_queries_seconds": ex.timings["embed_task_queries"],
            "align_task_queries_seconds": ex.timings["align_task_queries"],
            **{k: v for k, v in main.items() if not k.endswith("_all")},
            "target_embed_seconds": TARGET_EMBED_S, "target_update_seconds": TARGET_UPDATE_S,
            "by_threads": by_setting}


BOOTSTRAP_GOAL_S = 10.0   # the report's paired bootstrap: each metric's 1,000 resamples within 10 s


def _bootstrap_tables(n_users: int, n_tasks: int, seed: int = 0):
    """Labels (positive rate ~0.2) and two score tables, a better and a worse method, for `n_users` x `n_tasks`."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    users = [f"u{i:05d}" for i in range(n_users)]
    tasks = pd.DataFrame({"task_id": [f"t{j}" for j in range(n_tasks)], "domain": ["risk"] * n_tasks,
                          "query": [f"task {j}?" for j in range(n_tasks)]})
    keys = pd.DataFrame({"user_id": np.tile(users, n_tasks),
                         "task_id": np.repeat(tasks["task_id"].to_numpy(), n_users)})    # task-major rows
    y = (rng.random(len(keys)) < 0.2).astype(int)
    labels = keys.assign(label=y)
    better = keys.assign(score=y + rng.normal(0, 1.2, len(keys)))
    worse = keys.assign(score=y + rng.normal(0, 1.6, len(keys)))
    return labels, better, worse, tasks


def bench_bootstrap(fast: bool = False, n_users: int = 1500, n_tasks: int = 10, n_boot: int = 1000,
                    naive_boot: int = 40, repeats: int = 3) -> dict:
    """The paired bootstrap of the demo's report (`metrics.paired_bootstrap`) at its scale: seconds for the AUC with
    per-task intervals and for the KS, beside BOOTSTRAP_GOAL_S each, and the AUC's speedup over the plain way
    (scikit-learn's roc_auc_score per resample, task and method; timed on `naive_boot` resamples, scaled to
    `n_boot`; it computes the mean difference alone, no interval, so the ratio understates the gain). Medians of
    `repeats` runs, the two AUC contenders in turns. `fast`: 300 users, 3 tasks, 200 resamples."""
    from sklearn.metrics import roc_auc_score

    from qanchor_lab.metrics import paired_bootstrap

    if fast:
        n_users, n_tasks, n_boot, naive_boot, repeats = 300, 3, 200, 10, 1
    labels, better, worse, tasks = _bootstrap_tables(n_users, n_tasks)
    y = labels["label"].to_numpy().reshape(n_tasks, n_users)                     # (T, U), users in the same order
    s_a = better["score"].to_numpy().reshape(n_tasks, n_users)
    s_b = worse["score"].to_numpy().reshape(n_tasks, n_users)

    def library_auc():
        return paired_bootstrap(labels, better, worse, tasks, n_boot=n_boot, seed=0, per_task=True)

    def plain_auc():
        rng = np.random.default_rng(0)
        diffs = []
        for _ in range(naive_boot):
            i = rng.integers(0, n_users, n_users)
            diffs.append(np.mean([roc_auc_score(y[t, i], s_a[t, i]) - roc_auc_score(y[t, i], s_b[t, i])
                                  for t in range(n_tasks)]))
        return diffs

    auc_s, plain_s = _alternate(library_auc, plain_auc, repeats=repeats)
    (ks_s,) = _alternate(lambda: paired_bootstrap(labels, better, worse, tasks, metric="ks", n_boot=n_boot, seed=0),
                         repeats=repeats)
    plain_scaled = plain_s * n_boot / naive_boot
    return {"users": n_users, "tasks": n_tasks, "resamples": n_boot, "repeats": repeats,
            "auc_seconds": auc_s, "ks_seconds": ks_s, "goal_seconds": BOOTSTRAP_GOAL_S,
            "meets_goal": max(auc_s, ks_s) <= BOOTSTRAP_GOAL_S,
            "plain_auc_seconds": plain_scaled, "plain_resamples_timed": naive_boot, "auc_speedup": plain_scaled / auc_s}


def _digest(arrays) -> str:
    """sha256 of the arrays' bytes, in order: equal digests are bit-identical results."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _timed(fn: Callable[[], object]) -> tuple[object, dict]:
    """fn's result, with its wall seconds, this process's kernel (system) seconds and minor page faults."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return out, {"seconds": t1 - t0, "system_seconds": r1.ru_stime - r0.ru_stime, "page_faults": r1.ru_minflt - r0.ru_minflt}


def allocation_workloads(fast: bool = False, steps: int = 20, n_texts: int = 256, batch_size: int = 32) -> dict:
    """The demo's two heaviest torch workloads, timed in this process (bench_hugepages runs it in children):
    `steps` pre-training steps of the demo's model sizes (`batch_size` pairs each, the default PretrainConfig,
    torch's own threads) and MiniLM over `n_texts` users serialised as the text baseline serialises them (the
    baseline's encoder and batches). `fast`: 2 steps and 16 texts on the smoke-test world. Digests of the trained
    weights and of the vectors say whether two runs computed the same bits."""
    from qanchor_lab.baselines import text_embedding_vectors
    from qanchor_lab.pipeline import DemoConfig, text_serialization
    from qanchor_lab.pretrain import PretrainConfig, PretrainStep, make_optimizer

    if fast:
        steps, n_texts = 2, 16
    torch.manual_seed(0)
    world, model, _, test_users = _setup(fast)
    model.train()
    config = PretrainConfig(batch_size=batch_size)
    _, _, batches = _step_batches(model, world, config, steps)
    step = PretrainStep(model, config)
    optimizer, _ = make_optimizer(step, config, None)

    text_users = list(test_users[:n_texts])
    _, pretrain_t = _timed(lambda: _train_steps(step, optimizer, batches, config.grad_clip))
    vectors, minilm_t = _timed(lambda: text_embedding_vectors(
        world, text_users, serialize_kw=text_serialization(DemoConfig(), world), show_progress=False))  # (n_texts, 384)
    return {"pretrain": {**pretrain_t, "steps": steps,
                         "digest": _digest(p.detach().numpy() for p in step.parameters())},
            "minilm": {**minilm_t, "texts": len(text_users), "digest": _digest([vectors])}}


def bench_hugepages(fast: bool = False, repeats: int = 3) -> dict:
    """`allocation_workloads` in child processes with THP_MEM_ALLOC_ENABLE=0 and =1 in turns (torch reads it once
    per process, so each run is a fresh process), `repeats` of each: medians of seconds, kernel seconds and minor
    page faults per workload and setting, the speedup (off / on), and whether every run computed the same bits."""
    code = ("import json; from qanchor_lab.bench import allocation_workloads; "
            f"print(json.dumps(allocation_workloads(fast={fast!r})))")
    if fast:
        repeats = 1
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(repeats):
        for name, value in (("off", "0"), ("on", "1")):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={**os.environ, "THP_MEM_ALLOC_ENABLE": value})
            if proc.returncode != 0:
                raise RuntimeError(f"bench hugepages: the child with THP_MEM_ALLOC_ENABLE={value} failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = statistics.median
    out: dict = {"repeats": repeats}
    for work, size in (("pretrain", "steps"), ("minilm", "texts")):
        row = {size: runs["on"][0][work][size]}
        row.update({f"{key}_{name}": med(r[work][key] for r in runs[name])
                    for name in runs for key in ("seconds", "system_seconds", "page_faults")})
        row["speedup"] = row["seconds_off"] / row["seconds_on"]
        row["identical"] = len({r[work]["digest"] for name in runs for r in runs[name]}) == 1
        out[work] = row
    return out


def run(what: Bench, fast: bool = False) -> dict:
    torch.manual_seed(0)
    return {"kv": bench_kv, "prompt": bench_prompt, "pretrain": bench_pretrain, "explorer": bench_explorer,
            "bootstrap": bench_bootstrap, "hugepages": bench_hugepages}[what](fast=fast)
