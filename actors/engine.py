"""EngineActor: a Ray actor hosting one `haps_ray.engine.LLMEngine` built from a CandidateConfig.

The actor is a thin shell: every method forwards to the engine, so results equal a local engine's. Resources come
from the candidate (`num_cpus`, `num_gpus`, fractions allowed) so several replicas, or several small candidates,
share one machine. Adapters travel by value (pickled tensors); send detached factors (`Adapter.detach()`), as
non-leaf tensors that require grad cannot be serialised.

    actors = create_engine_actors(candidate, lora_layers=1)      # `candidate.replicas` actors
    gens = ray.get(actors[0].generate.remote(messages, adapters, max_new_tokens=64))
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch

from haps_ray.config import CandidateConfig
from haps_ray.engine import Generation, LLMEngine, Messages
from haps_ray.lora import Adapter


@ray.remote
class EngineActor:
    """One frozen LLM with per-sample LoRA, served to rollout workers and the learner."""

    def __init__(self, candidate: CandidateConfig, lora_layers: int = 1) -> None:
        self.started = time.time()
        self.calls = 0
        if candidate.torch_threads:
            torch.set_num_threads(candidate.torch_threads)
        self.engine = LLMEngine.from_config(candidate, lora_layers=lora_layers)

    def generate(
        self,
        messages: Sequence[Messages],
        adapters: Sequence[Adapter | None] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        self.calls += 1
        return self.engine.generate(messages, adapters, max_new_tokens, temperature, top_p, stop, seed)

    def score(
        self,
        messages: Sequence[Messages],
        completions: Sequence[list[int] | str],
        adapters: Sequence[Adapter | None] | None = None,
    ) -> list[list[float]]:
        self.calls += 1
        return self.engine.score(messages, completions, adapters)

    def adapter_grads(
        self,
        messages: Sequence[Messages],
        completions: Sequence[list[int] | str],
        adapters: Sequence[Adapter],
        weights: Sequence[float],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.calls += 1
        return self.engine.adapter_grads(messages, completions, adapters, weights)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def health(self) -> dict[str, Any]:
        """Liveness plus where the actor runs and how busy it has been."""
        return {
            "ok": True,
            "name": self.engine.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.engine.device),
            "uptime_s": time.time() - self.started,
            "calls": self.calls,
        }


def create_engine_actors(candidate: CandidateConfig, lora_layers: int = 1) -> list[ray.actor.ActorHandle]:
    """Start `candidate.replicas` EngineActors with the candidate's CPU/GPU reservation; returns their handles."""
    options = {"num_cpus": candidate.num_cpus, "num_gpus": candidate.num_gpus}
    return [EngineActor.options(**options).remote(candidate, lora_layers) for _ in range(candidate.replicas)]
