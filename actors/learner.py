"""Learner: a Ray actor owning the joint policy (router backbone + hypernetwork heads) and its optimiser.

A thin shell over `haps_ray.rl.learner.JointLearner`: the driver asks it for plans (z + adapters), hands
back advantages and the engines' adapter gradients, and asks it to checkpoint. Resources (num_cpus /
num_gpus) are given at `.options(...)` time by the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
import torch

from haps_ray.checkpoint import load_learner, save_learner
from haps_ray.config import ExperimentConfig
from haps_ray.rl.learner import AdapterGrads, JointLearner, Plan
from haps_ray.routing.policy import HAPSPolicy


@ray.remote
class Learner:
    """Owns the policy; every method is a call into the core learner."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        total_steps: int,
        adapter_shapes: dict[str, list[tuple[int, int]]],
        init_policy: str | None = None,
    ) -> None:
        if cfg.rl.learner_torch_threads:
            torch.set_num_threads(cfg.rl.learner_torch_threads)
        torch.manual_seed(cfg.seed)
        if init_policy:
            policy = HAPSPolicy.load(init_policy, device=cfg.router.device, seed=cfg.seed)
        else:
            policy = HAPSPolicy.from_config(cfg, adapter_shapes=adapter_shapes)
        self.learner = JointLearner(policy, cfg.rl, total_steps)

    def propose(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None) -> list[Plan]:
        return self.learner.propose(problems, mode, seed)

    def plans_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Plan]:
        return self.learner.plans_for(problems, assignments)

    def update(
        self,
        problems: Sequence[Any],
        assignments: Sequence[Sequence[int]],
        advantages: Sequence[float],
        adapter_grads: Sequence[AdapterGrads],
    ) -> dict[str, float]:
        return self.learner.update(problems, assignments, advantages, adapter_grads)

    def save(self, path: str) -> None:
        save_learner(self.learner, path)

    def restore(self, path: str) -> None:
        load_learner(self.learner, path)

    def step(self) -> int:
        return self.learner.step

    def health(self) -> dict[str, Any]:
        return {"ok": True, "step": self.learner.step}
