"""The API engine against a real loopback HTTP server (tests/api_loopback.py): answers and usage, bounded
concurrency, each injected fault's retries, records and errors, token counting without usage, the key's handling,
lock-step episodes with a failing API call, per-composition pricing and the api config rules."""

from __future__ import annotations

import math
import threading

import pytest

from haps_ray.config import CandidateConfig, ConfigError, config_from_dict
from haps_ray.engine.api import ApiAuthError, ApiEngine, ApiEngineClient, ClosedCandidateError, Secret
from haps_ray.episodes import EpisodeRunner
from haps_ray.models import load_tokenizer
from haps_ray.engine.chat import ChatEncoder
from haps_ray.rl.cost import PriceTable, TokenCounts
from haps_ray.tasks import ErrorKind, Problem, make_episode

from tests.api_loopback import Fault, LoopbackApi

KEY = "sk-test-0123456789abcdef"
CHATS = [[{"role": "user", "content": f"question number {i}"}] for i in range(6)]


def candidate(url: str, **api) -> CandidateConfig:
    return CandidateConfig(name="closed", model="loopback", open_source=False, max_batch_size=8,
                           api={"base_url": url, "model": "loopback-model", "api_key_env": "HAPS_TEST_KEY", **api})


@pytest.fixture
def server():
    with LoopbackApi(key=KEY) as api:
        yield api


def engine(url: str, key: str = KEY, **api) -> ApiEngine:
    return ApiEngine(candidate(url, **api), Secret(key))


def test_answers_with_usage_and_stop_strings(server):
    gens = engine(server.url).generate(CHATS[:3], max_new_tokens=7, stop=["Final answer"])
    assert [g.text for g in gens] == ["Reasoning: it follows. "] * 3  # cut before the stop string, as local engines do
    assert [g.n_input_tokens for g in gens] == [len("question number 0") // 3] * 3
    assert all(g.n_output_tokens == 6 and not g.tokens_estimated and g.error is None for g in gens)
    assert server.bodies[0]["max_tokens"] == 7 and server.bodies[0]["stop"] == ["Final answer"]
    assert server.bodies[0]["model"] == "loopback-model" and "seed" not in server.bodies[0]


def test_extra_body_is_sent(server):
    engine(server.url, extra_body={"seed": 11, "service_tier": "flex"}).generate(CHATS[:1])
    assert server.bodies[0]["seed"] == 11 and server.bodies[0]["service_tier"] == "flex"


def test_a_batch_goes_out_concurrently_up_to_max_concurrency():
    with LoopbackApi(key=KEY, gate=threading.Barrier(3)) as api:  # each request waits until 3 are in flight
        gens = engine(api.url, max_concurrency=3).generate(CHATS)
        assert all(g.error is None for g in gens) and api.max_in_flight == 3


def test_429_waits_retry_after_then_succeeds(server):
    server.faults.append(Fault("status", 429, retry_after="0.4"))
    eng = engine(server.url)
    [gen] = eng.generate(CHATS[:1])
    assert gen.error is None and eng.stats["retries"] == 1 and len(server.arrivals) == 2
    assert server.arrivals[1] - server.arrivals[0] >= 0.4  # the client honoured the server's Retry-After


def test_500_after_retries_is_a_failed_infrastructure_call(server):
    server.always = Fault("status", 500)
    [gen] = engine(server.url, max_retries=2).generate(CHATS[:1])
    assert len(server.arrivals) == 3  # one request and two retries
    assert gen.text == "" and gen.finish_reason == "error" and gen.error_kind == ErrorKind.ENGINE.value
    assert "HTTP 500 after 2 retries" in gen.error and gen.n_input_tokens == gen.n_output_tokens == 0


def test_slow_reply_past_the_timeout_is_retried(server):
    server.faults.append(Fault("slow", seconds=1.5))
    eng = engine(server.url, timeout_s=0.3, max_retries=1)
    [gen] = eng.generate(CHATS[:1])
    assert gen.error is None and eng.stats["retries"] == 1
    server.always = Fault("slow", seconds=1.5)
    [gen] = eng.generate(CHATS[:1])
    assert gen.error_kind == ErrorKind.ENGINE.value and "APITimeoutError after 1 retries" in gen.error


def test_malformed_json_is_an_unreadable_reply(server):
    server.faults.append(Fault("malformed"))
    [gen] = engine(server.url).generate(CHATS[:1])
    assert gen.error_kind == ErrorKind.ENGINE.value and "unreadable reply" in gen.error and len(server.arrivals) == 1


def test_a_4xx_is_the_requests_own_failure(server):
    server.faults.append(Fault("status", 400))
    [gen, ok] = engine(server.url).generate(CHATS[:2])
    assert {gen.error_kind, ok.error_kind} == {ErrorKind.REQUEST.value, None}


def test_missing_usage_estimated_and_flagged(server):
    server.always = Fault("no_usage")
    [gen] = engine(server.url).generate(CHATS[:1])
    assert gen.tokens_estimated
    assert (gen.n_input_tokens, gen.n_output_tokens) == (math.ceil(len(CHATS[0][0]["content"]) / 4), math.ceil(len(gen.text) / 4))


def test_missing_usage_counted_by_the_configured_tokenizer(server):
    server.always = Fault("no_usage")
    [gen] = engine(server.url, tokenizer="tiny-llama").generate(CHATS[:1])
    encoder = ChatEncoder(load_tokenizer("tiny-llama"))
    assert not gen.tokens_estimated
    assert (gen.n_input_tokens, gen.n_output_tokens) == (len(encoder.encode(CHATS[0])), len(encoder.tokens(gen.text)))


def test_401_raises_naming_candidate_and_variable_never_the_key(server):
    eng = engine(server.url, key="sk-wrong-key-42")
    for call in (eng.check_access, lambda: eng.generate(CHATS[:2])):
        with pytest.raises(ApiAuthError) as err:
            call()
        assert "'closed'" in str(err.value) and "HAPS_TEST_KEY" in str(err.value) and "401" in str(err.value)
        assert "sk-wrong-key-42" not in str(err.value) and KEY not in str(err.value)
    assert engine(server.url).check_access()


def test_key_from_the_environment_and_its_absence(server, monkeypatch):
    monkeypatch.delenv("HAPS_TEST_KEY", raising=False)
    with pytest.raises(ApiAuthError, match="environment variable HAPS_TEST_KEY is not set"):
        ApiEngine(candidate(server.url))
    monkeypatch.setenv("HAPS_TEST_KEY", KEY)
    eng = ApiEngine(candidate(server.url))
    assert eng.generate(CHATS[:1])[0].error is None
    assert KEY not in repr(eng._key) and KEY not in str(eng.info())


def test_adapters_scores_and_gradients_are_refused(server):
    eng = engine(server.url)
    with pytest.raises(ClosedCandidateError, match="takes no adapters"):
        eng.generate(CHATS[:1], [object()])
    with pytest.raises(ClosedCandidateError, match="cannot score"):
        eng.score(CHATS[:1], [[1, 2]])
    with pytest.raises(ClosedCandidateError, match="no adapter gradients"):
        eng.adapter_grads(CHATS[:1], [[1, 2]], [object()], [1.0])
    assert len(server.arrivals) == 0


def mmlu_problem(i: int) -> Problem:
    return Problem(id=f"p{i}", task="mmlu", question=f"Which letter is number {i}?", answer="B",
                   choices=["w", "x", "y", "z"], subject="test")


def test_a_failed_api_call_is_a_malformed_turn_and_the_episode_goes_on(server):
    cfg = config_from_dict({"candidates": [{"name": "closed", "model": "x", "open_source": False,
                                            "api": {"base_url": server.url, "model": "m", "api_key_env": "K"}}],
                            "task": {"name": "mmlu", "max_rounds": 2}})
    runner = EpisodeRunner({"closed": ApiEngineClient(engine(server.url, max_retries=0))}, cfg.eval_decoding,
                           PriceTable.from_candidates(cfg.candidates), cfg.reward)
    episodes = [make_episode(cfg.task, mmlu_problem(i), {"teacher": "closed", "student": "closed"}) for i in range(3)]
    server.faults.append(Fault("status", 503))  # the first request of step 0 (one episode's student)
    results = runner.run(episodes)
    failed = [r for r in results if r.error is not None]
    assert len(failed) == 1 and failed[0].error_kind == ErrorKind.CALL_FAILED and not failed[0].infrastructure_failure
    bad = [c for c in failed[0].calls if c.error is not None]
    assert len(bad) == 1 and bad[0].malformed and bad[0].completion == "" and "HTTP 503" in bad[0].error
    assert "1 call(s) failed after retries" in failed[0].error and "HTTP 503" in failed[0].error
    assert failed[0].n_calls > 1  # the protocol went on after the failed turn
    assert all(r.error is None for r in results if r is not failed[0])


def test_composition_pricing_prices_every_token_at_its_teams_rate():
    cfg = config_from_dict({"candidates": [{"name": "s", "model": "x", "size": "small", "price_in": 9.0},
                                           {"name": "l", "model": "y", "size": "large"}],
                            "cost": {"pricing": "composition"}})
    prices = PriceTable.from_config(cfg)
    tokens = TokenCounts()
    tokens.add("teacher", "s", 600_000, 100_000)
    tokens.add("student", "l", 200_000, 100_000)
    assert prices.episode_cost(tokens, {"teacher": "s", "student": "l"}) == pytest.approx(0.5)  # Mixed: $0.5 / 1M
    assert prices.episode_cost(tokens, {"teacher": "s", "student": "s"}) == pytest.approx(0.2)
    assert prices.episode_cost(tokens, {"teacher": "l", "student": "l"}) == pytest.approx(0.8)
    per_candidate = PriceTable.from_config(cfg.model_copy(update={"cost": type(cfg.cost)()}))
    assert per_candidate.episode_cost(tokens) == pytest.approx((600_000 * 9.0 + 100_000 * 0.2 + 300_000 * 0.2) / 1e6)
    with pytest.raises(ValueError, match="needs the episode's assignment"):
        prices.episode_cost(tokens)


def test_api_config_rules():
    api = {"base_url": "http://h/v1", "model": "m", "api_key_env": "K"}
    with pytest.raises(ConfigError, match=r"candidates\[0\].open_source: an api candidate is closed-source"):
        config_from_dict({"candidates": [{"name": "a", "model": "x", "api": api}]})
    with pytest.raises(ConfigError, match=r"api.api_key_env: must be the NAME") as err:
        config_from_dict({"candidates": [{"name": "a", "model": "x", "open_source": False,
                                          "api": {**api, "api_key_env": "sk-live-abc123"}}]})
    assert "sk-live-abc123" not in str(err.value)  # a key pasted by mistake is not echoed
    with pytest.raises(ConfigError, match=r"api.base_url: required unless serve_model"):
        config_from_dict({"candidates": [{"name": "a", "model": "x", "open_source": False, "api": {"model": "m", "api_key_env": "K"}}]})
    with pytest.raises(ConfigError, match=r"api.base_url: give base_url or serve_model, not both"):
        config_from_dict({"candidates": [{"name": "a", "model": "x", "open_source": False, "api": {**api, "serve_model": "tiny-qwen2"}}]})
    with pytest.raises(ConfigError, match=r"cost.composition_prices: no price for the teams \['large\+small'\]"):
        config_from_dict({"candidates": [{"name": "a", "model": "x", "size": "large"}, {"name": "b", "model": "y"}],
                          "cost": {"pricing": "composition", "composition_prices": {"small+small": 0.2, "large+large": 0.8}}})


def test_a_key_refused_mid_run_stops_the_runner(server):
    cfg = config_from_dict({"candidates": [{"name": "closed", "model": "x", "open_source": False,
                                            "api": {"base_url": server.url, "model": "m", "api_key_env": "K"}}],
                            "task": {"name": "mmlu", "max_rounds": 1}})
    runner = EpisodeRunner({"closed": ApiEngineClient(engine(server.url, key="sk-revoked"))}, cfg.eval_decoding,
                           PriceTable.from_candidates(cfg.candidates), cfg.reward)
    episodes = [make_episode(cfg.task, mmlu_problem(i), {"teacher": "closed", "student": "closed"}) for i in range(2)]
    with pytest.raises(ApiAuthError, match="HAPS_TEST_KEY"):  # re-raised, not turned into failed episodes
        runner.run(episodes)
