"""Joint RL training: one synchronous step (`rl_step`) and the loop around it (`RLTrainer`).

    trainer = RLTrainer(cfg, learner, rollouts, total_steps=planned_steps(len(train), cfg.rl.batch_size, ...))
    summary = trainer.fit(train, valid, out_dir, log=metrics.log, callback=report_to_tune)

`learner` has `propose` / `update` / `save` / `restore` (a `JointLearner` in this process, or the client of a
Learner actor); `rollouts` runs plans as episodes and asks the engines for adapter gradients (`LocalRollouts` here,
sharded over RolloutWorker actors in `actors/rollout.py`). One step:

1. repeat each problem G times and let the router sample z (and the heads write adapters) for each;
2. run every rollout, score it (perf, cost, shaped reward);
3. advantages = reward − baseline over the rollouts that finished (failed ones get 0 and no gradient);
4. engines return ∂(w_i Σ_t log p)/∂(A, B) with w_i = −A_i/N; the learner adds −A·log π(z|x) and steps.

The loop: epochs over the train split in `haps_ray.training.epoch_order`; each time `rl.eval_every_questions` more
train questions have been used (and at the start and the end) the greedy policy is evaluated on valid with greedy decoding, a checkpoint is written, the best
is kept as `best/` and the callback is called; `rl.patience` evaluations without improvement stop the run.
Checkpoints are also written every `rl.checkpoint_every` updates; only the newest `rl.keep_checkpoints` step
checkpoints stay. A rerun resumes from the newest checkpoint (policy, optimiser, schedule, data position).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from haps_ray.checkpoint import Checkpoints, read_metrics, read_state, save_checkpoint
from haps_ray.config import ExperimentConfig, RLConfig
from haps_ray.engine.client import EngineClient, RetrieverClient
from haps_ray.engine.logprobs import Nucleus
from haps_ray.dataset import StoredEpisode
from haps_ray.episodes import EpisodeResult, EpisodeRunner
from haps_ray.metrics import Progress
from haps_ray.rl.advantages import compute_advantages
from haps_ray.rl.cost import CostNormalizer, PriceTable
from haps_ray.rl.learner import AdapterGrads, Plan
from haps_ray.rl.losses import generator_weights
from haps_ray.rl.rollout import adapter_gradients, run_plans, trajectories
from haps_ray.tasks import CallRecord
from haps_ray.training import EvaluationCallback, TrainerState, epoch_progress, next_batch

logger = logging.getLogger(__name__)

TRAIN, EVAL = "train", "eval"


class Learner(Protocol):
    """The policy side of RL (`haps_ray.rl.learner.JointLearner`, or a Learner actor's client)."""

    def propose(self, problems: Sequence[Any], mode: str = "sample", seed: int | None = None,
                for_update: bool = False) -> list[Plan]: ...

    def plans_for(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]]) -> list[Plan]: ...

    def update(self, problems: Sequence[Any], assignments: Sequence[Sequence[int]], advantages: Sequence[float],
               adapter_grads: Sequence[AdapterGrads]) -> dict[str, float]: ...

    def save(self, path: str) -> None: ...

    def restore(self, path: str) -> None: ...


class Rollouts(Protocol):
    """Runs plans as episodes (`phase`: train or eval decoding) and collects adapter gradients of trajectories
    (`haps_ray.rl.rollout.adapter_gradients`: a rollout's calls, or a stored D row's)."""

    def run(self, problems: Sequence[Any], plans: Sequence[Plan], seed: int, phase: str) -> list[EpisodeResult]: ...

    def gradients(self, calls: Sequence[Sequence[CallRecord] | None], plans: Sequence[Plan],
                  weights: Sequence[float]) -> list[dict]: ...


class LocalRollouts:
    """`Rollouts` in this process: one runner per decoding phase over the given engine clients."""

    def __init__(self, cfg: ExperimentConfig, engines: Mapping[str, EngineClient],
                 normalizer: CostNormalizer | None = None, retriever: RetrieverClient | None = None, seed: int = 0) -> None:
        prices = PriceTable.from_config(cfg)
        self.cfg, self.engines = cfg, dict(engines)
        self.names = [c.name for c in cfg.candidates]
        self.runners = {
            phase: EpisodeRunner(engines, decoding, prices, cfg.reward, normalizer=normalizer, retriever=retriever, seed=seed)
            for phase, decoding in ((TRAIN, cfg.train_decoding), (EVAL, cfg.eval_decoding))
        }

    def run(self, problems: Sequence[Any], plans: Sequence[Plan], seed: int, phase: str) -> list[EpisodeResult]:
        return run_plans(self.runners[phase], self.cfg.task, self.names, problems, plans, seed=seed)

    def gradients(self, calls: Sequence[Sequence[CallRecord] | None], plans: Sequence[Plan],
                  weights: Sequence[float]) -> list[dict]:
        return adapter_gradients(calls, plans, weights, self.engines, logprob_nucleus(self.cfg))


def logprob_nucleus(cfg: ExperimentConfig) -> Nucleus | None:
    """The support of the token log-probs REINFORCE differentiates (`rl.logprob_support`): None for the full softmax,
    else the tempered top-p nucleus that training rollouts are sampled from (`train_decoding`)."""
    if cfg.rl.logprob_support == "full":
        return None
    return Nucleus(cfg.train_decoding.temperature, cfg.train_decoding.top_p)


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
        f"{prefix}/tokens_out": float(sum(r.tokens.total_out for r in ok)),
    }
    entropies = [p.entropy for p in plans if not math.isnan(p.entropy)]
    if entropies:
        metrics[f"{prefix}/router_entropy"] = sum(entropies) / len(entropies)
    counts = Counter(tuple(p.assignment) for p in plans)
    for z, c in sorted(counts.items()):
        metrics[f"{prefix}/z_{'-'.join(map(str, z))}"] = c / len(plans)
    return metrics


def rl_step(learner: Learner, batch: Sequence[Any], cfg: RLConfig, rollouts: Rollouts, seed: int,
            stored: Mapping[str, Sequence[StoredEpisode]] | None = None) -> tuple[dict[str, float], list[EpisodeResult]]:
    """One update on `cfg.objective` for a batch of problems; returns the metrics and the scored rollouts.

    `stored` (problem id -> its rows of D) is needed by the reward-weighted objective (paper eq. 5): every z of a
    batch problem counts with weight R(x, z) on log π(z|x) and on its stored trajectory's token log-likelihood under
    the adapters the heads now write. With `both`, the two objectives' batch means are added.
    """
    clock, times = time.perf_counter(), {}
    problems, plans, advantages, results = [], [], [], []
    if cfg.objective != "reward_weighted":
        problems = [p for p in batch for _ in range(cfg.group_size)]
        group_ids = [i for i in range(len(batch)) for _ in range(cfg.group_size)]
        plans = learner.propose(problems, mode="sample", seed=seed, for_update=True)
        times["propose"] = time.perf_counter() - clock
        results = rollouts.run(problems, plans, seed, TRAIN)
        times["rollout"] = time.perf_counter() - clock - sum(times.values())
        advantages = rollout_advantages(results, group_ids, cfg)
    calls = trajectories(results)
    if cfg.objective != "reinforce":
        d_problems, d_rows = stored_rows(batch, stored)
        d_plans = learner.plans_for(d_problems, [row.z for row in d_rows])
        times["stored_plans"] = time.perf_counter() - clock - sum(times.values())
        # one mean over every row of the update: rescale so that it is the sum of the two objectives' means
        total = len(problems) + len(d_problems)
        advantages = [a * total / len(problems) for a in advantages] + [row.reward * total / len(d_rows) for row in d_rows]
        problems, plans, calls = problems + d_problems, plans + d_plans, calls + [row.calls for row in d_rows]
    weights = generator_weights(advantages)
    grads = rollouts.gradients(calls, plans, weights)
    times["adapter_grads"] = time.perf_counter() - clock - sum(times.values())
    metrics = learner.update(problems, [p.assignment for p in plans], advantages, grads)
    times["update"] = time.perf_counter() - clock - sum(times.values())
    step_s = sum(times.values())
    metrics.update({f"time/{name}_s": t for name, t in times.items()})
    metrics["time/step_s"] = step_s
    if results:
        metrics.update(rollout_metrics(results, plans[:len(results)], "train"))
        metrics.update({"train/episodes_per_s": len(results) / step_s, "train/tokens_per_s": metrics["train/tokens_out"] / step_s})
    return metrics, results


def rollout_advantages(results: Sequence[EpisodeResult], group_ids: Sequence[int], cfg: RLConfig) -> list[float]:
    """Reward minus the baseline for the rollouts that finished; failed ones (and, with leave-one-out, a group's
    only finished rollout) get 0."""
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
    return advantages


def stored_rows(batch: Sequence[Any], stored: Mapping[str, Sequence[StoredEpisode]] | None
                ) -> tuple[list[Any], list[StoredEpisode]]:
    """Every stored row of D for the batch's problems, each with its problem (for the reward-weighted objective)."""
    if stored is None:
        raise ValueError("rl.objective reward_weighted / both needs the rows of D for the train problems")
    missing = [p.id for p in batch if p.id not in stored]
    if missing:
        raise ValueError(f"problems {missing[:5]} have no rows in D's train split (build D for the RL train problems)")
    pairs = [(p, row) for p in batch for row in stored[p.id]]
    return [p for p, _ in pairs], [row for _, row in pairs]


class RLTrainer:
    """The RL loop over a learner and its rollouts; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, learner: Learner, rollouts: Rollouts, total_steps: int,
                 stored: Mapping[str, Sequence[StoredEpisode]] | None = None) -> None:
        self.cfg, self.learner, self.rollouts = cfg, learner, rollouts
        self.total_steps = total_steps
        self.stored = stored  # rows of D per train problem, for rl.objective reward_weighted / both
        self.state = TrainerState()

    def evaluate(self, problems: Sequence[Any], prefix: str, seed: int = 0) -> tuple[dict[str, float], list[EpisodeResult]]:
        """Greedy router + evaluation decoding on a split: metrics (under `prefix/`) and results."""
        plans = self.learner.propose(problems, mode="greedy")
        results = self.rollouts.run(problems, plans, seed, EVAL)
        return rollout_metrics(results, plans, prefix), results

    def fit(self, train: Sequence[Any], valid: Sequence[Any], out_dir: str | Path,
            log: Callable[[dict[str, Any], int], None], callback: EvaluationCallback | None = None) -> dict[str, Any]:
        """Train to the end (or resume an interrupted run under `out_dir`); returns the summary."""
        ckpts = Checkpoints(out_dir)
        latest = ckpts.latest()
        if latest is not None:
            self.learner.restore(str(latest))
            self.state = read_state(latest)
            logger.info("resumed from %s (step %d, epoch %d, position %d)", latest, self.state.step,
                        self.state.epoch, self.state.position)
        if self.state.finished:
            return self._summary(ckpts)
        if latest is None:
            self._evaluate_and_save(valid, ckpts, log, callback)  # the start (e.g. the SFT router) competes for best
        state, rl = self.state, self.cfg.rl
        progress = Progress("rl", self.total_steps, done=state.step, every_s=5.0, unit=" updates")
        evaluated_at = state.step
        while not state.stopped and state.step < self.total_steps:
            indices = next_batch(state, len(train), rl.batch_size, self.cfg.seed, rl.epochs)
            if indices is None:
                break
            metrics, _ = rl_step(self.learner, [train[i] for i in indices], rl, self.rollouts,
                                 seed=self.cfg.seed * 100_003 + state.step, stored=self.stored)
            state.step += 1
            due = (state.questions + len(indices)) // rl.eval_every_questions > state.questions // rl.eval_every_questions
            state.questions += len(indices)
            log({**metrics, "epoch": epoch_progress(state, len(train)), "train/questions": state.questions}, state.step)
            progress.update(1, f"reward {metrics['train/reward']:.3f}" if "train/reward" in metrics else "")
            if due:
                self._evaluate_and_save(valid, ckpts, log, callback)
                evaluated_at = state.step
            elif state.step % rl.checkpoint_every == 0:
                self._save(ckpts.step(state.step), {"step": state.step}, ckpts)
        if evaluated_at != state.step and not state.stopped:
            self._evaluate_and_save(valid, ckpts, log, callback)
        state.finished = True
        self._save(ckpts.last, {"step": state.step}, ckpts)
        return self._summary(ckpts)

    def test(self, problems: Sequence[Any], out_dir: str | Path) -> dict[str, float]:
        """Restore the best checkpoint and evaluate it on `problems` (metrics under `test/`)."""
        self.learner.restore(str(Checkpoints(out_dir).best))
        metrics, _ = self.evaluate(problems, "test")
        return metrics

    def _evaluate_and_save(self, valid: Sequence[Any], ckpts: Checkpoints, log: Callable[[dict[str, Any], int], None],
                           callback: EvaluationCallback | None) -> None:
        state = self.state
        metrics, _ = self.evaluate(valid, "valid")
        improved = state.record_evaluation(metrics["valid/reward"], self.cfg.rl.patience)
        metrics["valid/best_reward"] = state.best_score
        path = self._save(ckpts.step(state.step), metrics, ckpts)
        if improved:
            self._save(ckpts.best, metrics, ckpts)
        log(metrics, state.step)
        logger.info("eval at step %d: valid reward %.4f (best %.4f at step %s)", state.step, metrics["valid/reward"],
                    state.best_score, state.best_step)
        if state.stopped:
            logger.info("early stop: %d evaluations without improvement", state.bad_evals)
        if callback is not None:
            callback(state, metrics, path)

    def _save(self, path: Path, metrics: dict[str, Any], ckpts: Checkpoints) -> Path:
        saved = save_checkpoint(path, lambda tmp: self.learner.save(str(tmp)), self.cfg, metrics, self.state)
        ckpts.prune(self.cfg.rl.keep_checkpoints)
        return saved

    def _summary(self, ckpts: Checkpoints) -> dict[str, Any]:
        state = self.state
        best = read_metrics(ckpts.best) if ckpts.best.is_dir() else {}
        return {"steps": state.step, "best_valid_reward": state.best_score, "best_step": state.best_step,
                "stopped_early": state.stopped, "best_policy": str(ckpts.best), "last_policy": str(ckpts.last),
                "best": best}
