"""The HAPS Serve app on a local Ray: tiny random-weight engines, a freshly initialised policy saved to disk, the
`openai` client against the loopback port. The app starts once for the module (about a minute on 2 cores).

What is checked: the OpenAI schema and the `haps` record; the service answers exactly as the evaluation path
(`JointLearner.propose(mode="greedy")` + `LocalRollouts.run(..., EVAL)`) for the same problems; concurrent clients
are batched across episodes with different adapters in one generate; every bad request gets its 4xx OpenAI error
object; an engine exception costs that call only; bearer auth; the serve.* fields that shape the app.
"""

import json
import os
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from ray import serve

from actors.serving import APP_NAME, engine_deployment_name
from haps_ray.config import load_config
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.lora import Adapter
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.trainer import EVAL, LocalRollouts
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.serving import EngineFailure, GenerateItem
from haps_ray.tasks import load_problems
from pipelines import serve as serve_pipeline
from tests.helpers import FIXTURES

TOKEN_ENV = "HAPS_TEST_SERVE_TOKEN"
TOKEN = "test-token-not-a-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    """(cfg, policy dir, base URL) of the running app; torn down after the module."""
    port = free_port()
    cfg = load_config(FIXTURES / "run_tiny.yaml", overrides=[
        f"serve.port={port}", "serve.router_num_cpus=0.25", "serve.router_replicas=2", "serve.max_batch_size=8",
        "serve.batch_wait_timeout_s=0.05", "serve.max_ongoing_requests=16", "serve.max_queued_requests=4",
        f"serve.api_key_env={TOKEN_ENV}",
    ])
    policy_dir = tmp_path_factory.mktemp("serve") / "policy"
    torch.manual_seed(0)
    HAPSPolicy.from_config(cfg).save(policy_dir)  # init "authors": every problem gets its own non-zero adapter
    os.environ[TOKEN_ENV] = TOKEN
    try:
        url = serve_pipeline.start(cfg, str(policy_dir))
        yield cfg, str(policy_dir), url
    finally:
        os.environ.pop(TOKEN_ENV, None)
        serve.shutdown()


@pytest.fixture(scope="module")
def problems():
    loaded, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    return loaded


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service[2], api_key=TOKEN, max_retries=0, timeout=300)


def ask(client, problem, **extra):
    return client.chat.completions.create(
        model="haps", messages=[{"role": "user", "content": problem.question}],
        extra_body={"haps": {"choices": problem.choices, "subject": problem.subject, "answer": problem.answer}}, **extra)


def post(url: str, body: bytes | dict, token: str | None = TOKEN) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_openai_client_gets_a_routed_episode_and_plain_chats(service, client, problems):
    cfg, _, url = service
    answer = ask(client, problems[0])
    haps = answer.model_extra["haps"]
    assert answer.object == "chat.completion" and answer.model == "haps"
    assert answer.choices[0].message.content == (haps["final_answer"] or "")
    assert answer.usage.prompt_tokens == sum(c["prompt_tokens"] for c in haps["calls"]) > 0
    assert answer.usage.completion_tokens == sum(c["completion_tokens"] for c in haps["calls"]) > 0
    probs = [p["probability"] for p in haps["probabilities"]]
    assert len(probs) == len(cfg.candidates) ** len(cfg.task.roles) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    best = haps["probabilities"][max(range(len(probs)), key=probs.__getitem__)]["assignment"]
    assert haps["assignment"] == best  # greedy routing
    assert {c["engine"] for c in haps["calls"]} <= set(haps["assignment"].values())
    assert all(c["adapter"] for c in haps["calls"])  # both tiny candidates are open: every call had its adapter
    assert haps["cost_usd"] > 0 and haps["perf"] in (0.0, 1.0)
    for name in (c.name for c in cfg.candidates):
        plain = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert plain.model == name and plain.usage.completion_tokens <= 3 and "haps" not in (plain.model_extra or {})
    assert [m.id for m in client.models.list().data] == ["haps", *(c.name for c in cfg.candidates)]
    status, route = post(f"{url}/route", {"messages": [{"role": "user", "content": problems[0].question}],
                                          "haps": {"choices": problems[0].choices}})
    assert status == 200 and route["assignment"] == haps["assignment"]


def test_service_answers_as_the_evaluation_path(service, client, problems):
    cfg, policy_dir, _ = service
    chosen = problems[:4]
    with ThreadPoolExecutor(len(chosen)) as pool:  # concurrent: their calls share the engines' batches
        served = [a.model_extra["haps"] for a in pool.map(lambda p: ask(client, p), chosen)]
    learner = JointLearner(HAPSPolicy.load(policy_dir, device=cfg.router.device, seed=cfg.seed), cfg.rl, total_steps=1)
    k = learner.policy.cfg.lora_layers
    rollouts = LocalRollouts(cfg, {c.name: LocalEngineClient(LLMEngine.from_config(c, lora_layers=k)) for c in cfg.candidates})
    plans = learner.propose(chosen, mode="greedy")
    results = rollouts.run(chosen, plans, 0, EVAL)
    names = [c.name for c in cfg.candidates]
    for record, plan, result in zip(served, plans, results):
        assert record["z"] == plan.z and record["assignment"] == {r: names[i] for r, i in plan.z.items()}
        assert record["final_answer"] == result.final_answer
        assert [c["text"] for c in record["calls"]] == [c.completion for c in result.calls]
        assert record["cost_usd"] == pytest.approx(result.cost)


@pytest.mark.slow
def test_sixteen_concurrent_clients_are_batched_with_different_adapters(service, client, problems):
    cfg, _, url = service
    chosen = [problems[i % len(problems)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: ask(client, p), chosen))
    assert len(answers) == 16 and all(a.choices[0].finish_reason == "stop" for a in answers)
    status, stats = get(f"{url}/stats")
    assert status == 200
    engines = stats["engines"].values()
    assert max(e["max_size"] for e in engines) > 1
    assert sum(e["multi_adapter_batches"] for e in engines) >= 1
    assert all(e["max_size"] <= cfg.serve.max_batch_size == e["max_batch_size"] for e in engines)
    assert all(e["batch_wait_timeout_s"] == cfg.serve.batch_wait_timeout_s for e in engines)


def mmlu_body(**over):
    body = {"model": "haps", "messages": [{"role": "user", "content": "Which planet is closest to the Sun?"}],
            "haps": {"choices": ["Venus", "Mercury", "Earth", "Mars"]}}
    body.update(over)
    return body


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "haps", "messages": [', 400, None),
    ("body not an object", [1, 2], 400, None),
    ("missing messages", {"model": "haps"}, 400, "messages"),
    ("empty messages", mmlu_body(messages=[]), 400, "messages"),
    ("no user message", mmlu_body(messages=[{"role": "system", "content": "hi"}]), 400, "messages"),
    ("unknown model", mmlu_body(model="gpt-9"), 404, "model"),
    ("unknown task", mmlu_body(haps={"task": "chess", "choices": ["a", "b", "c", "d"]}), 400, "haps.task"),
    ("task not served", mmlu_body(haps={"task": "hotpotqa", "context": [["T", ["x."]]]}), 400, "haps.task"),
    ("missing choices", mmlu_body(haps={}), 400, "haps.choices"),
    ("three choices", mmlu_body(haps={"choices": ["a", "b", "c"]}), 400, "haps.choices"),
    ("bad gold answer", mmlu_body(haps={"choices": ["a", "b", "c", "d"], "answer": "E"}), 400, "haps.answer"),
    ("prompt too long", mmlu_body(messages=[{"role": "user", "content": "planet " * 6000}]), 400, "messages"),
    ("plain prompt too long", mmlu_body(model="llama", messages=[{"role": "user", "content": "sun " * 6000}]), 400,
     "messages"),
    ("temperature out of range", mmlu_body(temperature=2.5), 400, "temperature"),
    ("top_p out of range", mmlu_body(top_p=0), 400, "top_p"),
    ("max_tokens out of range", mmlu_body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens over every context", mmlu_body(model="qwen", max_tokens=5000), 400, "max_tokens"),
    ("stream", mmlu_body(stream=True), 400, "stream"),
    ("stop on haps", mmlu_body(stop=["\n"]), 400, "stop"),
]


@pytest.mark.parametrize("case, body, status, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_error_objects(service, case, body, status, param):
    got, answer = post(f"{service[2]}/chat/completions", body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


def test_bearer_token_is_required(service):
    url = service[2]
    for token in (None, "wrong"):
        status, answer = post(f"{url}/chat/completions", mmlu_body(), token=token)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert get(f"{url}/models", token=token)[0] == 401
    status, health = get(f"{url.removesuffix('/v1')}/health", token=None)  # liveness probes need no token
    assert status == 200 and health["status"] == "ok"


def test_an_engine_exception_fails_that_call_and_the_replica_keeps_serving(service):
    handle = serve.get_deployment_handle(engine_deployment_name("llama"), APP_NAME)
    before = handle.stats.remote().result()
    messages = [{"role": "user", "content": "hi"}]
    wrong = Adapter(torch.zeros(1, 8, 3), torch.zeros(1, 5, 8), 1.0)  # no layer of the model has these shapes
    failed = handle.generate.remote(GenerateItem(messages, wrong, max_new_tokens=2)).result()
    assert isinstance(failed, EngineFailure)
    ok = handle.generate.remote(GenerateItem(messages, None, max_new_tokens=2)).result()
    assert ok.n_output_tokens >= 1
    after = handle.stats.remote().result()
    assert after["pid"] == before["pid"] and after["failures"] == before["failures"] + 1


def test_replica_counts_follow_the_config(service):
    cfg = service[0]
    deployments = serve.status().applications[APP_NAME].deployments
    assert sum(deployments["router"].replica_states.values()) == cfg.serve.router_replicas == 2
    assert sum(deployments[engine_deployment_name("llama")].replica_states.values()) == 1


@pytest.mark.slow
def test_more_requests_than_the_queue_holds_get_429_and_bad_ones_never_hurt(service, problems):
    cfg, _, url = service
    good = [mmlu_body(messages=[{"role": "user", "content": p.question}], haps={"choices": p.choices})
            for p in problems]
    bodies = [good[i % len(good)] for i in range(40)] + [row[1] for row in BAD_REQUESTS[:6]]
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait()  # every request leaves at once: more than max_ongoing + max_queued are inside together
        return post(f"{url}/chat/completions", body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        outcomes = list(pool.map(send, bodies))
    statuses = [s for s, _ in outcomes[:40]]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    refused = [a for s, a in outcomes[:40] if s == 429]
    assert all(a["error"]["code"] == "queue_full" for a in refused)
    assert [s for s, _ in outcomes[40:]] == [row[2] for row in BAD_REQUESTS[:6]]
    status, again = post(f"{url}/chat/completions", good[0])  # the service is still fine
    assert status == 200 and again["haps"]["assignment"]


@pytest.mark.slow
def test_a_killed_engine_replica_is_replaced_and_its_request_answered(service):
    import time

    import ray

    url = service[2]
    handle = serve.get_deployment_handle(engine_deployment_name("llama"), APP_NAME)
    old_pid = handle.stats.remote().result()["pid"]
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if f"#{engine_deployment_name('llama')}#" in a["name"])
    body = {"model": "llama", "messages": [{"role": "user", "content": "count"}], "max_tokens": 400}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, f"{url}/chat/completions", body)
        time.sleep(0.3)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        status, answer = in_flight.result(timeout=service[0].serve.request_timeout_s + 60)
    assert status in (200, 500), answer  # finished before the kill, or failed with it: never a hang
    deadline = time.time() + 180
    while True:  # Serve starts a replacement; requests succeed again
        status, answer = post(f"{url}/chat/completions", {**body, "max_tokens": 2})
        if status == 200:
            break
        assert status == 500 and time.time() < deadline, answer
        time.sleep(2)
    assert handle.stats.remote().result()["pid"] != old_pid
