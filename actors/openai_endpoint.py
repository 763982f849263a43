"""LoopbackEndpoint: an open model served behind an OpenAI-compatible endpoint on 127.0.0.1, in a Ray actor.

The offline stand-in for a closed API (`candidates[].api.serve_model`): `EnginePool` starts one per such candidate,
with a key of its own, and the candidate's API engine reaches it over HTTP exactly as it would reach a provider.
The actor loads the model (`LLMEngine`) with the candidate's dtype, device, CPUs/GPUs and threads, and serves it with
`haps_ray.engine.openai_server` (concurrent requests batched into one generate). It binds 127.0.0.1, so the API
engines that call it must run on the same node (a one-machine offline run).
"""

from __future__ import annotations

import ray
import torch

from haps_ray.config import CandidateConfig
from haps_ray.engine import LLMEngine
from haps_ray.engine.api import Secret
from haps_ray.engine.openai_server import EngineBackend, OpenAIServer


@ray.remote
class LoopbackEndpoint:
    """Serves `candidate.api.serve_model` as model `candidate.api.model` at `url()` (checked against `key`)."""

    def __init__(self, candidate: CandidateConfig, key: Secret) -> None:
        if candidate.torch_threads:
            torch.set_num_threads(candidate.torch_threads)
        local = CandidateConfig(name=candidate.name, model=candidate.api.serve_model, dtype=candidate.dtype,
                                device=candidate.device, max_batch_size=candidate.max_batch_size,
                                prefix_cache_mb=candidate.prefix_cache_mb, ragged_attention=candidate.ragged_attention)
        self.engine = LLMEngine.from_config(local, lora_layers=1)
        backend = EngineBackend(self.engine, max_batch=candidate.max_batch_size)
        self.server = OpenAIServer(backend, key.reveal(), candidate.api.model).start()

    def url(self) -> str:
        return self.server.url

    def checksum(self) -> str:
        """sha256 of the served weights (what D records for this candidate, with the model name)."""
        return self.engine.checksum

    def stats(self) -> dict:
        return {"requests": self.server.requests, "batches": self.server.backend.batches}

    def stop(self) -> None:
        self.server.stop()
