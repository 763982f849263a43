"""Checkpoints of SFT and RL: one layout, written atomically, resumable.

A checkpoint directory is a loadable policy (`HAPSPolicy.load(path)`) plus what resumes its training:

    backbone/, heads.safetensors, policy.json   HAPSPolicy.save
    optimizer.pt                                optimiser, LR schedule and update count of the trainer
    trainer_state.json                          haps_ray.training.TrainerState (step, epoch, data position, best, ...)
    metrics.json                                the metrics when it was written (the evaluation, for best/)
    config.yaml                                 the resolved experiment config

A stage (`<run_dir>/sft`, `<run_dir>/rl`) keeps `checkpoints/step_<N>/` (resumable points), `best/` (the best
valid evaluation) and `last/` (the end of the run). Every checkpoint is written into `<dir>.tmp` and renamed, so a
crash mid-write never leaves one that looks complete; `Checkpoints.latest()` finds the newest complete one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from haps_ray.config import ExperimentConfig, save_config
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.training import TrainerState

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


def write_policy(policy: Any, path: str | Path, optimizer_state: Mapping[str, Any] | None = None) -> None:
    """The policy's weights (and the trainer's optimiser state) into `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    policy.save(path)
    if optimizer_state is not None:
        torch.save(dict(optimizer_state), path / OPTIMIZER_FILE)


def read_optimizer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / OPTIMIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {OPTIMIZER_FILE} (a policy without trainer state cannot resume training)")
    return torch.load(file, weights_only=False)


def save_training(path: str | Path, policy: Any, optimizer: torch.optim.Optimizer, scheduler: Any, **extra: Any) -> None:
    """A trainer's policy, optimiser and LR schedule (plus `extra` counters) into checkpoint directory `path`."""
    write_policy(policy, path, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **extra})


def restore_training(path: str | Path, policy: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Load what `save_training` wrote into an existing policy (same shapes), optimiser and schedule; returns the
    saved state (with the `extra` counters)."""
    saved = HAPSPolicy.load(path, device=str(policy.router.device))
    policy.load_state_dict(saved.state_dict(), strict=True)
    state = read_optimizer_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def read_state(path: str | Path) -> TrainerState:
    return TrainerState.from_dict(json.loads(Path(path, STATE_FILE).read_text()))


def read_metrics(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path, METRICS_FILE).read_text())


def publish(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Atomically publish a fully written checkpoint directory (replacing an older one of the same name)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
    return final_dir


def save_checkpoint(
    path: str | Path,
    write: Callable[[Path], None],
    cfg: ExperimentConfig,
    metrics: Mapping[str, Any],
    state: TrainerState | None = None,
) -> Path:
    """Write one checkpoint at `path`: `write(tmp_dir)` puts the policy and optimiser state there (e.g.
    `write_policy`, or a Learner actor's `save`), then come the trainer state, metrics and config; then it is
    published atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a run that died mid-write
    write(tmp)
    Path(tmp, STATE_FILE).write_text(json.dumps((state or TrainerState()).to_dict(), indent=2, sort_keys=True))
    Path(tmp, METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, default=float))
    save_config(cfg, tmp / CONFIG_FILE)
    return publish(tmp, path)


class Checkpoints:
    """The checkpoints of one stage directory: `checkpoints/step_<N>`, `best`, `last`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def step(self, n: int) -> Path:
        return self.root / "checkpoints" / f"step_{n}"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def last(self) -> Path:
        return self.root / "last"

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` step checkpoints (`best/` and `last/` are never touched)."""
        steps = sorted((p for p in (self.root / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
                       key=lambda p: int(p.name[5:]))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The complete checkpoint with the most updates among `last` and `checkpoints/step_*` (None if none)."""
        candidates = [p for p in [self.last, *(self.root / "checkpoints").glob("step_*")]
                      if p.is_dir() and (p / STATE_FILE).is_file() and not p.name.endswith((".tmp", ".old"))]
        if not candidates:
            return None
        return max(candidates, key=lambda p: (read_state(p).step, p == self.last))
