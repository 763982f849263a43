"""The tables and plots of a sweep: one row per trial, the performance-cost front across λ, reward against k and r.

    rows = [TrialRow(experiment="lam_0.2", trial="a1b2_00000", lam=0.2, k=1, r=8, router_lr=1e-6, generator_lr=1e-5,
                     params={"rl.generator_lr": 1e-5}, status="finished", reward=0.41, perf=0.5, cost=1e-4, best_step=3)]
    write_sweep_report(rows, out_dir)   # results.md, results.csv, front.png, depth_rank.png

Plain data in, files out: nothing here knows about Ray (pipelines/tune.py turns Tune's results into rows).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("experiment", "trial", "lam", "k", "r", "router_lr", "generator_lr", "params", "status", "reward", "perf",
           "cost", "best_step", "evaluations", "error")


@dataclass
class TrialRow:
    """One trial: its λ, depth, rank and learning rates, the searched values, and its best validation evaluation
    (reward, perf and cost of the evaluation with the best metric; NaN when it never evaluated)."""

    experiment: str
    trial: str
    lam: float
    k: int
    r: int
    router_lr: float
    generator_lr: float
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "finished"  # finished | stopped (early, by the scheduler) | failed | unfinished (interrupted)
    reward: float = math.nan
    perf: float = math.nan
    cost: float = math.nan
    best_step: int | None = None
    evaluations: int = 0
    error: str = ""

    def cells(self) -> dict[str, Any]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.params.items()))
        return {name: params if name == "params" else getattr(self, name) for name in COLUMNS}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    return "—" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Sequence[TrialRow]) -> str:
    """A Markdown table, rows ordered by λ then best reward (failed and unfinished trials last within a λ)."""
    ordered = sorted(rows, key=lambda r: (r.lam, r.status != "finished", -(r.reward if not math.isnan(r.reward) else -math.inf)))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(v) for v in row.cells().values()) + " |" for row in ordered]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.cells())
    return out.getvalue()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, perf) points no other point beats on both (lower cost and higher perf), by increasing cost."""
    front, best = [], -math.inf
    for cost, perf in sorted(points, key=lambda p: (p[0], -p[1])):
        if perf > best:
            front.append((cost, perf))
            best = perf
    return front


def front_plot(rows: Sequence[TrialRow], path: str | Path) -> None:
    """Valid perf against cost of every finished trial, one colour per λ, with the front over all of them (the
    paper's cost-aware experiment)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "finished" and not math.isnan(r.perf)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lam in sorted({r.lam for r in done}):
        group = [r for r in done if r.lam == lam]
        ax.scatter([r.cost for r in group], [r.perf for r in group], label=f"λ = {lam:g}", alpha=0.8)
    front = pareto_front([(r.cost, r.perf) for r in done])
    if front:
        ax.plot([c for c, _ in front], [p for _, p in front], "k--", linewidth=1, label="front")
    ax.set_xlabel("valid cost (USD per episode)")
    ax.set_ylabel("valid performance")
    ax.set_title("Performance-cost front across λ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def depth_rank_plot(rows: Sequence[TrialRow], path: str | Path) -> None:
    """Best valid reward against LoRA depth k (left) and rank r (right), one line per λ (the paper's depth experiment);
    each point is the best finished trial with that k (or r)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "finished" and not math.isnan(r.reward)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, attr, label in ((axes[0], "k", "LoRA depth k (last k layers)"), (axes[1], "r", "LoRA rank r")):
        for lam in sorted({r.lam for r in done}):
            best: dict[int, float] = defaultdict(lambda: -math.inf)
            for r in done:
                if r.lam == lam:
                    best[getattr(r, attr)] = max(best[getattr(r, attr)], r.reward)
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], marker="o", label=f"λ = {lam:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best valid reward")
    axes[1].legend(fontsize=8)
    fig.suptitle("Valid reward against LoRA depth and rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep_report(rows: Sequence[TrialRow], out_dir: str | Path) -> dict[str, Path]:
    """results.md, results.csv, front.png and depth_rank.png under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "front": out / "front.png", "depth_rank": out / "depth_rank.png"}
    paths["md"].write_text(to_markdown(rows))
    paths["csv"].write_text(to_csv(rows))
    front_plot(rows, paths["front"])
    depth_rank_plot(rows, paths["depth_rank"])
    return paths
