"""RolloutWorker: a Ray actor that runs the learner's plans as lock-step episodes on the EngineActors, and the group
of workers that implements `haps_ray.rl.trainer.Rollouts` for the RL loop and evaluation.

A worker is a thin shell over `haps_ray.rl.trainer.LocalRollouts` (one runner per decoding phase) whose engines are
EngineActor clients (shared by every worker; each engine batches whatever one worker sends in a step); after the
driver has turned rewards into advantages it asks the engines for the adapter gradients of its rollouts. Sampling
seeds derive from the run seed, the step and the worker index, so a run is reproducible.

    workers = RolloutWorkerGroup(cfg, pool, normalizer, retriever, count=cfg.rl.num_rollout_workers)
    results = workers.run(problems, plans, seed, phase="train")
    grads = workers.gradients(trajectories(results), plans, weights)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from actors.engine import EnginePool
from actors.retriever import RetrieverActorClient
from haps_ray.config import ExperimentConfig
from haps_ray.episodes import EpisodeResult
from haps_ray.rl.cost import CostNormalizer
from haps_ray.rl.learner import Plan
from haps_ray.rl.trainer import LocalRollouts
from haps_ray.tasks import CallRecord


@ray.remote(num_cpus=0)
class RolloutWorker:
    """Runs episodes for plans; returns scored trajectories, then per-rollout adapter gradients."""

    def __init__(self, cfg: ExperimentConfig, engines: dict[str, Any], normalizer: CostNormalizer | None = None,
                 retriever: RetrieverActorClient | None = None, worker_index: int = 0) -> None:
        self.worker_index = worker_index
        self.rollouts = LocalRollouts(cfg, engines, normalizer, retriever, seed=cfg.seed + 1000 * worker_index)

    def run(self, problems: Sequence[Any], plans: Sequence[Plan], seed: int, phase: str) -> list[EpisodeResult]:
        return self.rollouts.run(problems, plans, seed * 1009 + self.worker_index, phase)

    def gradients(self, calls: Sequence[Sequence[CallRecord] | None], plans: Sequence[Plan],
                  weights: Sequence[float]) -> list[dict]:
        return self.rollouts.gradients(calls, plans, weights)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "worker_index": self.worker_index,
                "generate_calls": sum(r.generate_calls for r in self.rollouts.runners.values())}


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


class RolloutWorkerGroup:
    """`Rollouts` over `count` RolloutWorkers: a batch is split into contiguous shards and gathered in order.
    Worker w talks to lane w of the engine pool (replica w mod replicas of every candidate)."""

    def __init__(self, cfg: ExperimentConfig, pool: EnginePool, normalizer: CostNormalizer | None,
                 retriever: RetrieverActorClient | None, count: int) -> None:
        self.workers = [RolloutWorker.remote(cfg, pool.clients(w), normalizer, retriever, w) for w in range(count)]

    def run(self, problems: Sequence[Any], plans: Sequence[Plan], seed: int, phase: str) -> list[EpisodeResult]:
        parts = shards(len(problems), len(self.workers))
        refs = [w.run.remote([problems[i] for i in r], [plans[i] for i in r], seed, phase) for w, r in zip(self.workers, parts)]
        return [res for chunk in ray.get(refs) for res in chunk]

    def gradients(self, calls: Sequence[Sequence[CallRecord] | None], plans: Sequence[Plan],
                  weights: Sequence[float]) -> list[dict]:
        parts = shards(len(calls), len(self.workers))
        refs = [w.gradients.remote([calls[i] for i in r], [plans[i] for i in r], [weights[i] for i in r])
                for w, r in zip(self.workers, parts)]
        return [g for chunk in ray.get(refs) for g in chunk]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
