"""D-building throughput (episodes/s) with 1 vs 2 EngineActor replicas per candidate.

For each replica count: start the engines (loading is not timed), build D for the same problems into a
fresh temporary directory, report episodes/s of the build. Prints a Markdown table for RESULTS.md.

    python benchmarks/build_dataset.py --config tune_configs/offline_mmlu.yaml --problems 8 \\
        --set eval_decoding.max_new_tokens=32 --replicas 1 2

Engines reserve `--engine-cpus` logical CPUs each so that every replica fits on a small machine; torch in
each actor then runs one thread (Ray sets OMP_NUM_THREADS from the reservation, at least 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time

import ray

from haps_ray.config import load_config
from pipelines import common
from pipelines.build_dataset import BuildActors, DatasetBuilder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--problems", type=int, default=8, help="train problems (each runs all M^K assignments)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engine-cpus", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    common.setup_logging("WARNING")
    overrides = [f"task.n_train={args.problems}", f"dataset.batch_size={args.batch_size}", *args.overrides]
    cfg = load_config(args.config, overrides)
    for cand in cfg.candidates:
        cand.num_cpus = args.engine_cpus
    ray.init(num_cpus=max(2, int(len(cfg.candidates) * max(args.replicas) * args.engine_cpus + 0.999)),
             include_dashboard=False, log_to_driver=False)
    problems = {"train": common.load_split(cfg, "train")}
    episodes = len(problems["train"]) * len(cfg.candidates) ** len(cfg.task.roles)
    rows = []
    for replicas in args.replicas:
        cfg.dataset.replicas = replicas
        actors = BuildActors(cfg)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                report = DatasetBuilder(cfg, os.path.join(tmp, "D"), actors).build(problems)
                seconds = time.perf_counter() - started
        finally:
            actors.shutdown()
        assert report.committed_episodes == episodes
        rows.append((replicas, episodes, seconds, episodes / seconds))
    load = os.getloadavg()[0]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}; "
          f"candidates {[c.model for c in cfg.candidates]}; max_new_tokens {cfg.eval_decoding.max_new_tokens}; "
          f"batch_size {cfg.dataset.batch_size}; engine CPUs {args.engine_cpus}")
    print("| replicas per candidate | episodes | seconds | episodes/s | speed-up |\n|---|---|---|---|---|")
    for replicas, n, seconds, rate in rows:
        print(f"| {replicas} | {n} | {seconds:.1f} | {rate:.3f} | {rate / rows[0][3]:.2f}x |")
    ray.shutdown()


if __name__ == "__main__":
    logging.getLogger("pipelines.build_dataset").setLevel(logging.WARNING)
    main()
