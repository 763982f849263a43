"""Episodes as plain state machines, and the prompt templates they fill.

An `Episode` holds one problem, its role assignment z (role -> candidate name) and its own adapters
(candidate name -> Adapter or None). A driver (the lock-step runner, or a test) repeats:

    call = episode.pending_call()          # PendingCall(role, messages) or None
    query = episode.pending_retrieval()    # HotpotQA: a Search waits for passages between turns
    episode.advance(text, generation=...)  # parse the completion, record the call, move on

until `episode.done`. `advance` never raises for anything the model wrote: unreadable turns are recorded
as malformed and the protocol continues; the protocol caps its own number of calls.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

from haps_ray.tasks.parsing import Parsed
from haps_ray.tasks.problem import Problem

PROMPT_DIR = Path(__file__).parent / "prompts"
Messages = list[dict[str, str]]


class _Slots(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(f"prompt slot {{{key}}} has no value")


@lru_cache(maxsize=None)
def load_template(name: str) -> dict[str, str]:
    """Sections of `prompts/<name>.txt`, split on `=== section ===` lines (e.g. system, user, reminders)."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} does not exist")
    sections: dict[str, str] = {}
    current = None
    for line in path.read_text().splitlines():
        header = re.fullmatch(r"=== (\w+) ===", line.strip())
        if header:
            current = header.group(1)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    if "system" not in sections or "user" not in sections:
        raise ValueError(f"prompt template {path} needs '=== system ===' and '=== user ===' sections")
    return {k: v.strip() for k, v in sections.items()}


def fill(template: str, **slots: Any) -> str:
    """Fill `{slot}`s; slot values may contain braces, a slot without a value raises KeyError."""
    return template.format_map(_Slots({k: str(v) for k, v in slots.items()}))


def chat(name: str, **slots: Any) -> Messages:
    sections = load_template(name)
    return [{"role": "system", "content": fill(sections["system"], **slots)},
            {"role": "user", "content": fill(sections["user"], **slots)}]


@dataclass
class PendingCall:
    role: str
    messages: Messages


@dataclass
class CallRecord:
    """One LLM call of an episode: who, on which engine, what it saw and wrote, and how it was read."""

    role: str
    engine: str
    messages: Messages
    completion: str
    action: dict
    malformed: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    n_input_tokens: int = 0
    n_output_tokens: int = 0
    finish_reason: str = ""
    adapter: bool = False
    seed: int | None = None
    step: int = 0
    error: str | None = None  # the call failed after the engine's retries (text is empty, the turn malformed)
    error_kind: str | None = None  # ErrorKind value of that failure: engine (infrastructure) or request
    tokens_estimated: bool = False  # n_input_tokens / n_output_tokens are estimates, not the server's usage

    def to_dict(self) -> dict:
        """Every field, except the failure/estimate fields when unset (`from_dict` restores them), so records of
        calls that went well serialise as they did before those fields existed."""
        data = asdict(self)
        for name, unset in _UNSET_OPTIONAL.items():
            if data[name] == unset:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CallRecord:
        """A record from its `to_dict` form (also the calls in D's `trajectory` column); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"call record has unknown keys {unknown}")
        return cls(**data)


_UNSET_OPTIONAL = {"error": None, "error_kind": None, "tokens_estimated": False}


@dataclass
class Retrieval:
    """One HotpotQA search: the query and the (title, text) passages it returned."""

    query: str
    passages: list[tuple[str, str]]

    def to_dict(self) -> dict:
        return {"query": self.query, "passages": [list(p) for p in self.passages]}

    @classmethod
    def from_dict(cls, data: dict) -> Retrieval:
        return cls(data["query"], [(str(t), str(b)) for t, b in data["passages"]])


class ErrorKind(str, Enum):
    """Why an episode ended early. Engine and retrieval failures are the infrastructure's, not the episode's."""

    ENGINE = "engine"  # an engine call failed
    RETRIEVAL = "retrieval"  # the retriever failed
    PROTOCOL = "protocol"  # the protocol broke its own rules (call cap, no next step)
    INTERNAL = "internal"  # parsing or advancing the episode raised: a bug
    REQUEST = "request"  # an engine refused one call's request (an API's 4xx other than auth): the call's own doing
    CALL_FAILED = "call_failed"  # calls failed after their retries; each was recorded as a malformed turn, the episode went on

    @property
    def infrastructure(self) -> bool:
        return self in (ErrorKind.ENGINE, ErrorKind.RETRIEVAL)


class Episode:
    """Base state machine; subclasses implement `_parse`, `_on_turn` and start with `_ask`."""

    task = ""
    stop: tuple[str, ...] = ()  # stop strings for every call of this task

    def __init__(self, problem: Problem, assignment: dict[str, str], adapters: dict[str, Any] | None = None) -> None:
        self.problem = problem
        self.assignment = dict(assignment)
        self.adapters = dict(adapters or {})
        self.calls: list[CallRecord] = []
        self.final_answer: str | None = None
        self.error: str | None = None
        self.error_kind: ErrorKind | None = None
        self.retrieved: list[Retrieval] = []
        self.done = False
        self._pending: PendingCall | None = None
        self._failed_calls = 0  # calls that failed after an engine's retries (recorded as malformed turns)
        self._first_failure: str | None = None

    # ---- what the driver reads ------------------------------------------------------------------

    def pending_call(self) -> PendingCall | None:
        return None if self.done else self._pending

    def pending_retrieval(self) -> str | None:
        return None

    def receive_retrieval(self, passages: list[tuple[str, str]]) -> None:
        raise RuntimeError(f"{type(self).__name__} does not retrieve")

    def engine_for(self, role: str) -> str:
        if role not in self.assignment:
            raise KeyError(f"episode {self.problem.id}: role {role!r} has no engine in assignment {self.assignment}")
        return self.assignment[role]

    def adapter_for(self, role: str) -> Any:
        return self.adapters.get(self.engine_for(role))

    @property
    def max_calls(self) -> int:
        raise NotImplementedError

    # ---- what the driver calls ------------------------------------------------------------------

    def advance(self, text: str, generation: Any = None, step: int = 0, seed: int | None = None) -> Parsed:
        """Read the completion of the pending call, record it and move to the next state."""
        if self._pending is None or self.done:
            raise RuntimeError(f"episode {self.problem.id}: advance() without a pending call")
        call, self._pending = self._pending, None
        parsed = self._parse(call.role, text)
        record = CallRecord(call.role, self.engine_for(call.role), call.messages, text, parsed.to_dict(), parsed.malformed,
                            adapter=self.adapter_for(call.role) is not None, seed=seed, step=step)
        if generation is not None:
            record.token_ids = list(generation.token_ids)
            record.logprobs = [float(x) for x in generation.logprobs]
            record.n_input_tokens = int(generation.n_input_tokens)
            record.n_output_tokens = int(generation.n_output_tokens)
            record.finish_reason = str(generation.finish_reason)
            record.tokens_estimated = bool(getattr(generation, "tokens_estimated", False))
            error = getattr(generation, "error", None)
            if error is not None:  # failed after retries: a malformed turn, and the episode says what happened
                record.error, record.error_kind, record.malformed = str(error), generation.error_kind, True
                self._failed_calls += 1
                if self._first_failure is None:
                    self._first_failure = f"{call.role} on {record.engine}: {error}"
                self.error = f"{self._failed_calls} call(s) failed after retries; first: {self._first_failure}"
                self.error_kind = ErrorKind.CALL_FAILED
        self.calls.append(record)
        self._on_turn(call.role, parsed)
        if not self.done and len(self.calls) >= self.max_calls and self._pending is not None:
            self.fail(f"protocol exceeded its {self.max_calls} calls", ErrorKind.PROTOCOL)
        return parsed

    def fail(self, message: str, kind: ErrorKind) -> None:
        """End the episode with an error (recorded in its result); the answer so far is kept."""
        self.error = message
        self.error_kind = kind
        self.final_answer = self.answer_so_far()
        self.done = True
        self._pending = None

    def answer_so_far(self) -> str | None:
        """The answer the episode would give if it ended now."""
        return self.final_answer

    # ---- for subclasses -------------------------------------------------------------------------

    def _ask(self, role: str, messages: Messages) -> None:
        self._pending = PendingCall(role, messages)

    def _finish(self, answer: str | None) -> None:
        self.final_answer = answer
        self.done = True
        self._pending = None

    def _parse(self, role: str, text: str) -> Parsed:
        raise NotImplementedError

    def _on_turn(self, role: str, parsed: Parsed) -> None:
        raise NotImplementedError
