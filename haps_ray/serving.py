"""OpenAI-compatible request parsing and response building for the HAPS service (no Ray, no HTTP).

The Serve ingress (actors/serving.py, not yet written) is meant to be a thin shell over these
functions: every bad request is turned here into an `ApiError` carrying the OpenAI error object
(`message`, `type`, `param`, `code`) and an HTTP status, so the 4xx behaviour is unit-testable.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from haps_ray.engine.generator import Generation

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
