"""Ray Serve deployments of the trained HAPS system: router, one engine per candidate, and the OpenAI-style ingress.

Thin shells over `haps_ray.serving` (parsing, routing, batching, responses) and the training code itself:

- `RouterDeployment` holds the trained `HAPSPolicy`; `@serve.batch` gathers the route calls of concurrent requests
  into one greedy router pass (assignment, π(z|x) for every z, the adapters of the batch).
- `EngineDeployment` holds one candidate's `LLMEngine` (or `ApiEngine`); `@serve.batch` gathers the generate calls
  of all concurrent episodes into one batched generate, each sample with its own adapter or none. `stats()` reports
  the batches it ran (sizes, batches holding several distinct adapters).
- `ServeEngineClient` is the `EngineClient` over an engine deployment's handle, so a request's episode runs on the
  unchanged `EpisodeRunner` through `haps_ray.rl.rollout.run_plans`, the function evaluation runs.
- `HapsIngress` (FastAPI through `@serve.ingress`): POST /v1/chat/completions, POST /v1/route, GET /v1/models,
  GET /v1/stats, GET /health. Episodes run in a thread pool (the runner is synchronous), at most
  `serve.max_ongoing_requests` at once; `serve.max_queued_requests` more wait, then 429.

    app = build_app(cfg, "runs/demo_mmlu_offline/rl/best")   # pipelines.serve builds and runs it
    serve.run(app, name="haps")
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views resolve the endpoint annotations
# (`request: Request`) outside this module, so they must be real objects, not strings.
import asyncio
import json
import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from actors.retriever import RetrieverActor, RetrieverActorClient
from haps_ray.config import CandidateConfig, DecodingConfig, ExperimentConfig
from haps_ray.engine import ChatEncoder, Generation, LLMEngine, Messages
from haps_ray.engine.api import ApiEngine, Secret
from haps_ray.episodes import EpisodeRunner
from haps_ray.lora import Adapter
from haps_ray.models import load_tokenizer, model_config
from haps_ray.rl.cost import PriceTable
from haps_ray.rl.rollout import run_plans
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.routing.prompt import RoutingSpec
from haps_ray.serving import (
    HAPS_MODEL, Admission, ApiError, BatchStats, EngineFailure, GenerateItem, RouteDecision, chat_completion,
    check_bearer, check_context, check_policy, generate_items, haps_completion, models_list, parse_chat_request,
    problem_from_request, route_batch, route_view,
)
from haps_ray.tasks import Problem, make_episode

logger = logging.getLogger(__name__)

APP_NAME = "haps"
HEADROOM = 8  # ingress requests beyond running + queued ones that still reach our own 429 (and /health)
MAX_TOKENS_WITHOUT_CONTEXT = 4096  # max_tokens bound of a pool of API candidates only (contexts are the providers')
# router and engine calls are per request and per sample: no access-log line each (the ingress keeps its own)
INTERNAL_LOGGING = {"enable_access_log": False}


def engine_deployment_name(candidate: str) -> str:
    return f"engine-{candidate}"


@serve.deployment
class EngineDeployment:
    """One candidate LLM; batched generate across every concurrent episode."""

    def __init__(self, candidate: CandidateConfig, lora_layers: int, max_batch_size: int, batch_wait_timeout_s: float,
                 api_key: Secret | None = None) -> None:
        if candidate.torch_threads:
            torch.set_num_threads(candidate.torch_threads)
        if candidate.api is not None:
            self.engine: Any = ApiEngine(candidate, key=api_key)
        else:
            self.engine = LLMEngine.from_config(candidate, lora_layers=lora_layers)
        self.name = candidate.name
        self.stats_ = BatchStats()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{candidate.name}")  # one decode at a time
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate(self, items: list[GenerateItem]) -> list[Generation | EngineFailure]:
        # the decode runs off the event loop, so the next batch gathers while this one decodes
        return await asyncio.get_running_loop().run_in_executor(self.executor, generate_items, self.engine, items,
                                                                self.stats_)

    async def score(self, messages: Sequence[Messages], completions: Sequence[Any],
                    adapters: Sequence[Adapter | None] | None = None) -> list[list[float]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.score, messages,
                                                                completions, adapters)

    async def adapter_grads(self, messages: Sequence[Messages], completions: Sequence[Any], adapters: Sequence[Adapter],
                            weights: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.adapter_grads, messages,
                                                                completions, adapters, weights)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "max_batch_size": self.generate._get_max_batch_size(),
                "batch_wait_timeout_s": self.generate._get_batch_wait_timeout_s(), **self.stats_.to_dict()}


@serve.deployment
class RouterDeployment:
    """The trained policy; batched greedy routing decisions plus adapters."""

    def __init__(self, policy_path: str, device: str, seed: int, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.policy = HAPSPolicy.load(policy_path, device=device, seed=seed)
        self.stats_ = BatchStats()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="router")
        self.route.set_max_batch_size(max_batch_size)
        self.route.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, problems: list[Problem]) -> list[RouteDecision]:
        self.stats_.record(len(problems), 0)
        return await asyncio.get_running_loop().run_in_executor(self.executor, route_batch, self.policy, problems)

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), **self.stats_.to_dict()}


class ServePending:
    """The pending generations of one `ServeEngineClient.generate` call (one Serve request per sample)."""

    def __init__(self, responses: list[DeploymentResponse], timeout_s: float) -> None:
        self.responses = responses
        self.timeout_s = timeout_s

    def result(self, timeout: float | None = None) -> list[Generation]:
        outs = [r.result(timeout_s=self.timeout_s if timeout is None else timeout) for r in self.responses]
        failed = [o for o in outs if isinstance(o, EngineFailure)]
        if failed:
            raise RuntimeError(failed[0].message)
        return outs


class ServeEngineClient:
    """`haps_ray.engine.EngineClient` over an engine deployment's handle (arguments as `EngineClient` documents)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Adapter | None] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> ServePending:
        adapters = [None] * len(messages) if adapters is None else adapters
        items = [GenerateItem(list(m), None if a is None else a.detach(), max_new_tokens, temperature, top_p,
                              tuple(stop or ()), seed) for m, a in zip(messages, adapters)]
        return ServePending([self.handle.generate.remote(item) for item in items], self.timeout_s)

    def score(self, messages: Sequence[Messages], completions: Sequence[Any],
              adapters: Sequence[Adapter | None] | None = None) -> Any:
        return _One(self.handle.score.remote(messages, completions, adapters), self.timeout_s)

    def adapter_grads(self, messages: Sequence[Messages], completions: Sequence[Any], adapters: Sequence[Adapter],
                      weights: Sequence[float]) -> Any:
        return _One(self.handle.adapter_grads.remote(messages, completions, [a.detach() for a in adapters], weights),
                    self.timeout_s)


class _One:
    def __init__(self, response: DeploymentResponse, timeout_s: float) -> None:
        self.response, self.timeout_s = response, timeout_s

    def result(self, timeout: float | None = None) -> Any:
        return self.response.result(timeout_s=self.timeout_s if timeout is None else timeout)


api = FastAPI(title="haps-ray", description="The trained HAPS system as an OpenAI-compatible service.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("request %s failed", request.url.path)
    return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error").body(),
                        status_code=500)


@serve.deployment
@serve.ingress(api)
class HapsIngress:
    """OpenAI-compatible front: each `model: "haps"` request is routed and run as one Teacher-Student episode."""

    def __init__(self, cfg: ExperimentConfig, router: DeploymentHandle, engines: dict[str, DeploymentHandle],
                 token: Secret | None = None) -> None:
        self.cfg, self.router, self.engines = cfg, router, engines
        self.token = None if token is None else token.reveal()
        self.names = [c.name for c in cfg.candidates]
        self.models = [HAPS_MODEL, *self.names]
        self.timeout_s = cfg.serve.request_timeout_s
        self.clients = {name: ServeEngineClient(engines[name], self.timeout_s) for name in self.names}
        self.prices = PriceTable.from_config(cfg)
        self.admission = Admission(cfg.serve.max_ongoing_requests, cfg.serve.max_queued_requests)
        self.pool = ThreadPoolExecutor(cfg.serve.max_ongoing_requests, thread_name_prefix="episode")
        self.retriever_handle = RetrieverActor.remote(cfg.retriever) if cfg.task.name == "hotpotqa" else None
        self.retriever = None if self.retriever_handle is None else RetrieverActorClient(self.retriever_handle)
        # the engines' own chat encoding and context, here: a prompt too long is refused before any engine call
        self.encoders = {c.name: (ChatEncoder(load_tokenizer(c.model), None, name=c.name),
                                  getattr(model_config(c.model), "max_position_embeddings", None))
                         for c in cfg.candidates if c.api is None}
        self.assignments = RoutingSpec.from_config(cfg).assignments()
        # `max_tokens` is bounded by the largest engine context (each engine then checks its own)
        self.max_tokens_limit = max([ctx for _, ctx in self.encoders.values() if ctx] or [MAX_TOKENS_WITHOUT_CONTEXT])

    # ---- plumbing --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> Any:
        check_bearer(request.headers.get("authorization"), self.token)
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"malformed JSON body: {err}") from None

    def _check_context(self, names: Sequence[str], messages: Messages, max_new_tokens: int) -> None:
        """400 when `messages` plus `max_new_tokens` does not fit the context of one of the engines `names` (an API
        engine's context is the provider's to check)."""
        for name in names:
            if name in self.encoders:
                encoder, context = self.encoders[name]
                check_context(len(encoder.encode(messages)), max_new_tokens, context, name)

    async def _bounded(self, work: Any) -> Any:
        async with self.admission.slot():
            try:
                return await asyncio.wait_for(work, timeout=self.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, f"no answer within serve.request_timeout_s={self.timeout_s}",
                               type_="timeout_error", code="timeout") from None

    # ---- endpoints -------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": self.models, "task": self.cfg.task.name}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), self.token)
        return models_list(self.models)

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), self.token)
        engines = {name: await handle.stats.remote() for name, handle in self.engines.items()}
        return {"router": await self.router.stats.remote(), "engines": engines,
                "admission": {"inside": self.admission.inside, "refused": self.admission.refused}}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        req = parse_chat_request(body, self.models, self.max_tokens_limit)
        if req.model == HAPS_MODEL:
            return await self._bounded(self._episode(body, req))
        return await self._bounded(self._plain(req))

    @api.post("/v1/route")
    async def route(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        if isinstance(body, dict):
            body.setdefault("model", HAPS_MODEL)
        req = parse_chat_request(body, [HAPS_MODEL], self.max_tokens_limit)
        problem, _ = problem_from_request(body, req, self.cfg.task.name, f"route-{uuid.uuid4().hex[:12]}")
        decision = await self._bounded(self.router.route.remote(problem))
        return {"object": "haps.route", "problem_id": problem.id,
                **route_view(decision, self.cfg.task.roles, self.names, self.assignments)}

    async def _plain(self, req: Any) -> dict[str, Any]:
        max_new = req.max_tokens or self.cfg.eval_decoding.max_new_tokens
        self._check_context([req.model], req.messages, max_new)
        item = GenerateItem(req.messages, None, max_new, req.temperature, req.top_p, tuple(req.stop), req.seed)
        gen = await self.engines[req.model].generate.remote(item)
        if isinstance(gen, EngineFailure):
            raise ApiError(500, f"engine {req.model!r} failed: {gen.message}", type_="server_error", code="engine_error")
        return chat_completion(req.model, gen)

    async def _episode(self, body: dict[str, Any], req: Any) -> dict[str, Any]:
        if req.stop:
            raise ApiError(400, "'stop' cannot be set for model 'haps': the protocol sets its own", param="stop")
        problem, has_gold = problem_from_request(body, req, self.cfg.task.name, f"req-{uuid.uuid4().hex[:12]}")
        decoding = DecodingConfig(max_new_tokens=req.max_tokens or self.cfg.eval_decoding.max_new_tokens,
                                  temperature=req.temperature, top_p=req.top_p)
        # the episode's first prompt (the same whoever is assigned) must fit every engine that may get it
        probe = make_episode(self.cfg.task, problem, {role: self.names[0] for role in self.cfg.task.roles})
        self._check_context(self.names, probe.pending_call().messages, decoding.max_new_tokens)
        decision: RouteDecision = await self.router.route.remote(problem)
        runner = EpisodeRunner(self.clients, decoding, self.prices, self.cfg.reward, retriever=self.retriever)
        results = await asyncio.get_running_loop().run_in_executor(
            self.pool, run_plans, runner, self.cfg.task, self.names, [problem], [decision.plan], req.seed or 0)
        routing = route_view(decision, self.cfg.task.roles, self.names, self.assignments)
        return haps_completion(results[0], routing, has_gold)


def build_app(cfg: ExperimentConfig, policy_path: str) -> serve.Application:
    """The Serve application for `cfg.serve` around the policy in `policy_path` (a `HAPSPolicy.save` directory)."""
    lora_layers = check_policy(cfg, policy_path)
    sc = cfg.serve
    token = None
    if sc.api_key_env:
        value = os.environ.get(sc.api_key_env)
        if not value:
            raise ValueError(f"serve.api_key_env: environment variable {sc.api_key_env} is not set (export the token "
                             "there, or leave serve.api_key_env empty for no auth)")
        token = Secret(value)
    engines = {}
    for i, c in enumerate(cfg.candidates):
        if c.api is not None and c.api.serve_model:
            raise ValueError(f"candidates[{i}].api.serve_model: the service calls API candidates at their base_url; "
                             "serve_model (the pipelines' loopback stand-in) is not served")
        key = Secret(os.environ[c.api.api_key_env]) if c.api is not None and c.api.api_key_env in os.environ else None
        engines[c.name] = EngineDeployment.options(
            name=engine_deployment_name(c.name), num_replicas=sc.engine_replicas or c.replicas,
            max_ongoing_requests=sc.max_ongoing_requests, logging_config=INTERNAL_LOGGING,
            ray_actor_options={"num_cpus": 0 if c.api is not None else c.num_cpus, "num_gpus": c.num_gpus},
        ).bind(c, lora_layers, sc.max_batch_size, sc.batch_wait_timeout_s, key)
    router = RouterDeployment.options(
        name="router", num_replicas=sc.router_replicas, max_ongoing_requests=sc.max_ongoing_requests,
        logging_config=INTERNAL_LOGGING,
        ray_actor_options={"num_cpus": sc.router_num_cpus, "num_gpus": sc.router_num_gpus},
    ).bind(policy_path, cfg.router.device, cfg.seed, sc.max_batch_size, sc.batch_wait_timeout_s)
    return HapsIngress.options(
        name="ingress", max_ongoing_requests=sc.max_ongoing_requests + sc.max_queued_requests + HEADROOM,
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg, router, engines, token)
