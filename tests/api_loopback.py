"""The tests' loopback OpenAI-compatible API: real HTTP on 127.0.0.1 (port 0), deterministic answers with usage, and
faults on demand (429 with Retry-After, 5xx, slow past the client's timeout, malformed JSON, no usage; a wrong key
gets 401 from the server itself).

    with LoopbackApi(key="k") as api:          # api.url, api.arrivals, api.max_in_flight
        api.faults.extend([Fault("status", 429, retry_after="0.3"), Fault("status", 500)])   # the next two requests
        api.always = Fault("status", 500)      # every request from now on (None = healthy again)

Answers: `answer(messages)` (default: a short deterministic text naming a letter, derived from the last message),
with usage prompt_tokens = characters of all messages // 3, completion_tokens = words of the answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from haps_ray.engine.openai_server import ChatReply, OpenAIServer, completion_payload, error_payload


@dataclass
class Fault:
    kind: str  # status | slow | malformed | no_usage
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0


def default_answer(messages: list[dict]) -> str:
    digest = hashlib.sha256(messages[-1]["content"].encode()).digest()
    return f"Reasoning: it follows. Final answer: {'ABCD'[digest[0] % 4]}"


class _Backend:
    def __init__(self, answer: Callable[[list[dict]], str], latency_s: float) -> None:
        self.answer, self.latency_s = answer, latency_s

    def complete(self, body: dict) -> ChatReply:
        if self.latency_s:
            time.sleep(self.latency_s)
        text = self.answer(body["messages"])
        prompt = sum(len(m.get("content") or "") for m in body["messages"])
        return ChatReply(text, prompt // 3, len(text.split()))


class LoopbackApi(OpenAIServer):
    """An `OpenAIServer` with scripted faults and a record of every request (arrival time, body)."""

    def __init__(self, key: str = "loopback-key", model: str = "loopback-model",
                 answer: Callable[[list[dict]], str] = default_answer, latency_s: float = 0.0,
                 gate: threading.Barrier | None = None) -> None:
        super().__init__(_Backend(answer, latency_s), key, model)
        self.faults: deque[Fault] = deque()
        self.always: Fault | None = None
        self.gate = gate  # requests wait here until that many are in flight together
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def reply_chat(self, body: dict) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.bodies.append(body)
            fault = self.faults.popleft() if self.faults else self.always
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                self.gate.wait(timeout=10)
            return self._reply(body, fault)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(self, body: dict, fault: Fault | None) -> tuple[int, dict[str, str], bytes]:
        if fault is None:
            return super().reply_chat(body)
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return fault.status, headers, error_payload(f"injected {fault.status}", "server_error")
        if fault.kind == "slow":
            time.sleep(fault.seconds)
            return super().reply_chat(body)
        if fault.kind == "malformed":
            return 200, {}, b'{"id": "x", "choices": [{"message": '
        if fault.kind == "no_usage":
            reply = self.backend.complete(body)
            return 200, {}, json.dumps(completion_payload(self.model, reply, usage=False)).encode()
        raise ValueError(f"unknown fault {fault.kind!r}")

    def __enter__(self) -> LoopbackApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
