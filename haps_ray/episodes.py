"""Lock-step episode runner: many Teacher–Student episodes advance together, LLM calls batched per engine.

Each step of `EpisodeRunner.run`:
1. every episode waiting on a HotpotQA Search gets its passages from one batched `retrieve` call;
2. every pending LLM call is gathered and grouped by engine (the episode's assignment maps role -> engine);
   each engine receives one batched `generate` with one adapter (or None) per sample. Engines are
   `EngineClient`s: every engine's call is submitted before any result is awaited, so engines in other
   processes (actors, deployments, APIs) decode concurrently;
3. each completion goes back to its episode, which parses it and moves on.
So a run makes at most (steps x engines) generate calls, however many episodes it holds.

Sampling is seeded per call from the run's seed, the step and the engine, so a run is reproducible.
Nothing an episode does can stop the runner: a failing engine call, retrieval or parse marks the episodes
involved as failed (their result carries `error` and `error_kind`) and the others go on. An engine that returns a
failed generation for one call (an API call that failed after its retries) costs that call only: the episode records
it as a malformed turn and goes on (error_kind CALL_FAILED). A `FatalEngineError` (an API refusing its key) is
re-raised: no episode can succeed on that engine, so the caller must stop.

    runner = EpisodeRunner({name: LocalEngineClient(engine)}, cfg.eval_decoding, PriceTable.from_candidates(...),
                           cfg.reward, retriever=LocalRetrieverClient(retriever))
    results = runner.run([make_episode(cfg.task, p, z, adapters={}) for p in problems])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from haps_ray.config import DecodingConfig, RewardConfig
from haps_ray.engine.client import EngineClient, FatalEngineError, RetrieverClient
from haps_ray.rl.cost import CostNormalizer, PriceTable, TokenCounts
from haps_ray.rl.rewards import combine_reward, task_performance
from haps_ray.tasks.protocol import CallRecord, Episode, ErrorKind, PendingCall, Retrieval

logger = logging.getLogger(__name__)


@dataclass
class EpisodeResult:
    """A scored trajectory: every call, the answer, performance, tokens, cost and reward."""

    problem_id: str
    task: str
    assignment: dict[str, str]
    calls: list[CallRecord]
    final_answer: str | None
    gold: str
    perf: float  # raw task performance (F1 / EM / accuracy), before shaping
    reward: float | None  # None until a cost normaliser is available (λ > 0)
    cost: float  # USD
    cost_norm: float | None
    tokens: TokenCounts  # per role and per engine, in/out
    n_calls: int
    n_steps: int
    n_malformed: int
    retrievals: list[Retrieval] = field(default_factory=list)
    error: str | None = None
    error_kind: ErrorKind | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable form; `calls` and `retrievals` are written as in D's `trajectory` column."""
        return {
            "problem_id": self.problem_id, "task": self.task, "assignment": dict(self.assignment),
            "calls": [c.to_dict() for c in self.calls], "final_answer": self.final_answer, "gold": self.gold,
            "perf": self.perf, "reward": self.reward, "cost": self.cost, "cost_norm": self.cost_norm,
            "tokens": self.tokens.to_dict(), "n_calls": self.n_calls, "n_steps": self.n_steps,
            "n_malformed": self.n_malformed, "retrievals": [r.to_dict() for r in self.retrievals],
            "error": self.error, "error_kind": None if self.error_kind is None else self.error_kind.value,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EpisodeResult:
        kind = data.get("error_kind")
        return cls(**{
            **data,
            "calls": [CallRecord.from_dict(c) for c in data["calls"]],
            "tokens": TokenCounts.from_dict(data["tokens"]),
            "retrievals": [Retrieval.from_dict(r) for r in data.get("retrievals", [])],
            "error_kind": None if kind is None else ErrorKind(kind),
        })

    @property
    def infrastructure_failure(self) -> bool:
        """The episode ended because an engine or the retriever failed (not because of anything it did)."""
        return self.error_kind is not None and self.error_kind.infrastructure


@dataclass
class RunStats:
    steps: int = 0
    generate_calls: int = 0
    retrieve_calls: int = 0
    seconds: float = 0.0


def score(result: EpisodeResult, reward: RewardConfig, normalizer: CostNormalizer | None) -> EpisodeResult:
    """(Re)compute `cost_norm` and `reward` in place, e.g. once the normaliser is fitted on the train split."""
    result.cost_norm = normalizer(result.cost) if normalizer is not None else None
    if reward.lam > 0 and result.cost_norm is None:
        result.reward = None
    else:
        result.reward = combine_reward(result.perf, result.cost_norm, reward.lam, reward.shaping)
    return result


class EpisodeRunner:
    """Drives batches of episodes in lock-step over `EngineClient`s (one per candidate name)."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        decoding: DecodingConfig,
        prices: PriceTable,
        reward: RewardConfig | None = None,
        normalizer: CostNormalizer | None = None,
        retriever: RetrieverClient | None = None,
        seed: int = 0,
    ) -> None:
        if not engines:
            raise ValueError("EpisodeRunner needs at least one engine")
        missing = sorted(set(engines) - set(prices.prices))
        if missing:
            raise ValueError(f"no price for engines {missing}; every engine needs price_in/price_out")
        for name, client in engines.items():
            if not isinstance(client, EngineClient):
                raise TypeError(f"engine {name!r}: {type(client).__name__} is not an EngineClient "
                                "(wrap a local engine in haps_ray.engine.LocalEngineClient)")
        if retriever is not None and not isinstance(retriever, RetrieverClient):
            raise TypeError(f"retriever: {type(retriever).__name__} is not a RetrieverClient")
        self.engines = dict(engines)
        self.engine_order = sorted(engines)
        self.decoding = decoding
        self.prices = prices
        self.reward = reward or RewardConfig()
        self.normalizer = normalizer
        self.retriever = retriever
        self.seed = seed
        self.runs = 0
        self.generate_calls = 0  # over the runner's lifetime; `last_run` has the latest run's counts
        self.last_run = RunStats()

    def call_seed(self, run_seed: int, step: int, engine: str) -> int:
        """Sampling seed of one generate call: a fixed function of the run's seed, the step and the engine."""
        return (run_seed * 1_000_003 + step * 1_009 + self.engine_order.index(engine)) % (2**31 - 1)

    def _check(self, episodes: Sequence[Episode]) -> None:
        for ep in episodes:
            unknown = sorted(set(ep.assignment.values()) - set(self.engines))
            if unknown:
                raise ValueError(f"episode {ep.problem.id}: assignment {ep.assignment} names engines {unknown} "
                                 f"that the runner does not have (known: {self.engine_order})")
            if ep.task == "hotpotqa" and self.retriever is None:
                raise ValueError(f"episode {ep.problem.id}: HotpotQA episodes need a retriever")

    def run(self, episodes: Sequence[Episode], seed: int | None = None) -> list[EpisodeResult]:
        """Advance every episode to its end, in lock-step; results come back in input order."""
        self._check(episodes)
        run_seed = self.seed + self.runs if seed is None else seed
        self.runs += 1
        stats = RunStats()
        started = time.perf_counter()
        last_step = {id(ep): 0 for ep in episodes}  # steps each episode stayed active
        active = [ep for ep in episodes if not ep.done]
        while active:
            self._retrieve(active, stats)
            calls = [(ep, ep.pending_call()) for ep in active if not ep.done]
            for ep, call in calls:
                if call is None and ep.pending_retrieval() is None:
                    ep.fail("episode is neither done nor waiting for a call or a retrieval", ErrorKind.PROTOCOL)
            self._generate([(ep, c) for ep, c in calls if c is not None and not ep.done], stats, run_seed)
            stats.steps += 1
            for ep in active:
                last_step[id(ep)] = stats.steps
            active = [ep for ep in active if not ep.done]
        stats.seconds = time.perf_counter() - started
        self.last_run = stats
        self.generate_calls += stats.generate_calls
        return [self._result(ep, last_step[id(ep)]) for ep in episodes]

    # ---- one step -------------------------------------------------------------------------------

    def _retrieve(self, active: list[Episode], stats: RunStats) -> None:
        waiting = [(ep, q) for ep in active if (q := ep.pending_retrieval()) is not None]
        if not waiting:
            return
        problems, queries = [ep.problem for ep, _ in waiting], [q for _, q in waiting]
        stats.retrieve_calls += 1
        try:
            hits = self.retriever.retrieve(problems, queries).result()
        except Exception as err:
            logger.exception("retrieval failed for %d episodes", len(waiting))
            for ep, _ in waiting:
                ep.fail(f"retrieval failed: {type(err).__name__}: {err}", ErrorKind.RETRIEVAL)
            return
        for (ep, _), passages in zip(waiting, hits):
            try:
                ep.receive_retrieval([(p[0], p[1]) for p in passages])
            except Exception as err:
                logger.exception("episode %s rejected its passages", ep.problem.id)
                ep.fail(f"receive_retrieval failed: {type(err).__name__}: {err}", ErrorKind.INTERNAL)

    def _generate(self, calls: list[tuple[Episode, PendingCall]], stats: RunStats, run_seed: int) -> None:
        groups: dict[str, list[tuple[Episode, PendingCall]]] = {}
        for ep, call in calls:
            groups.setdefault(ep.engine_for(call.role), []).append((ep, call))
        seeds = {name: self.call_seed(run_seed, stats.steps, name) for name in groups}
        submitted = {}
        for name, batch in groups.items():  # every call goes out before any result is awaited
            adapters = [ep.adapter_for(call.role) for ep, call in batch]
            stats.generate_calls += 1
            try:
                submitted[name] = self.engines[name].generate(
                    [call.messages for _, call in batch],
                    None if all(a is None for a in adapters) else adapters,
                    max_new_tokens=self.decoding.max_new_tokens, temperature=self.decoding.temperature,
                    top_p=self.decoding.top_p, stop=sorted({s for ep, _ in batch for s in ep.stop}) or None,
                    seed=seeds[name],
                )
            except FatalEngineError:
                raise
            except Exception as err:
                submitted[name] = err
                continue
            if not callable(getattr(submitted[name], "result", None)):
                raise TypeError(f"engine {name!r}: generate returned a {type(submitted[name]).__name__}, not a pending "
                                "result; wrap a local engine in haps_ray.engine.LocalEngineClient")
        for name, batch in groups.items():
            outcome = submitted[name]
            if not isinstance(outcome, Exception):
                try:
                    outcome = outcome.result()
                except FatalEngineError:
                    raise
                except Exception as err:
                    outcome = err
            if isinstance(outcome, Exception) or len(outcome) != len(batch):
                reason = outcome if isinstance(outcome, Exception) else f"{len(outcome)} generations for {len(batch)} prompts"
                logger.error("engine %s failed on %d calls: %s", name, len(batch), reason)
                for ep, _ in batch:
                    ep.fail(f"engine {name} failed: {reason}", ErrorKind.ENGINE)
                continue
            for (ep, _), gen in zip(batch, outcome):
                try:
                    ep.advance(gen.text, generation=gen, step=stats.steps, seed=seeds[name])
                except Exception as err:
                    logger.exception("episode %s failed to advance", ep.problem.id)
                    ep.fail(f"advance failed: {type(err).__name__}: {err}", ErrorKind.INTERNAL)

    # ---- results --------------------------------------------------------------------------------

    def _result(self, ep: Episode, n_steps: int) -> EpisodeResult:
        tokens = TokenCounts()
        for call in ep.calls:
            tokens.add(call.role, call.engine, call.n_input_tokens, call.n_output_tokens)
        result = EpisodeResult(
            problem_id=ep.problem.id, task=ep.task, assignment=dict(ep.assignment),
            calls=list(ep.calls), final_answer=ep.final_answer, gold=ep.problem.answer,
            perf=task_performance(ep.task, ep.final_answer, ep.problem.answer, self.reward.metric),
            reward=None, cost=self.prices.episode_cost(tokens, ep.assignment), cost_norm=None, tokens=tokens,
            n_calls=len(ep.calls), n_steps=n_steps, n_malformed=sum(c.malformed for c in ep.calls),
            retrievals=list(ep.retrieved), error=ep.error, error_kind=ep.error_kind,
        )
        return score(result, self.reward, normalizer=self.normalizer)
