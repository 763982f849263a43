"""RL checkpoints: policy weights, optimiser/schedule state and the trainer's position, written atomically.

Layout of one checkpoint directory:

    policy/            HAPSPolicy.save (HF backbone + heads safetensors + metadata)
    learner.pt         optimiser, LR schedule, update count
    trainer_state.json epoch, position in the epoch's data order, best valid score, patience counter, ...

`save_checkpoint` writes into `<dir>.tmp` and renames, so a crash mid-write never leaves a checkpoint that
looks complete; `latest_checkpoint` finds the newest complete one to resume from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from haps_ray.rl.learner import JointLearner

POLICY_DIR = "policy"
LEARNER_FILE = "learner.pt"
STATE_FILE = "trainer_state.json"


def save_learner(learner: JointLearner, path: str | Path) -> None:
    """Policy weights and optimiser state into `path` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    learner.policy.save(path / POLICY_DIR)
    torch.save(learner.state_dict(), path / LEARNER_FILE)


def load_learner(learner: JointLearner, path: str | Path) -> None:
    """Restore weights and optimiser state saved by `save_learner` into an existing learner of the same shape."""
    from haps_ray.routing.policy import HAPSPolicy

    path = Path(path)
    saved = HAPSPolicy.load(path / POLICY_DIR, device=str(learner.policy.router.device))
    learner.policy.load_state_dict(saved.state_dict(), strict=True)
    learner.load_state_dict(torch.load(path / LEARNER_FILE, weights_only=False))


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    Path(path, STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path, STATE_FILE).read_text())


def finalize(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Atomically publish a fully written checkpoint directory (replacing an older one of the same name)."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
    return final_dir


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step_*` checkpoint under `root` (one with a trainer_state.json), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file() and not p.name.endswith((".tmp", ".old"))]
    if not done:
        return None
    return max(done, key=lambda p: int(p.name.split("_")[1]))
