"""Mixed open/closed pools end to end: D built on Ray with one tiny local model and the loopback API (the closed
candidate routed to, never given an adapter or asked for a gradient), re-queues when the API is down, the 401
stop before any row, the pipeline's own loopback endpoint (api.serve_model), and a grep of every artefact of a
run for the key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import ray
import torch

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import config_from_dict
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.engine.api import ApiAuthError, ApiEngine, ApiEngineClient, Secret, api_checksum
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.trainer import LocalRollouts, rl_step
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import load_problems

from tests.api_loopback import Fault, LoopbackApi
from tests.helpers import FIXTURES

KEY = "sk-loopback-5f2c9a1e7d3b4c60"
ENV = "HAPS_TEST_API_KEY"


def config(url: str, tmp_path: Path, **api) -> dict:
    return {
        "seed": 1, "run_dir": str(tmp_path / "run"),
        "candidates": [
            {"name": "open", "model": "tiny-llama", "dtype": "float32", "device": "cpu", "num_cpus": 0.5},
            {"name": "closed", "model": "loopback", "open_source": False, "num_cpus": 0, "price_in": 0.8, "price_out": 3.2,
             "api": {"base_url": url, "model": "loopback-model", "api_key_env": ENV, "max_retries": 0, **api}},
        ],
        "task": {"name": "mmlu", "train_path": str(FIXTURES / "d_mmlu.jsonl"), "valid_path": str(FIXTURES / "d_mmlu.jsonl"),
                 "n_train": 1, "n_valid": 1, "max_rounds": 1},
        "eval_decoding": {"max_new_tokens": 6},
        "router": {"backbone": "tiny-llama", "max_prompt_tokens": 256, "lora_alpha": 1.0, "init": "authors"},
        "dataset": {"batch_size": 4, "progress_every_s": 5.0, "splits": ["train"]},
    }


def problems():
    return load_problems("mmlu", str(FIXTURES / "d_mmlu.jsonl"))[0]


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with LoopbackApi(key=KEY) as server:
        yield server


def closed_calls(rows):
    return [c for row in rows for c in json.loads(row["trajectory"])["calls"] if c["engine"] == "closed"]


def test_rl_step_routes_to_the_closed_candidate_without_adapter_or_gradient(api, tmp_path):
    cfg = config_from_dict(config(api.url, tmp_path), overrides=[
        "rl.batch_size=4", "rl.group_size=2", "rl.baseline=none", "rl.router_lr=1.0e-3", "rl.generator_lr=1.0e-3",
        "reward.shaping=true", "train_decoding.max_new_tokens=4"])
    local = LLMEngine.from_config(cfg.candidates[0])
    closed = ApiEngine(cfg.candidates[1])  # its adapter_grads raises: the step would fail if it asked for one
    engines = {"open": LocalEngineClient(local), "closed": ApiEngineClient(closed)}
    torch.manual_seed(0)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes={"open": local.info()["adapter_shapes"]})
    assert policy.hypernet.names == ["open"]  # no head, so no adapter and no parameters, for the closed one
    learner = JointLearner(policy, cfg.rl, total_steps=2)
    metrics, results = rl_step(learner, problems()[:4], cfg.rl, LocalRollouts(cfg, engines), seed=5)
    routed = [r for r in results if "closed" in r.assignment.values()]
    assert routed and api.requests > 0  # the router sent roles to the API
    assert all(not c.adapter for r in routed for c in r.calls if c.engine == "closed")
    assert any(c.adapter for r in results for c in r.calls if c.engine == "open")
    assert metrics["grad_norm/heads"] > 0 and closed.stats["failed"] == 0


@pytest.mark.slow
def test_mixed_pool_d_end_to_end(api, tmp_path, ray_session):
    from pipelines.build_dataset import DatasetBuilder

    cfg = config_from_dict(config(api.url, tmp_path))
    report = DatasetBuilder(cfg, str(tmp_path / "D")).build({"train": problems()[:2]})
    d, _ = D.read_d(str(tmp_path / "D"))
    assert d.num_rows == 8 and report.committed_episodes == 8 and report.failed_calls == 0
    rows = d.to_pylist()
    calls = closed_calls(rows)
    assert calls and len(calls) == api.requests and all(not c["adapter"] and "error" not in c for c in calls)
    assert all(c["n_input_tokens"] > 0 and "tokens_estimated" not in c for c in calls)  # the server's usage
    assert {r["engine_checksums"][1] for r in rows} == {api_checksum("loopback-model", api.url)}
    for row in rows:  # the closed candidate's tokens are priced at its own rates
        n_in, n_out = row["engine_input_tokens"][1], row["engine_output_tokens"][1]
        local = (row["engine_input_tokens"][0] * 0.2 + row["engine_output_tokens"][0] * 0.2) / 1e6
        assert row["cost"] == pytest.approx(local + (n_in * 0.8 + n_out * 3.2) / 1e6)
        assert row["n_estimated_calls"] == 0


@pytest.mark.slow
def test_batches_the_api_failed_entirely_are_requeued(api, tmp_path, ray_session):
    from pipelines.build_dataset import DatasetBuilder

    cfg = config_from_dict(config(api.url, tmp_path))
    api.always = Fault("status", 503)
    dispatched = []

    def heal_on_second_dispatch(event, info):
        if event == "dispatch":
            dispatched.append(info["batch_id"])
            if len(dispatched) == 2:
                api.always = None

    report = DatasetBuilder(cfg, str(tmp_path / "D")).build({"train": problems()[:1]}, callback=heal_on_second_dispatch)
    assert dispatched[0] == dispatched[1] and report.unavailable_batches == 1 and report.requeued_batches == 1
    rows = D.read_d(str(tmp_path / "D"))[0].to_pylist()
    assert len(rows) == 4 and all("error" not in c for c in closed_calls(rows))

    api.always = Fault("status", 503)  # down for good: the build stops after max_unavailable_requeues
    cfg.dataset.max_unavailable_requeues = 1
    with pytest.raises(RuntimeError, match="dataset.max_unavailable_requeues=1"):
        DatasetBuilder(cfg, str(tmp_path / "D2")).build({"train": problems()[:1]})


@pytest.mark.slow
def test_a_sporadic_failure_is_kept_in_its_row(api, tmp_path, ray_session):
    from pipelines.build_dataset import DatasetBuilder

    cfg = config_from_dict(config(api.url, tmp_path))
    api.faults.append(Fault("status", 500))
    report = DatasetBuilder(cfg, str(tmp_path / "D")).build({"train": problems()[:1]})
    rows = D.read_d(str(tmp_path / "D"))[0].to_pylist()
    failed = [r for r in rows if r["error"]]
    assert report.failed_calls == 1 and report.unavailable_batches == 0 and len(failed) == 1
    assert "HTTP 500" in failed[0]["error"] and failed[0]["n_malformed"] >= 1


@pytest.mark.slow
def test_401_stops_the_build_before_any_row(api, tmp_path, ray_session, monkeypatch):
    from pipelines.build_dataset import DatasetBuilder

    monkeypatch.setenv(ENV, "sk-revoked-000")
    cfg = config_from_dict(config(api.url, tmp_path))
    with pytest.raises(ApiAuthError) as err:
        DatasetBuilder(cfg, str(tmp_path / "D")).build({"train": problems()[:2]})
    message = str(err.value)
    assert "'closed'" in message and ENV in message and "401" in message and "sk-revoked-000" not in message
    assert api.requests == 0 and not list((tmp_path).rglob("*.parquet"))


@pytest.mark.slow
def test_serve_model_stands_in_for_an_api_offline(tmp_path, ray_session):
    from actors.engine import EnginePool

    raw = config("", tmp_path)
    raw["candidates"][1]["api"] = {"model": "qwen-served", "serve_model": "tiny-qwen2", "max_retries": 0}
    raw["candidates"][1]["num_cpus"] = 0.5
    cfg = config_from_dict(raw)
    pool = EnginePool(cfg)
    try:
        pool.wait_ready()
        clients = pool.clients()
        chats = [[{"role": "user", "content": f"hello {i}"}] for i in range(3)]
        gens = clients["closed"].generate(chats, max_new_tokens=5).result()
        assert all(g.error is None and g.n_input_tokens > 0 and g.n_output_tokens > 0 for g in gens)
        stats = ray.get(pool.endpoints["closed"].stats.remote())
        assert stats["requests"] == 3 and stats["batches"] < 3  # concurrent requests decoded together
        assert pool.adapter_shapes().keys() == {"open"}
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_the_key_is_in_no_artefact_of_a_run(api, tmp_path, ray_session, caplog, capsys):
    """A build through the pipeline entry (resolved config, D, tables, summary) plus the engine's own DEBUG logs
    in this process and every Ray log of the session: the key appears nowhere."""
    from pipelines.build_dataset import build

    caplog.set_level(logging.DEBUG)
    cfg = config_from_dict(config(api.url, tmp_path))
    api.faults.extend([Fault("status", 500), Fault("status", 429, retry_after="0.1"), Fault("no_usage")])
    summary = build(cfg)
    assert summary["rows"] == 4
    direct = ApiEngine(cfg.candidates[1], Secret(KEY))  # in-process too, so the openai client logs here at DEBUG
    direct.generate([[{"role": "user", "content": "x"}]])
    with pytest.raises(ApiAuthError):
        ApiEngine(cfg.candidates[1], Secret(KEY + "-bad")).generate([[{"role": "user", "content": "x"}]])
    artefacts = [p for p in Path(cfg.run_dir).rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in artefacts) and any(p.name == "build_config.yaml" for p in artefacts)
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    artefacts += [p for p in session_logs.rglob("*") if p.is_file()]
    leaks = [str(p) for p in artefacts if KEY.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert not leaks and KEY not in caplog.text and KEY not in captured.out + captured.err
    assert "openai" in caplog.text or "httpx" in caplog.text  # the clients' debug logs were captured and checked
    assert storage.exists(str(Path(cfg.run_dir) / "dataset" / "summary.json"))
