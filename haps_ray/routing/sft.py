"""SFT warm-up of the high-level router on D_SFT, and the router's offline valid score read from D.

Examples are D_SFT rows (split, problem_id, z) joined with the problem texts; a row whose problem is
unknown or whose z does not fit the configured pool is reported (row number, reason) and skipped. The
loss is cross-entropy on the canonical JSON target tokens only (plus the turn-end token), averaged per
example and over the batch: `-(sum / count).mean()` of `HighLevelRouter.target_log_probs`.

AdamW updates the router backbone's fp32 master weights (the hypernetwork heads get no gradient from
this loss and are not in the optimiser); on CUDA the forward runs under bf16 autocast (`router.autocast`),
on CPU in plain fp32. The learning rate warms up linearly for `warmup_ratio` of the steps, then decays
by a cosine to 0; the global gradient norm is clipped. Batches follow `haps_ray.training.epoch_order`; checkpoints
use the layout of `haps_ray.checkpoint` and a rerun resumes from the newest one.

Checkpoint selection needs no rollouts: the router's greedy z on every valid problem is looked up in D,
and the valid score is the sum of those D rewards (`score_choices`, with label and best-fixed references).

    examples, skipped = join_examples(d_sft, {p.id: p for p in train}, spec, "train", "D_sft.parquet")
    valid = ValidSet.from_tables(d_with_reward, d_sft, {p.id: p for p in valid_problems}, spec)
    trainer = SFTTrainer(policy, cfg.sft, total_steps=planned_steps(len(examples), cfg.sft.batch_size, cfg.sft.epochs, cfg.sft.max_steps))
    result = trainer.fit(examples, cfg, run_dir / "sft", evaluate=lambda: evaluate_router(policy, valid, 16), log=...)
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from transformers import get_cosine_schedule_with_warmup

from haps_ray.checkpoint import Checkpoints, read_metrics, read_state, restore_training, save_checkpoint, save_training
from haps_ray.config import ExperimentConfig, SFTConfig
from haps_ray.dataset_labels import TIE_TOL
from haps_ray.metrics import Progress
from haps_ray.routing.prompt import RoutingSpec
from haps_ray.training import EvaluationCallback, TrainerState, epoch_progress, next_batch

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Data: D_SFT rows joined with problems; the valid rewards from D
# ----------------------------------------------------------------------------------------------


@dataclass
class SFTExample:
    """One training pair: a problem and the assignment the router must answer with."""

    problem_id: str
    problem: Any  # haps_ray.tasks.Problem (anything `problem_text` accepts)
    z: tuple[int, ...]


def _row_error(row: Mapping[str, Any], problems: Mapping[str, Any], spec: RoutingSpec) -> str | None:
    """Why a D_SFT row cannot be used (None when it can)."""
    pid, z = row.get("problem_id"), row.get("z")
    if pid not in problems:
        return f"unknown problem id {pid!r} (not among the {len(problems)} loaded problems of this split)"
    if z is None or len(z) != spec.num_roles or any(i is None or not 0 <= i < spec.num_candidates for i in z):
        return f"z {z} is not {spec.num_roles} candidate ids in [0, {spec.num_candidates})"
    index = spec.index(z)
    if row.get("z_index") is not None and row["z_index"] != index:
        return f"z_index {row['z_index']} does not match z {list(z)} (index {index})"
    names = row.get("z_names")
    if names is not None and list(names) != [spec.candidates[i] for i in z]:
        return f"z_names {list(names)} do not match the configured candidates {[spec.candidates[i] for i in z]} for z {list(z)}"
    return None


def join_examples(
    labels: pa.Table, problems: Mapping[str, Any], spec: RoutingSpec, split: str, source: str
) -> tuple[list[SFTExample], list[str]]:
    """SFT examples from the D_SFT rows of `split`; returns (examples, one 'source row N: reason' per skipped row)."""
    missing = [c for c in ("split", "problem_id", "z") if c not in labels.column_names]
    if missing:
        raise ValueError(f"{source}: D_SFT lacks columns {missing}")
    examples, skipped = [], []
    for number, row in enumerate(labels.to_pylist()):
        if row["split"] != split:
            continue
        error = _row_error(row, problems, spec)
        if error is not None:
            skipped.append(f"{source} row {number} (split {split}, problem {row.get('problem_id')!r}): {error}")
            logger.warning("skipped %s", skipped[-1])
            continue
        examples.append(SFTExample(row["problem_id"], problems[row["problem_id"]], tuple(int(i) for i in row["z"])))
    if skipped:
        logger.warning("%s: %d of %d %s rows skipped", source, len(skipped), len(skipped) + len(examples), split)
    return examples, skipped


def check_pool(d: pa.Table, spec: RoutingSpec, where: str) -> None:
    """Refuse a D whose roles or candidate pool differ from the router's: its z would mean other models."""
    if d.num_rows == 0:
        return
    pools = {(tuple(r), tuple(n)) for r, n in zip(d.column("roles").to_pylist(), d.column("engine_names").to_pylist())}
    if pools != {(spec.roles, spec.candidates)}:
        raise ValueError(f"{where}: D was built for (roles, candidates) {sorted(pools)}, but the config routes "
                         f"{list(spec.roles)} over {list(spec.candidates)}; build D for this pool")


def _reward_matrix(d: pa.Table, split: str, n_z: int) -> tuple[dict[str, list[float]], int]:
    """problem_id -> D reward of every z (by z_index) for the complete problems of `split`; + incomplete count."""
    by_problem: dict[str, dict[int, float]] = defaultdict(dict)
    for row in d.select(["split", "problem_id", "z_index", "reward"]).to_pylist():
        if row["split"] == split:
            by_problem[row["problem_id"]][row["z_index"]] = row["reward"]
    complete = {pid: [r[i] for i in range(n_z)] for pid, r in by_problem.items() if len(r) == n_z}
    return complete, len(by_problem) - len(complete)


@dataclass
class ValidSet:
    """Valid problems with the D reward of every z, their D_SFT labels and the best fixed assignment."""

    problems: list[Any]
    rewards: list[list[float]]  # (P, |Z|) by z_index
    labels: list[set[int]]  # D_SFT label z_index(es) per problem (empty: no label row)
    best_fixed: int  # z_index of the fixed assignment with the best mean reward on `best_fixed_split`
    best_fixed_split: str
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tables(
        cls, d: pa.Table, labels: pa.Table, problems: Mapping[str, Any], spec: RoutingSpec, split: str = "valid",
        source: str = "D_sft",
    ) -> ValidSet:
        """`d` must carry the derived `reward` column (`haps_ray.dataset.with_reward`)."""
        if "reward" not in d.column_names:
            raise ValueError("D lacks the derived 'reward' column; call haps_ray.dataset.with_reward first")
        check_pool(d, spec, "D")
        n_z = spec.num_assignments
        rewards, incomplete = _reward_matrix(d, split, n_z)
        unknown = sorted(pid for pid in rewards if pid not in problems)
        if incomplete or unknown:
            logger.warning("valid score: %d %s problems lack some z in D, %d have no loaded problem text %s; "
                           "both are left out", incomplete, split, len(unknown), unknown[:5])
        ids = [pid for pid in rewards if pid in problems]
        if not ids:
            raise ValueError(f"no complete {split} problems in D with a loaded problem text to score the router on")
        examples, skipped_labels = join_examples(labels, problems, spec, split, source)
        label_sets: dict[str, set[int]] = defaultdict(set)
        for ex in examples:
            label_sets[ex.problem_id].add(spec.index(ex.z))
        train_rewards, _ = _reward_matrix(d, "train", n_z)
        fixed_split, pool = ("train", train_rewards) if train_rewards else (split, rewards)
        if not train_rewards:
            logger.warning("D has no complete train problems: the best fixed assignment is chosen on %s itself", split)
        means = [sum(r[i] for r in pool.values()) / len(pool) for i in range(n_z)]
        best_fixed = max(range(n_z), key=lambda i: (means[i], -i))
        return cls([problems[pid] for pid in ids], [rewards[pid] for pid in ids], [label_sets[pid] for pid in ids],
                   best_fixed, fixed_split,
                   {"incomplete": incomplete, "unknown_problem": len(unknown), "label_rows": len(skipped_labels)})


def score_choices(valid: ValidSet, choices: Sequence[int], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The offline valid metrics of per-problem choices (z_index): D rewards summed and averaged, accuracies.

    valid/score            Σ_p reward(p, choice_p)          (checkpoint selection maximises this)
    valid/label_acc        share of labelled problems whose choice is one of their D_SFT labels
    valid/best_acc         share of problems whose choice reaches the problem's best D reward
    valid/best_fixed_*     the same for always choosing the best fixed assignment
    valid/agree_best_fixed share of problems where the router chooses the best fixed assignment
    """
    if len(choices) != len(valid.problems):
        raise ValueError(f"{len(choices)} choices for {len(valid.problems)} valid problems")
    n = len(choices)
    labelled = [i for i, lab in enumerate(valid.labels) if lab]

    def summary(picks: Sequence[int], prefix: str) -> dict[str, float]:
        got = [valid.rewards[i][c] for i, c in enumerate(picks)]
        best = [got[i] >= max(valid.rewards[i]) - TIE_TOL for i in range(n)]
        return {
            f"{prefix}score": sum(got),
            f"{prefix}reward_mean": sum(got) / n,
            f"{prefix}best_acc": sum(best) / n,
            f"{prefix}label_acc": sum(picks[i] in valid.labels[i] for i in labelled) / len(labelled) if labelled else math.nan,
        }

    out: dict[str, Any] = summary(choices, "valid/")
    out.update(summary([valid.best_fixed] * n, "valid/best_fixed_"))
    out["valid/agree_best_fixed"] = sum(c == valid.best_fixed for c in choices) / n
    out["valid/oracle_reward_mean"] = sum(max(r) for r in valid.rewards) / n
    out["valid/problems"] = n
    out["valid/labelled_problems"] = len(labelled)
    names = labels or [str(i) for i in range(len(valid.rewards[0]))]
    out["valid/choices"] = dict(sorted(Counter(names[c] for c in choices).items()))
    out["valid/best_fixed"] = names[valid.best_fixed]
    return out


@torch.no_grad()
def greedy_choices(policy: Any, problems: Sequence[Any], batch_size: int) -> list[int]:
    """z_index of the router's greedy assignment for every problem (argmax of π over Z, or greedy decoding)."""
    spec = policy.spec
    return [spec.index(d.z) for start in range(0, len(problems), batch_size)
            for d in policy.router.greedy(problems[start:start + batch_size])]


def evaluate_router(policy: Any, valid: ValidSet, batch_size: int) -> dict[str, Any]:
    """`score_choices` of the router's greedy assignments on the valid problems."""
    spec = policy.spec
    names = [", ".join(f"{r}={spec.candidates[i]}" for r, i in zip(spec.roles, z)) for z in spec.assignments()]
    return score_choices(valid, greedy_choices(policy, valid.problems, batch_size), names)


# ----------------------------------------------------------------------------------------------
# Optimisation and the loop
# ----------------------------------------------------------------------------------------------


class SFTTrainer:
    """AdamW + warm-up/cosine schedule (`transformers.get_cosine_schedule_with_warmup`) + clipping over the router
    backbone of a `HAPSPolicy`, and the loop over D_SFT (`fit`)."""

    def __init__(self, policy: Any, cfg: SFTConfig, total_steps: int) -> None:
        self.policy, self.cfg = policy, cfg
        self.params = policy.parameter_groups()["router"]
        if not self.params:
            raise ValueError("the router backbone has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
        self.total_steps = total_steps
        self.state = TrainerState()

    def loss(self, batch: Sequence[SFTExample]) -> torch.Tensor:
        """Mean over examples of the per-token cross-entropy of their canonical JSON targets."""
        spec = self.policy.spec
        sums, counts = self.policy.router.target_log_probs([e.problem for e in batch], [spec.canonical_json(e.z) for e in batch])
        return -(sums / counts).mean()

    def update(self, batch: Sequence[SFTExample]) -> dict[str, float]:
        """One optimiser step on `batch`, in micro-batches of `micro_batch_size` whose gradients add up to the batch's."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        size = self.cfg.micro_batch_size or len(batch)
        total = 0.0
        for start in range(0, len(batch), size):
            part = batch[start:start + size]
            loss = self.loss(part) * (len(part) / len(batch))  # the batch mean, piece by piece
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {"sft/loss": total, "sft/grad_norm": grad_norm.item(), "sft/lr": lr}

    def save(self, path: Path) -> None:
        save_training(path, self.policy, self.optimizer, self.scheduler)

    def restore(self, path: Path) -> None:
        restore_training(path, self.policy, self.optimizer, self.scheduler)
        self.state = read_state(path)

    def fit(
        self,
        examples: Sequence[SFTExample],
        experiment: ExperimentConfig,
        out_dir: str | Path,
        evaluate: Callable[[], dict[str, Any]] | None,
        log: Callable[[dict[str, Any], int], None],
        callback: EvaluationCallback | None = None,
    ) -> dict[str, Any]:
        """Train, evaluate at step 0, every `eval_every` updates and after every epoch; keep the best valid score.

        Every evaluation writes a resumable checkpoint (`checkpoints/step_N`) and, when the valid score improves
        (strictly; the earliest wins ties), `best/`; the end writes `last/`. Without `evaluate` (no valid data) the
        last state is also the best, and its metrics say so. A rerun resumes from the newest checkpoint. Returns
        {"best": metrics, "last": metrics, "steps": updates}.
        """
        if not examples:
            raise ValueError("no SFT examples to train on")
        ckpts = Checkpoints(out_dir)
        latest = ckpts.latest()
        if latest is not None:
            self.restore(latest)
            logger.info("SFT resumed from %s (step %d)", latest, self.state.step)
        state, cfg, seed = self.state, self.cfg, experiment.seed
        if not state.finished:
            progress = Progress("sft", total=self.total_steps, done=state.step, unit=" steps")
            evaluated_at = None if latest is None else state.step
            if evaluated_at is None:
                self._checkpoint(experiment, ckpts, evaluate, log, callback, len(examples))
                evaluated_at = state.step
            while state.step < self.total_steps:
                if state.position >= len(examples) and evaluated_at != state.step:  # the last batch ended an epoch
                    self._checkpoint(experiment, ckpts, evaluate, log, callback, len(examples))
                    evaluated_at = state.step
                indices = next_batch(state, len(examples), cfg.batch_size, seed, cfg.epochs)
                if indices is None:
                    break
                metrics = self.update([examples[i] for i in indices])
                state.step += 1
                log({**metrics, "sft/epoch": epoch_progress(state, len(examples))}, state.step)
                progress.update(1, f"loss {metrics['sft/loss']:.4f}")
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    self._checkpoint(experiment, ckpts, evaluate, log, callback, len(examples))
                    evaluated_at = state.step
            if evaluated_at != state.step:
                self._checkpoint(experiment, ckpts, evaluate, log, callback, len(examples))
            if evaluate is None:
                logger.warning("no valid data: the SFT checkpoint is the last state, not selected by a valid score")
                save_checkpoint(ckpts.best, self.save, experiment,
                                {**read_metrics(ckpts.step(state.step)), "selection": "last (no valid data to select on)"}, state)
            state.finished = True
            save_checkpoint(ckpts.last, self.save, experiment, {**read_metrics(ckpts.step(state.step)), "selection": "last"}, state)
        return {"best": read_metrics(ckpts.best), "last": read_metrics(ckpts.last), "steps": state.step}

    def _checkpoint(self, experiment: ExperimentConfig, ckpts: Checkpoints, evaluate: Callable[[], dict[str, Any]] | None,
                    log: Callable[[dict[str, Any], int], None], callback: EvaluationCallback | None, n: int) -> None:
        """Evaluate (when there is valid data), then write the step checkpoint and, on improvement, `best/`."""
        state = self.state
        metrics: dict[str, Any] = {"step": state.step, "epoch": epoch_progress(state, n)}
        improved = False
        if evaluate is not None:
            metrics.update(evaluate())
            log({k: v for k, v in metrics.items() if k.startswith("valid/")}, state.step)
            logger.info("sft step %d: valid score %.4f, label acc %.3f, best-z acc %.3f (best fixed: %.4f, %.3f)",
                        state.step, metrics["valid/score"], metrics["valid/label_acc"], metrics["valid/best_acc"],
                        metrics["valid/best_fixed_score"], metrics["valid/best_fixed_label_acc"])
            improved = state.record_evaluation(metrics["valid/score"], patience=None)
        path = save_checkpoint(ckpts.step(state.step), self.save, experiment, metrics, state)
        ckpts.prune(keep=1)  # SFT resumes from its newest evaluation; best/ and last/ hold the rest
        if improved:
            save_checkpoint(ckpts.best, self.save, experiment, {**metrics, "selection": "best valid score"}, state)
        if callback is not None and evaluate is not None:
            callback(state, metrics, path)
