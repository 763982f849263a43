"""The interface everything that generates text implements, and its in-process implementation.

The episode runner, D building, RL rollouts and serving talk to engines through `EngineClient` only: a local
engine (`LocalEngineClient`, here), an EngineActor handle (`actors.engine.EngineActorClient`), a Serve deployment
or an API engine. Each call returns at once with a `Pending` result, so a caller can put calls to several engines
in flight before waiting on any:

    pending = {name: client.generate(messages, adapters, max_new_tokens=64) for name, client in clients.items()}
    generations = {name: p.result() for name, p in pending.items()}

The HotpotQA retriever is reached the same way (`RetrieverClient`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from haps_ray.engine.chat import Messages
from haps_ray.engine.generator import Generation
from haps_ray.engine.logprobs import Nucleus
from haps_ray.engine.teacher_forcing import Completion
from haps_ray.lora import Adapter

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class FatalEngineError(RuntimeError):
    """An engine failure no retry or re-queue can fix (an API refusing its key): callers re-raise it instead of
    failing the episodes involved, so a dataset build or a training run stops at once with this message."""


class Pending(Protocol[T_co]):
    """A result still to come (a `concurrent.futures.Future` satisfies this too)."""

    def result(self, timeout: float | None = None) -> T_co: ...


class Deferred(Generic[T]):
    """A local call run when its result is first asked for, so calls to remote engines submitted after it are
    already in flight while it runs. Its outcome (value or exception) is kept."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._call: Callable[[], T] | None = call
        self._value: T | None = None
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> T:
        if self._call is not None:
            call, self._call = self._call, None
            try:
                self._value = call()
            except Exception as err:
                self._error = err
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


@runtime_checkable
class EngineClient(Protocol):
    """generate / score / adapter_grads of one candidate LLM, each returning a `Pending` result."""

    def generate(
        self,
        messages: Sequence[Messages],
        adapters: Sequence[Adapter | None] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Pending[list[Generation]]: ...

    def score(
        self, messages: Sequence[Messages], completions: Sequence[Completion], adapters: Sequence[Adapter | None] | None = None,
        nucleus: Nucleus | None = None,
    ) -> Pending[list[list[float]]]: ...

    def adapter_grads(
        self, messages: Sequence[Messages], completions: Sequence[Completion], adapters: Sequence[Adapter],
        weights: Sequence[float], nucleus: Nucleus | None = None,
    ) -> Pending[list[tuple[torch.Tensor, torch.Tensor]]]: ...


class LocalEngineClient:
    """`EngineClient` over an object in this process with the engine's synchronous methods (an `LLMEngine`); each
    call runs when its result is first asked for. Arguments are those of `EngineClient`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Adapter | None] | None = None,
                 **sampling: Any) -> Deferred[list[Generation]]:
        return Deferred(lambda: self.engine.generate(messages, adapters, **sampling))

    def score(self, *args: Any, **kwargs: Any) -> Deferred[list[list[float]]]:
        return Deferred(lambda: self.engine.score(*args, **kwargs))

    def adapter_grads(self, *args: Any, **kwargs: Any) -> Deferred[list[tuple[torch.Tensor, torch.Tensor]]]:
        return Deferred(lambda: self.engine.adapter_grads(*args, **kwargs))


@runtime_checkable
class RetrieverClient(Protocol):
    """The HotpotQA Search tool: passages (title, text) for each (problem, query)."""

    def retrieve(self, problems: Sequence[Any], queries: Sequence[str], top_k: int | None = None) -> Pending[list[list[Any]]]: ...


class LocalRetrieverClient:
    """`RetrieverClient` over a `haps_ray.retrieval.Retriever` in this process."""

    def __init__(self, retriever: Any) -> None:
        self.retriever = retriever

    def retrieve(self, problems: Sequence[Any], queries: Sequence[str], top_k: int | None = None) -> Deferred[list[list[Any]]]:
        return Deferred(lambda: self.retriever.retrieve(problems, queries, top_k))
