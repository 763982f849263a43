"""The HAPS service's core (no Ray, no HTTP): OpenAI-compatible request parsing and response building, the
problem a request describes, batched routing and batched generation, admission control and bearer-token auth.

`actors/serving.py` (the Ray Serve deployments) is a thin shell over these functions: every bad request is turned
here into an `ApiError` carrying the OpenAI error object (`message`, `type`, `param`, `code`) and an HTTP status, so
the 4xx behaviour is unit-testable. A `model: "haps"` request runs the evaluation path unchanged: `route_batch` is
`JointLearner.propose(mode="greedy")` (policy.act + to_plan), and the episode is `haps_ray.rl.rollout.run_plans` on
an `EpisodeRunner` whose engines are Serve deployments.

The extension field `haps` of a chat request describes the problem (the question is the last user message):

    {"task": "mmlu", "choices": ["Venus", "Mercury", "Earth", "Mars"], "subject": "astronomy", "answer": "B", "id": "q1"}
    {"task": "hotpotqa", "context": [["Title", ["Sentence one.", " Sentence two."]], ...], "answer": "..."}

`task` defaults to the served one; `answer` (optional gold) adds the episode's `perf` to the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from haps_ray.config import ExperimentConfig

from haps_ray.engine.generator import Generation
from haps_ray.episodes import EpisodeResult
from haps_ray.lora import Adapter
from haps_ray.rl.learner import Plan, to_plan
from haps_ray.routing.policy import META_FILE
from haps_ray.tasks import hotpotqa, mmlu
from haps_ray.tasks.problem import TASKS, Problem, RecordError

logger = logging.getLogger(__name__)

HAPS_MODEL = "haps"
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A request error with the OpenAI error object and the HTTP status it should be answered with."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated /v1/chat/completions request."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def question(self) -> str:
        """The last user message: what a `model: "haps"` episode answers."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {type(value).__name__}", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return float(value)


def parse_chat_request(body: Any, models: list[str], max_tokens_limit: int) -> ChatRequest:
    """Validate a decoded JSON body against the served `models`; raise `ApiError` naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a string)", param="model")
    if model not in models:
        raise ApiError(404, f"model '{model}' does not exist; served: {', '.join(models)}",
                       param="model", code="model_not_found")
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported: send 'stream': false", param="stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {ROLES}", param=f"messages[{i}].role")
        if not isinstance(message.get("content"), str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in clean):
        raise ApiError(400, "'messages' needs a non-empty user message", param="messages")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
            raise ApiError(400, f"'max_tokens' must be an integer in [1, {max_tokens_limit}]", param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    return ChatRequest(model=model, messages=clean, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 1e-6, 1.0), stop=stop, seed=seed)


def chat_completion(model: str, generation: Generation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAI chat-completion object for one generation (`extra`, e.g. the `haps` record, is added)."""
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                     "finish_reason": generation.finish_reason}],
        "usage": {"prompt_tokens": generation.n_input_tokens, "completion_tokens": generation.n_output_tokens,
                  "total_tokens": generation.n_input_tokens + generation.n_output_tokens},
    }
    if extra:
        response.update(extra)
    return response


def models_list(names: list[str]) -> dict[str, Any]:
    """The GET /v1/models body."""
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "haps-ray"} for n in names]}


# ---- the problem a `model: "haps"` request describes ---------------------------------------------------

_GOLD_PLACEHOLDER = {"mmlu": "A", "hotpotqa": "?"}  # the loaders require a gold answer; a request may have none


def problem_from_request(body: dict[str, Any], request: ChatRequest, served_task: str, request_id: str) -> tuple[Problem, bool]:
    """The Problem of a routed request (question = last user message, the rest from the `haps` field) and whether
    a gold answer came with it. Records go through the task loaders' own checks, so a request is held to the same
    rules as a data file; their errors name the field as `haps.<field>`."""
    ext = body.get("haps") or {}
    if not isinstance(ext, dict):
        raise ApiError(400, "'haps' must be an object (task, choices / context, answer, id)", param="haps")
    task = ext.get("task", served_task)
    if task not in TASKS:
        raise ApiError(400, f"unknown task {task!r}; tasks: {', '.join(TASKS)}", param="haps.task", code="unknown_task")
    if task != served_task:
        raise ApiError(400, f"this service routes {served_task} problems (its policy was trained on them), not {task}",
                       param="haps.task", code="unsupported_task")
    gold = ext.get("answer")
    record = {key: value for key, value in ext.items() if key != "task"}
    record.update(question=request.question, answer=gold if gold is not None else _GOLD_PLACEHOLDER[task])
    record.setdefault("subject", "general")
    record.setdefault("id" if task == "mmlu" else "_id", request_id)
    if task == "mmlu" and "choices" not in ext:
        raise ApiError(400, "MMLU needs 'haps.choices': the four options A-D", param="haps.choices")
    if task == "hotpotqa" and "context" not in ext:
        raise ApiError(400, "HotpotQA needs 'haps.context': [[title, [sentences]], ...]", param="haps.context")
    try:
        problem = (mmlu if task == "mmlu" else hotpotqa).problem_from_record(record, "request")
    except RecordError as err:
        field_name = next((f for f in ("choices", "context", "answer", "subject", "id", "supporting_facts")
                           if f in str(err)), None)
        raise ApiError(400, f"haps: {err}", param=f"haps.{field_name}" if field_name else "haps") from None
    if gold is None:
        problem.answer = ""
    return problem, gold is not None


# ---- routing --------------------------------------------------------------------------------------------


def check_policy(cfg: ExperimentConfig, path: str) -> int:
    """Check that the policy saved in `path` routes this config's task, roles and candidates (in order); returns
    the k its heads write adapters for (the engines wrap that many layers)."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"--policy {path}: not a policy checkpoint (no {META_FILE}); give e.g. <run_dir>/rl/best")
    meta = json.loads(meta_file.read_text())
    spec = meta["spec"]
    names = [c.name for c in cfg.candidates]
    for what, saved, configured in (("task.name", spec["task"], cfg.task.name), ("task.roles", spec["roles"], cfg.task.roles),
                                    ("candidates", spec["candidates"], names)):
        if list(saved) != list(configured) if isinstance(saved, list) else saved != configured:
            raise ValueError(f"{what}: the config has {configured}, the policy in {path} was trained with {saved}")
    return int(meta["router"]["lora_layers"])


@dataclass
class RouteDecision:
    """The router's greedy decision for one problem: the plan (z + adapters) and π(z|x) over every z."""

    plan: Plan
    probabilities: list[float] | None  # over RoutingSpec.assignments(); None when Z is too large to enumerate


def route_batch(policy: Any, problems: Sequence[Problem]) -> list[RouteDecision]:
    """Greedy routing of a batch, as evaluation does it (`JointLearner.propose(mode="greedy")`): one router pass,
    every chosen open candidate's adapter from the heads."""
    with torch.no_grad():
        actions = policy.act(problems, mode="greedy")
    return [RouteDecision(to_plan(a), None if a.table is None else a.table.detach().float().exp().tolist())
            for a in actions]


def route_view(decision: RouteDecision, roles: Sequence[str], candidates: Sequence[str],
               assignments: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The `haps` routing record: assignment by name and index, and π(z|x) of every z."""
    view: dict[str, Any] = {
        "assignment": {role: candidates[decision.plan.z[role]] for role in roles},
        "z": dict(decision.plan.z),
        "adapters": sorted(decision.plan.adapters),
    }
    if decision.probabilities is not None:
        view["probabilities"] = [
            {"assignment": {role: candidates[i] for role, i in zip(roles, z)}, "probability": p}
            for z, p in zip(assignments, decision.probabilities)
        ]
    return view


def haps_completion(result: EpisodeResult, routing: dict[str, Any], has_gold: bool) -> dict[str, Any]:
    """The chat-completion answer of a routed episode: the final answer as the message, usage summed over every
    call, and the `haps` record (routing, per-call role / engine / tokens, cost). An episode that an engine or the
    retriever failed is a 500; one that ended without an answer (malformed turns) is answered with empty content."""
    if result.infrastructure_failure:
        raise ApiError(500, f"the episode failed: {result.error}", type_="server_error", code=result.error_kind.value)
    n_in = sum(c.n_input_tokens for c in result.calls)
    n_out = sum(c.n_output_tokens for c in result.calls)
    generation = Generation(text=result.final_answer or "", token_ids=[], logprobs=[], n_input_tokens=n_in,
                            n_output_tokens=n_out, finish_reason="stop")
    record = {
        **routing, "task": result.task, "problem_id": result.problem_id, "final_answer": result.final_answer,
        "calls": [{"role": c.role, "engine": c.engine, "adapter": c.adapter, "prompt_tokens": c.n_input_tokens,
                   "completion_tokens": c.n_output_tokens, "malformed": c.malformed, "text": c.completion}
                  for c in result.calls],
        "retrievals": [r.to_dict() for r in result.retrievals],
        "cost_usd": result.cost, "n_steps": result.n_steps, "n_malformed": result.n_malformed, "error": result.error,
    }
    if has_gold:
        record["perf"] = result.perf
    return chat_completion("haps", generation, extra={"haps": record})


def check_context(n_prompt: int, max_new_tokens: int, context: int | None, engine: str) -> None:
    """A prompt that cannot fit `engine`'s context with `max_new_tokens` more is a 400 (OpenAI's code)."""
    if context is not None and n_prompt + max_new_tokens > context:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; with {max_new_tokens} new tokens it exceeds the "
                       f"{context}-token context of engine {engine!r}", param="messages", code="context_length_exceeded")


# ---- batched generation in an engine deployment ----------------------------------------------------------


@dataclass
class GenerateItem:
    """One sample of a generate call as an engine deployment receives it (batched with others by @serve.batch)."""

    messages: list[dict[str, str]]
    adapter: Adapter | None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def sampling_key(self) -> tuple:
        # greedy decoding ignores the seed, so greedy samples of different episodes share one generate call
        seed = None if self.temperature == 0 else self.seed
        return (self.max_new_tokens, self.temperature, self.top_p, self.stop, seed)


@dataclass
class EngineFailure:
    """What a sample gets back when its generate call raised (the other groups of the batch are unaffected)."""

    message: str


def adapter_fingerprint(adapter: Adapter | None) -> bytes | None:
    """Identifies an adapter by value (the same adapter sent twice arrives as two objects)."""
    if adapter is None:
        return None
    return adapter.A.detach().float().flatten()[:16].numpy().tobytes() + adapter.B.detach().float().flatten()[:16].numpy().tobytes()


@dataclass
class BatchStats:
    """What an engine deployment's batches looked like: sizes and how many distinct adapters each one held."""

    batches: int = 0
    samples: int = 0
    max_size: int = 0
    multi_adapter_batches: int = 0  # batches with >= 2 distinct adapters in one generate call
    failures: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int, distinct_adapters: int) -> None:
        self.batches += 1
        self.samples += size
        self.max_size = max(self.max_size, size)
        self.multi_adapter_batches += distinct_adapters >= 2
        self.sizes.append(size)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "max_size": self.max_size,
                "mean_size": self.samples / self.batches if self.batches else 0.0,
                "multi_adapter_batches": self.multi_adapter_batches, "failures": self.failures}


def generate_items(engine: Any, items: Sequence[GenerateItem], stats: BatchStats) -> list[Generation | EngineFailure]:
    """Decode a gathered batch: samples with the same sampling parameters go into one `engine.generate` with one
    adapter (or None) per sample; a group whose call raises gets `EngineFailure`s, the others their generations."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.sampling_key(), []).append(i)
    out: list[Generation | EngineFailure | None] = [None] * len(items)
    for rows in groups.values():
        first = items[rows[0]]
        adapters = [items[i].adapter for i in rows]
        distinct = {adapter_fingerprint(a) for a in adapters} - {None}
        stats.record(len(rows), len(distinct))
        try:
            gens = engine.generate([items[i].messages for i in rows], None if not distinct else adapters,
                                   max_new_tokens=first.max_new_tokens, temperature=first.temperature,
                                   top_p=first.top_p, stop=list(first.stop) or None, seed=first.seed)
            if len(gens) != len(rows):
                raise RuntimeError(f"{len(gens)} generations for {len(rows)} prompts")
        except Exception as err:
            logger.exception("generate failed for a batch of %d samples", len(rows))
            stats.failures += 1
            gens = [EngineFailure(f"{type(err).__name__}: {err}")] * len(rows)
        for i, gen in zip(rows, gens):
            out[i] = gen
    return out  # type: ignore[return-value]


# ---- admission and auth ----------------------------------------------------------------------------------


class Admission:
    """At most `max_ongoing` requests run at once, `max_queued` more wait for a slot; one more is refused with a
    429 OpenAI error (Serve's own backpressure answers with a bare 503, without the error object)."""

    def __init__(self, max_ongoing: int, max_queued: int) -> None:
        self.max_ongoing = max_ongoing
        self.max_queued = max_queued
        self.slots = asyncio.Semaphore(max_ongoing)
        self.inside = 0  # running + waiting
        self.refused = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.inside >= self.max_ongoing + self.max_queued:
            self.refused += 1
            raise ApiError(429, f"the service is full ({self.max_ongoing} requests running, {self.max_queued} "
                           "queued): retry later", type_="rate_limit_error", code="queue_full")
        self.inside += 1
        try:
            async with self.slots:
                yield
        finally:
            self.inside -= 1


def check_bearer(authorization: str | None, token: str | None) -> None:
    """401 unless `Authorization: Bearer <token>` matches (constant-time compare); no token configured = open."""
    if not token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "missing or invalid bearer token (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")
