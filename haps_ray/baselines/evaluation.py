"""A fitted baseline as evaluation rows: plans for live episodes (frozen engines) and its numbers read from D.

    plans = frozen_plans(problems, zs, roles)                       # run with the rollouts, greedy decoding
    row = d_row("RouteLLM (D)", "valid", d, problems, zs)      # None when D lacks a routed (problem, z)

Both describe the same episodes: D's rows were decoded greedily with frozen engines, as evaluation decodes, so a
baseline's live row and its D row agree (up to float rounding of the engines' batched kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from haps_ray.dataset import assignment_index
from haps_ray.report import ResultRow
from haps_ray.rl.learner import Plan


def frozen_plans(problems: Sequence[Any], zs: Sequence[Sequence[int]], roles: Sequence[str]) -> list[Plan]:
    """One plan per problem: the routed z, no adapters (a baseline has no low-level router)."""
    return [Plan(p.id, tuple(z), dict(zip(roles, z, strict=True)), 0.0, {}) for p, z in zip(problems, zs, strict=True)]


def d_lookup(table: pa.Table, split: str) -> dict[tuple[str, int], dict]:
    """(problem_id, z_index) -> D row (reward, perf, cost) of `split`; the table carries the derived reward."""
    rows = table.filter(pc.equal(table.column("split"), split)).select(["problem_id", "z_index", "reward", "perf", "cost"])
    return {(r["problem_id"], r["z_index"]): r for r in rows.to_pylist()}


def d_row(label: str, split: str, table: pa.Table, problems: Sequence[Any], zs: Sequence[Sequence[int]],
          num_candidates: int) -> ResultRow | None:
    """The routed episodes' mean reward / perf / cost from D, or None when D does not hold every one of them."""
    lookup = d_lookup(table, split)
    rows = [lookup.get((p.id, assignment_index(z, num_candidates))) for p, z in zip(problems, zs, strict=True)]
    if not rows or any(r is None for r in rows):
        return None
    n = len(rows)
    return ResultRow(label, split, sum(r["reward"] for r in rows) / n, sum(r["perf"] for r in rows) / n,
                     sum(r["cost"] for r in rows) / n, n, "D")
