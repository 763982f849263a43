"""Joint RL of router and hypernetwork on Ray: Learner actor, RolloutWorkers, EngineActors.

    python -m pipelines.train --config tune_configs/offline_mmlu.yaml [--init-policy runs/x/sft/best]
    ray job submit --working-dir . -- python -m pipelines.train --config tune_configs/mmlu_llama_qwen.yaml

Epochs over the RL train split in a seeded order; each update is one `haps_ray.rl.trainer.rl_step` with
rollouts sharded over `rl.num_rollout_workers` workers; every `rl.eval_every` updates the greedy policy is
evaluated on valid (greedy router, greedy decoding), the best is kept, and training stops after
`rl.patience` evaluations without improvement. Finally the best checkpoint is evaluated once on test.
A checkpoint (policy, optimiser, data position) is written every `rl.checkpoint_every` updates; rerunning
the same command resumes from the newest one (`--fresh` starts over).

Outputs under <run_dir>/rl/: metrics/metrics.jsonl (+ TensorBoard), checkpoints/step_N, best/, summary.json.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from actors.engine import create_engine_actors
from actors.learner import Learner
from actors.retriever import RetrieverActor
from actors.rollout import RolloutWorker
from haps_ray import checkpoint as ckpt
from haps_ray import storage
from haps_ray.config import DecodingConfig, ExperimentConfig
from haps_ray.metrics import MetricsLogger, Progress
from haps_ray.rl.cost import CostNormalizer
from haps_ray.rl.trainer import rl_step, rollout_metrics
from pipelines import common

logger = logging.getLogger("pipelines.train")


class LearnerProxy:
    """The Learner actor behind the `propose` / `update` interface that `rl_step` expects."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def propose(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None) -> list:
        return ray.get(self.handle.propose.remote(problems, mode, seed))

    def update(self, problems, assignments, advantages, adapter_grads) -> dict:
        return ray.get(self.handle.update.remote(problems, assignments, advantages, adapter_grads))


def shards(n: int, parts: int) -> list[range]:
    """Split range(n) into `parts` contiguous, nearly equal ranges (empty ones dropped)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        if stop > start:
            out.append(range(start, stop))
        start = stop
    return out


def sharded(workers: Sequence[Any]) -> tuple[Callable, Callable]:
    """`rollout` and `gradients` functions that spread a batch over the workers and gather in order."""

    def rollout(problems, plans, seed):
        parts = shards(len(problems), len(workers))
        refs = [w.rollout.remote([problems[i] for i in r], [plans[i] for i in r], seed) for w, r in zip(workers, parts)]
        return [res for chunk in ray.get(refs) for res in chunk]

    def gradients(results, plans, weights):
        parts = shards(len(results), len(workers))
        refs = [w.adapter_gradients.remote([results[i] for i in r], [plans[i] for i in r], [weights[i] for i in r])
                for w, r in zip(workers, parts)]
        return [g for chunk in ray.get(refs) for g in chunk]

    return rollout, gradients


def load_normalizer(cfg: ExperimentConfig, run_dir: str) -> CostNormalizer | None:
    """The train-fitted, frozen cost normaliser from D (needed when λ > 0), clipping as `reward.clip_cost` says."""
    uri = storage.join(cfg.dataset.output or storage.join(run_dir, "dataset"), "cost_normalizer.json")
    if storage.exists(uri):
        return replace(CostNormalizer.load(uri), clip=cfg.reward.clip_cost)
    if cfg.reward.lam > 0:
        raise FileNotFoundError(f"reward.lam={cfg.reward.lam} needs the cost normaliser fitted on D's train split: "
                                f"{uri} does not exist (run pipelines.build_dataset first)")
    return None


def start_engines(cfg: ExperimentConfig) -> tuple[dict[str, list], dict[str, list[tuple[int, int]]]]:
    """EngineActors of every candidate (`replicas` each) and the adapter shapes of the open candidates."""
    engines = {c.name: create_engine_actors(c, cfg.router.lora_layers) for c in cfg.candidates}
    shapes = {c.name: ray.get(engines[c.name][0].info.remote())["adapter_shapes"] for c in cfg.open_candidates}
    return engines, shapes


def start_workers(cfg: ExperimentConfig, engines: dict[str, list], decoding: DecodingConfig,
                  normalizer: CostNormalizer | None, retriever: Any, count: int) -> list:
    """`count` RolloutWorkers; worker w talks to replica w mod replicas of every candidate."""
    return [
        RolloutWorker.options(num_cpus=0).remote(
            cfg, {name: reps[w % len(reps)] for name, reps in engines.items()}, decoding, normalizer, retriever, w)
        for w in range(count)
    ]


def evaluate(learner: LearnerProxy, workers: Sequence[Any], problems: Sequence[Any], prefix: str, seed: int = 0):
    """Greedy router + the eval workers' decoding on a split: metrics and results."""
    rollout, _ = sharded(workers)
    plans = learner.propose(problems, mode="greedy")
    results = rollout(problems, plans, seed)
    return rollout_metrics(results, plans, prefix), results


def release(*groups: Any) -> None:
    """Kill the actors a stage started (handles, lists of handles, dicts of lists), freeing their memory."""
    for group in groups:
        if group is None:
            continue
        if isinstance(group, dict):
            release(*group.values())
        elif isinstance(group, (list, tuple)):
            release(*group)
        else:
            ray.kill(group)


def train(cfg: ExperimentConfig, run_dir: str, init_policy: str | None = None, fresh: bool = False,
          reporter: Callable[[dict], None] | None = None) -> dict:
    """Run joint RL to completion (or resume it); returns the summary also written to <run_dir>/rl/summary.json."""
    started: dict[str, Any] = {}
    try:
        return _train(cfg, run_dir, init_policy, fresh, reporter, started)
    finally:
        release(started)


def _train(cfg: ExperimentConfig, run_dir: str, init_policy: str | None, fresh: bool,
           reporter: Callable[[dict], None] | None, started: dict) -> dict:
    if storage.is_s3(run_dir):
        raise ValueError(f"run_dir={run_dir}: RL checkpoints need a local or shared-filesystem run_dir, not s3://")
    out = Path(run_dir) / "rl"
    if fresh and out.exists():
        shutil.rmtree(out)
    checkpoints = out / "checkpoints"
    train_set = common.load_split(cfg, "train")
    valid_set = common.load_split(cfg, "valid")
    test_set = common.load_split(cfg, "test") if cfg.task.test_path else []
    steps_per_epoch = -(-len(train_set) // cfg.rl.batch_size)
    total_steps = steps_per_epoch * cfg.rl.epochs
    if cfg.rl.max_steps:
        total_steps = min(total_steps, cfg.rl.max_steps)

    normalizer = load_normalizer(cfg, run_dir)
    engines, shapes = start_engines(cfg)
    retriever = RetrieverActor.remote(cfg.retriever) if cfg.task.name == "hotpotqa" else None
    handle = Learner.options(num_cpus=cfg.rl.learner_num_cpus, num_gpus=cfg.rl.learner_num_gpus).remote(
        cfg, total_steps, shapes, init_policy)
    learner = LearnerProxy(handle)
    workers = start_workers(cfg, engines, cfg.train_decoding, normalizer, retriever, cfg.rl.num_rollout_workers)
    eval_workers = start_workers(cfg, engines, cfg.eval_decoding, normalizer, retriever, cfg.rl.num_rollout_workers)
    started.update(engines=engines, learner=handle, retriever=retriever, workers=workers + eval_workers)
    rollout, gradients = sharded(workers)

    state = {"step": 0, "epoch": 0, "position": 0, "best_valid": None, "best_step": None, "bad_evals": 0, "stopped": False}
    latest = None if fresh else ckpt.latest_checkpoint(checkpoints)
    if latest is not None:
        ray.get(handle.restore.remote(str(latest)))
        state = ckpt.read_state(latest)
        logger.info("resumed from %s (step %d, epoch %d, position %d)", latest, state["step"], state["epoch"], state["position"])
    metrics_log = MetricsLogger(out / "metrics", reporter)
    progress = Progress("rl", total_steps, done=state["step"], every_s=5.0, unit=" updates")

    def save(name: str) -> Path:
        tmp = checkpoints / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ray.get(handle.save.remote(str(tmp)))
        ckpt.write_state(tmp, state)
        return ckpt.finalize(tmp, checkpoints / name)

    def run_eval() -> None:
        metrics, _ = evaluate(learner, eval_workers, valid_set, "valid")
        score = metrics["valid/reward"]
        if state["best_valid"] is None or score > state["best_valid"]:
            state.update(best_valid=score, best_step=state["step"], bad_evals=0)
            ray.get(handle.save.remote(str(out / "best.tmp")))
            ckpt.finalize(out / "best.tmp", out / "best")
        else:
            state["bad_evals"] += 1
        metrics_log.log({**metrics, "valid/best_reward": state["best_valid"]}, state["step"])
        logger.info("eval at step %d: valid reward %.4f (best %.4f at step %s)", state["step"], score,
                    state["best_valid"], state["best_step"])
        if state["bad_evals"] >= cfg.rl.patience:
            logger.info("early stop: %d evaluations without improvement", state["bad_evals"])
            state["stopped"] = True

    if state["step"] == 0 and state["best_valid"] is None:
        run_eval()  # the starting policy (e.g. the SFT router) is the first candidate for "best"
    while not state["stopped"] and state["epoch"] < cfg.rl.epochs and state["step"] < total_steps:
        order = list(range(len(train_set)))
        random.Random(cfg.seed * 7919 + state["epoch"]).shuffle(order)
        while state["position"] < len(order) and state["step"] < total_steps and not state["stopped"]:
            batch = [train_set[i] for i in order[state["position"]: state["position"] + cfg.rl.batch_size]]
            metrics, _ = rl_step(learner, batch, cfg.rl, rollout, gradients, seed=cfg.seed * 100_003 + state["step"])
            state["position"] += len(batch)
            state["step"] += 1
            metrics_log.log({**metrics, "epoch": state["epoch"]}, state["step"])
            progress.update(1, f"reward {metrics['train/reward']:.3f}")
            if state["step"] % cfg.rl.eval_every == 0:
                run_eval()
            if state["step"] % cfg.rl.checkpoint_every == 0 or state["stopped"]:
                save(f"step_{state['step']}")
        if state["position"] >= len(order):
            state["epoch"] += 1
            state["position"] = 0
    if state["step"] % cfg.rl.eval_every != 0 and not state["stopped"]:
        run_eval()
    save(f"step_{state['step']}")

    summary: dict[str, Any] = {"steps": state["step"], "best_valid_reward": state["best_valid"], "best_step": state["best_step"],
                               "best_policy": str(out / "best" / ckpt.POLICY_DIR)}
    if test_set:
        ray.get(handle.restore.remote(str(out / "best")))
        test_metrics, _ = evaluate(learner, eval_workers, test_set, "test")
        metrics_log.log(test_metrics, state["step"])
        summary["test"] = test_metrics
    metrics_log.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.build_parser("Joint RL of the HAPS router and hypernetwork")
    parser.add_argument("--init-policy", default=None, help="Policy checkpoint to start from (e.g. the SFT router).")
    parser.add_argument("--fresh", action="store_true", help="Ignore existing checkpoints and start over.")
    args = parser.parse_args(argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args)
    common.init_ray(cfg)
    run_dir = common.resolve_run_dir(cfg)
    common.save_resolved_config(cfg, run_dir, "config.rl.yaml")
    summary = train(cfg, run_dir, init_policy=args.init_policy, fresh=args.fresh)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
