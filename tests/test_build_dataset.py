"""Building D: rows from real lock-step episodes, batch planning, and the Ray builder end to end — the
pipeline as a subprocess, HotpotQA, a crashed build resumed on the loopback S3, an engine killed mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import ray
import yaml

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.config import config_from_dict
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.rl.cost import PriceTable
from haps_ray.tasks import load_problems
from pipelines import common

from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def config(task: str = "mmlu", **dataset) -> dict:
    return {
        "seed": 3,
        "candidates": [
            {"name": "a", "model": "tiny-llama", "num_cpus": 0.5, "device": "cpu", "price_in": 0.2, "price_out": 0.4},
            {"name": "b", "model": "tiny-qwen2", "num_cpus": 0.5, "device": "cpu", "price_in": 0.8, "price_out": 1.6},
        ],
        "task": {"name": task, "train_path": str(FIXTURES / f"d_{task}.jsonl"), "valid_path": str(FIXTURES / f"d_{task}.jsonl"),
                 "n_train": 0, "n_valid": 1, "max_rounds": 2, "search_budget": 1},
        "eval_decoding": {"max_new_tokens": 6},
        "dataset": {"batch_size": 4, "progress_every_s": 5.0, **dataset},
    }


def problems(task: str = "mmlu"):
    return load_problems(task, str(FIXTURES / f"d_{task}.jsonl"))[0]


# ----------------------------------------------------------------------------------------------
# Without Ray
# ----------------------------------------------------------------------------------------------


class BrokenEngine:
    """Test double: an engine whose every generate call fails (stands for a crashed model server)."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device lost")


def test_plan_batches_skips_done_and_is_deterministic():
    ps = problems()
    plan = D.plan_batches({"train": ps}, 2, 2, set(), batch_size=5, seed=0)
    assert [len(s.zs) for s in plan] == [5, 5, 2]
    assert [(p.id, z) for s in plan for p, z in zip(s.problems, s.zs)][:5] == [
        ("d-mmlu-1", (0, 0)), ("d-mmlu-1", (0, 1)), ("d-mmlu-1", (1, 0)), ("d-mmlu-1", (1, 1)), ("d-mmlu-2", (0, 0))]
    assert [s.batch_id for s in plan] == [s.batch_id for s in D.plan_batches({"train": ps}, 2, 2, set(), 5, 0)]
    done = {("train", "d-mmlu-1", i) for i in range(4)} | {("train", "d-mmlu-3", 2)}
    rest = D.plan_batches({"train": ps}, 2, 2, done, batch_size=5, seed=0)
    keys = [(p.id, D.assignment_index(z, 2)) for s in rest for p, z in zip(s.problems, s.zs)]
    assert keys == [("d-mmlu-2", i) for i in range(4)] + [("d-mmlu-3", 0), ("d-mmlu-3", 1), ("d-mmlu-3", 3)]


def test_run_batch_rows_from_local_engines(make_tiny):
    cfg = config_from_dict(config())
    engines = {"a": LLMEngine(*make_tiny("llama"), name="a"), "b": LLMEngine(*make_tiny("qwen2"), name="b")}
    checksums = [engines["a"].checksum, engines["b"].checksum]
    spec = D.plan_batches({"valid": problems()[:1]}, 2, 2, set(), batch_size=4, seed=cfg.seed)[0]
    clients = {name: LocalEngineClient(engine) for name, engine in engines.items()}
    rows = D.run_batch(spec, clients, cfg, checksums)
    table = D.rows_to_table(rows)
    assert table.num_rows == 4 and [r["z_index"] for r in rows] == [0, 1, 2, 3]
    prices = PriceTable.from_candidates(cfg.candidates)
    for row in rows:
        assert row["split"] == "valid" and row["problem_id"] == "d-mmlu-1" and row["gold"] == "B"
        assert row["z_names"] == [["a", "b"][i] for i in row["z"]] and row["engine_checksums"] == checksums
        assert row["n_input_tokens"] == sum(row["role_input_tokens"]) == sum(row["engine_input_tokens"]) > 0
        assert row["n_output_tokens"] == sum(row["role_output_tokens"]) == sum(row["engine_output_tokens"]) > 0
        unused = {0, 1} - set(row["z"])
        assert all(row["engine_input_tokens"][i] == 0 for i in unused)
        cost = sum(prices.call_cost(n, row["engine_input_tokens"][i], row["engine_output_tokens"][i]) for i, n in enumerate("ab"))
        assert row["cost"] == pytest.approx(cost)
        calls = json.loads(row["trajectory"])["calls"]
        assert len(calls) == row["n_calls"] and {c["engine"] for c in calls} <= set(row["z_names"])
        assert sum(c["n_input_tokens"] for c in calls) == row["n_input_tokens"]
        assert row["perf"] == float(row["answer"] == "B")
        assert (row["max_new_tokens"], row["temperature"], row["seed"]) == (6, 0.0, spec.seed)
    # a re-run of the same batch (greedy, same seed) on engines with empty prefix caches reproduces its rows
    # exactly (a warm prefix cache changes float rounding, which can flip near-tied tokens of these random models)
    for engine in engines.values():
        engine.clear_prefix_cache()
    assert D.run_batch(spec, clients, cfg, checksums) == rows


def test_run_batch_refuses_engine_failures(make_tiny):
    cfg = config_from_dict(config())
    engines = {"a": LLMEngine(*make_tiny("llama"), name="a"), "b": BrokenEngine()}
    spec = D.plan_batches({"train": problems()[:1]}, 2, 2, set(), batch_size=4, seed=0)[0]
    with pytest.raises(D.EngineFailure, match="engine b failed.*device lost"):
        D.run_batch(spec, {name: LocalEngineClient(engine) for name, engine in engines.items()}, cfg, ["x", "y"])


def connect_in_subprocess(env: dict, cfg_path: Path) -> str:
    """The GCS address `common.init_ray` connects a fresh driver process to."""
    code = ("import sys; from pipelines import common; "
            "print(common.init_ray(common.load(common.parse_args('x', ['--config', sys.argv[1]]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_init_ray_joins_the_cluster_named_by_ray_address_or_the_config(ray_session, tmp_path):
    """On a real local cluster: a driver given RAY_ADDRESS (what `ray job submit` sets) or `ray_address` in its
    config joins that cluster instead of starting its own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(config()))
    assert connect_in_subprocess({**env, "RAY_ADDRESS": ray_session}, plain) == ray_session
    addressed = tmp_path / "addressed.yaml"
    addressed.write_text(yaml.safe_dump({**config(), "ray_address": ray_session}))
    assert connect_in_subprocess(env, addressed) == ray_session
    assert common.init_ray(config_from_dict(config())) == ray_session  # already initialised here: kept as it is


def test_cli_overrides_and_locations(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config()))
    args = common.parse_args("x", ["--config", str(path), "--set", "dataset.batch_size=2", "--set", "run_dir=runs/q"])
    cfg = common.load(args)
    assert cfg.dataset.batch_size == 2
    monkeypatch.setenv("HAPS_RUN_ROOT", str(tmp_path))
    assert common.resolve_run_dir(cfg) == str(tmp_path / "runs" / "q")
    assert common.resolve_location("s3://b/x/") == "s3://b/x"
    with pytest.raises(SystemExit) as stop:  # a bad config is one line on stderr and exit status 2
        common.load(common.parse_args("x", ["--config", str(path), "--set", "dataset.batch_size=0"]))
    assert stop.value.code == 2 and capsys.readouterr().err.startswith(f"error: {path}: dataset.batch_size: ")


# ----------------------------------------------------------------------------------------------
# On Ray
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_actors(ray_session):
    """Engines and a worker lane shared by the in-process builds (starting them is most of a build's time)."""
    from pipelines.build_dataset import BuildActors

    actors = BuildActors(config_from_dict(config()))
    yield actors
    actors.shutdown()


def expected_keys(split_problems: dict) -> set:
    return {(s, p.id, i) for s, ps in split_problems.items() for p in ps for i in range(4)}


@pytest.mark.slow
def test_pipeline_builds_d_and_tables(ray_session, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**config(), "run_dir": str(tmp_path / "run")}))
    env = {**os.environ, "RAY_ADDRESS": ray_session}
    proc = subprocess.run([sys.executable, "-m", "pipelines.build_dataset", "--config", str(cfg_path), "--set", "task.n_train=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "dataset"
    d, dropped = D.read_d(str(out / "D"))
    assert dropped == 0 and d.num_rows == 2 * 4 + 1 * 4
    assert d.schema.equals(D.D_SCHEMA, check_metadata=False)
    chosen = {s: {r["problem_id"] for r in d.to_pylist() if r["split"] == s} for s in ("train", "valid")}
    assert len(chosen["train"]) == 2 and len(chosen["valid"]) == 1
    assert D.present_keys(d) == expected_keys({s: [p for p in problems() if p.id in ids] for s, ids in chosen.items()})
    assert sorted(p.name for p in (out / "D").iterdir()) == ["split=train", "split=valid"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["build"]["committed_episodes"] == 12 and summary["build"]["missing"] == 0
    assert summary["sft_labels"]["train"]["problems"] == 2 and summary["sft_labels"]["valid"]["problems"] == 1
    assert (out / "baselines.md").exists() and (out / "D_sft.parquet").exists() and (out / "cost_normalizer.json").exists()
    assert yaml.safe_load((out / "build_config.yaml").read_text())["task"]["n_train"] == 2
    assert "| train | oracle |" in proc.stdout


@pytest.mark.slow
def test_builds_hotpotqa(build_actors, tmp_path):
    from pipelines.build_dataset import DatasetBuilder

    cfg = config_from_dict(config("hotpotqa"))
    split_problems = {"train": problems("hotpotqa")}
    report = DatasetBuilder(cfg, str(tmp_path / "D"), build_actors).build(split_problems)
    d, _ = D.read_d(str(tmp_path / "D"))
    assert report.committed_episodes == 8 and D.present_keys(d) == expected_keys(split_problems)
    assert all(r["task"] == "hotpotqa" and r["gold"] in ("Danube", "yes") for r in d.to_pylist())


@pytest.mark.slow
def test_crashed_build_resumes_on_s3(build_actors, s3_server):
    from pipelines.build_dataset import DatasetBuilder

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="resume")
    uri = "s3://resume/run/D"
    cfg = config_from_dict(config())
    split_problems = {"train": problems()}

    class DriverCrash(Exception):
        pass

    def crash_after_first_commit(event: str, info: dict) -> None:
        if event == "commit":
            raise DriverCrash("driver killed")

    with pytest.raises(DriverCrash):
        DatasetBuilder(cfg, uri, build_actors).build(split_problems, callback=crash_after_first_commit)
    partial, _ = D.read_d(uri)
    assert partial.num_rows == 4
    first = storage.list_files(uri, ".parquet")
    etag = boto3.client("s3", endpoint_url=s3_server).head_object(Bucket="resume", Key=first[0][len("s3://resume/"):])["ETag"]

    report = DatasetBuilder(cfg, uri, build_actors).build(split_problems)
    assert (report.already_present, report.planned_episodes, report.committed_episodes) == (4, 8, 8)
    d, dropped = D.read_d(uri)
    assert dropped == 0 and d.num_rows == 12 and D.present_keys(d) == expected_keys(split_problems)
    assert boto3.client("s3", endpoint_url=s3_server).head_object(
        Bucket="resume", Key=first[0][len("s3://resume/"):])["ETag"] == etag  # the committed batch was not redone
    # the safety net: a stray copy of a batch file is found and dropped on read
    storage.write_bytes(f"{uri}/split=train/part-copy.parquet", storage.read_bytes(first[0]))
    d, dropped = D.read_d(uri)
    assert dropped == 4 and d.num_rows == 12


@pytest.mark.slow
def test_killed_engine_is_replaced_and_rows_are_exactly_once(build_actors, tmp_path):
    from pipelines.build_dataset import DatasetBuilder

    cfg = config_from_dict(config())
    split_problems = {"train": problems()}
    dispatched = []

    def kill_during_second_batch(event: str, info: dict) -> None:
        if event == "dispatch":
            dispatched.append(info["batch_id"])
            if len(dispatched) == 2:
                ray.kill(info["engines"]["b"])

    report = DatasetBuilder(cfg, str(tmp_path / "D"), build_actors).build(split_problems, callback=kill_during_second_batch)
    assert report.engine_restarts == 1 and report.requeued_batches == 1
    assert dispatched[2] == dispatched[1]  # the failed batch went again, whole
    assert report.committed_batches == 3 and report.committed_episodes == 12
    d, dropped = D.read_d(str(tmp_path / "D"))
    assert dropped == 0 and d.num_rows == 12 and D.present_keys(d) == expected_keys(split_problems)
    assert len(storage.list_files(str(tmp_path / "D"), ".parquet")) == 3
    assert all(r["error"] is None for r in d.to_pylist())
    assert build_actors.pool.wait_ready() == build_actors.checksums  # the replacement serves the same weights
