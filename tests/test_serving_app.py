"""How `serve.*` shapes the Serve application (built, not run), the `serve run` builder's arguments, and a second
running app whose `serve.request_timeout_s` is too short for any engine call (every request gets the 504)."""

import json
import socket

import pytest
import torch
from ray import serve

from actors import serving as deployments
from haps_ray.config import load_config
from haps_ray.routing.policy import HAPSPolicy
from pipelines import serve as serve_pipeline
from tests.helpers import FIXTURES

CONFIG = FIXTURES / "run_tiny.yaml"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    cfg = load_config(CONFIG)
    path = tmp_path_factory.mktemp("policy") / "policy"
    torch.manual_seed(0)
    HAPSPolicy.from_config(cfg).save(path)
    return str(path)


def test_serve_fields_become_deployment_options(policy_dir, monkeypatch):
    monkeypatch.setenv("HAPS_APP_TOKEN", "t0ken")
    cfg = load_config(CONFIG, overrides=[
        "serve.router_replicas=3", "serve.router_num_cpus=0.5", "serve.router_num_gpus=0.25", "serve.engine_replicas=2",
        "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.2", "serve.max_ongoing_requests=12",
        "serve.max_queued_requests=5", "serve.request_timeout_s=9", "serve.api_key_env=HAPS_APP_TOKEN"])
    ingress = deployments.build_app(cfg, policy_dir)._bound_deployment
    assert ingress.max_ongoing_requests == 12 + 5 + deployments.HEADROOM
    _, router_app, engine_apps, token = ingress.init_args
    assert token.reveal() == "t0ken" and "t0ken" not in repr(ingress.init_args)
    router = router_app._bound_deployment
    assert router.num_replicas == 3 and router.max_ongoing_requests == 12
    assert router.ray_actor_options["num_cpus"] == 0.5 and router.ray_actor_options["num_gpus"] == 0.25
    assert router.init_args[-2:] == (4, 0.2)
    for candidate in cfg.candidates:
        engine = engine_apps[candidate.name]._bound_deployment
        assert engine.name == deployments.engine_deployment_name(candidate.name)
        assert engine.num_replicas == 2 and engine.max_ongoing_requests == 12
        assert engine.ray_actor_options["num_cpus"] == candidate.num_cpus
        assert engine.init_args[1:4] == (1, 4, 0.2)  # lora_layers of the policy, max_batch_size, wait
    cfg.serve.engine_replicas = 0  # each candidate's own replicas
    cfg.candidates[1].replicas = 3
    engines = deployments.build_app(cfg, policy_dir)._bound_deployment.init_args[2]
    assert [engines[c.name]._bound_deployment.num_replicas for c in cfg.candidates] == [1, 3]


def test_build_app_refuses_a_missing_token_and_another_pool(policy_dir, monkeypatch):
    monkeypatch.delenv("HAPS_APP_TOKEN", raising=False)
    cfg = load_config(CONFIG, overrides=["serve.api_key_env=HAPS_APP_TOKEN"])
    with pytest.raises(ValueError, match="serve.api_key_env: environment variable HAPS_APP_TOKEN is not set"):
        deployments.build_app(cfg, policy_dir)
    other = load_config(CONFIG)
    other.candidates[0].name = "renamed"
    with pytest.raises(ValueError, match=r"^candidates: the config has \['renamed', 'qwen'\]"):
        deployments.build_app(other, policy_dir)


def test_serve_run_builder_takes_config_policy_and_overrides(policy_dir):
    app = serve_pipeline.build_app({"config": str(CONFIG), "policy": policy_dir, "set": "serve.max_queued_requests=7"})
    assert app._bound_deployment.max_ongoing_requests == 32 + 7 + deployments.HEADROOM
    with pytest.raises(ValueError, match="build_app takes config=<yaml> policy=<dir>"):
        serve_pipeline.build_app({"config": str(CONFIG)})


@pytest.mark.slow
def test_a_request_over_the_timeout_gets_504(ray_session, policy_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # 1 ms: no router or engine call can answer in time, so every request that reaches one times out
    cfg = load_config(CONFIG, overrides=[f"serve.port={port}", "serve.request_timeout_s=0.001",
                                         "serve.router_num_cpus=0.25"])
    try:
        url = serve_pipeline.start(cfg, policy_dir)
        import urllib.error
        import urllib.request

        body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=120)
        assert info.value.code == 504
        error = json.loads(info.value.read())["error"]
        assert error["code"] == "timeout" and "serve.request_timeout_s=0.001" in error["message"]
        with urllib.request.urlopen(f"{url.removesuffix('/v1')}/health", timeout=60) as health:
            assert health.status == 200  # the app itself is fine
    finally:
        serve.shutdown()


def scripted_hotpot_turn(messages: list[dict]) -> str:
    """The loopback API's answers: the Student searches once, then finishes; the Teacher always continues."""
    if messages[0]["content"].startswith("You are the Teacher"):
        return "Thought: fine.\nSummary: on track.\nDecision: [Continue]"
    if "Searches left: 0" in messages[-1]["content"]:
        return "Thought: the river is known now.\nSummary: Dravik.\nAction: Finish[the Vesna River]"
    return "Thought: where is the tower?\nSummary: nothing yet.\nAction: Search[Arlen Clock Tower]"


@pytest.mark.slow
def test_hotpotqa_runs_with_retrieval_in_the_service_as_in_evaluation(ray_session, tmp_path, monkeypatch):
    from haps_ray.config import ApiConfig, CandidateConfig
    from haps_ray.engine import LocalRetrieverClient
    from haps_ray.engine.api import ApiEngine, ApiEngineClient, Secret
    from haps_ray.retrieval import Retriever
    from haps_ray.rl.learner import JointLearner
    from haps_ray.rl.trainer import EVAL, LocalRollouts
    from haps_ray.tasks import load_problems
    from tests.api_loopback import LoopbackApi
    from tests.test_serving import free_port, post

    hotpot = str(FIXTURES / "hotpotqa_small.json")
    monkeypatch.setenv("HAPS_TEST_LOOPBACK_KEY", "loopback-key")
    with LoopbackApi(key="loopback-key", answer=scripted_hotpot_turn) as api:
        cfg = load_config(CONFIG, overrides=[
            "task.name=hotpotqa", f"task.train_path={hotpot}", f"task.valid_path={hotpot}", f"task.test_path={hotpot}",
            "task.search_budget=1", f"serve.port={free_port()}", "serve.router_num_cpus=0.25", "retriever.device=cpu"])
        # two closed candidates behind the loopback API (a scripted test double): every episode searches, so the
        # service's retriever runs whatever z the fresh router picks
        cfg.candidates = [CandidateConfig(name=name, model=name, open_source=False, num_cpus=0, price_in=p, price_out=p,
                                          api=ApiConfig(base_url=api.url, model="loopback-model",
                                                        api_key_env="HAPS_TEST_LOOPBACK_KEY"))
                          for name, p in (("small", 0.2), ("large", 0.8))]
        policy = tmp_path / "policy"
        torch.manual_seed(0)
        HAPSPolicy.from_config(cfg).save(policy)
        problems, _ = load_problems("hotpotqa", hotpot)
        chosen = problems[:3]
        try:
            url = serve_pipeline.start(cfg, str(policy))
            served = []
            for p in chosen:
                status, answer = post(f"{url}/chat/completions", {
                    "model": "haps", "messages": [{"role": "user", "content": p.question}],
                    "haps": {"task": "hotpotqa", "context": [[t, s] for t, s in p.context], "answer": p.answer}},
                    token=None)
                assert status == 200, answer
                served.append(answer["haps"])
        finally:
            serve.shutdown()
        learner = JointLearner(HAPSPolicy.load(policy, device=cfg.router.device, seed=cfg.seed), cfg.rl, total_steps=1)
        engines = {c.name: ApiEngineClient(ApiEngine(c, key=Secret("loopback-key"))) for c in cfg.candidates}
        rollouts = LocalRollouts(cfg, engines, retriever=LocalRetrieverClient(Retriever.from_config(cfg.retriever)))
        plans = learner.propose(chosen, mode="greedy")
        results = rollouts.run(chosen, plans, 0, EVAL)
    for record, plan, result in zip(served, plans, results):
        assert record["z"] == plan.z and record["final_answer"] == result.final_answer == "the Vesna River"
        assert [c["text"] for c in record["calls"]] == [c.completion for c in result.calls]
        assert record["retrievals"] == [r.to_dict() for r in result.retrievals] and len(record["retrievals"]) == 1
        assert record["perf"] == pytest.approx(result.perf)
    assert served[0]["retrievals"][0]["passages"][0][0] == "Arlen Clock Tower"  # the question's own paragraphs


@pytest.mark.slow
def test_the_entry_point_serves_until_ctrl_c(policy_dir):
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.test_serving import free_port, post

    port = free_port()
    root = FIXTURES.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout, also in the Ray workers the job starts
    # ray_address=local: a Ray of its own, never a cluster someone started on this machine
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "--config", str(CONFIG), "--policy", policy_dir,
                             "--set", "ray_address=local", "--set", f"serve.port={port}",
                             "--set", "serve.router_num_cpus=0.25"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
                    if health.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "the service did not come up"
                time.sleep(2)
        status, answer = post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "haps", "messages": [{"role": "user", "content": "Which planet is closest to the Sun?"}],
            "haps": {"choices": ["Venus", "Mercury", "Earth", "Mars"]}}, token=None)
        assert status == 200 and answer["haps"]["assignment"]
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
        assert "shutting down the HAPS app" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
