"""ApiEngine: a closed-source candidate behind an OpenAI-compatible chat-completions API.

It has the engine's `generate` (a batch goes out as concurrent requests, at most `api.max_concurrency` in flight)
and refuses what needs weights: adapters, `score`, `adapter_grads` (the candidate is `open_source: false`, so the
policy never gives it an adapter nor asks it for a gradient; asking anyway is a bug and raises
`ClosedCandidateError`).

    engine = ApiEngine(candidate)                          # the key is read from os.environ[candidate.api.api_key_env]
    client = ApiEngineClient(engine)                       # EngineClient: the requests start at once
    gens = client.generate(messages, max_new_tokens=64).result()

Failures. The openai client retries a request after a connection error, a timeout, 408/409/429 or 5xx, backing off
exponentially or as the server's Retry-After says (`api.max_retries`, `api.timeout_s`). A call still failing after
that becomes a failed `Generation` (empty text, `finish_reason` "error", `error` says what happened, `error_kind`
"engine" for the infrastructure's failures, "request" for a 4xx that is the request's own): the episode records it
as a malformed turn and goes on, and D building decides from the kinds whether to re-queue the batch. A 401 or 403
(the key is wrong or lacks access) raises `ApiAuthError`, a `FatalEngineError`: no call can succeed, so the caller
stops, naming the candidate and the environment variable.

Token counts come from the reply's `usage`; without it, from the candidate's `api.tokenizer` when configured, else
they are estimated (4 characters per token) and flagged `tokens_estimated` (the call record and D say so).

The key is held in a `Secret` (its repr is masked), goes only into the client's Authorization header, and is cut
out of every error text this module writes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai

from haps_ray.config import CandidateConfig
from haps_ray.engine.chat import ChatEncoder, Messages
from haps_ray.engine.client import FatalEngineError
from haps_ray.engine.generator import Generation
from haps_ray.tasks.protocol import ErrorKind

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # estimate when a reply has no usage and no tokenizer is configured
MAX_STOP_SEQUENCES = 4  # OpenAI's limit; longer stop lists are also applied here, on the returned text
RETRIED_STATUS = (408, 409, 429)  # plus every 5xx: what the openai client retries


class Secret:
    """An API key that never prints: repr/str show '***'. `reveal()` is for the HTTP client only."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> tuple:  # pickled for Ray as itself (the value travels, it is never rendered)
        return (Secret, (self._value,))


class ApiAuthError(FatalEngineError):
    """The API refused the key (401/403); the message names the candidate and the environment variable."""


class ClosedCandidateError(ValueError):
    """An adapter, a score or a gradient was asked of a closed-source (API) candidate."""


def api_key(candidate: CandidateConfig) -> Secret:
    """The candidate's key from this process's environment; a clear error naming the variable when it is unset."""
    env = candidate.api.api_key_env
    value = os.environ.get(env, "")
    if not value:
        raise ApiAuthError(f"candidate {candidate.name!r}: environment variable {env} is not set (it must hold the API key "
                           f"of {candidate.api.base_url or 'the endpoint'})")
    return Secret(value)


def api_checksum(model: str, where: str) -> str:
    """What identifies an API candidate in D's engine_checksums: the served model and where it is served from."""
    return hashlib.sha256(f"api\0{model}\0{where}".encode()).hexdigest()


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """`text` cut before its first stop string, and whether one was found."""
    cuts = [i for s in stop or () if (i := text.find(s)) >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class _BatchPending:
    """The pending result of one generate: a future per request, gathered in order."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def result(self, timeout: float | None = None) -> list[Generation]:
        return [f.result(timeout) for f in self.futures]


class ApiEngine:
    """`generate` over an OpenAI-compatible endpoint for one closed candidate (`candidate.api` must be set).

    `key` defaults to the environment variable `api.api_key_env`; `base_url` overrides `api.base_url` (an endpoint
    the pipeline started, `api.serve_model`); `checksum` overrides the identity written to D.
    """

    def __init__(self, candidate: CandidateConfig, key: Secret | None = None, base_url: str | None = None,
                 checksum: str | None = None) -> None:
        if candidate.api is None:
            raise ValueError(f"candidate {candidate.name!r} has no api block")
        if candidate.open_source:
            raise ValueError(f"candidate {candidate.name!r}: an api candidate must be open_source: false")
        self.name = candidate.name
        self.api = candidate.api
        self.base_url = base_url or self.api.base_url
        if not self.base_url:
            raise ValueError(f"candidate {candidate.name!r}: no base_url to send requests to")
        self._key = key or api_key(candidate)
        self.checksum = checksum or api_checksum(self.api.model, self.base_url)
        self.max_batch_size = candidate.max_batch_size
        self.device = "api"
        self._client = openai.OpenAI(api_key=self._key.reveal(), base_url=self.base_url, timeout=self.api.timeout_s,
                                     max_retries=self.api.max_retries)
        self._pool = ThreadPoolExecutor(self.api.max_concurrency, thread_name_prefix=f"api-{self.name}")
        self._encoder = self._token_counter(self.api.tokenizer)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failed": 0, "estimated": 0}

    def _token_counter(self, source: str) -> ChatEncoder | None:
        if not source:
            return None
        from haps_ray.models import load_tokenizer  # transformers only when a tokenizer is configured

        return ChatEncoder(load_tokenizer(source), name=f"tokenizer of candidate {self.name!r}")

    # ---- what the engine is --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "api", "model": self.api.model, "base_url": self.base_url,
                "checksum": self.checksum, "lora_layers": 0, "adapter_shapes": [], "device": self.device,
                "max_batch_size": self.max_batch_size, "max_concurrency": self.api.max_concurrency}

    def check_access(self) -> bool:
        """Ask the endpoint's model list once: a refused key raises `ApiAuthError` before any work starts. Other
        failures (no /models route, endpoint down) only warn: the calls themselves will say. True when it answered."""
        try:
            self._client.with_options(max_retries=0).models.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise self._auth_error(err) from None
        except openai.OpenAIError as err:
            logger.warning("candidate %s: could not list the endpoint's models (%s); going on",
                           self.name, self._scrub(f"{type(err).__name__}: {err}"))
            return False
        return True

    # ---- the three calls -----------------------------------------------------------------------

    def submit(self, messages: Sequence[Messages], adapters: Sequence[Any] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
               seed: int | None = None) -> _BatchPending:
        """Start one request per chat at once (at most max_concurrency in flight); the result comes in order.
        `seed` is not sent (providers differ): put one in `api.extra_body` to ask for reproducible sampling."""
        if adapters is not None and any(a is not None for a in adapters):
            raise ClosedCandidateError(f"candidate {self.name!r} is a closed-source API: it takes no adapters")
        body = {"max_tokens": max_new_tokens, "temperature": temperature}
        if top_p < 1.0:
            body["top_p"] = top_p
        if stop:
            body["stop"] = list(stop)[:MAX_STOP_SEQUENCES]
        return _BatchPending([self._pool.submit(self._call, list(m), body, stop) for m in messages])

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Any] | None = None, **sampling: Any) -> list[Generation]:
        """`submit` and wait: one `Generation` per chat, failed calls included (see the module docstring)."""
        return self.submit(messages, adapters, **sampling).result()

    def score(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        raise ClosedCandidateError(f"candidate {self.name!r} is a closed-source API: it cannot score completions")

    def adapter_grads(self, *args: Any, **kwargs: Any) -> list:
        raise ClosedCandidateError(f"candidate {self.name!r} is a closed-source API: it has no adapter gradients")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # ---- one request ---------------------------------------------------------------------------

    def _call(self, messages: Messages, body: dict, stop: Sequence[str] | None) -> Generation:
        with self._lock:
            self.stats["requests"] += 1
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.api.model, messages=messages, extra_body=self.api.extra_body or None, **body)
            with self._lock:
                self.stats["retries"] += raw.retries_taken
            reply = raw.parse()
            if isinstance(reply, (str, bytes)) or not reply.choices:
                raise ValueError(f"reply has no choices: {str(reply)[:200]!r}")
            choice = reply.choices[0]
            content = choice.message.content or ""
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise self._auth_error(err) from None
        except openai.APIStatusError as err:
            infrastructure = err.status_code in RETRIED_STATUS or err.status_code >= 500
            retried = f" after {self.api.max_retries} retries" if infrastructure else ""
            return self._failed(f"HTTP {err.status_code}{retried}: {err.message}", infrastructure)
        except openai.APIConnectionError as err:  # refused, reset, timed out
            return self._failed(f"{type(err).__name__} after {self.api.max_retries} retries: {err}", True)
        except Exception as err:  # an unreadable reply (not JSON, no choices): the server's fault
            return self._failed(f"unreadable reply: {type(err).__name__}: {err}", True)
        text, stopped = cut_at_stop(content, stop)
        finish = "stop" if stopped or choice.finish_reason == "stop" else "length" if choice.finish_reason == "length" else "stop"
        n_in, n_out, estimated = self._count(messages, text, reply.usage)
        return Generation(text=text, token_ids=[], logprobs=[], n_input_tokens=n_in, n_output_tokens=n_out,
                          finish_reason=finish, tokens_estimated=estimated)

    def _count(self, messages: Messages, text: str, usage: Any) -> tuple[int, int, bool]:
        if usage is not None and usage.prompt_tokens is not None and usage.completion_tokens is not None:
            return int(usage.prompt_tokens), int(usage.completion_tokens), False
        if self._encoder is not None:
            return len(self._encoder.encode(messages)), len(self._encoder.tokens(text)), False
        with self._lock:
            self.stats["estimated"] += 1
        chars_in = sum(len(m.get("content") or "") for m in messages)
        return math.ceil(chars_in / CHARS_PER_TOKEN), math.ceil(len(text) / CHARS_PER_TOKEN), True

    def _failed(self, message: str, infrastructure: bool) -> Generation:
        message = self._scrub(f"api {self.name} ({self.api.model}): {message}")
        logger.warning("%s", message)
        with self._lock:
            self.stats["failed"] += 1
        kind = ErrorKind.ENGINE if infrastructure else ErrorKind.REQUEST
        return Generation(text="", token_ids=[], logprobs=[], n_input_tokens=0, n_output_tokens=0, finish_reason="error",
                          error=message, error_kind=kind.value)

    def _auth_error(self, err: openai.APIStatusError) -> ApiAuthError:
        # The server's message is left out: providers echo part of the key back.
        return ApiAuthError(f"candidate {self.name!r}: {self.base_url} refused the API key in ${self.api.api_key_env} "
                            f"(HTTP {err.status_code}); set a valid key in that environment variable")

    def _scrub(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, "***") if key else text


class ApiEngineClient:
    """`EngineClient` over an `ApiEngine` in this process: generate's requests start when it is called."""

    def __init__(self, engine: ApiEngine) -> None:
        self.engine = engine

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Any] | None = None, **sampling: Any) -> _BatchPending:
        return self.engine.submit(messages, adapters, **sampling)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine.score(*args, **kwargs)

    def adapter_grads(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine.adapter_grads(*args, **kwargs)
