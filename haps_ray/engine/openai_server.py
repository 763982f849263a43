"""A small OpenAI-compatible HTTP endpoint on 127.0.0.1 (stdlib `http.server`, one thread per connection).

It answers `POST /v1/chat/completions` (non-streaming) and `GET /v1/models`, checks `Authorization: Bearer <key>`
(401 otherwise) and hands each request to a backend. `EngineBackend` serves a local `LLMEngine`: requests that
arrive together are gathered into one batched `generate` (like the engines' own batching), so concurrent API
calls from lock-step episodes decode as one batch. It is how an open model stands in for a closed API offline
(`api.serve_model`; the Ray actor around it is `actors/openai_endpoint.py`), and the tests' loopback API.

    server = OpenAIServer(EngineBackend(engine), key="k", model="qwen").start()
    server.url            # http://127.0.0.1:<port>/v1
    server.stop()

`reply_chat(body)` returns (status, headers, payload bytes); a subclass may answer otherwise (the tests inject
429s, 5xx, slow and malformed replies there).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass
class ChatReply:
    """What a backend returns for one chat request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


class ChatBackend(Protocol):
    def complete(self, body: dict) -> ChatReply: ...


def completion_payload(model: str, reply: ChatReply, usage: bool = True) -> dict:
    """The JSON body of a chat.completion response."""
    payload = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason}],
    }
    if usage:
        payload["usage"] = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                            "total_tokens": reply.prompt_tokens + reply.completion_tokens}
    return payload


def error_payload(message: str, kind: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


class _Quiet(ThreadingHTTPServer):
    """A client that gave up (its timeout) closes the socket under a slow reply: log that, do not print a trace."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("connection from %s closed before the reply was sent", client_address, exc_info=True)


class OpenAIServer:
    """The HTTP endpoint: `start()` binds 127.0.0.1 (port 0 = a free one), `url` is the API root, `stop()` closes."""

    def __init__(self, backend: ChatBackend, key: str, model: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.backend, self.model = backend, model
        self._key = key
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:  # request lines go to logging, never headers
                logger.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def _authorised(self) -> bool:
                given = self.headers.get("Authorization", "")
                if hmac.compare_digest(given.encode(), f"Bearer {server._key}".encode()):
                    return True
                self._send(401, error_payload("Invalid API key.", "invalid_request_error", "invalid_api_key"))
                return False

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if not self._authorised():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    body = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "haps-ray"}]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(404, error_payload(f"no route {self.path}", "not_found"))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if not self._authorised():
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, error_payload(f"no route {self.path}", "not_found"))
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, error_payload("request body is not JSON", "invalid_request_error"))
                    return
                server.requests += 1
                status, headers, payload = server.reply_chat(body)
                self._send(status, payload, headers)

        self._httpd = _Quiet((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reply_chat(self, body: dict) -> tuple[int, dict[str, str], bytes]:
        """Answer one chat-completions request (already authorised and parsed)."""
        if not isinstance(body.get("messages"), list):
            return 400, {}, error_payload("'messages' must be a list", "invalid_request_error")
        try:
            reply = self.backend.complete(body)
        except ValueError as err:
            return 400, {}, error_payload(str(err), "invalid_request_error")
        except Exception as err:
            logger.exception("backend failed")
            return 500, {}, error_payload(f"{type(err).__name__}: {err}", "server_error")
        return 200, {}, json.dumps(completion_payload(self.model, reply)).encode()

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        stop = getattr(self.backend, "stop", None)
        if stop is not None:
            stop()


class EngineBackend:
    """Serves an engine with `generate` (an `LLMEngine`): requests that arrive within `gather_s` of each other and
    share decoding settings go through one batched generate call (at most `max_batch` rows)."""

    def __init__(self, engine: Any, max_batch: int = 64, gather_s: float = 0.005) -> None:
        self.engine, self.max_batch, self.gather_s = engine, max_batch, gather_s
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="engine-backend", daemon=True)
        self._running = True
        self.batches = 0
        self._worker.start()

    def complete(self, body: dict) -> ChatReply:
        messages = [{"role": str(m.get("role", "")), "content": str(m.get("content") or "")} for m in body["messages"]]
        stop = body.get("stop")
        sampling = {"max_new_tokens": int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
                    "temperature": float(body.get("temperature", 1.0)), "top_p": float(body.get("top_p", 1.0)),
                    "stop": tuple([stop] if isinstance(stop, str) else stop or ()), "seed": body.get("seed")}
        future: Future = Future()
        self._queue.put((messages, sampling, future))
        return future.result()

    def stop(self) -> None:
        self._running = False
        self._queue.put(None)

    def _loop(self) -> None:
        while self._running:
            first = self._queue.get()
            if first is None:
                break
            items, deadline = [first], time.monotonic() + self.gather_s
            while len(items) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self._running = False
                    break
                items.append(item)
            groups: dict[tuple, list] = {}
            for item in items:
                s = item[1]
                groups.setdefault((s["max_new_tokens"], s["temperature"], s["top_p"], s["stop"], s["seed"]), []).append(item)
            for group in groups.values():
                self._run(group)

    def _run(self, group: Sequence[tuple]) -> None:
        sampling = dict(group[0][1])
        sampling["stop"] = list(sampling["stop"]) or None
        self.batches += 1
        try:
            gens = self.engine.generate([messages for messages, _, _ in group], None, **sampling)
        except Exception as err:
            for _, _, future in group:
                future.set_exception(err)
            return
        for (_, _, future), gen in zip(group, gens):
            future.set_result(ChatReply(gen.text, gen.n_input_tokens, gen.n_output_tokens,
                                        "length" if gen.finish_reason == "length" else "stop"))
