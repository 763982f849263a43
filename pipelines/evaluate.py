"""Evaluate a trained HAPS policy against its ablations and the static baselines; write table + plot.

    python -m pipelines.evaluate --config tune_configs/offline_mmlu.yaml --policy runs/x/rl/best/policy \
        [--extra-policy "w/o parameter sharing=runs/x_nosharing/rl/best/policy"]

Rows (greedy router, greedy decoding, requests bucketed by engine with per-sample adapters):
- HAPS                      the policy's z and adapters
- w/o low-level router      the policy's z, no adapters (frozen engines)
- w/o high-level router     uniform random z (seeded), adapters from the heads; and each fixed z with adapters
                            (`evaluation.fixed_assignments`)
- extra policies            e.g. the w/o-parameter-sharing policy, trained separately
- oracle / fixed / random   from the action-level dataset D (frozen engines), when D holds the split
Outputs: <run_dir>/eval/results.{md,csv,png} and results.json.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray

from actors.learner import Learner
from actors.retriever import RetrieverActor
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.dataset_labels import static_baselines
from haps_ray.report import ResultRow, summarize, write_report
from pipelines import common
from pipelines.train import LearnerProxy, load_normalizer, release, sharded, start_engines, start_workers

logger = logging.getLogger("pipelines.evaluate")

MAX_FIXED_ROWS = 16  # every fixed z gets its own row only while |Z| stays readable


def d_rows(cfg: ExperimentConfig, run_dir: str, splits: Sequence[str]) -> list[ResultRow]:
    """Oracle, best fixed and uniform-random rows from D (frozen engines, no adapters)."""
    d_uri = storage.join(cfg.dataset.output or storage.join(run_dir, "dataset"), "D")
    if not storage.exists(d_uri):
        logger.info("no D at %s: oracle and static baselines are left out", d_uri)
        return []
    table, _ = D.read_d(d_uri, list(splits))
    table = D.with_reward(table, cfg.reward, load_normalizer(cfg, run_dir))
    rows, _ = static_baselines(table)
    out = []
    for r in rows:
        label = {"oracle": "oracle (D)", "random": "random z, no adapters (D)"}.get(r.method, f"fixed {r.assignment} (D)")
        out.append(ResultRow(label, r.split, r.reward, r.perf, r.cost, r.problems, "D"))
    return out


def evaluate(cfg: ExperimentConfig, run_dir: str, policy: str, extra_policies: dict[str, str] | None = None) -> list[ResultRow]:
    """Run every variant on each of `evaluation.splits` that has a path configured; returns the rows (also written)."""
    started: dict[str, Any] = {}
    try:
        return _evaluate(cfg, run_dir, policy, extra_policies or {}, cfg.evaluation.splits, started)
    finally:
        release(started)


def _evaluate(cfg: ExperimentConfig, run_dir: str, policy: str, extra_policies: dict[str, str],
              splits: Sequence[str], started: dict) -> list[ResultRow]:
    splits = [s for s in splits if getattr(cfg.task, f"{s}_path")]
    normalizer = load_normalizer(cfg, run_dir)
    engines, shapes = start_engines(cfg)
    retriever = RetrieverActor.remote(cfg.retriever) if cfg.task.name == "hotpotqa" else None
    workers = start_workers(cfg, engines, cfg.eval_decoding, normalizer, retriever, cfg.rl.num_rollout_workers)
    rollout, _ = sharded(workers)

    def host(path: str) -> LearnerProxy:
        return LearnerProxy(Learner.options(num_cpus=cfg.rl.learner_num_cpus, num_gpus=cfg.rl.learner_num_gpus)
                            .remote(cfg, 1, shapes, path))

    learner = host(policy)
    others = {label: host(path) for label, path in extra_policies.items()}
    started.update(engines=engines, retriever=retriever, workers=workers,
                   learners=[learner.handle] + [o.handle for o in others.values()])
    num_c, num_r = len(cfg.candidates), len(cfg.task.roles)
    all_z = list(itertools.product(range(num_c), repeat=num_r))
    names = [c.name for c in cfg.candidates]
    rows: list[ResultRow] = []
    for split in splits:
        problems = common.load_split(cfg, split)
        plans = learner.propose(problems, mode="greedy")
        variants = {"HAPS": plans, "w/o low-level router": [replace(p, adapters={}) for p in plans]}
        rng = random.Random(cfg.seed)
        random_z = [rng.choice(all_z) for _ in problems]
        variants["w/o high-level router (random z)"] = ray.get(learner.handle.plans_for.remote(problems, random_z))
        if cfg.evaluation.fixed_assignments and len(all_z) <= MAX_FIXED_ROWS:
            for z in all_z:
                label = "w/o high-level router (" + ", ".join(f"{r}={names[i]}" for r, i in zip(cfg.task.roles, z)) + ")"
                variants[label] = ray.get(learner.handle.plans_for.remote(problems, [z] * len(problems)))
        for label, other in others.items():
            variants[label] = other.propose(problems, mode="greedy")
        # Every variant's episodes advance together: one lock-step run, larger batches per engine call.
        results = rollout([p for _ in variants for p in problems], [p for v in variants.values() for p in v], 0)
        for k, label in enumerate(variants):
            rows.append(summarize(label, split, results[k * len(problems): (k + 1) * len(problems)]))
        logger.info("evaluated split %s: HAPS reward %.4f over %d problems", split, rows[-len(variants)].reward, len(problems))
    rows += d_rows(cfg, run_dir, splits)
    out = Path(run_dir) / "eval"
    paths = write_report(rows, out)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    logger.info("results table: %s, plot: %s", paths["markdown"], paths["plot"])
    return rows


def parse_extra(values: Sequence[str]) -> dict[str, str]:
    extra = {}
    for value in values:
        if "=" not in value:
            raise SystemExit(f"--extra-policy {value!r}: expected LABEL=PATH")
        label, path = value.split("=", 1)
        extra[label] = path
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Evaluate HAPS against ablations and baselines")
    parser.add_argument("--policy", required=True, help="Policy checkpoint directory (e.g. <run_dir>/rl/best/policy).")
    parser.add_argument("--extra-policy", action="append", default=[], metavar="LABEL=PATH",
                        help="Another policy to add as a row (e.g. the w/o-parameter-sharing ablation).")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args)
    common.init_ray(cfg)
    run_dir = common.resolve_run_dir(cfg)
    evaluate(cfg, run_dir, args.policy, parse_extra(args.extra_policy))
    print((Path(run_dir) / "eval" / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
