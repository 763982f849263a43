"""Baselines in the evaluation: fitted by the `baselines` stage on a D built from real (tiny) engines, their live
greedy episodes with frozen engines agree with D's rows for the same routes; `baselines.routers` picks which.

The engines run in this process (`LocalEngineClient`, `LocalRollouts`): the code under test is the stage, the
routing and the plans evaluation runs, not the actor placement (covered by the pipeline test).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from haps_ray import dataset as D
from haps_ray import storage
from haps_ray.baselines.evaluation import d_row, frozen_plans
from haps_ray.config import config_from_dict, save_config
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.report import summarize
from haps_ray.rl.trainer import EVAL, LocalRollouts
from haps_ray.tasks import load_problems
from pipelines import baselines as stage
from pipelines import build_dataset, common, evaluate

from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # building the module's D from tiny engines takes most of a minute here


def config(run_dir, routers):
    path = str(FIXTURES / "mmlu_small.jsonl")
    return config_from_dict({
        "seed": 0, "run_dir": str(run_dir),
        "candidates": [{"name": "a", "model": "tiny-llama", "device": "cpu", "price_in": 0.2, "price_out": 0.4},
                       {"name": "b", "model": "tiny-qwen2", "device": "cpu", "price_in": 0.8, "price_out": 1.6}],
        "task": {"name": "mmlu", "train_path": path, "valid_path": path, "test_path": path, "max_rounds": 1},
        "eval_decoding": {"max_new_tokens": 6},
        "reward": {"lam": 0.2},
        "baselines": {"routers": routers, "epochs": 10, "hidden": 8},
    })


@pytest.fixture(scope="module")
def built(make_tiny, tmp_path_factory):
    """D over every z for 8 train / 4 valid / 4 test fixture problems, from tiny engines, as pipelines.build_dataset
    lays it out (one file per batch, then D_SFT, the static baselines and the cost normaliser)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config(run_dir, ["routellm", "irt"])
    everything = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))[0]
    problems = {"train": everything[:8], "valid": everything[8:12], "test": everything[12:16]}
    engines = {"a": LLMEngine(*make_tiny("llama"), name="a"), "b": LLMEngine(*make_tiny("qwen2"), name="b")}
    clients = {name: LocalEngineClient(engine) for name, engine in engines.items()}
    checksums = [engines["a"].checksum, engines["b"].checksum]
    out = common.dataset_dir(cfg)
    for spec in D.plan_batches(problems, 2, 2, set(), batch_size=16, seed=cfg.seed):
        table = D.rows_to_table(D.run_batch(spec, clients, cfg, checksums)).drop_columns([D.PARTITION])
        storage.write_table(table, storage.join(out, "D", f"split={spec.split}", f"{spec.batch_id}.parquet"))
    build_dataset.write_tables(cfg, out)
    return cfg, problems, engines, clients


def test_stage_fits_the_configured_routers_and_resumes(built, tmp_path):
    cfg, problems, _, _ = built
    only = config(tmp_path, ["irt"]).model_copy(update={"dataset": cfg.dataset.model_copy(update={"output": common.dataset_dir(cfg)})})
    summaries = stage.fit_baselines(only, str(tmp_path), problems)
    assert list(summaries) == ["irt"] and sorted(p.name for p in (tmp_path / "baselines").iterdir()) == [
        "embeddings", "irt", "summary.json", "summary.md"]
    assert summaries["irt"]["valid_problems"] == 4 and summaries["irt"]["fit_seconds"] > 0
    assert list(stage.load_fitted(only, str(tmp_path))) == ["IRT-Router"]
    none = config(tmp_path / "none", [])
    assert stage.fit_baselines(none, str(tmp_path / "none"), problems) == {}
    assert not (tmp_path / "none" / "baselines").exists()
    # a second run keeps what is saved (no refit: the state file is untouched)
    state = tmp_path / "baselines" / "irt" / "state.safetensors"
    before = state.stat().st_mtime_ns
    stage.fit_baselines(only, str(tmp_path), problems)
    assert state.stat().st_mtime_ns == before


def test_live_frozen_episodes_of_a_baseline_agree_with_d(built):
    cfg, problems, engines, clients = built
    run_dir = common.resolve_run_dir(cfg)
    stage.fit_baselines(cfg, run_dir, problems)
    routes = evaluate.baseline_routes(cfg, run_dir, {s: problems[s] for s in ("valid", "test")})
    assert set(routes["test"][1]) == {"RouteLLM", "IRT-Router"}
    for engine in engines.values():  # D was decoded from cold prefix caches; so is this run (float rounding)
        engine.clear_prefix_cache()
    rollouts = LocalRollouts(cfg, clients, common.load_normalizer(cfg))
    table = D.with_reward(D.read_d(storage.join(common.dataset_dir(cfg), "D"))[0], cfg.reward, common.load_normalizer(cfg))
    lookup = {split: {(r["problem_id"], r["z_index"]): r for r in table.filter(pc.equal(table.column("split"), split)).to_pylist()}
              for split in ("valid", "test")}
    for split in ("valid", "test"):
        ps, by_label = routes[split]
        for label, zs in by_label.items():
            results = rollouts.run(ps, frozen_plans(ps, zs, cfg.task.roles), 0, EVAL)
            for p, z, result in zip(ps, zs, results):
                row = lookup[split][(p.id, D.assignment_index(z, 2))]
                assert (result.perf, result.final_answer) == (row["perf"], row["answer"]), (label, p.id, z)
                assert result.cost == pytest.approx(row["cost"]) and result.reward == pytest.approx(row["reward"])
            live, from_d = summarize(label, split, results), d_row(label, split, table, ps, zs, 2)
            assert (live.reward, live.perf, live.cost) == pytest.approx((from_d.reward, from_d.perf, from_d.cost))
    rows = evaluate.d_rows(cfg, ["valid", "test"], routes)
    assert {r.method for r in rows if r.source == "D"} >= {"RouteLLM (D)", "IRT-Router (D)", "oracle (D)"}


def test_entry_point_fits_and_prints_the_summary(built, tmp_path):
    cfg, _, _, _ = built
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    command = [sys.executable, "-m", "pipelines.baselines", "--config", str(path), "--set", f"run_dir={tmp_path / 'run'}",
               "--set", f"dataset.output={common.dataset_dir(cfg)}", "--set", "baselines.routers=[routellm]",
               "--set", "task.n_train=0", "--set", "task.n_valid=0"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| RouteLLM |" in proc.stdout and (tmp_path / "run" / "baselines" / "routellm" / "router.json").is_file()
    bad = subprocess.run(command[:5] + ["--set", "baselines.routellm_threshold=2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "baselines.routellm_threshold" in bad.stderr
