"""Building D on Ray: EngineActor replicas, DatasetWorker lanes, one committed file per batch, exactly once.

Placement: each candidate gets `replicas` EngineActors (resources from its CandidateConfig); lane i is a
DatasetWorker actor (no CPU reserved: it mostly waits on engines) driving lock-step batches over replica
i (mod that candidate's count) of every candidate. The driver keeps one batch in flight per lane.

Exactly once: a batch's rows are committed as one Parquet file named by a hash of its (problem, z) keys
(`D/split=<split>/<batch_id>.parquet`, atomic write), so re-running a batch overwrites its own file; a
resumed build plans only the (problem, z) not yet in D. When a batch fails because an actor died (an
engine killed mid-generate, a worker lost), the dead actors are replaced and the batch is re-queued whole;
a failure with every actor alive is a bug and stops the build (committed batches stay for the resume).

    report = DatasetBuilder(cfg, "runs/x/dataset/D").build({"train": train, "valid": valid})

    actors = BuildActors(cfg)                 # or share started engines between builds
    DatasetBuilder(cfg, uri_1, actors).build(...); DatasetBuilder(cfg, uri_2, actors).build(...)
    actors.shutdown()
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.engine import EngineActor
from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import CandidateConfig, ExperimentConfig
from haps_ray.retrieval import Retriever
from haps_ray.tasks import Problem

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 60.0  # an engine busy with another lane's batch answers late but is alive


@ray.remote(num_cpus=0)
class DatasetWorker:
    """Runs one batch at a time: episodes in lock-step over the engine handles it is given."""

    def __init__(self) -> None:
        self.retriever: Retriever | None = None

    def run_batch(self, spec: D.BatchSpec, engines: dict[str, Any], checksums: list[str], cfg: ExperimentConfig) -> list[dict]:
        if cfg.task.name == "hotpotqa" and self.retriever is None:
            self.retriever = Retriever.from_config(cfg.retriever)
        return D.run_batch(spec, engines, cfg, checksums, self.retriever)

    def ping(self) -> int:
        return os.getpid()


def _alive(handle: Any, method: str) -> bool:
    try:
        ray.get(getattr(handle, method).remote(), timeout=HEALTH_TIMEOUT_S)
    except RayActorError:
        return False
    except GetTimeoutError:
        return True
    return True


class EnginePool:
    """EngineActor replicas per candidate; dead ones are replaced on request (with the same weights)."""

    def __init__(self, cfg: ExperimentConfig, replicas: int = 0) -> None:
        self.cfg = cfg
        self.counts = {c.name: replicas or c.replicas for c in cfg.candidates}
        self.handles = {c.name: [self._start(c) for _ in range(self.counts[c.name])] for c in cfg.candidates}
        self.checksums: dict[str, str] = {}

    def _start(self, candidate: CandidateConfig) -> Any:
        return EngineActor.options(num_cpus=candidate.num_cpus, num_gpus=candidate.num_gpus).remote(
            candidate, self.cfg.router.lora_layers)

    def wait_ready(self) -> list[str]:
        """Block until every engine loaded; returns checksums in candidate order (replicas must agree)."""
        for name, handles in self.handles.items():
            sums = {info["checksum"] for info in ray.get([h.info.remote() for h in handles])}
            if len(sums) != 1:
                raise RuntimeError(f"replicas of candidate {name!r} loaded different weights: {sorted(sums)}")
            self.checksums[name] = sums.pop()
        return [self.checksums[c.name] for c in self.cfg.candidates]

    @property
    def lanes(self) -> int:
        return max(self.counts.values())

    def lane(self, i: int) -> dict[str, Any]:
        return {name: handles[i % len(handles)] for name, handles in self.handles.items()}

    def replace_dead(self, used: dict[str, Any]) -> tuple[int, bool]:
        """Replace the dead among `used`; returns (replaced now, whether any was already replaced earlier)."""
        replaced, stale = 0, False
        for name, handle in used.items():
            slot = next((i for i, h in enumerate(self.handles[name]) if h == handle), None)
            if slot is None:  # another lane's failure already replaced it
                stale = True
                continue
            if not _alive(handle, "health"):
                candidate = next(c for c in self.cfg.candidates if c.name == name)
                logger.warning("engine %s (replica %d) is dead: starting a replacement", name, slot)
                new = self._start(candidate)
                checksum = ray.get(new.info.remote())["checksum"]
                if checksum != self.checksums[name]:
                    raise RuntimeError(f"replacement engine {name!r} loaded other weights ({checksum})")
                self.handles[name][slot] = new
                replaced += 1
        return replaced, stale

    def shutdown(self) -> None:
        for handles in self.handles.values():
            for handle in handles:
                ray.kill(handle)


class BuildActors:
    """The engine pool plus one DatasetWorker per lane; reusable across builds with the same candidates."""

    def __init__(self, cfg: ExperimentConfig, replicas: int | None = None) -> None:
        self.candidates = [(c.name, c.model) for c in cfg.candidates]
        self.pool = EnginePool(cfg, cfg.dataset.replicas if replicas is None else replicas)
        self.workers = [DatasetWorker.remote() for _ in range(self.pool.lanes)]
        try:
            self.checksums = self.pool.wait_ready()
        except Exception:
            self.shutdown()
            raise

    def check(self, cfg: ExperimentConfig) -> None:
        wanted = [(c.name, c.model) for c in cfg.candidates]
        if wanted != self.candidates:
            raise ValueError(f"these actors host {self.candidates}, the config asks for {wanted}")

    def replace_worker(self, lane: int) -> None:
        self.workers[lane] = DatasetWorker.remote()

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
    engine_restarts: int = 0
    worker_restarts: int = 0
    duplicates_on_read: int = 0
    missing: int = 0
    rows_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    episodes_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class Progress:
    """Episodes done out of planned, rate and ETA, logged at most every `every_s` seconds."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every_s or self.done == self.total:
            self.log()

    def log(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info("D: %d/%d episodes (%.0f%%), %.2f episodes/s, ETA %s", self.done, self.total,
                    100 * self.done / max(self.total, 1), rate, "?" if eta == float("inf") else f"{eta / 60:.1f} min")


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
        progress = Progress(report.planned_episodes, self.cfg.dataset.progress_every_s)
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
                progress.log()
            for ref in ready:
                lane, spec, engines = in_flight.pop(ref)
                try:
                    rows = ray.get(ref)
                except (RayActorError, D.EngineFailure) as err:
                    self._recover(lane, spec, engines, actors, report, err)
                    queue.appendleft(spec)
                    continue
                self._commit(spec, rows)
                report.committed_batches += 1
                report.committed_episodes += len(rows)
                progress.add(len(rows))
                if callback:
                    callback("commit", {"batch_id": spec.batch_id, "lane": lane, "split": spec.split, "rows": len(rows)})

    def _recover(self, lane: int, spec: D.BatchSpec, engines: dict[str, Any], actors: BuildActors,
                 report: BuildReport, err: Exception) -> None:
        """Replace whatever died under a failed batch, or re-raise when nothing did."""
        replaced, stale = actors.pool.replace_dead(engines)
        worker_dead = not _alive(actors.workers[lane], "ping")
        if worker_dead:
            logger.warning("dataset worker of lane %d is dead: starting a replacement", lane)
            actors.replace_worker(lane)
        if not (replaced or stale or worker_dead):
            raise RuntimeError(f"batch {spec.batch_id} failed with every actor alive: {err}") from err
        report.engine_restarts += replaced
        report.worker_restarts += int(worker_dead)
        report.requeued_batches += 1
        restarts = report.engine_restarts + report.worker_restarts
        if restarts > self.cfg.dataset.max_engine_restarts:
            raise RuntimeError(f"{restarts} actor restarts exceed dataset.max_engine_restarts="
                               f"{self.cfg.dataset.max_engine_restarts}; last failure: {err}") from err
        logger.warning("batch %s re-queued after an actor died (%s)", spec.batch_id, type(err).__name__)
