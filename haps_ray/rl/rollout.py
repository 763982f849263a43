"""Rollouts for joint RL: run the learner's plans as episodes, then ask each engine for its adapter gradients.

    results = run_plans(runner, task_cfg, candidates, problems, plans, seed)
    grads = adapter_gradients(trajectories(results), plans, generator_weights(adv), engines)   # name -> (dA, dB)

`adapter_gradients` sends each engine one batched `adapter_grads` call holding every call that engine
served with an adapter, weighted by its episode's w_i, and sums the per-call gradients per (episode,
engine): ∂/∂(A,B) of w_i Σ_calls Σ_t log p(y_t). Every engine's call is submitted before any is awaited, so
engines in other processes compute at once. Frozen weights stay where they are; only r×d gradients travel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from haps_ray.config import TaskConfig
from haps_ray.engine.client import EngineClient
from haps_ray.engine.logprobs import Nucleus
from haps_ray.episodes import EpisodeResult, EpisodeRunner
from haps_ray.rl.learner import Plan
from haps_ray.tasks import CallRecord, make_episode


def run_plans(
    runner: EpisodeRunner,
    task: TaskConfig,
    candidates: Sequence[str],
    problems: Sequence[Any],
    plans: Sequence[Plan],
    seed: int | None = None,
    episode_factory: Callable[..., Any] = make_episode,
) -> list[EpisodeResult]:
    """One episode per (problem, plan): roles go to the planned candidates, with the planned adapters.

    `episode_factory(task, problem, assignment, adapters=...)` builds the protocol (default: the task's own).
    """
    if len(problems) != len(plans):
        raise ValueError(f"{len(problems)} problems but {len(plans)} plans")
    episodes = []
    for problem, plan in zip(problems, plans):
        if plan.problem_id != problem.id:
            raise ValueError(f"plan for {plan.problem_id} paired with problem {problem.id}")
        assignment = {role: candidates[index] for role, index in plan.z.items()}
        episodes.append(episode_factory(task, problem, assignment, adapters=dict(plan.adapters)))
    return runner.run(episodes, seed=seed)


def trajectories(results: Sequence[EpisodeResult]) -> list[list[CallRecord] | None]:
    """The calls of each rollout for `adapter_gradients`; a failed episode has none (it gets no gradient)."""
    return [None if r.error is not None else list(r.calls) for r in results]


def adapter_gradients(
    calls: Sequence[Sequence[CallRecord] | None],
    plans: Sequence[Plan],
    weights: Sequence[float],
    engines: Mapping[str, EngineClient],
    nucleus: Nucleus | None = None,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per trajectory, candidate name -> (dA, dB) of w_i Σ log p over every call of it on a candidate its plan has an
    adapter for: the calls of a rollout (generated with that adapter) or of a stored D trajectory (generated without
    one, teacher-forced under it for the reward-weighted objective).

    A trajectory of None (a failed episode) contributes nothing; weight-zero ones are skipped (their gradient is 0).
    """
    if not len(calls) == len(plans) == len(weights):
        raise ValueError(f"{len(calls)} trajectories, {len(plans)} plans, {len(weights)} weights must match")
    work: dict[str, list[tuple[int, CallRecord]]] = {}
    for i, (trajectory, plan) in enumerate(zip(calls, plans)):
        if trajectory is None or weights[i] == 0.0:
            continue
        for call in trajectory:
            if call.engine in plan.adapters and call.token_ids:
                work.setdefault(call.engine, []).append((i, call))
    pending = {
        name: engines[name].adapter_grads(
            [call.messages for _, call in items], [call.token_ids for _, call in items],
            [plans[i].adapters[name] for i, _ in items], [float(weights[i]) for i, _ in items], nucleus=nucleus,
        )
        for name, items in work.items()
    }
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in calls]
    for name, handle in pending.items():
        for (i, _), (dA, dB) in zip(work[name], handle.result()):
            if name in out[i]:
                sA, sB = out[i][name]
                out[i][name] = (sA + dA, sB + dB)
            else:
                out[i][name] = (dA, dB)
    return out
