"""EngineActor (one `haps_ray.engine.LLMEngine` in a Ray actor), its `EngineClient`, and the pool of replicas.

The actor is a thin shell: every method forwards to the engine, so results equal a local engine's. Resources come
from the candidate (`num_cpus`, `num_gpus`, fractions allowed) so several replicas, or several small candidates,
share one machine. `EngineActorClient` is what the episode runner, D building and RL call: it sends detached
adapter factors (non-leaf tensors that require grad cannot be serialised) and returns at once with a pending
result. `EnginePool` starts every candidate's replicas, checks they loaded the same weights, hands out lanes
(one replica of every candidate) and replaces replicas that died.

A closed candidate with an `api` block gets an EngineActor around a `haps_ray.engine.api.ApiEngine` instead (no
weights loaded; a threaded actor, so the batches of several lanes are in flight at once, sharing the engine's
`api.max_concurrency`), so D building, rollouts and evaluation use it unchanged. Its key is read from the driver's
environment (`api.api_key_env`) and travels to the actor as a masked `Secret` (else the actor reads its own
environment); `wait_ready` asks each API once for its model list, so a refused key stops everything before any
work starts. With `api.serve_model` the pool first starts a `LoopbackEndpoint` serving that model on 127.0.0.1
with a fresh random key, and the candidate's API actor talks to it over HTTP.

    pool = EnginePool(cfg)                                         # cfg.candidates, replicas each
    clients = pool.clients(lane=0)                                 # name -> EngineActorClient
    gens = clients["llama8b"].generate(messages, adapters, max_new_tokens=64).result()
    pool.shutdown()
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from haps_ray.config import CandidateConfig, ExperimentConfig
from haps_ray.engine import FatalEngineError, Generation, LLMEngine, Messages
from haps_ray.engine.api import ApiEngine, Secret, api_checksum
from haps_ray.engine.logprobs import Nucleus
from haps_ray.engine.teacher_forcing import Completion
from haps_ray.lora import Adapter

logger = logging.getLogger(__name__)

T = TypeVar("T")

HEALTH_TIMEOUT_S = 60.0  # an engine busy with another caller's batch answers late but is alive
API_ACTOR_CONCURRENCY = 32  # generate calls an API engine actor runs at once (they share api.max_concurrency)


class RayPending(Generic[T]):
    """The pending result of an actor call (`haps_ray.engine.Pending` over an ObjectRef)."""

    def __init__(self, ref: ray.ObjectRef) -> None:
        self.ref = ref

    def result(self, timeout: float | None = None) -> T:
        return ray.get(self.ref, timeout=timeout)


@ray.remote
class EngineActor:
    """One frozen LLM with per-sample LoRA, served to rollout workers, dataset workers and the learner."""

    def __init__(self, candidate: CandidateConfig, lora_layers: int = 1, api: dict[str, Any] | None = None) -> None:
        """`api` (API candidates): ApiEngine keyword arguments (key, base_url, checksum) the pool resolved."""
        self.started = time.time()
        self.calls = 0
        if candidate.api is not None:
            self.engine = ApiEngine(candidate, **(api or {}))
            return
        if candidate.torch_threads:
            torch.set_num_threads(candidate.torch_threads)
        self.engine = LLMEngine.from_config(candidate, lora_layers=lora_layers)

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Adapter | None] | None = None,
                 **sampling: Any) -> list[Generation]:
        self.calls += 1
        return self.engine.generate(messages, adapters, **sampling)

    def score(self, messages: Sequence[Messages], completions: Sequence[Completion],
              adapters: Sequence[Adapter | None] | None = None, nucleus: Nucleus | None = None) -> list[list[float]]:
        self.calls += 1
        return self.engine.score(messages, completions, adapters, nucleus=nucleus)

    def adapter_grads(self, messages: Sequence[Messages], completions: Sequence[Completion],
                      adapters: Sequence[Adapter], weights: Sequence[float],
                      nucleus: Nucleus | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.calls += 1
        return self.engine.adapter_grads(messages, completions, adapters, weights, nucleus=nucleus)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def check_access(self) -> bool:
        """API engines: ask the endpoint once (a refused key raises ApiAuthError); local engines: True."""
        check = getattr(self.engine, "check_access", None)
        return True if check is None else check()

    def health(self) -> dict[str, Any]:
        """Liveness plus where the actor runs and how busy it has been."""
        return {"ok": True, "name": self.engine.name, "pid": os.getpid(), "host": socket.gethostname(),
                "device": str(self.engine.device), "uptime_s": time.time() - self.started, "calls": self.calls}


def _detached(adapters: Sequence[Adapter | None] | None) -> list[Adapter | None] | None:
    return None if adapters is None else [None if a is None else a.detach() for a in adapters]


class EngineActorClient:
    """`haps_ray.engine.EngineClient` over an EngineActor handle (arguments as `EngineClient` documents them)."""

    def __init__(self, handle: ray.actor.ActorHandle) -> None:
        self.handle = handle

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Adapter | None] | None = None,
                 **sampling: Any) -> RayPending[list[Generation]]:
        return RayPending(self.handle.generate.remote(messages, _detached(adapters), **sampling))

    def score(self, messages: Sequence[Messages], completions: Sequence[Completion],
              adapters: Sequence[Adapter | None] | None = None,
              nucleus: Nucleus | None = None) -> RayPending[list[list[float]]]:
        return RayPending(self.handle.score.remote(messages, completions, _detached(adapters), nucleus))

    def adapter_grads(self, messages: Sequence[Messages], completions: Sequence[Completion], adapters: Sequence[Adapter],
                      weights: Sequence[float],
                      nucleus: Nucleus | None = None) -> RayPending[list[tuple[torch.Tensor, torch.Tensor]]]:
        return RayPending(self.handle.adapter_grads.remote(messages, completions, _detached(adapters), weights, nucleus))


def alive(handle: ray.actor.ActorHandle, method: str = "health") -> bool:
    """False when the actor is dead; an actor too busy to answer within HEALTH_TIMEOUT_S counts as alive."""
    try:
        ray.get(getattr(handle, method).remote(), timeout=HEALTH_TIMEOUT_S)
    except RayActorError:
        return False
    except GetTimeoutError:
        return True
    return True


class EnginePool:
    """EngineActor replicas of every candidate (`replicas` each, or `cfg.candidates[].replicas`).

    Engines wrap `o_proj` of the last `lora_layers` layers (default `router.lora_layers`). Ray restarts a replica
    whose process died up to `max_restarts` times and retries the calls it was running (generate, score and
    adapter_grads are pure functions of their inputs); a replica killed for good is replaced on request
    (`replace_dead`) with one that loaded the same weights (checked by checksum).
    """

    def __init__(self, cfg: ExperimentConfig, replicas: int = 0, lora_layers: int | None = None,
                 max_restarts: int = 0) -> None:
        self.candidates = {c.name: c for c in cfg.candidates}
        self.lora_layers = cfg.router.lora_layers if lora_layers is None else lora_layers
        self.max_restarts = max_restarts
        self.counts = {c.name: replicas or c.replicas for c in cfg.candidates}
        self.endpoints: dict[str, ray.actor.ActorHandle] = {}  # api.serve_model candidates' loopback endpoints
        self._api_args: dict[str, dict[str, Any]] = {}
        self.handles: dict[str, list[ray.actor.ActorHandle]] = {}
        try:
            for name, c in self.candidates.items():
                if c.api is not None:
                    self._api_args[name] = self._resolve_api(c)
                self.handles[name] = [self._start(c) for _ in range(self.counts[name])]
        except Exception:
            self.shutdown()
            raise
        self.checksums: dict[str, str] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def _resolve_api(self, candidate: CandidateConfig) -> dict[str, Any]:
        """ApiEngine arguments of an API candidate: the driver's key, or a loopback endpoint of its own."""
        if not candidate.api.serve_model:
            key = os.environ.get(candidate.api.api_key_env)
            return {"key": Secret(key)} if key else {}  # unset here: the actor reads its own environment
        from actors.openai_endpoint import LoopbackEndpoint

        key = Secret(secrets.token_urlsafe(24))
        endpoint = LoopbackEndpoint.options(num_cpus=candidate.num_cpus, num_gpus=candidate.num_gpus).remote(candidate, key)
        self.endpoints[candidate.name] = endpoint
        url, weights = ray.get([endpoint.url.remote(), endpoint.checksum.remote()])
        logger.info("candidate %s: %s served at %s", candidate.name, candidate.api.serve_model, url)
        return {"key": key, "base_url": url, "checksum": api_checksum(candidate.api.model, f"serve_model:{weights}")}

    def _start(self, candidate: CandidateConfig) -> ray.actor.ActorHandle:
        if candidate.api is not None:  # no weights: the endpoint (or the provider) does the work
            cpus = 0 if candidate.api.serve_model else candidate.num_cpus
            return EngineActor.options(num_cpus=cpus, num_gpus=0, max_concurrency=API_ACTOR_CONCURRENCY,
                                       max_restarts=self.max_restarts, max_task_retries=self.max_restarts,
                                       ).remote(candidate, self.lora_layers, self._api_args[candidate.name])
        return EngineActor.options(num_cpus=candidate.num_cpus, num_gpus=candidate.num_gpus, max_restarts=self.max_restarts,
                                   max_task_retries=self.max_restarts).remote(candidate, self.lora_layers)

    def wait_ready(self) -> list[str]:
        """Block until every engine loaded; returns checksums in candidate order (replicas must agree)."""
        for name, handles in self.handles.items():
            if self.candidates[name].api is not None:
                try:
                    ray.get(handles[0].check_access.remote())
                except FatalEngineError as err:  # Ray's error is also the engine's: re-raise that, one line
                    raise getattr(err, "cause", err) from None
            infos = ray.get([h.info.remote() for h in handles])
            sums = {info["checksum"] for info in infos}
            if len(sums) != 1:
                raise RuntimeError(f"replicas of candidate {name!r} loaded different weights: {sorted(sums)}")
            self.checksums[name], self._info[name] = sums.pop(), infos[0]
        return [self.checksums[name] for name in self.candidates]

    def adapter_shapes(self, layers: int | None = None) -> dict[str, list[tuple[int, int]]]:
        """(d_in, d_out) of every wrapped layer of each open candidate (what the hypernetwork heads emit), or of the
        deepest `layers` of them: a policy with a smaller k than the pool's sends adapters for those layers only."""
        if not self._info:
            self.wait_ready()
        layers = self.lora_layers if layers is None else layers
        if not 1 <= layers <= self.lora_layers:
            raise ValueError(f"router.lora_layers={layers}: the engine pool wraps the last {self.lora_layers} layers; "
                             "start it with lora_layers >= the deepest k that will use it")
        return {name: [tuple(s) for s in self._info[name]["adapter_shapes"]][-layers:]
                for name, c in self.candidates.items() if c.open_source}

    @property
    def lanes(self) -> int:
        return max(self.counts.values())

    def lane(self, i: int) -> dict[str, ray.actor.ActorHandle]:
        """Replica i (mod its count) of every candidate."""
        return {name: handles[i % len(handles)] for name, handles in self.handles.items()}

    def clients(self, lane: int = 0) -> dict[str, EngineActorClient]:
        return {name: EngineActorClient(handle) for name, handle in self.lane(lane).items()}

    def replace_dead(self, used: dict[str, ray.actor.ActorHandle]) -> tuple[int, bool]:
        """Replace the dead among `used`; returns (replaced now, whether any was already replaced earlier)."""
        replaced, stale = 0, False
        for name, handle in used.items():
            slot = next((i for i, h in enumerate(self.handles[name]) if h == handle), None)
            if slot is None:  # another caller's failure already replaced it
                stale = True
                continue
            if not alive(handle):
                logger.warning("engine %s (replica %d) is dead: starting a replacement", name, slot)
                new = self._start(self.candidates[name])
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
        for endpoint in self.endpoints.values():
            ray.kill(endpoint)
