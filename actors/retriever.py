"""RetrieverActor: a Ray actor hosting one `haps_ray.retrieval.Retriever` (the HotpotQA Search tool).

A thin shell: `retrieve` forwards to the core retriever, so results equal a local one's, and the paragraph
embedding cache lives in the actor, shared by every rollout worker that calls it. The lock-step runner
(`haps_ray.episodes.EpisodeRunner`) takes a `RetrieverActorClient` in place of a local retriever and sends one
batched `retrieve` per step.

    retriever = RetrieverActorClient(RetrieverActor.remote(cfg.retriever))
    hits = retriever.retrieve(problems, queries).result()
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from actors.engine import RayPending
from haps_ray.config import RetrieverConfig
from haps_ray.retrieval import Passage, Retriever
from haps_ray.tasks.problem import Problem


@ray.remote
class RetrieverActor:
    """Dense retriever with its per-problem embedding cache, served to rollout workers."""

    def __init__(self, cfg: RetrieverConfig) -> None:
        self.started = time.time()
        self.calls = 0
        self.retriever = Retriever.from_config(cfg)

    def retrieve(self, problems: Sequence[Problem], queries: Sequence[str], top_k: int | None = None) -> list[list[Passage]]:
        self.calls += 1
        return self.retriever.retrieve(problems, queries, top_k)

    def health(self) -> dict[str, Any]:
        """Liveness plus the retriever's state and how busy the actor has been."""
        return {"ok": True, "pid": os.getpid(), "uptime_s": time.time() - self.started, "calls": self.calls,
                "forward_passes": self.retriever.forward_passes, **self.retriever.health()}


class RetrieverActorClient:
    """`haps_ray.engine.RetrieverClient` over a RetrieverActor handle."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def retrieve(self, problems: Sequence[Problem], queries: Sequence[str], top_k: int | None = None) -> RayPending[list[list[Passage]]]:
        return RayPending(self.handle.retrieve.remote(problems, queries, top_k))
