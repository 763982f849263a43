"""Joint-RL throughput with 1 vs 2 rollout workers: episodes/s and where a step's time goes.

For each worker count W: W replicas of every candidate's EngineActor (worker w talks to replica w), one
Learner actor and W RolloutWorkers, started untimed; then `--steps` RL updates on the config's train split,
each timed in its phases (router proposal, rollouts, adapter gradients in the engines, learner update).
Episodes/s counts rollouts (batch_size x group_size per step) over the whole step; the phase times
are the `time/*` metrics every RL step reports. Prints a Markdown table.

    python benchmarks/rl_throughput.py --config tune_configs/demo_mmlu_offline.yaml --workers 1 2
    python benchmarks/rl_throughput.py --config tests/fixtures/run_tiny.yaml --set ray_address=local

The config's train split must exist (`python -m pipelines.data --config ...`, or a `make demo` run).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics

import ray

from actors.rl import RLActors
from haps_ray.config import load_config
from haps_ray.rl.trainer import rl_step
from pipelines import common


def measure(cfg, workers_count: int, steps: int) -> dict[str, float]:
    cfg = copy.deepcopy(cfg)
    cfg.rl.num_rollout_workers = workers_count
    for c in cfg.candidates:
        c.replicas = workers_count
    needed = sum(c.num_cpus for c in cfg.candidates) * workers_count + cfg.rl.learner_num_cpus
    if needed > ray.cluster_resources().get("CPU", 0):
        raise SystemExit(f"{workers_count} workers need {needed} reserved CPUs (engine replicas + learner), the cluster has "
                         f"{ray.cluster_resources().get('CPU', 0)}: lower candidates' num_cpus or rl.learner_num_cpus")
    train_set = common.load_split(cfg, "train")
    actors = RLActors(cfg, common.load_normalizer(cfg))
    try:
        learner = actors.learner(cfg, steps + 1, None)
        timed = []
        for step in range(steps + 1):  # update 0 warms up (first calls fill caches, allocate buffers)
            batch = [train_set[(step * cfg.rl.batch_size + i) % len(train_set)] for i in range(cfg.rl.batch_size)]
            metrics, _ = rl_step(learner, batch, cfg.rl, actors.rollouts, seed=step)
            if step > 0:
                timed.append(metrics)
        episodes = cfg.rl.batch_size * cfg.rl.group_size
        mean = {key: statistics.mean(m[key] for m in timed) for key in timed[0] if key.startswith("time/")}
        return {"workers": workers_count, "episodes_per_s": episodes * steps / sum(m["time/step_s"] for m in timed), **mean}
    finally:
        actors.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed updates per setting (after one warm-up update)")
    args = parser.parse_args()
    common.setup_logging("WARNING")
    cfg = load_config(args.config, args.overrides)
    common.init_ray(cfg)
    rows = [measure(cfg, w, args.steps) for w in args.workers]
    cpus = os.cpu_count()
    print(f"\n{args.config}: batch {cfg.rl.batch_size} x G {cfg.rl.group_size}, {args.steps} timed updates, "
          f"candidates {[c.name for c in cfg.candidates]} | {platform.machine()} CPU x{cpus} | Ray {ray.__version__}")
    print("| rollout workers (= engine replicas) | episodes/s | step s | propose s | rollout s | adapter grads s | learner update s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['episodes_per_s']:.2f} | {r['time/step_s']:.1f} | {r['time/propose_s']:.2f} | "
              f"{r['time/rollout_s']:.1f} | {r['time/adapter_grads_s']:.1f} | {r['time/update_s']:.2f} |")
    if len(rows) > 1:
        print(f"speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: {rows[-1]['episodes_per_s'] / rows[0]['episodes_per_s']:.2f}x")
    logging.shutdown()


if __name__ == "__main__":
    main()
