"""RolloutWorker: a Ray actor that runs the learner's plans as lock-step episodes on the EngineActors.

A thin shell over `haps_ray.rl.rollout`: it owns an `EpisodeRunner` whose engines are EngineActor
handles (shared by every worker; each engine batches whatever one worker sends in a step), and, after the
driver has turned rewards into advantages, asks the engines for the adapter gradients of its rollouts.
Sampling seeds derive from the run seed, the step and the worker index, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from haps_ray.config import DecodingConfig, ExperimentConfig
from haps_ray.episodes import EpisodeResult, EpisodeRunner
from haps_ray.rl.cost import CostNormalizer, PriceTable
from haps_ray.rl.learner import Plan
from haps_ray.rl.rollout import adapter_gradients, run_plans


@ray.remote
class RolloutWorker:
    """Runs episodes for plans; returns scored trajectories, then per-rollout adapter gradients."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        engines: dict[str, Any],
        decoding: DecodingConfig,
        normalizer: CostNormalizer | None = None,
        retriever: Any = None,
        worker_index: int = 0,
    ) -> None:
        self.cfg = cfg
        self.engines = engines
        self.worker_index = worker_index
        self.runner = EpisodeRunner(
            engines, decoding, PriceTable.from_candidates(cfg.candidates), cfg.reward,
            normalizer=normalizer, retriever=retriever, seed=cfg.seed + 1000 * worker_index,
        )

    def rollout(self, problems: Sequence[Any], plans: Sequence[Plan], seed: int) -> list[EpisodeResult]:
        names = [c.name for c in self.cfg.candidates]
        return run_plans(self.runner, self.cfg.task, names, problems, plans, seed=seed * 1009 + self.worker_index)

    def adapter_gradients(
        self, results: Sequence[EpisodeResult], plans: Sequence[Plan], weights: Sequence[float]
    ) -> list[dict]:
        return adapter_gradients(results, plans, weights, self.engines)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "worker_index": self.worker_index, "generate_calls": self.runner.generate_calls}
