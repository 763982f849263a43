"""DatasetWorker: a Ray actor that runs one lock-step batch of D (every episode of a batch of (problem, z)) at a time.

A thin shell over `haps_ray.dataset.run_batch`, over the EngineActors of one lane of the pool (their handles come
with each batch, so a replaced engine is used from the next batch on). It reserves no CPU: it mostly waits on the
engines. Ray restarts a worker whose process died and retries its batch (`max_restarts` / `max_task_retries`,
set by the scheduler in `pipelines/build_dataset.py`): a batch is a pure function of its spec, and only the
scheduler commits rows, once per returned batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray

from actors.engine import EngineActorClient
from haps_ray import dataset as D
from haps_ray.config import ExperimentConfig
from haps_ray.engine import LocalRetrieverClient
from haps_ray.retrieval import Retriever


@ray.remote(num_cpus=0)
class DatasetWorker:
    """Runs one batch at a time: episodes in lock-step over the engine handles it is given."""

    def __init__(self) -> None:
        self.retriever: LocalRetrieverClient | None = None

    def run_batch(self, spec: D.BatchSpec, engines: dict[str, ray.actor.ActorHandle], checksums: Sequence[str],
                  cfg: ExperimentConfig) -> list[dict]:
        if cfg.task.name == "hotpotqa" and self.retriever is None:
            self.retriever = LocalRetrieverClient(Retriever.from_config(cfg.retriever))
        clients = {name: EngineActorClient(handle) for name, handle in engines.items()}
        return D.run_batch(spec, clients, cfg, checksums, self.retriever)

    def ping(self) -> int:
        return os.getpid()
