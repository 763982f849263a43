import asyncio
import json

import pytest
import torch

from haps_ray.config import ConfigError, ServeConfig, load_config
from haps_ray.engine.generator import Generation
from haps_ray.episodes import EpisodeResult
from haps_ray.lora import Adapter
from haps_ray.rl.cost import TokenCounts
from haps_ray.serving import (
    Admission, ApiError, BatchStats, EngineFailure, GenerateItem, chat_completion, check_bearer, check_context,
    check_policy, generate_items, haps_completion, models_list, parse_chat_request, problem_from_request,
)
from haps_ray.tasks import CallRecord, ErrorKind
from tests.helpers import FIXTURES

MODELS = ["haps", "tiny-llama"]


def ok(**over):
    body = {"model": "haps", "messages": [{"role": "user", "content": "Who?"}]}
    body.update(over)
    return body


def test_valid_request_defaults_and_question():
    req = parse_chat_request(ok(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}],
                                stop="\n"), MODELS, 256)
    assert req.question == "q" and req.temperature == 0.0 and req.top_p == 1.0
    assert req.stop == ["\n"] and req.max_tokens is None


@pytest.mark.parametrize("body,status,param", [
    ([1], 400, None),
    ({"messages": []}, 400, "model"),
    (ok(model="nope"), 404, "model"),
    (ok(stream=True), 400, "stream"),
    (ok(messages=[]), 400, "messages"),
    (ok(messages="hi"), 400, "messages"),
    (ok(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    (ok(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
    (ok(messages=[{"role": "user", "content": "  "}]), 400, "messages"),
    (ok(temperature=3), 400, "temperature"),
    (ok(temperature="hot"), 400, "temperature"),
    (ok(top_p=0), 400, "top_p"),
    (ok(max_tokens=0), 400, "max_tokens"),
    (ok(max_tokens=257), 400, "max_tokens"),
    (ok(stop=[""]), 400, "stop"),
    (ok(seed=1.5), 400, "seed"),
])
def test_bad_requests_name_the_field(body, status, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body, MODELS, 256)
    err = info.value
    assert err.status == status and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_completion_schema():
    gen = Generation(text="Paris", token_ids=[1, 2], logprobs=[-0.1, -0.2], n_input_tokens=7,
                     n_output_tokens=2, finish_reason="stop")
    out = chat_completion("tiny-llama", gen, extra={"haps": {"assignment": {"teacher": 0}}})
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Paris"}
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert out["haps"]["assignment"] == {"teacher": 0}
    assert [m["id"] for m in models_list(MODELS)["data"]] == MODELS


# ---- the rest of the service's core: problems from requests, responses, batching, admission, auth, config --------

CHOICES = ["Venus", "Mercury", "Earth", "Mars"]


def test_problem_from_request_uses_the_loaders_rules():
    body = ok(haps={"choices": CHOICES, "answer": "b", "subject": "Astronomy"})
    problem, gold = problem_from_request(body, parse_chat_request(body, MODELS, 256), "mmlu", "r1")
    assert (problem.question, problem.choices, problem.answer, problem.subject, problem.id, gold) == (
        "Who?", CHOICES, "B", "astronomy", "r1", True)
    body = ok(haps={"task": "hotpotqa", "context": [["Paris", ["Paris is in France."]]]})
    problem, gold = problem_from_request(body, parse_chat_request(body, MODELS, 256), "hotpotqa", "r2")
    assert problem.paragraphs == [("Paris", "Paris is in France.")] and problem.answer == "" and not gold


@pytest.mark.parametrize("ext,served,param", [
    ("x", "mmlu", "haps"),
    ({"task": "go"}, "mmlu", "haps.task"),
    ({"task": "hotpotqa"}, "mmlu", "haps.task"),
    ({}, "mmlu", "haps.choices"),
    ({"choices": ["a", ""]}, "mmlu", "haps.choices"),
    ({"choices": CHOICES, "answer": "Z"}, "mmlu", "haps.answer"),
    ({}, "hotpotqa", "haps.context"),
    ({"context": [["T", ["  "]]]}, "hotpotqa", "haps.context"),
])
def test_bad_problem_fields_are_named(ext, served, param):
    body = ok(haps=ext)
    with pytest.raises(ApiError) as info:
        problem_from_request(body, parse_chat_request(body, MODELS, 256), served, "r")
    assert info.value.status == 400 and info.value.param == param


def result(error_kind=None, answer="B"):
    call = CallRecord("student", "a", [], "Answer: B", {}, False, n_input_tokens=10, n_output_tokens=3, adapter=True)
    return EpisodeResult("p", "mmlu", {"student": "a", "teacher": "a"}, [call, call], answer, "B", 1.0, None, 0.5,
                         None, TokenCounts(), 2, 2, 0, error=None if error_kind is None else "boom", error_kind=error_kind)


def test_haps_completion_sums_usage_and_maps_infrastructure_failures_to_500():
    out = haps_completion(result(), {"assignment": {"student": "a"}}, has_gold=True)
    assert out["usage"] == {"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}
    assert out["choices"][0]["message"]["content"] == "B" and out["haps"]["perf"] == 1.0
    assert [c["text"] for c in out["haps"]["calls"]] == ["Answer: B"] * 2
    assert "perf" not in haps_completion(result(answer=None), {}, has_gold=False)["haps"]
    for kind in (ErrorKind.ENGINE, ErrorKind.RETRIEVAL):
        with pytest.raises(ApiError) as info:
            haps_completion(result(kind), {}, has_gold=False)
        assert info.value.status == 500 and info.value.code == kind.value


def test_context_check():
    check_context(100, 28, 128, "a")
    with pytest.raises(ApiError, match="128-token context of engine 'a'") as info:
        check_context(101, 28, 128, "a")
    assert info.value.code == "context_length_exceeded"
    check_context(10**6, 1, None, "api")  # an API engine's context is the provider's to check


class RecordingEngine:
    """Test double of an engine: records each generate call, fails calls whose first prompt says 'fail'."""

    def __init__(self):
        self.calls = []

    def generate(self, messages, adapters=None, **sampling):
        self.calls.append((len(messages), adapters, sampling))
        if messages[0][0]["content"] == "fail":
            raise ValueError("engine refused")
        return [Generation(m[0]["content"], [1], [0.0], 1, 1, "stop") for m in messages]


def adapter(value):
    return Adapter(torch.full((1, 2, 4), value), torch.full((1, 4, 2), value), 1.0)


def test_generate_items_groups_by_sampling_and_isolates_failures():
    engine, stats = RecordingEngine(), BatchStats()
    items = [GenerateItem([{"role": "user", "content": "x"}], adapter(1.0), seed=1),
             GenerateItem([{"role": "user", "content": "y"}], adapter(2.0), seed=2),  # greedy: the seed is no key
             GenerateItem([{"role": "user", "content": "z"}], None, seed=3),
             GenerateItem([{"role": "user", "content": "fail"}], None, max_new_tokens=9),
             GenerateItem([{"role": "user", "content": "t"}], None, temperature=1.0, seed=4)]
    out = generate_items(engine, items, stats)
    assert [o.text for o in out[:3]] == ["x", "y", "z"] and out[4].text == "t"
    assert isinstance(out[3], EngineFailure) and "engine refused" in out[3].message
    assert [n for n, _, _ in engine.calls] == [3, 1, 1]
    assert engine.calls[0][1][2] is None and engine.calls[2][1] is None  # per-sample adapters, or none at all
    assert stats.to_dict() | {"mean_size": 0} == {"batches": 3, "samples": 5, "max_size": 3, "mean_size": 0,
                                                 "multi_adapter_batches": 1, "failures": 1}


def test_admission_refuses_beyond_running_plus_queued():
    async def scenario():
        admission = Admission(max_ongoing=1, max_queued=1)
        release = asyncio.Event()

        async def hold():
            async with admission.slot():
                await release.wait()

        running = [asyncio.create_task(hold()) for _ in range(2)]  # one runs, one waits for its slot
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as info:
            async with admission.slot():
                pass
        release.set()
        await asyncio.gather(*running)
        async with admission.slot():  # room again
            pass
        return info.value, admission

    err, admission = asyncio.run(scenario())
    assert err.status == 429 and err.code == "queue_full" and admission.refused == 1 and admission.inside == 0


def test_bearer_check():
    token = "s3cr3t-token"
    check_bearer(None, None)
    check_bearer(f"Bearer {token}", token)
    for header in (None, "Bearer x", f"Basic {token}", token):
        with pytest.raises(ApiError) as info:
            check_bearer(header, token)
        assert info.value.status == 401 and token not in str(info.value.body())


def test_serve_config_rules_name_the_field():
    with pytest.raises(ConfigError, match=r"^max_batch_size: 32 > max_ongoing_requests=8"):
        ServeConfig(max_batch_size=32, max_ongoing_requests=8)
    with pytest.raises(ConfigError, match=r"^api_key_env: must be the NAME") as info:
        ServeConfig(api_key_env="sk-abc-123")
    assert "sk-abc" not in str(info.value)
    with pytest.raises(ConfigError, match=r"serve.port"):
        load_config(FIXTURES / "run_tiny.yaml", overrides=["serve.port=70000"])


def test_check_policy_rejects_a_policy_of_another_pool(tmp_path):
    cfg = load_config(FIXTURES / "run_tiny.yaml")
    meta = {"router": {"lora_layers": 2}, "spec": {"task": "mmlu", "roles": ["teacher", "student"],
                                                    "candidates": ["llama", "qwen"]}}
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    assert check_policy(cfg, str(tmp_path)) == 2
    meta["spec"]["candidates"] = ["qwen", "llama"]
    (tmp_path / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^candidates: the config has \['llama', 'qwen'\]"):
        check_policy(cfg, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
        check_policy(cfg, str(tmp_path / "missing"))
