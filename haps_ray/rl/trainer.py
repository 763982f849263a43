"""One synchronous joint-RL step, written once for in-process runs and for Ray actors alike.

    metrics, results = rl_step(learner, batch, cfg.rl, rollout, gradients, seed)

`learner` has `propose` / `update` (a `JointLearner`, or a proxy that forwards to the Learner actor);
`rollout(problems, plans, seed)` runs the plans as episodes (locally, or sharded over RolloutWorkers);
`gradients(results, plans, weights)` asks the engines for adapter gradients. The step:

1. repeat each problem G times and let the router sample z (and the heads write adapters) for each;
2. run every rollout, score it (perf, cost, shaped reward);
3. advantages = reward − baseline over the rollouts that finished (failed ones get 0 and no gradient);
4. engines return ∂(w_i Σ_t log p)/∂(A, B) with w_i = −A_i/N; the learner adds −A·log π(z|x) and steps.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from haps_ray.config import RLConfig
from haps_ray.episodes import EpisodeResult
from haps_ray.rl.advantages import compute_advantages
from haps_ray.rl.learner import Plan
from haps_ray.rl.losses import generator_weights

Rollout = Callable[[Sequence[Any], Sequence[Plan], int], list[EpisodeResult]]
Gradients = Callable[[Sequence[EpisodeResult], Sequence[Plan], Sequence[float]], list[dict]]


def rollout_metrics(results: Sequence[EpisodeResult], plans: Sequence[Plan], prefix: str) -> dict[str, float]:
    """Mean reward/perf/cost, failures, token totals, router entropy and the assignment histogram."""
    ok = [r for r in results if r.error is None]
    n = max(len(ok), 1)
    metrics = {
        f"{prefix}/reward": sum(r.reward or 0.0 for r in ok) / n,
        f"{prefix}/perf": sum(r.perf for r in ok) / n,
        f"{prefix}/cost_usd": sum(r.cost for r in ok) / n,
        f"{prefix}/failed": float(len(results) - len(ok)),
        f"{prefix}/malformed_calls": float(sum(r.n_malformed for r in ok)),
        f"{prefix}/tokens_out": float(sum(sum(v["out"] for v in r.tokens["by_engine"].values()) for r in ok)),
    }
    entropies = [p.entropy for p in plans if not math.isnan(p.entropy)]
    if entropies:
        metrics[f"{prefix}/router_entropy"] = sum(entropies) / len(entropies)
    counts = Counter(tuple(p.assignment) for p in plans)
    for z, c in sorted(counts.items()):
        metrics[f"{prefix}/z_{'-'.join(map(str, z))}"] = c / len(plans)
    return metrics


def rl_step(
    learner: Any, batch: Sequence[Any], cfg: RLConfig, rollout: Rollout, gradients: Gradients, seed: int
) -> tuple[dict[str, float], list[EpisodeResult]]:
    """Sample, roll out, score, and apply one update; returns the metrics and the scored rollouts."""
    problems = [p for p in batch for _ in range(cfg.group_size)]
    group_ids = [i for i in range(len(batch)) for _ in range(cfg.group_size)]
    clock = time.perf_counter()
    plans = learner.propose(problems, mode="sample", seed=seed)
    times = {"propose": time.perf_counter() - clock}
    results = rollout(problems, plans, seed)
    times["rollout"] = time.perf_counter() - clock - sum(times.values())
    usable = [i for i, r in enumerate(results) if r.error is None and r.reward is not None]
    if cfg.baseline == "leave_one_out":  # a group left with one finished rollout has no baseline: no signal
        sizes = Counter(group_ids[i] for i in usable)
        usable = [i for i in usable if sizes[group_ids[i]] >= 2]
    advantages = [0.0] * len(results)
    if usable:
        adv = compute_advantages(
            [results[i].reward for i in usable], [group_ids[i] for i in usable], cfg.baseline, cfg.normalize_advantage
        )
        for i, a in zip(usable, adv.tolist()):
            advantages[i] = a
    weights = generator_weights(advantages)
    grads = gradients(results, plans, weights)
    times["adapter_grads"] = time.perf_counter() - clock - sum(times.values())
    metrics = learner.update(problems, [p.assignment for p in plans], advantages, grads)
    times["update"] = time.perf_counter() - clock - sum(times.values())
    metrics.update(rollout_metrics(results, plans, "train"))
    step_s = sum(times.values())
    metrics.update({f"time/{name}_s": t for name, t in times.items()})
    metrics.update({"time/step_s": step_s, "train/episodes_per_s": len(results) / step_s,
                    "train/tokens_per_s": metrics["train/tokens_out"] / step_s})
    return metrics, results
