"""What D says with no new rollouts: SFT labels (D_SFT) and static baselines (fixed, random, oracle).

Both work on a D table that already carries the derived `reward` column (`haps_ray.dataset.with_reward`)
and only use the columns split, problem_id, z_index, z, z_names, roles, engine_names, reward, perf, cost.
A problem is *complete* when it has a row for every z in M^K; incomplete problems (a build still
running) are left out and counted, so a label or a baseline never compares a partial set of z.

    labels, summary = sft_labels(d, tie_policy="random", drop_all_zero=False, balance="none", seed=0)
    rows = static_baselines(d); write_baselines(rows, "runs/x/dataset")
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import pyarrow as pa

from haps_ray import storage
from haps_ray.dataset import assignment_label

# Rewards closer than this are a tie (rewards are sums of a few float terms, exact ties are common).
TIE_TOL = 1e-9

SFT_SCHEMA = pa.schema([
    ("split", pa.string()), ("problem_id", pa.string()), ("z_index", pa.int32()), ("z", pa.list_(pa.int32())),
    ("z_names", pa.list_(pa.string())), ("roles", pa.list_(pa.string())), ("reward", pa.float64()),
    ("n_best", pa.int32()),
])


@dataclass
class _Problem:
    split: str
    problem_id: str
    roles: list[str]
    rows: dict[int, dict]  # z_index -> row


def _group(table: pa.Table) -> tuple[dict[str, list[_Problem]], dict[str, int], int]:
    """Complete problems per split (in first-seen order), incomplete counts per split, and |Z|."""
    needed = ["split", "problem_id", "z_index", "z", "z_names", "roles", "engine_names", "reward", "perf", "cost"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"D table lacks columns {missing} (call haps_ray.dataset.with_reward first for 'reward')")
    problems: dict[tuple[str, str], _Problem] = {}
    sizes = set()
    for row in table.select(needed).to_pylist():
        sizes.add(len(row["engine_names"]) ** len(row["roles"]))
        key = (row["split"], row["problem_id"])
        problem = problems.setdefault(key, _Problem(row["split"], row["problem_id"], row["roles"], {}))
        problem.rows[row["z_index"]] = row
    if len(sizes) > 1:
        raise ValueError(f"D mixes assignment spaces of sizes {sorted(sizes)}; one D must use one candidate pool")
    n_z = sizes.pop() if sizes else 0
    complete: dict[str, list[_Problem]] = defaultdict(list)
    incomplete: Counter = Counter()
    for problem in problems.values():
        if len(problem.rows) == n_z:
            complete[problem.split].append(problem)
        else:
            incomplete[problem.split] += 1
    return dict(complete), dict(incomplete), n_z


def _rng(seed: int, *parts: str) -> random.Random:
    # String seeds hash deterministically (sha512), so a problem's draw does not depend on row order.
    return random.Random("|".join([str(seed), *parts]))


# ----------------------------------------------------------------------------------------------
# SFT labels
# ----------------------------------------------------------------------------------------------


def sft_labels(
    table: pa.Table,
    tie_policy: str = "random",
    drop_all_zero: bool = False,
    balance: str = "none",
    seed: int = 0,
) -> tuple[pa.Table, dict]:
    """D_SFT: the best-reward z per problem, one table over all splits, plus a label-distribution summary.

    Args:
        tie_policy: 'first' = the lowest z_index among the best; 'random' = one of them drawn with a
            per-(seed, split, problem) RNG; 'all' = one row per tied z.
        drop_all_zero: drop problems where every z has perf == 0 (no signal about which z is better).
        balance: per split, 'oversample' draws extra copies (with replacement) of every label until each
            present label has as many rows as the most frequent one; 'undersample' keeps a random subset of
            each label's rows down to the rarest label's count; 'none' keeps the rows as they are.
    Returns (table with SFT_SCHEMA, summary dict per split).
    """
    if tie_policy not in ("random", "all", "first"):
        raise ValueError(f"tie_policy {tie_policy!r}: expected random | all | first")
    if balance not in ("none", "oversample", "undersample"):
        raise ValueError(f"balance {balance!r}: expected none | oversample | undersample")
    complete, incomplete, _ = _group(table)
    out: list[dict] = []
    summary: dict = {}
    for split in sorted(set(complete) | set(incomplete)):
        rows: list[dict] = []
        stats = {"problems": 0, "incomplete": incomplete.get(split, 0), "dropped_all_zero": 0, "ties": 0}
        for problem in complete.get(split, []):
            stats["problems"] += 1
            if drop_all_zero and all(r["perf"] == 0 for r in problem.rows.values()):
                stats["dropped_all_zero"] += 1
                continue
            best = max(r["reward"] for r in problem.rows.values())
            tied = sorted(i for i, r in problem.rows.items() if r["reward"] >= best - TIE_TOL)
            stats["ties"] += len(tied) > 1
            if tie_policy == "first":
                chosen = tied[:1]
            elif tie_policy == "random":
                chosen = [_rng(seed, "tie", split, problem.problem_id).choice(tied)]
            else:
                chosen = tied
            for index in chosen:
                r = problem.rows[index]
                rows.append({"split": split, "problem_id": problem.problem_id, "z_index": index, "z": r["z"],
                             "z_names": r["z_names"], "roles": r["roles"], "reward": r["reward"], "n_best": len(tied)})
        stats["labels_before_balance"] = _label_counts(rows)
        rows = _balance(rows, balance, _rng(seed, "balance", split))
        stats["labels"] = _label_counts(rows)
        stats["rows"] = len(rows)
        summary[split] = stats
        out.extend(rows)
    return pa.Table.from_pylist(out, schema=SFT_SCHEMA), summary


def _label_counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(assignment_label(r["roles"], r["z_names"]) for r in rows)
    return dict(sorted(counts.items()))


def _balance(rows: list[dict], balance: str, rng: random.Random) -> list[dict]:
    if balance == "none" or not rows:
        return rows
    by_label: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_label[row["z_index"]].append(row)
    sizes = [len(group) for group in by_label.values()]
    out = []
    for index in sorted(by_label):
        group = by_label[index]
        if balance == "oversample":
            out.extend(group + [rng.choice(group) for _ in range(max(sizes) - len(group))])
        else:
            keep = sorted(rng.sample(range(len(group)), min(sizes)))
            out.extend(group[i] for i in keep)
    return out


def label_summary_markdown(summary: dict) -> str:
    """The label distribution per split as Markdown."""
    lines = []
    for split, stats in summary.items():
        lines.append(f"### {split}: {stats['rows']} labels from {stats['problems']} complete problems")
        lines.append(f"incomplete (skipped): {stats['incomplete']}; dropped all-zero: {stats['dropped_all_zero']}; "
                     f"problems with tied best z: {stats['ties']}")
        lines.append("\n| assignment | labels (before balancing) | labels |\n|---|---|---|")
        for label in sorted(set(stats["labels_before_balance"]) | set(stats["labels"])):
            lines.append(f"| {label} | {stats['labels_before_balance'].get(label, 0)} | {stats['labels'].get(label, 0)} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Static baselines
# ----------------------------------------------------------------------------------------------


@dataclass
class BaselineRow:
    split: str
    method: str  # fixed | random | oracle
    assignment: str  # the fixed z; 'uniform over Z' for random; 'best z per problem' for oracle
    reward: float
    perf: float
    cost: float
    problems: int


def static_baselines(table: pa.Table) -> tuple[list[BaselineRow], dict]:
    """Every fixed assignment, uniform random (exact expected value) and the oracle, per split.

    The oracle takes the best-reward z of each problem (ties: the cheaper, then the lower z_index).
    Returns (rows, headroom per split): headroom holds the best fixed assignment and the share of
    problems where some z beats it strictly (what a per-problem router can win over the best fixed z).
    """
    complete, incomplete, n_z = _group(table)
    rows: list[BaselineRow] = []
    headroom: dict = {}
    for split in sorted(complete):
        problems = complete[split]
        n = len(problems)
        fixed = []
        for index in range(n_z):
            first = problems[0].rows[index]
            label = assignment_label(first["roles"], first["z_names"])
            means = [sum(p.rows[index][key] for p in problems) / n for key in ("reward", "perf", "cost")]
            fixed.append(BaselineRow(split, "fixed", label, *means, n))
        rows.extend(fixed)
        rows.append(BaselineRow(split, "random", "uniform over Z", *(
            sum(getattr(row, key) for row in fixed) / n_z for key in ("reward", "perf", "cost")), n))
        chosen = [min(p.rows.values(), key=lambda r: (-r["reward"], r["cost"], r["z_index"])) for p in problems]
        rows.append(BaselineRow(split, "oracle", "best z per problem", *(
            sum(r[key] for r in chosen) / n for key in ("reward", "perf", "cost")), n))
        best_fixed = max(range(n_z), key=lambda i: (fixed[i].reward, -i))
        beaten = sum(max(r["reward"] for r in p.rows.values()) > p.rows[best_fixed]["reward"] + TIE_TOL for p in problems)
        headroom[split] = {"best_fixed": fixed[best_fixed].assignment, "best_fixed_reward": fixed[best_fixed].reward,
                           "share_best_differs": beaten / n, "problems": n, "incomplete": incomplete.get(split, 0)}
    return rows, headroom


def baselines_markdown(rows: list[BaselineRow], headroom: dict) -> str:
    lines = ["| split | method | assignment | reward | perf | cost (USD) | problems |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.split} | {r.method} | {r.assignment} | {r.reward:.4f} | {r.perf:.4f} | {r.cost:.3g} | {r.problems} |")
    lines.append("")
    for split, h in headroom.items():
        lines.append(f"- {split}: best fixed = {h['best_fixed']} (reward {h['best_fixed_reward']:.4f}); "
                     f"some z beats it on {100 * h['share_best_differs']:.1f}% of {h['problems']} problems"
                     + (f"; {h['incomplete']} incomplete problems left out" if h["incomplete"] else ""))
    return "\n".join(lines) + "\n"


def baselines_csv(rows: list[BaselineRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BaselineRow.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buffer.getvalue()


def write_baselines(rows: list[BaselineRow], headroom: dict, out_dir: str) -> None:
    """baselines.md, baselines.csv and baselines_headroom.json under `out_dir` (local or s3://)."""
    storage.write_text(storage.join(out_dir, "baselines.md"), baselines_markdown(rows, headroom))
    storage.write_text(storage.join(out_dir, "baselines.csv"), baselines_csv(rows))
    storage.write_text(storage.join(out_dir, "baselines_headroom.json"), json.dumps(headroom, indent=2))
