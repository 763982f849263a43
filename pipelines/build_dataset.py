"""Build the action-level dataset D on Ray, then D_SFT and the static baselines from it.

    python -m pipelines.build_dataset --config tune_configs/offline_mmlu.yaml --set task.n_train=20
    ray job submit --working-dir . -- python -m pipelines.build_dataset --config tune_configs/mmlu_llama_qwen.yaml

Outputs under `dataset.output` (default `<run_dir>/dataset`, local or s3://):
    D/split=<split>/part-*.parquet   one row per (problem, z); schema: haps_ray.dataset.D_SCHEMA
    cost_normalizer.json             min-max bounds of episode cost fitted on D's train rows (frozen after)
    D_sft.parquet, sft_labels.md     best z per problem (dataset.tie_policy / drop_all_zero / balance)
    baselines.md, baselines.csv      every fixed z, uniform random, oracle, per split
    summary.json                     the build report, label summary and headroom
Re-running the same command resumes: (problem, z) already in D are skipped.

Placement: an `EnginePool` (each candidate's replicas, resources from its config); lane i is a DatasetWorker
driving lock-step batches over replica i (mod that candidate's count) of every candidate; one batch is in flight per
lane. Exactly once: a batch's rows are committed as one Parquet file named by a hash of its (problem, z) keys
(atomic write), so re-running a batch overwrites its own file, and a resumed build plans only the (problem, z) not
yet in D. A worker or engine process that dies is restarted by Ray, which retries what it was running. An engine
killed for good fails its batch: the scheduler replaces it and re-queues the batch whole. A failure with every actor
alive is a bug and stops the build (committed batches stay for the resume). A batch whose every call to one engine
failed for an infrastructure reason (an API down) is re-queued as well, up to `dataset.max_unavailable_requeues`
times per build (`BuildReport.unavailable_batches`); single API calls failing after their retries are kept in
their rows (see `haps_ray.dataset.run_batch`). A `FatalEngineError` (an API refusing its key) stops the build at
once with its own one-line message; the pool checks every key before the first batch, so no row is written then.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from actors.dataset import DatasetWorker
from actors.engine import EnginePool
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import ExperimentConfig
from haps_ray.dataset_labels import label_summary_markdown, sft_labels, static_baselines, write_baselines
from haps_ray.engine.client import FatalEngineError
from haps_ray.metrics import Progress
from haps_ray.rl.cost import CostNormalizer
from haps_ray.tasks import Problem
from pipelines import common

logger = logging.getLogger("pipelines.build_dataset")


class BuildActors:
    """The engine pool plus one DatasetWorker per lane; reusable across builds with the same candidates."""

    def __init__(self, cfg: ExperimentConfig, replicas: int | None = None) -> None:
        self.candidates = [(c.name, c.model) for c in cfg.candidates]
        restarts = cfg.dataset.max_engine_restarts
        self.pool = EnginePool(cfg, cfg.dataset.replicas if replicas is None else replicas, max_restarts=restarts)
        self.workers = [DatasetWorker.options(max_restarts=restarts, max_task_retries=restarts).remote()
                        for _ in range(self.pool.lanes)]
        try:
            self.checksums = self.pool.wait_ready()
        except Exception:
            self.shutdown()
            raise

    def check(self, cfg: ExperimentConfig) -> None:
        wanted = [(c.name, c.model) for c in cfg.candidates]
        if wanted != self.candidates:
            raise ValueError(f"these actors host {self.candidates}, the config asks for {wanted}")

    def shutdown(self) -> None:
        self.pool.shutdown()
        for worker in self.workers:
            ray.kill(worker)


@dataclass
class BuildReport:
    """What one build did (written to summary.json by the pipeline)."""

    planned_episodes: int = 0
    already_present: int = 0
    committed_episodes: int = 0
    committed_batches: int = 0
    requeued_batches: int = 0
    unavailable_batches: int = 0  # of those, re-queued because an engine (an API) failed every call of the batch
    failed_calls: int = 0  # calls of committed rows that failed after an API's retries (kept as malformed turns)
    estimated_calls: int = 0  # calls of committed rows whose token counts are estimates (no usage, no tokenizer)
    engine_restarts: int = 0
    duplicates_on_read: int = 0
    missing: int = 0
    rows_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    episodes_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class DatasetBuilder:
    """Enumerates every (problem, z), runs the missing ones on Ray and commits them to D at `d_uri`.

    `actors` lets several builds share started engines (tests, benchmarks); without it the build
    starts its own and stops them at the end.
    """

    def __init__(self, cfg: ExperimentConfig, d_uri: str, actors: BuildActors | None = None) -> None:
        self.cfg, self.d_uri, self.actors = cfg, d_uri, actors
        self.names = [c.name for c in cfg.candidates]
        self.n_z = len(self.names) ** len(cfg.task.roles)

    def _commit(self, spec: D.BatchSpec, rows: list[dict]) -> None:
        table = D.rows_to_table(rows).drop_columns([D.PARTITION])
        storage.write_table(table, storage.join(self.d_uri, f"{D.PARTITION}={spec.split}", f"{spec.batch_id}.parquet"))

    def build(self, problems: dict[str, list[Problem]], callback: Callable[[str, dict], None] | None = None) -> BuildReport:
        """Run every missing (problem, z) of `problems` (split -> problems); returns the report.

        `callback(event, info)` is called on 'dispatch' (info: batch_id, lane, split, the lane's engine
        handles) and on 'commit' (batch_id, lane, split, rows); an exception from it stops the build.
        """
        report, started = BuildReport(), time.monotonic()
        existing, _ = D.read_d(self.d_uri)
        actors = self.actors or BuildActors(self.cfg)
        try:
            actors.check(self.cfg)
            D.check_compatible(existing, self.names, actors.checksums, self.cfg.eval_decoding, self.d_uri)
            specs = D.plan_batches(problems, len(self.names), len(self.cfg.task.roles), D.present_keys(existing),
                                   self.cfg.dataset.batch_size, self.cfg.seed)
            report.planned_episodes = sum(len(s.zs) for s in specs)
            report.already_present = sum(len(ps) for ps in problems.values()) * self.n_z - report.planned_episodes
            logger.info("D at %s: %d episodes to run in %d batches over %d lanes (%d already present)",
                        self.d_uri, report.planned_episodes, len(specs), len(actors.workers), report.already_present)
            self._run(deque(specs), actors, report, callback)
        finally:
            if self.actors is None:
                actors.shutdown()
        final, report.duplicates_on_read = D.read_d(self.d_uri, splits=list(problems))
        expected = {(s, p.id, i) for s, ps in problems.items() for p in ps for i in range(self.n_z)}
        report.missing = len(expected - D.present_keys(final))
        splits = final.column(D.PARTITION).to_pylist()
        report.rows_per_split = {s: splits.count(s) for s in problems}
        report.seconds = time.monotonic() - started
        report.episodes_per_s = report.committed_episodes / report.seconds if report.seconds else 0.0
        if report.missing:
            raise RuntimeError(f"D at {self.d_uri} lacks {report.missing} (problem, z) rows after the build")
        return report

    def _run(self, queue: deque, actors: BuildActors, report: BuildReport,
             callback: Callable[[str, dict], None] | None) -> None:
        progress = Progress("D", report.planned_episodes, every_s=self.cfg.dataset.progress_every_s, unit=" episodes")
        in_flight: dict[Any, tuple[int, D.BatchSpec, dict[str, Any]]] = {}
        while queue or in_flight:
            busy = {lane for lane, _, _ in in_flight.values()}
            for lane, worker in enumerate(actors.workers):
                if lane not in busy and queue:
                    spec, engines = queue.popleft(), actors.pool.lane(lane)
                    in_flight[worker.run_batch.remote(spec, engines, actors.checksums, self.cfg)] = (lane, spec, engines)
                    if callback:
                        callback("dispatch", {"batch_id": spec.batch_id, "lane": lane, "split": spec.split, "engines": engines})
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.cfg.dataset.progress_every_s)
            if not ready:
                progress.update(0)
            for ref in ready:
                lane, spec, engines = in_flight.pop(ref)
                try:
                    rows = ray.get(ref)
                except FatalEngineError as err:  # Ray's error is also the engine's: raise that, one line
                    raise getattr(err, "cause", err) from None
                except D.EngineUnavailable as err:
                    self._requeue_unavailable(spec, report, err)
                    queue.append(spec)  # to the back: give the endpoint the other batches' time to come back
                    continue
                except (RayActorError, D.EngineFailure) as err:
                    self._recover(spec, engines, actors, report, err)
                    queue.appendleft(spec)
                    continue
                self._commit(spec, rows)
                report.committed_batches += 1
                report.committed_episodes += len(rows)
                for row in rows:
                    calls = json.loads(row["trajectory"])["calls"]
                    report.failed_calls += sum(c.get("error") is not None for c in calls)
                    report.estimated_calls += row["n_estimated_calls"]
                progress.update(len(rows))
                if callback:
                    callback("commit", {"batch_id": spec.batch_id, "lane": lane, "split": spec.split, "rows": len(rows)})

    def _requeue_unavailable(self, spec: D.BatchSpec, report: BuildReport, err: Exception) -> None:
        report.unavailable_batches += 1
        report.requeued_batches += 1
        limit = self.cfg.dataset.max_unavailable_requeues
        if report.unavailable_batches > limit:
            raise RuntimeError(f"{report.unavailable_batches} batches found an engine unavailable, more than "
                               f"dataset.max_unavailable_requeues={limit}; last: {err}") from None
        logger.warning("batch %s re-queued: %s", spec.batch_id, err)

    def _recover(self, spec: D.BatchSpec, engines: dict[str, Any], actors: BuildActors, report: BuildReport,
                 err: Exception) -> None:
        """Replace the engines that died under a failed batch, or re-raise when none did."""
        replaced, stale = actors.pool.replace_dead(engines)
        if not (replaced or stale):
            raise RuntimeError(f"batch {spec.batch_id} failed with every actor alive: {err}") from err
        report.engine_restarts += replaced
        report.requeued_batches += 1
        if report.engine_restarts > self.cfg.dataset.max_engine_restarts:
            raise RuntimeError(f"{report.engine_restarts} engine replacements exceed dataset.max_engine_restarts="
                               f"{self.cfg.dataset.max_engine_restarts}; last failure: {err}") from err
        logger.warning("batch %s re-queued after an engine died (%s)", spec.batch_id, type(err).__name__)


def frozen_normalizer(d: pa.Table, out: str, clip: bool = True) -> CostNormalizer | None:
    """Fit on D's train rows and save; without train rows, load the one saved by an earlier build.

    `clip` (the config's `reward.clip_cost`) is recorded with the bounds and overrides a loaded one.
    """
    uri = storage.join(out, "cost_normalizer.json")
    if "train" in set(d.column("split").to_pylist()):
        normalizer = D.fit_cost_normalizer(d, clip=clip)
        normalizer.save(uri)
        return normalizer
    return replace(CostNormalizer.load(uri), clip=clip) if storage.exists(uri) else None


def write_tables(cfg: ExperimentConfig, out: str) -> dict:
    """D_SFT, label summary, baselines and the frozen cost normaliser from the D under `out`."""
    d, duplicates = D.read_d(storage.join(out, "D"))
    normalizer = frozen_normalizer(d, out, cfg.reward.clip_cost)
    d = D.with_reward(d, cfg.reward, normalizer)
    labels, label_summary = sft_labels(d, cfg.dataset.tie_policy, cfg.dataset.drop_all_zero, cfg.dataset.balance, cfg.seed)
    storage.write_table(labels, storage.join(out, "D_sft.parquet"))
    storage.write_text(storage.join(out, "sft_labels.md"), label_summary_markdown(label_summary))
    rows, headroom = static_baselines(d)
    write_baselines(rows, headroom, out)
    return {"rows": d.num_rows, "duplicates_on_read": duplicates, "sft_labels": label_summary, "headroom": headroom,
            "cost_normalizer": normalizer.to_dict() if normalizer else None,
            "baselines": [r.__dict__ for r in rows]}


def build(cfg: ExperimentConfig) -> dict:
    """Build (or complete) D for `cfg.dataset.splits` and write the tables; returns the summary (also written)."""
    out = common.dataset_dir(cfg)
    common.save_resolved_config(cfg, out, "build_config.yaml")
    problems = {split: common.load_split(cfg, split) for split in cfg.dataset.splits}
    report = DatasetBuilder(cfg, storage.join(out, "D")).build(problems)
    tables = write_tables(cfg, out)
    summary = {"build": report.to_dict(), **tables}
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args("Build the action-level dataset D, D_SFT and static baselines", argv)
    common.setup_logging(args.log_level)
    cfg = common.load(args, lambda c: c.dataset.splits, "dataset.splits")
    common.init_ray(cfg)
    summary = build(cfg)
    out, report = common.dataset_dir(cfg), summary["build"]
    print(f"D: {summary['rows']} rows at {storage.join(out, 'D')} ({report['committed_episodes']} run now, "
          f"{report['already_present']} already present, {report['requeued_batches']} batches re-queued, "
          f"{report['episodes_per_s']:.2f} episodes/s)")
    print(storage.read_text(storage.join(out, "baselines.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
