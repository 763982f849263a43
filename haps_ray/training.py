"""What the SFT and RL trainers share: their state, the data order, early stopping and the evaluation callback.

    state = TrainerState()
    while (batch := next_batch(state, n_examples, batch_size, seed, epochs)) is not None:
        ... one update on `batch` (indices into the examples) ...
        state.step += 1
        if due: improved = state.record_evaluation(score, patience)

The data order of epoch e is `epoch_order(n, seed, e)`, the same permutation on every machine, so a run resumed
from a checkpoint (which holds `TrainerState`) sees exactly the batches the uninterrupted run would have seen.
`EvaluationCallback` is what a driver supplies to watch every evaluation (Ray Tune reports from it).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol


@dataclass
class TrainerState:
    """Where a training run is: updates made, position in the data order, best evaluation, patience, stop."""

    step: int = 0  # updates made
    epoch: int = 0  # current pass over the data
    position: int = 0  # examples of this epoch's order already used
    questions: int = 0  # examples used over the whole run (RL evaluates every rl.eval_every_questions of them)
    best_score: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement
    stopped: bool = False  # early stop (patience ran out)
    finished: bool = False  # the run is complete; a rerun has nothing to do

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"trainer state has unknown keys {unknown}")
        return cls(**data)

    def record_evaluation(self, score: float, patience: int | None) -> bool:
        """Note an evaluation's score; True when it is a new best (strictly better: the earliest wins ties).
        With `patience`, the run stops after that many evaluations in a row without improvement."""
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step, self.bad_evals = score, self.step, 0
        else:
            self.bad_evals += 1
            if patience is not None and self.bad_evals >= patience:
                self.stopped = True
        return improved


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (seed, epoch) on every machine."""
    order = list(range(n))
    random.Random(f"{seed}|epoch|{epoch}").shuffle(order)
    return order


def next_batch(state: TrainerState, n: int, batch_size: int, seed: int, epochs: int) -> list[int] | None:
    """Indices of the next batch in the state's epoch order (advancing `position`, and `epoch` at an epoch's end),
    or None once `epochs` passes are done. The last batch of an epoch may be smaller."""
    if n == 0:
        return None
    if state.position >= n:
        state.epoch, state.position = state.epoch + 1, 0
    if state.epoch >= epochs:
        return None
    order = epoch_order(n, seed, state.epoch)
    batch = order[state.position:state.position + batch_size]
    state.position += len(batch)
    return batch


def planned_steps(n_examples: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    """Updates a run makes: every batch of every epoch, capped by `max_steps` when set (0 = no cap)."""
    total = epochs * math.ceil(n_examples / batch_size)
    return min(total, max_steps) if max_steps else total


def epoch_progress(state: TrainerState, n: int) -> float:
    """Epochs done as a fraction (e.g. 1.5 = halfway through the second pass)."""
    return state.epoch + (state.position / n if n else 0.0)


class EvaluationCallback(Protocol):
    """Called after every evaluation with the state, the evaluation's metrics and the checkpoint written with it."""

    def __call__(self, state: TrainerState, metrics: dict[str, Any], checkpoint: Path) -> None: ...
