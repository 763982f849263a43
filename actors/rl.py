"""The actors RL and evaluation place together: the engine pool, the retriever (HotpotQA), the rollout workers and
the Learner actors, started and shut down as one.

    actors = RLActors(cfg, normalizer)                  # or RLActors(cfg, normalizer, pool=shared_pool)
    learner = actors.learner(cfg, total_steps, init_policy="runs/x/sft/best")
    ... RLTrainer(cfg, learner, actors.rollouts, total_steps).fit(...) ...
    actors.shutdown()                                   # a shared pool is left running for its owner
"""

from __future__ import annotations

import ray

from actors.engine import EnginePool
from actors.learner import LearnerClient
from actors.retriever import RetrieverActor, RetrieverActorClient
from actors.rollout import RolloutWorkerGroup
from haps_ray.config import ExperimentConfig
from haps_ray.rl.cost import CostNormalizer


class RLActors:
    """Engine pool (own or shared), retriever, `rl.num_rollout_workers` workers, and the learners started here."""

    def __init__(self, cfg: ExperimentConfig, normalizer: CostNormalizer | None, pool: EnginePool | None = None) -> None:
        self.own_pool = pool is None
        self.pool = pool or EnginePool(cfg)
        self.retriever_handle = RetrieverActor.remote(cfg.retriever) if cfg.task.name == "hotpotqa" else None
        retriever = RetrieverActorClient(self.retriever_handle) if self.retriever_handle is not None else None
        self.learners: list[LearnerClient] = []
        try:
            self.shapes = self.pool.adapter_shapes(cfg.router.lora_layers)  # a shared pool may wrap deeper
            self.rollouts = RolloutWorkerGroup(cfg, self.pool, normalizer, retriever, cfg.rl.num_rollout_workers)
        except Exception:
            self.shutdown()
            raise

    def learner(self, cfg: ExperimentConfig, total_steps: int, init_policy: str | None) -> LearnerClient:
        """A Learner actor holding `init_policy` (or a fresh policy), sized for this pool's engines."""
        client = LearnerClient.start(cfg, total_steps, self.shapes, init_policy)
        self.learners.append(client)
        return client

    def shutdown(self) -> None:
        for learner in self.learners:
            learner.shutdown()
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.shutdown()
        if self.retriever_handle is not None:
            ray.kill(self.retriever_handle)
        if self.own_pool:
            self.pool.shutdown()
