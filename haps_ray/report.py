"""Evaluation tables and plots: HAPS against its ablations and the static baselines, per split.

    rows = [ResultRow("HAPS", "test", reward=0.61, perf=0.64, cost=1.2e-4, problems=100, source="rollouts"), ...]
    write_report(rows, out_dir)   # results.md, results.csv, results.png
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from haps_ray.episodes import EpisodeResult


@dataclass
class ResultRow:
    """One method on one split: mean reward, performance and cost (USD per episode) over its problems."""

    method: str
    split: str
    reward: float
    perf: float
    cost: float
    problems: int
    source: str  # "rollouts" (run now) or "D" (read from the action-level dataset, frozen engines)


def summarize(method: str, split: str, results: Sequence[EpisodeResult]) -> ResultRow:
    """Means over finished episodes; a failed episode counts as reward 0, perf 0."""
    n = max(len(results), 1)
    return ResultRow(
        method, split,
        reward=sum((r.reward or 0.0) if r.error is None else 0.0 for r in results) / n,
        perf=sum(r.perf if r.error is None else 0.0 for r in results) / n,
        cost=sum(r.cost for r in results) / n,
        problems=len(results), source="rollouts",
    )


def to_markdown(rows: Sequence[ResultRow]) -> str:
    splits = sorted({r.split for r in rows}, key=["train", "valid", "test"].index)
    methods = list(dict.fromkeys(r.method for r in rows))
    by_key = {(r.method, r.split): r for r in rows}
    head = "| method | " + " | ".join(f"{s} reward | {s} perf | {s} cost (USD/ep) | {s} n" for s in splits) + " | source |"
    lines = [head, "|" + "---|" * (1 + 4 * len(splits) + 1)]
    for m in methods:
        cells, source = [], ""
        for s in splits:
            r = by_key.get((m, s))
            if r is None:
                cells += ["–"] * 4
                continue
            cells += [f"{r.reward:.3f}", f"{r.perf:.3f}", f"{r.cost:.2e}", str(r.problems)]
            source = r.source
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {source} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[ResultRow]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(ResultRow)])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    return buf.getvalue()


def bar_chart(rows: Sequence[ResultRow], path: str | Path, metric: str = "reward") -> None:
    """Grouped bars: one group per method, one bar per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r.split for r in rows}, key=["train", "valid", "test"].index)
    methods = list(dict.fromkeys(r.method for r in rows))
    by_key = {(r.method, r.split): getattr(r, metric) for r in rows}
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 4))
    for j, split in enumerate(splits):
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [by_key.get((m, split), 0.0) for m in methods], width, label=split)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(f"HAPS vs ablations and baselines ({metric})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[ResultRow], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "plot": out / "results.png"}
    paths["markdown"].write_text(to_markdown(rows))
    paths["csv"].write_text(to_csv(rows))
    bar_chart(rows, paths["plot"])
    return paths
