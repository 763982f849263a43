"""Evaluate a trained HAPS policy against its ablations and the static baselines; write table + plot.

    python -m pipelines.evaluate --config tune_configs/offline_mmlu.yaml --policy runs/x/rl/best \
        [--extra-policy "w/o low-level router=runs/x_nolow/rl/best"] \
        [--extra-policy "w/o parameter sharing=runs/x_nosharing/rl/best"]

Rows (greedy router, greedy decoding, requests bucketed by engine with per-sample adapters):
- HAPS                      the policy's z and adapters
- HAPS z, adapters removed  the policy's z on the frozen engines: an evaluation-time probe of what the adapters add,
                            not the paper's w/o low-level router (a router trained without heads, `router.low_level:
                            false`, evaluated here as an extra policy)
- w/o high-level router     uniform random z (seeded), adapters from the heads; and each fixed z with adapters
                            (`evaluation.fixed_assignments`)
- extra policies            the trained ablations: w/o low-level router, w/o parameter sharing (their own runs)
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

from actors.rl import RLActors
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.dataset_labels import static_baselines
from haps_ray.report import ResultRow, summarize, write_report
from haps_ray.rl.trainer import EVAL, Learner, Rollouts
from pipelines import common

logger = logging.getLogger("pipelines.evaluate")

ADAPTERS_REMOVED = "HAPS z, adapters removed (eval only)"
MAX_FIXED_ROWS = 16  # every fixed z gets its own row only while |Z| stays readable


def d_rows(cfg: ExperimentConfig, splits: Sequence[str]) -> list[ResultRow]:
    """Oracle, best fixed and uniform-random rows from D (frozen engines, no adapters)."""
    d_uri = storage.join(common.dataset_dir(cfg), "D")
    if not storage.exists(d_uri):
        logger.info("no D at %s: oracle and static baselines are left out", d_uri)
        return []
    table, _ = D.read_d(d_uri, list(splits))
    table = D.with_reward(table, cfg.reward, common.load_normalizer(cfg))
    rows, _ = static_baselines(table)
    out = []
    for r in rows:
        label = {"oracle": "oracle (D)", "random": "random z, no adapters (D)"}.get(r.method, f"fixed {r.assignment} (D)")
        out.append(ResultRow(label, r.split, r.reward, r.perf, r.cost, r.problems, "D"))
    return out


def evaluate(cfg: ExperimentConfig, run_dir: str, policy: str, extra_policies: dict[str, str] | None = None) -> list[ResultRow]:
    """Run every variant on each of `evaluation.splits` that has a path configured; returns the rows (also written)."""
    splits = [s for s in cfg.evaluation.splits if getattr(cfg.task, f"{s}_path")]
    actors = RLActors(cfg, common.load_normalizer(cfg))
    try:
        learner = actors.learner(cfg, 1, policy)
        others = {label: actors.learner(cfg, 1, path) for label, path in (extra_policies or {}).items()}
        rows = []
        for split in splits:
            rows += evaluate_split(cfg, split, common.load_split(cfg, split), learner, others, actors.rollouts)
    finally:
        actors.shutdown()
    rows += d_rows(cfg, splits)
    out = Path(run_dir) / "eval"
    paths = write_report(rows, out)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    logger.info("results table: %s, plot: %s", paths["markdown"], paths["plot"])
    return rows


def evaluate_split(cfg: ExperimentConfig, split: str, problems: Sequence[Any], learner: Learner,
                   others: dict[str, Learner], rollouts: Rollouts) -> list[ResultRow]:
    """Every variant's row on one split; all variants' episodes advance together as one lock-step run."""
    num_c, num_r = len(cfg.candidates), len(cfg.task.roles)
    all_z = list(itertools.product(range(num_c), repeat=num_r))
    names = [c.name for c in cfg.candidates]
    plans = learner.propose(problems, mode="greedy")
    variants = {"HAPS": plans, ADAPTERS_REMOVED: [replace(p, adapters={}) for p in plans]}
    rng = random.Random(cfg.seed)
    random_z = [rng.choice(all_z) for _ in problems]
    variants["w/o high-level router (random z)"] = learner.plans_for(problems, random_z)
    if cfg.evaluation.fixed_assignments and len(all_z) <= MAX_FIXED_ROWS:
        for z in all_z:
            label = "w/o high-level router (" + ", ".join(f"{r}={names[i]}" for r, i in zip(cfg.task.roles, z)) + ")"
            variants[label] = learner.plans_for(problems, [z] * len(problems))
    for label, other in others.items():
        variants[label] = other.propose(problems, mode="greedy")
    results = rollouts.run([p for _ in variants for p in problems], [p for v in variants.values() for p in v], 0, EVAL)
    rows = [summarize(label, split, results[k * len(problems): (k + 1) * len(problems)]) for k, label in enumerate(variants)]
    logger.info("evaluated split %s: HAPS reward %.4f over %d problems", split, rows[0].reward, len(problems))
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
    parser.add_argument("--policy", required=True, help="Policy checkpoint directory (e.g. <run_dir>/rl/best).")
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
