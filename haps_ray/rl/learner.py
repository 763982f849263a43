"""The joint learner: owns the HAPS policy and its optimiser; proposes actions, applies one update per batch.

One synchronous RL step:

    plans = learner.propose(problems, mode="sample", seed=step_seed, for_update=True)   # z + adapters per rollout
    ... rollouts run the plans on the engines, rewards come back ...
    adv = compute_advantages(rewards, group_ids, cfg.baseline, cfg.normalize_advantage)
    grads = engines' ∂(w_i Σ_t log p)/∂(A, B) with w = generator_weights(adv)
    metrics = learner.update(problems, [p.assignment for p in plans], adv, grads)

The policy runs once per step: `propose(..., for_update=True)` keeps the graph of log π(z|x) and of the adapters
it wrote (one router pass scores every z and feeds the heads), and `update` backpropagates through that graph
(parameters have not moved since, so it is the graph the rollouts were sampled from). An `update` for other
problems or assignments than the ones proposed (e.g. after a resume) rebuilds the graph with `policy.evaluate`.
The update backpropagates the router's −A·log π(z|x) and the engines' adapter gradients in one pass, clips, and
steps AdamW (fp32 master weights; the router backbone and the heads are separate parameter groups with their own
learning rates, both decayed linearly to `final_lr_ratio` over the run by `torch.optim.lr_scheduler.LinearLR`; a
separate trained feature backbone, w/o sharing, is a third group at the router's rate, being the same kind of
weights). With `rl.train_router: false` the router backbone is frozen and has no group; a policy without the low
level has no heads group.
The policy stays in eval mode throughout: log π(z|x) at update time must equal the one the rollouts were sampled
from, so nothing stochastic (dropout) may run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from haps_ray.checkpoint import restore_training, save_training
from haps_ray.config import RLConfig
from haps_ray.lora import Adapter
from haps_ray.rl.losses import backward_joint, router_pg_loss
from haps_ray.routing.prompt import problem_id

AdapterGrads = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # candidate name -> (dA, dB)


@dataclass
class Plan:
    """What one rollout must run: the chosen assignment and the adapters (detached, on CPU) it needs."""

    problem_id: str
    assignment: tuple[int, ...]
    z: dict[str, int]
    log_prob: float
    adapters: dict[str, Adapter]
    fallback: bool = False
    entropy: float = float("nan")  # of π(·|x) over Z (NaN when Z is too large to enumerate)


def to_plan(action: Any) -> Plan:
    """A policy `Action` as a shippable plan: floats and detached CPU adapters."""
    adapters = {name: ad.detach().to("cpu") for name, ad in action.adapters.items()}
    return Plan(action.problem_id, tuple(action.assignment), dict(action.z), float(action.log_prob.detach()), adapters,
                action.fallback, action.entropy)


@dataclass
class _Proposed:
    """The actions (with graph) of the last `propose(..., for_update=True)`, kept for `update`."""

    problem_ids: list[str]
    assignments: list[tuple[int, ...]]
    actions: list[Any]


class JointLearner:
    """Router + hypernetwork updates from rollout rewards and remote adapter gradients."""

    def __init__(self, policy: Any, cfg: RLConfig, total_steps: int) -> None:
        self.policy = policy
        self.cfg = cfg
        if not cfg.train_router:
            policy.freeze_router()
        groups = policy.parameter_groups()
        param_groups = [
            {"params": groups["router"], "lr": cfg.router_lr, "name": "router"},
            {"params": groups["heads"], "lr": cfg.generator_lr, "name": "heads"},
            {"params": groups["feature_backbone"], "lr": cfg.router_lr, "name": "feature_backbone"},
        ]
        param_groups = [g for g in param_groups if g["params"]]
        if not param_groups:
            raise ValueError("the policy has no trainable parameters (rl.train_router false and no heads)")
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(
            self.optimizer, start_factor=1.0, end_factor=cfg.final_lr_ratio, total_iters=max(total_steps, 1))
        self.step = 0
        self._proposed: _Proposed | None = None

    def propose(
        self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None, for_update: bool = False
    ) -> list[Plan]:
        """One plan per problem (repeat a problem G times in `problems` for G rollouts of it). With `for_update`
        the graph is kept for the `update` of these rollouts."""
        with torch.set_grad_enabled(for_update):
            actions = self.policy.act(problems, mode=mode, seed=seed)
        self._proposed = _Proposed([a.problem_id for a in actions], [tuple(a.assignment) for a in actions],
                                   actions) if for_update else None
        return [to_plan(a) for a in actions]

    def plans_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Plan]:
        """Plans for given assignments (fixed or random routing ablations): the heads still write the adapters."""
        with torch.no_grad():
            return [to_plan(a) for a in self.policy.evaluate(problems, assignments)]

    def update(
        self,
        problems: Sequence[Any],
        assignments: Sequence[Sequence[int]],
        advantages: Sequence[float] | torch.Tensor,
        adapter_grads: Sequence[AdapterGrads],
    ) -> dict[str, float]:
        """One optimiser step on the REINFORCE objective; returns losses, grad norms and learning rates."""
        adv = torch.as_tensor(advantages, dtype=torch.float32).flatten()
        if not len(problems) == len(assignments) == adv.numel() == len(adapter_grads):
            raise ValueError(
                f"update: {len(problems)} problems, {len(assignments)} assignments, {adv.numel()} advantages, "
                f"{len(adapter_grads)} gradient sets must match"
            )
        self.optimizer.zero_grad(set_to_none=True)
        actions = self._actions_for(problems, assignments)
        log_probs = torch.stack([a.log_prob for a in actions])
        router_loss = router_pg_loss(log_probs, adv.to(log_probs.device)) if self.cfg.reinforce_router else None
        factors, grads = [], []
        for i, (action, episode_grads) in enumerate(zip(actions, adapter_grads)):
            unknown = set(episode_grads) - set(action.adapters)
            if unknown:
                raise ValueError(f"rollout {i}: gradients for {sorted(unknown)}, which have no adapter in this assignment")
            for name, (dA, dB) in episode_grads.items():
                factors += [action.adapters[name].A, action.adapters[name].B]
                grads += [dA, dB]
        backward_joint(router_loss, factors, grads)
        norms = self._grad_norms()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        total_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = {
            "losses/router_pg": float(router_loss.detach()) if router_loss is not None else 0.0,
            "grad_norm/total": total_norm,
            "router/mean_log_prob": float(log_probs.detach().mean()),
            "router/adv_mean": float(adv.mean()),
            "router/adv_std": float(adv.std()) if adv.numel() > 1 else 0.0,
        }
        metrics.update(norms)
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        return metrics

    def _actions_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Any]:
        """The proposed actions (graph kept) when they are for these problems and assignments, else a new pass."""
        proposed, self._proposed = self._proposed, None
        ids = [problem_id(p, i) for i, p in enumerate(problems)]
        if proposed is not None and proposed.problem_ids == ids and proposed.assignments == [tuple(z) for z in assignments]:
            return proposed.actions
        return self.policy.evaluate(problems, assignments)

    def _grad_norms(self) -> dict[str, float]:
        out = {}
        for group in self.optimizer.param_groups:
            sq = sum(float(p.grad.detach().pow(2).sum()) for p in group["params"] if p.grad is not None)
            out[f"grad_norm/{group['name']}"] = math.sqrt(sq)
        return out

    def save(self, path: str) -> None:
        """Policy weights, optimiser, schedule and update count into checkpoint directory `path`."""
        save_training(path, self.policy, self.optimizer, self.scheduler, step=self.step)

    def restore(self, path: str) -> None:
        """What `save` wrote, into this learner (same shapes)."""
        self.step = int(restore_training(path, self.policy, self.optimizer, self.scheduler)["step"])
        self._proposed = None
