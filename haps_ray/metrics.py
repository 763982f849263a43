"""Metrics and progress for long jobs: JSONL + TensorBoard event files, optional extra reporter, ETA lines.

    log = MetricsLogger(run_dir / "metrics", reporter=tune.report)   # reporter: e.g. Ray Tune's
    log.log({"train/reward": 0.4, ...}, step=12)
    progress = Progress("rl", total=120); progress.update(1)           # "rl 12/120 (10%) 0.4/s ETA 4m30s"
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends `{"step": n, **metrics}` lines to metrics.jsonl, mirrors scalars to TensorBoard and a reporter."""

    def __init__(self, directory: str | Path, reporter: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "metrics.jsonl"
        self.reporter = reporter
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self.writer = None
            logger.info("tensorboardX not installed: metrics go to %s only", self.path)
        else:
            self.writer = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.reporter is not None:
            self.reporter({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (e.g. to plot or to check a resumed run)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Progress with rate and ETA, logged at most every `every_s` seconds (and at the end)."""

    def __init__(self, label: str, total: int, done: int = 0, every_s: float = 10.0, unit: str = "") -> None:
        self.label, self.total, self.done, self.every_s, self.unit = label, total, done, every_s, unit
        self.start_done = done
        self.started = time.perf_counter()
        self.last = 0.0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        logger.info("%s %d/%d (%.0f%%) %.2f%s/s elapsed %s ETA %s %s", self.label, self.done, self.total, pct, rate,
                    self.unit, format_seconds(elapsed), format_seconds(eta), extra)
