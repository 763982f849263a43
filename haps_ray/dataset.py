"""The action-level dataset D: its Parquet schema, the assignment space Z, rows from episodes, reading D.

D holds one row per (problem, assignment z): every z in Z = M^K (M candidates, K roles) is run on every
problem with frozen engines. On disk D is a directory of small Parquet files, hive-partitioned by split
(`D/split=train/part-<batch>.parquet`), one file per committed batch (see `pipelines/build_dataset.py`).

Order of operations for the reward (why D stores no reward column):
  1. the builder stores the raw task metric `perf` and the raw episode `cost` (USD) of every row;
  2. a `CostNormalizer` (haps_ray.rl.cost) is fitted on the *train* rows' cost (min-max) and then frozen;
  3. `reward = (1 - λ)·shape(perf) − λ·Ĉ(cost)` is derived on read (`with_reward`), for every split with
     the same frozen normaliser. So one D serves every λ and shaping choice, and valid/test rewards never
     see their own cost range.
SFT labels and static baselines live in `haps_ray/dataset_labels.py`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from haps_ray import storage
from haps_ray.config import DecodingConfig, ExperimentConfig, RewardConfig
from haps_ray.engine.client import EngineClient, RetrieverClient
from haps_ray.episodes import EpisodeResult, EpisodeRunner
from haps_ray.rl.cost import CostNormalizer, PriceTable
from haps_ray.rl.rewards import combine_reward
from haps_ray.tasks import CallRecord, ErrorKind, Problem, Retrieval, make_episode

logger = logging.getLogger(__name__)

PARTITION = "split"


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


# The on-disk schema of D. Each field's metadata["doc"] says what it holds; `describe_schema()` renders
# it as a Markdown table for the README. Lists named role_* align with `roles`, lists named engine_*
# align with `engine_names` (the candidate pool in config order).
D_SCHEMA = pa.schema([
    _f("problem_id", pa.string(), "Problem id from the task loader (unique within the task)."),
    _f("split", pa.string(), "train | valid | test; also the hive partition directory `split=<value>`."),
    _f("task", pa.string(), "Task protocol: mmlu | hotpotqa."),
    _f("roles", pa.list_(pa.string()), "Agent roles in routing order, e.g. [teacher, student]."),
    _f("z", pa.list_(pa.int32()), "The assignment: candidate index per role (aligned with roles)."),
    _f("z_names", pa.list_(pa.string()), "The assignment: candidate name per role (aligned with roles)."),
    _f("z_index", pa.int32(), "Index of z in Z = M^K, lexicographic with the first role most significant."),
    _f("perf", pa.float64(), "Raw task metric: MMLU accuracy (0/1), HotpotQA token F1."),
    _f("cost", pa.float64(), "Episode cost in USD: Σ over calls (n_in·price_in + n_out·price_out) / 1e6."),
    _f("answer", pa.string(), "Final answer parsed from the episode (null when none).", nullable=True),
    _f("gold", pa.string(), "Gold answer."),
    _f("n_input_tokens", pa.int64(), "Input (prompt) tokens over all calls."),
    _f("n_output_tokens", pa.int64(), "Output (generated) tokens over all calls."),
    _f("role_input_tokens", pa.list_(pa.int64()), "Input tokens per role (aligned with roles)."),
    _f("role_output_tokens", pa.list_(pa.int64()), "Output tokens per role (aligned with roles)."),
    _f("engine_input_tokens", pa.list_(pa.int64()), "Input tokens per candidate (aligned with engine_names)."),
    _f("engine_output_tokens", pa.list_(pa.int64()), "Output tokens per candidate (aligned with engine_names)."),
    _f("n_calls", pa.int32(), "LLM calls in the episode."),
    _f("n_malformed", pa.int32(), "Calls whose output could not be parsed (the protocol went on)."),
    _f("error", pa.string(), "Set when the episode ended on an internal error (perf is then 0), or says which calls "
       "failed after an API's retries (each recorded as a malformed turn; the episode went on).", nullable=True),
    _f("trajectory", pa.string(), "JSON: every call's role, engine, prompt, completion, parsed action, tokens."),
    _f("engine_names", pa.list_(pa.string()), "Candidate names in config order (the meaning of z)."),
    _f("engine_checksums", pa.list_(pa.string()), "sha256 of each candidate's weights (aligned with engine_names)."),
    _f("max_new_tokens", pa.int32(), "Decoding: tokens per call at most."),
    _f("temperature", pa.float64(), "Decoding: temperature (0 = greedy)."),
    _f("top_p", pa.float64(), "Decoding: nucleus mass."),
    _f("seed", pa.int64(), "Seed of the lock-step run that produced the row (call seeds derive from it, step, engine)."),
    _f("batch_id", pa.string(), "Name of the committed batch file the row came from."),
    _f("n_estimated_calls", pa.int32(), "Calls whose token counts (so cost) are estimates: an API reply without usage "
       "and no api.tokenizer (null in rows written before this column).", nullable=True),
])

# Columns `with_reward` adds on read (never stored).
DERIVED_DOCS = {
    "cost_norm": "Ĉ: cost min-max normalised with the frozen train-split normaliser (clipped to [0, 1]).",
    "reward": "R = (1 − λ)·shape(perf) − λ·Ĉ; shape(p) = −1 if p == 0 else p when reward.shaping, else p.",
}
KEY_COLUMNS = ("split", "problem_id", "z_index")
LATER_COLUMNS = ("n_estimated_calls",)  # nullable columns D gained after rows had been written without them


def describe_schema() -> str:
    """Markdown table of D's columns (stored and derived) for the README."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for field in D_SCHEMA:
        lines.append(f"| `{field.name}` | `{field.type}` | {field.metadata[b'doc'].decode().replace('|', '/')} |")
    for name, text in DERIVED_DOCS.items():
        lines.append(f"| `{name}` | `double` (derived on read) | {text} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The assignment space
# ----------------------------------------------------------------------------------------------


def assignments(num_candidates: int, num_roles: int) -> list[tuple[int, ...]]:
    """Every z in Z = M^K in z_index order (first role most significant)."""
    return list(itertools.product(range(num_candidates), repeat=num_roles))


def assignment_index(z: Sequence[int], num_candidates: int) -> int:
    """Position of z in `assignments(M, K)`."""
    index = 0
    for choice in z:
        if not 0 <= choice < num_candidates:
            raise ValueError(f"assignment {list(z)}: index {choice} outside 0..{num_candidates - 1}")
        index = index * num_candidates + choice
    return index


def assignment_label(roles: Sequence[str], names: Sequence[str]) -> str:
    """Human-readable z, e.g. 'teacher=llama8b, student=qwen7b'."""
    return ", ".join(f"{role}={name}" for role, name in zip(roles, names, strict=True))


def batch_seed(seed: int, batch: str) -> int:
    """Deterministic 31-bit run seed per (config seed, batch): a re-queued batch samples identically."""
    digest = hashlib.sha256(f"{seed}|{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def batch_id(split: str, keys: Sequence[tuple[str, int]]) -> str:
    """Name of a batch's commit file, a hash of its (problem_id, z_index) keys.

    The same batch always gets the same name, so re-running it after a crash overwrites its file
    instead of adding a second copy of its rows.
    """
    digest = hashlib.sha256(json.dumps([split, sorted(keys)]).encode()).hexdigest()
    return f"part-{digest[:20]}"


# ----------------------------------------------------------------------------------------------
# Building rows: batches of (problem, z) episodes
# ----------------------------------------------------------------------------------------------


class EngineFailure(RuntimeError):
    """An engine call (or retrieval) failed inside a batch: infrastructure, not the episode's doing.

    Such a batch is never committed: its rows would record a model failure as a wrong answer.
    """


class EngineUnavailable(EngineFailure):
    """Every call a batch made to one engine failed for an infrastructure reason (an API down: connection refused,
    5xx, timeouts, after the client's retries). The batch is not committed; the builder re-queues it."""


@dataclass
class BatchSpec:
    """One lock-step batch: episodes (problem, z) of a single split, committed as one file."""

    split: str
    batch_id: str
    seed: int
    problems: list[Problem]
    zs: list[tuple[int, ...]]


def plan_batches(
    problems: dict[str, list[Problem]],
    num_candidates: int,
    num_roles: int,
    done: set[tuple[str, str, int]],
    batch_size: int,
    seed: int,
) -> list[BatchSpec]:
    """Every (problem, z) not in `done`, problem-major, cut into batches of `batch_size` within each split."""
    zs = assignments(num_candidates, num_roles)
    specs = []
    for split, split_problems in problems.items():
        todo = [(p, z) for p in split_problems for i, z in enumerate(zs) if (split, p.id, i) not in done]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            name = batch_id(split, [(p.id, assignment_index(z, num_candidates)) for p, z in chunk])
            specs.append(BatchSpec(split, name, batch_seed(seed, name), [p for p, _ in chunk], [z for _, z in chunk]))
    return specs


def episode_row(result: EpisodeResult, spec: BatchSpec, z: tuple[int, ...], cfg: ExperimentConfig,
                checksums: Sequence[str]) -> dict:
    """One D row from a scored episode (see D_SCHEMA)."""
    names = [c.name for c in cfg.candidates]
    roles = list(cfg.task.roles)
    by_role, by_engine = result.tokens.by_role, result.tokens.by_engine
    trajectory = {"calls": [c.to_dict() for c in result.calls], "retrievals": [r.to_dict() for r in result.retrievals],
                  "n_steps": result.n_steps}
    return {
        "problem_id": result.problem_id, "split": spec.split, "task": result.task, "roles": roles, "z": list(z),
        "z_names": [names[i] for i in z], "z_index": assignment_index(z, len(names)), "perf": float(result.perf),
        "cost": float(result.cost), "answer": result.final_answer, "gold": result.gold,
        "n_input_tokens": sum(v["in"] for v in by_engine.values()),
        "n_output_tokens": sum(v["out"] for v in by_engine.values()),
        "role_input_tokens": [by_role.get(r, {}).get("in", 0) for r in roles],
        "role_output_tokens": [by_role.get(r, {}).get("out", 0) for r in roles],
        "engine_input_tokens": [by_engine.get(n, {}).get("in", 0) for n in names],
        "engine_output_tokens": [by_engine.get(n, {}).get("out", 0) for n in names],
        "n_calls": result.n_calls, "n_malformed": result.n_malformed, "error": result.error,
        "trajectory": json.dumps(trajectory, ensure_ascii=False), "engine_names": names,
        "engine_checksums": list(checksums), "max_new_tokens": cfg.eval_decoding.max_new_tokens,
        "temperature": cfg.eval_decoding.temperature, "top_p": cfg.eval_decoding.top_p, "seed": spec.seed,
        "batch_id": spec.batch_id, "n_estimated_calls": sum(c.tokens_estimated for c in result.calls),
    }


@dataclass
class StoredEpisode:
    """One row of D as the reward-weighted RL objective reads it: the assignment, its reward, its calls."""

    z: tuple[int, ...]
    reward: float
    calls: list[CallRecord]


def stored_episodes(table: pa.Table, split: str = "train") -> dict[str, list[StoredEpisode]]:
    """problem_id -> every z's row of `split` (the table must carry the derived `reward`, see `with_reward`)."""
    if "reward" not in table.column_names:
        raise ValueError("D lacks the derived 'reward' column; call haps_ray.dataset.with_reward first")
    out: dict[str, list[StoredEpisode]] = {}
    for row in table.filter(pc.equal(table.column("split"), split)).to_pylist():
        calls, _, _ = trajectory(row)
        out.setdefault(row["problem_id"], []).append(StoredEpisode(tuple(row["z"]), float(row["reward"]), calls))
    return out


def trajectory(row: Mapping[str, object]) -> tuple[list[CallRecord], list[Retrieval], int]:
    """The typed records of a D row's `trajectory` column: (calls, retrievals, lock-step steps)."""
    data = json.loads(str(row["trajectory"]))
    return ([CallRecord.from_dict(c) for c in data["calls"]], [Retrieval.from_dict(r) for r in data.get("retrievals", [])],
            int(data["n_steps"]))


def run_batch(spec: BatchSpec, engines: Mapping[str, EngineClient], cfg: ExperimentConfig, checksums: Sequence[str],
              retriever: RetrieverClient | None = None) -> list[dict]:
    """Run a batch's episodes in lock-step (frozen engines, no adapters) and return its D rows.

    `engines` maps candidate name to an `EngineClient`. Decoding is `cfg.eval_decoding`. Raises `EngineFailure`
    when an engine call or retrieval failed outright (the episodes ended), and `EngineUnavailable` when every call to
    some engine failed for an infrastructure reason. Single calls an API failed after its retries stay in their
    rows as malformed turns with the episode's `error` saying so: a sporadic failure is part of what z costs.
    """
    names = [c.name for c in cfg.candidates]
    episodes = [make_episode(cfg.task, p, {role: names[i] for role, i in zip(cfg.task.roles, z, strict=True)}, adapters={})
                for p, z in zip(spec.problems, spec.zs, strict=True)]
    runner = EpisodeRunner(engines, cfg.eval_decoding, PriceTable.from_config(cfg), cfg.reward,
                           retriever=retriever, seed=spec.seed)
    results = runner.run(episodes, seed=spec.seed)
    failed = [r for r in results if r.infrastructure_failure]
    if failed:
        raise EngineFailure(f"batch {spec.batch_id}: {len(failed)} episodes hit infrastructure errors, "
                            f"first ({failed[0].problem_id}): {failed[0].error}")
    calls = [c for r in results for c in r.calls]
    for name in names:
        mine = [c for c in calls if c.engine == name]
        if mine and all(c.error_kind == ErrorKind.ENGINE.value for c in mine):
            raise EngineUnavailable(f"batch {spec.batch_id}: all {len(mine)} calls to {name} failed; first: {mine[0].error}")
    return [episode_row(r, spec, z, cfg, checksums) for r, z in zip(results, spec.zs)]


# ----------------------------------------------------------------------------------------------
# Reading D
# ----------------------------------------------------------------------------------------------


def empty_table() -> pa.Table:
    return D_SCHEMA.empty_table()


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with every D column) to a table with exactly D_SCHEMA; names the first bad row. Columns added to
    D later (`LATER_COLUMNS`) may be absent and are then null, as in files written before them."""
    missing = [name for name in D_SCHEMA.names if rows and name not in rows[0] and name not in LATER_COLUMNS]
    if missing:
        raise ValueError(f"D row for problem {rows[0].get('problem_id')!r} lacks columns {missing}")
    try:
        return pa.Table.from_pylist(rows, schema=D_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"D rows do not fit D_SCHEMA: {err}") from err


def dedupe(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep one row per (split, problem_id, z_index); returns (table, number of duplicate rows dropped).

    The builder commits each (problem, z) once; this is the safety net for a copy that slipped through
    (e.g. two runs writing to the same D at once). The kept copy is the one in the smallest batch_id.
    """
    if table.num_rows == 0:
        return table, 0
    order = pc.sort_indices(table, sort_keys=[(name, "ascending") for name in (*KEY_COLUMNS, "batch_id")])
    table = table.take(order)
    cols = [table.column(name).to_pylist() for name in KEY_COLUMNS]
    keep, previous = [], None
    for i, key in enumerate(zip(*cols)):
        if key != previous:
            keep.append(i)
        previous = key
    dropped = table.num_rows - len(keep)
    return (table.take(pa.array(keep, pa.int64())) if dropped else table), dropped


def read_d(uri: str, splits: Sequence[str] | None = None) -> tuple[pa.Table, int]:
    """Read D from a local directory or s3:// prefix, deduplicated; returns (table, duplicates dropped)."""
    table = storage.read_dataset(uri, schema=D_SCHEMA, partition_field=PARTITION)
    if splits is not None:
        table = table.filter(pc.is_in(table.column("split"), pa.array(list(splits), pa.string())))
    table, dropped = dedupe(table)
    if dropped:
        logger.warning("D at %s holds %d duplicate (split, problem, z) rows; kept one of each", uri, dropped)
    return table, dropped


def present_keys(table: pa.Table) -> set[tuple[str, str, int]]:
    """(split, problem_id, z_index) of every row: what a resumed build skips."""
    return set(zip(*(table.column(name).to_pylist() for name in KEY_COLUMNS)))


def check_compatible(table: pa.Table, names: Sequence[str], checksums: Sequence[str], decoding: DecodingConfig,
                     where: str) -> None:
    """Refuse to extend a D built with other candidates, other weights or other decoding: rows would not
    be comparable (a resumed build must run what the first one ran)."""
    if table.num_rows == 0:
        return
    found = {(tuple(n), tuple(c)) for n, c in zip(table.column("engine_names").to_pylist(), table.column("engine_checksums").to_pylist())}
    expected = (tuple(names), tuple(checksums))
    if found != {expected}:
        other = sorted(found - {expected})
        raise ValueError(
            f"{where}: existing rows were built with other engines {other} (now {expected}); "
            "write to a fresh dataset.output or delete the old D"
        )
    settings = {tuple(r.values()) for r in table.select(["max_new_tokens", "temperature", "top_p"]).to_pylist()}
    now = (decoding.max_new_tokens, decoding.temperature, decoding.top_p)
    if settings != {now}:
        raise ValueError(f"{where}: existing rows were decoded with (max_new_tokens, temperature, top_p) = "
                         f"{sorted(settings - {now})}, the config says {now}; write to a fresh dataset.output")


# ----------------------------------------------------------------------------------------------
# The derived reward
# ----------------------------------------------------------------------------------------------


def fit_cost_normalizer(table: pa.Table, split: str = "train", clip: bool = True) -> CostNormalizer:
    """Min-max bounds of the episode cost over the rows of `split` (the paper fits them on train)."""
    costs = table.filter(pc.equal(table.column("split"), split)).column("cost").to_pylist()
    if not costs:
        raise ValueError(f"no {split!r} rows in D to fit the cost normaliser on; build that split or pass a frozen normaliser")
    return CostNormalizer.fit(costs, clip=clip)


def with_reward(table: pa.Table, reward: RewardConfig, normalizer: CostNormalizer | None = None) -> pa.Table:
    """D plus the derived `cost_norm` and `reward` columns (see the module docstring for the order).

    `normalizer` is the frozen train-split normaliser; None fits one on this D's train rows. Either way
    `reward.clip_cost` decides whether Ĉ is clipped to [0, 1]: a given normaliser contributes its bounds only.
    With λ = 0 the cost term vanishes and `cost_norm` is still filled (when train rows exist) for reporting.
    """
    if normalizer is not None:
        normalizer = replace(normalizer, clip=reward.clip_cost)
    elif reward.lam > 0 or pc.any(pc.equal(table.column("split"), "train")).as_py():
        normalizer = fit_cost_normalizer(table, clip=reward.clip_cost)
    costs = table.column("cost").to_pylist()
    perfs = table.column("perf").to_pylist()
    cost_norm = [normalizer(c) if normalizer else None for c in costs]
    rewards = [combine_reward(p, c, reward.lam, reward.shaping) for p, c in zip(perfs, cost_norm)]
    for name, values in (("cost_norm", cost_norm), ("reward", rewards)):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(pa.field(name, pa.float64()), pa.array(values, pa.float64()))
    return table
