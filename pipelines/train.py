"""Joint RL of router and hypernetwork on Ray: Learner actor, RolloutWorkers, EngineActors.

    python -m pipelines.train --config tune_configs/offline_mmlu.yaml [--init-policy runs/x/sft/best]
    ray job submit --working-dir . -- python -m pipelines.train --config tune_configs/mmlu_llama_qwen.yaml

This module only places the actors and hands them to `haps_ray.rl.trainer.RLTrainer`, which owns the loop (epochs,
evaluation every `rl.eval_every_questions` train questions, patience, checkpoints and resume; see there). Finally the best checkpoint
is evaluated once on test. Rerunning the same command resumes from the newest checkpoint (`--fresh` starts over).

Outputs under <run_dir>/rl/: metrics/metrics.jsonl (+ TensorBoard), checkpoints/step_N, best/, last/, summary.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.engine import EnginePool
from actors.rl import RLActors
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.metrics import MetricsLogger
from haps_ray.rl.trainer import RLTrainer
from haps_ray.routing.policy import check_structure
from haps_ray.tasks import Problem, sample_problems
from haps_ray.training import EvaluationCallback, planned_steps
from pipelines import common

logger = logging.getLogger("pipelines.train")


def rl_splits(cfg: ExperimentConfig) -> tuple[list[Problem], list[Problem]]:
    """RL's train and valid problems: seeded samples of `rl.n_train` / `rl.n_valid` of the splits D was built on (the
    paper: RL on 300 / 100 of them), or all of them."""
    return (sample_problems(common.load_split(cfg, "train"), cfg.rl.n_train, cfg.task.seed),
            sample_problems(common.load_split(cfg, "valid"), cfg.rl.n_valid, cfg.task.seed))


def stored_train_rows(cfg: ExperimentConfig) -> dict[str, list[D.StoredEpisode]]:
    """The train split's rows of D with their rewards (λ applied, frozen normaliser), for the reward-weighted objective."""
    uri = storage.join(common.dataset_dir(cfg), "D")
    table, _ = D.read_d(uri, ["train"])
    if table.num_rows == 0:
        raise FileNotFoundError(f"rl.objective={cfg.rl.objective} reads D's train rows, but {uri} has none "
                                "(run pipelines.build_dataset first)")
    return D.stored_episodes(D.with_reward(table, cfg.reward, common.load_normalizer(cfg)), "train")


def train(cfg: ExperimentConfig, run_dir: str, init_policy: str | None = None, fresh: bool = False,
          callback: EvaluationCallback | None = None, pool: EnginePool | None = None) -> dict[str, Any]:
    """Run joint RL to completion (or resume it); returns the summary also written to <run_dir>/rl/summary.json.

    `pool` lets callers (a Tune sweep) share started engines; `callback` sees every evaluation."""
    if storage.is_s3(run_dir):
        raise ValueError(f"run_dir={run_dir}: RL checkpoints need a local or shared-filesystem run_dir, not s3://")
    out = Path(run_dir) / "rl"
    if fresh and out.exists():
        shutil.rmtree(out)
    if init_policy:
        check_structure(init_policy, cfg.router)  # before any actor starts
    train_set, valid_set = rl_splits(cfg)
    test_set = common.load_split(cfg, "test") if cfg.task.test_path else []
    total_steps = planned_steps(len(train_set), cfg.rl.batch_size, cfg.rl.epochs, cfg.rl.max_steps)
    stored = stored_train_rows(cfg) if cfg.rl.objective != "reinforce" else None
    actors = RLActors(cfg, common.load_normalizer(cfg), pool)
    metrics_log = MetricsLogger(out / "metrics")
    try:
        trainer = RLTrainer(cfg, actors.learner(cfg, total_steps, init_policy), actors.rollouts, total_steps, stored)
        summary = trainer.fit(train_set, valid_set, out, log=metrics_log.log, callback=callback)
        if test_set:
            summary["test"] = trainer.test(test_set, out)
            metrics_log.log(summary["test"], summary["steps"])
    finally:
        metrics_log.close()
        actors.shutdown()
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Joint RL of the HAPS router and hypernetwork")
    parser.add_argument("--init-policy", default=None, help="Policy checkpoint to start from (e.g. <run_dir>/sft/best).")
    parser.add_argument("--fresh", action="store_true", help="Ignore existing checkpoints and start over.")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: ["train", "valid"])
    common.init_ray(cfg)
    run_dir = common.resolve_run_dir(cfg)
    common.save_resolved_config(cfg, run_dir, "config.rl.yaml")
    summary = train(cfg, run_dir, init_policy=args.init_policy, fresh=args.fresh)
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
