"""Learner: a Ray actor owning the joint policy (router backbone + hypernetwork heads) and its optimiser, and the
client through which the RL loop and evaluation call it.

A thin shell over `haps_ray.rl.learner.JointLearner`: the driver asks it for plans (z + adapters), hands back
advantages and the engines' adapter gradients, and asks it to checkpoint. Resources come from `rl.learner_num_cpus`
/ `rl.learner_num_gpus`. `LearnerClient` implements `haps_ray.rl.trainer.Learner` by waiting on each call.

    learner = LearnerClient.start(cfg, total_steps, adapter_shapes=pool.adapter_shapes(), init_policy=path)
    plans = learner.propose(problems, mode="greedy")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import torch

from haps_ray.config import ExperimentConfig
from haps_ray.rl.learner import AdapterGrads, JointLearner, Plan
from haps_ray.routing.policy import HAPSPolicy


@ray.remote
class Learner:
    """Owns the policy; every method is a call into the core learner."""

    def __init__(self, cfg: ExperimentConfig, total_steps: int, adapter_shapes: dict[str, list[tuple[int, int]]],
                 init_policy: str | None = None) -> None:
        if cfg.rl.learner_torch_threads:
            torch.set_num_threads(cfg.rl.learner_torch_threads)
        torch.manual_seed(cfg.seed)
        if init_policy:
            policy = HAPSPolicy.load(init_policy, device=cfg.router.device, seed=cfg.seed)
        else:
            policy = HAPSPolicy.from_config(cfg, adapter_shapes=adapter_shapes)
        self.learner = JointLearner(policy, cfg.rl, total_steps)

    def propose(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None,
                for_update: bool = False) -> list[Plan]:
        return self.learner.propose(problems, mode, seed, for_update)

    def plans_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Plan]:
        return self.learner.plans_for(problems, assignments)

    def update(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]], advantages: Sequence[float],
               adapter_grads: Sequence[AdapterGrads]) -> dict[str, float]:
        return self.learner.update(problems, assignments, advantages, adapter_grads)

    def save(self, path: str) -> None:
        self.learner.save(path)

    def restore(self, path: str) -> None:
        self.learner.restore(path)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "step": self.learner.step}


class LearnerClient:
    """`haps_ray.rl.trainer.Learner` over a Learner actor (each call waits for its result)."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    @classmethod
    def start(cls, cfg: ExperimentConfig, total_steps: int, adapter_shapes: dict[str, list[tuple[int, int]]],
              init_policy: str | None = None) -> LearnerClient:
        """A Learner actor with the configured reservation."""
        options = {"num_cpus": cfg.rl.learner_num_cpus, "num_gpus": cfg.rl.learner_num_gpus}
        return cls(Learner.options(**options).remote(cfg, total_steps, adapter_shapes, init_policy))

    def propose(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None,
                for_update: bool = False) -> list[Plan]:
        return ray.get(self.handle.propose.remote(problems, mode, seed, for_update))

    def plans_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Plan]:
        return ray.get(self.handle.plans_for.remote(problems, assignments))

    def update(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]], advantages: Sequence[float],
               adapter_grads: Sequence[AdapterGrads]) -> dict[str, float]:
        return ray.get(self.handle.update.remote(problems, assignments, advantages, adapter_grads))

    def save(self, path: str) -> None:
        ray.get(self.handle.save.remote(path))

    def restore(self, path: str) -> None:
        ray.get(self.handle.restore.remote(path))

    def shutdown(self) -> None:
        ray.kill(self.handle)
