"""Ray Tune sweeps (pipelines.tune): the sweep config, the shared engine pool, failures, resume, results.

The sweeps run on tiny random-weight models and the MMLU fixture: D and the SFT router are prepared once per module
(`prepared`) and each sweep starts from a copy of that run directory, as a rerun of `pipelines.tune` on an earlier
`pipelines.run` would.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from haps_ray.config import ConfigError, config_from_dict, load_config
from haps_ray.sweep_report import TrialRow, pareto_front, to_csv, to_markdown

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "fixtures" / "sweep_tiny.yaml"
ONE_LAMBDA = "sweep.space={reward.lam: {grid: [0.5]}, router.lora_layers: {grid: [1, 2]}}"


def base_dict() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def with_space(space: dict, **sweep) -> dict:
    data = base_dict()
    data["sweep"] = {"space": space, **sweep}
    return data


# ---------------------------------------------------------------------------------------------- config, fast


@pytest.mark.parametrize(("space", "sweep", "message"), [
    ({"router.lora_layrs": {"grid": [1, 2]}}, {}, r"sweep\.space\.router\.lora_layrs: unknown field 'lora_layrs'"),
    ({"task.n_train": {"grid": [2, 4]}}, {}, r"sweep\.space\.task\.n_train: not sweepable"),
    ({"reward.lam": {"uniform": [0.1, 0.9]}}, {}, r"sweep\.space\.reward\.lam: λ is an outer grid"),
    ({"reward.lam": {"grid": [0.2, 1.5]}}, {}, r"sweep\.space\.reward\.lam: value 1\.5 does not make a valid config"),
    ({"router.lora_layers": {"uniform": [1, 4]}}, {}, r"sweep\.space\.router\.lora_layers: value 1\.0 .*valid integer"),
    ({"rl.epochs": {"grid": [1], "choice": [2]}}, {}, r"sweep\.space\.rl\.epochs\.grid: give exactly one of"),
    ({"rl.generator_lr": {"loguniform": [0.0, 1e-3]}}, {}, r"sweep\.space\.rl\.generator_lr\.loguniform: needs low > 0"),
    ({"rl.epochs": {"grid": [1, 2]}}, {"search_alg": "optuna"}, r"sweep\.space\.rl\.epochs: search_alg optuna cannot run a grid"),
    ({}, {"scheduler": "hyperband"}, r"sweep\.scheduler: Input should be 'none' or 'asha'"),
])
def test_invalid_space_fails_at_load_naming_the_field(space, sweep, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_space(space, **sweep))


def test_space_maps_onto_tune_and_lambda_is_an_outer_grid() -> None:
    from ray import tune as ray_tune

    from pipelines import tune

    cfg = config_from_dict(with_space({
        "reward.lam": {"choice": [0.8, 0.2, 0.8]}, "router.lora_layers": {"grid": [1, 2]},
        "router.lora_rank": {"choice": [4, 8]}, "rl.generator_lr": {"loguniform": [1e-5, 1e-3]},
        "rl.router_lr": {"uniform": [1e-4, 1e-3]},
    }, scheduler="asha", grace_period=3))
    assert tune.lambdas(cfg) == [0.8, 0.2]
    space = tune.param_space(cfg)
    assert set(space) == {"router.lora_layers", "router.lora_rank", "rl.generator_lr", "rl.router_lr"}  # no λ
    assert space["router.lora_layers"] == {"grid_search": [1, 2]}
    assert isinstance(space["router.lora_rank"], ray_tune.search.sample.Categorical)
    assert (space["rl.generator_lr"].lower, space["rl.generator_lr"].upper) == (1e-5, 1e-3)
    assert tune.deepest_k(cfg) == 2
    scheduler, search = tune.scheduler_and_search(cfg)
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"
    assert min(t for t, _ in scheduler._brackets[0]._rungs) == 3  # the first rung is at grace_period evaluations
    assert search is None
    trial = tune.trial_config(tune_base(cfg), 0.8, {"router.lora_layers": 2, "rl.generator_lr": 3e-4})
    assert (trial.reward.lam, trial.router.lora_layers, trial.rl.generator_lr) == (0.8, 2, 3e-4)
    assert tune.scheduler_and_search(config_from_dict(with_space({})))[0] is None
    assert tune.lambdas(config_from_dict(with_space({}))) == [0.2]  # the config's own λ


def tune_base(cfg) -> dict:
    from haps_ray.config import to_dict

    base = to_dict(cfg)
    del base["sweep"]
    return base


def test_tune_config_and_best_evaluation_follow_metric_mode_samples_and_concurrency() -> None:
    import pandas as pd

    from pipelines import tune

    cfg = config_from_dict(with_space({"rl.generator_lr": {"choice": [1e-4, 1e-3]}}, metric="valid/cost_usd", mode="min",
                                      num_samples=3, max_concurrent_trials=2))
    tc = tune.tune_config(cfg)
    assert (tc.metric, tc.mode, tc.num_samples, tc.max_concurrent_trials) == ("valid/cost_usd", "min", 3, 2)
    assert tune.tune_config(config_from_dict(with_space({}))).max_concurrent_trials is None  # 0: as resources allow
    frame = pd.DataFrame({"valid/reward": [0.1, 0.5, 0.3], "valid/cost_usd": [3e-4, 2e-4, 1e-4], "step": [0, 1, 2]})
    assert tune.best_evaluation(frame, "valid/cost_usd", "min")["step"] == 2
    assert tune.best_evaluation(frame, "valid/reward", "max")["step"] == 1
    assert tune.best_evaluation(frame.iloc[:0], "valid/reward", "max") is None


def test_optuna_is_optional_and_named_when_missing() -> None:
    from pipelines import tune

    cfg = config_from_dict(with_space({"rl.generator_lr": {"loguniform": [1e-5, 1e-3]}}, search_alg="optuna"))
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="sweep.search_alg=optuna needs Optuna: pip install optuna"):
            tune.scheduler_and_search(cfg)
    else:
        assert type(tune.scheduler_and_search(cfg)[1]).__name__ == "OptunaSearch"


def test_trial_reserves_its_process_and_learner_and_engines_only_without_sharing() -> None:
    from pipelines import tune

    cfg = config_from_dict(with_space({}, trial_num_cpus=0.5))
    assert tune.trial_resources(cfg, share_engines=True).bundles == [{"CPU": 0.5}, {"CPU": 0.25}]
    naive = tune.trial_resources(cfg, share_engines=False).bundles
    assert naive == [{"CPU": 0.5}, {"CPU": 0.25}, {"CPU": 0.25}, {"CPU": 0.25}]  # + one per candidate replica


def test_report_table_front_and_csv() -> None:
    rows = [
        TrialRow("lam_0.2", "a", 0.2, 1, 8, 1e-6, 1e-5, {"router.lora_layers": 1}, "finished", 0.5, 0.6, 2e-4, 3, 2),
        TrialRow("lam_0.2", "b", 0.2, 2, 8, 1e-6, 1e-5, {"router.lora_layers": 2}, "failed", error="RuntimeError: x|y"),
        TrialRow("lam_0.8", "c", 0.8, 1, 4, 1e-6, 1e-5, {}, "finished", 0.1, 0.4, 1e-4, 0, 1),
    ]
    md = to_markdown(rows)
    assert md.splitlines()[2].startswith("| lam_0.2 | a | 0.2 | 1 | 8 |")
    assert "| failed | — | — | — | — | 0 | RuntimeError: x\\|y |" in md
    parsed = list(csv.DictReader(to_csv(rows).splitlines()))
    assert [r["status"] for r in parsed] == ["finished", "failed", "finished"] and parsed[0]["params"] == "router.lora_layers=1"
    assert pareto_front([(2e-4, 0.6), (1e-4, 0.4), (3e-4, 0.5)]) == [(1e-4, 0.4), (2e-4, 0.6)]


def test_invalid_space_fails_before_ray_or_any_actor_starts(tmp_path, capsys) -> None:
    from pipelines import tune

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_space({"router.lora_layrs": {"grid": [1, 2]}})))
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--config", str(bad), "--set", f"run_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "sweep.space.router.lora_layrs: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was prepared, no engine was started


def test_shipped_sweep_configs_load() -> None:
    paths = sorted((ROOT / "tune_configs").glob("sweep_*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.sweep.space, path


# ---------------------------------------------------------------------------------------------- sweeps, slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session) -> Path:
    """A run directory with the stages before RL done (data, D, SFT) for the tiny sweep config."""
    from pipelines import run

    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    cfg = load_config(CONFIG, overrides=[f"run_dir={run_dir}"])
    run.prepare(cfg, str(run_dir))
    return run_dir


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(prepared, run_dir)
    return run_dir


class EngineCounter:
    """Polls the GCS for live EngineActors while a sweep runs; `most` is the largest count seen."""

    def __init__(self) -> None:
        self.most, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        import ray._private.state as state

        while not self.stop.is_set():
            alive = [a for a in state.actors().values() if a["ActorClassName"] == "EngineActor" and a["State"] == "ALIVE"]
            self.most = max(self.most, len(alive))
            time.sleep(0.2)

    def __enter__(self) -> EngineCounter:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.slow
def test_four_trial_sweep_shares_one_engine_pool_and_writes_the_results(prepared, tmp_path) -> None:
    import ray

    from pipelines import tune

    run_dir = copy_of(prepared, tmp_path)
    cfg = load_config(CONFIG, overrides=[f"run_dir={run_dir}"])
    with EngineCounter() as engines:
        result = tune.sweep(cfg, str(run_dir))
    assert engines.most == 2  # one replica of each candidate for the whole sweep, not trials x candidates
    rows = result["rows"]
    assert sorted((r.lam, r.k) for r in rows) == [(0.2, 1), (0.2, 2), (0.8, 1), (0.8, 2)]
    assert all(r.status == "finished" and r.evaluations == 2 and r.best_step is not None for r in rows), rows
    for r in rows:  # every trial trained under its own λ and k
        saved = load_config(run_dir / "tune" / "trials" / r.experiment / r.trial / "rl" / "best" / "config.yaml")
        assert (saved.reward.lam, saved.router.lora_layers) == (r.lam, r.k)
    assert {r.reward for r in rows if r.lam == 0.2}.isdisjoint({r.reward for r in rows if r.lam == 0.8})
    out = run_dir / "tune"
    table = (out / "results.md").read_text()
    assert table.count("| finished |") == 4
    assert len(list(csv.DictReader((out / "results.csv").read_text().splitlines()))) == 4
    assert (out / "front.png").stat().st_size > 1000 and (out / "depth_rank.png").stat().st_size > 1000
    assert list((out / "lam_0.2").glob("*/events.out.tfevents.*")) and list((out / "lam_0.8").glob("*/events.out.tfevents.*"))
    # a k=1 trial used the SFT backbone with new one-layer heads; every trial's policy came back as a Tune checkpoint
    k1 = next(r for r in rows if r.k == 1 and r.lam == 0.2)
    heads = json.loads((out / "trials" / "lam_0.2" / k1.trial / "rl" / "best" / "policy.json").read_text())["adapter_shapes"]
    assert all(len(shapes) == 1 for shapes in heads.values())
    assert list((out / "lam_0.2").glob("*/checkpoint_*/policy.json"))
    assert not [a for a in ray._private.state.actors().values()
                if a["ActorClassName"] == "EngineActor" and a["State"] == "ALIVE"]  # the pool is shut down


@pytest.mark.slow
def test_a_failing_trial_is_reported_and_the_others_finish(prepared, tmp_path) -> None:
    from pipelines import tune

    def flaky(params, **kwargs):  # a test double around the real trainable: depth 2 crashes at start
        if params["router.lora_layers"] == 2:
            raise RuntimeError("forced failure of the k=2 trial")
        tune.run_trial(params, **kwargs)

    run_dir = copy_of(prepared, tmp_path)
    cfg = load_config(CONFIG, overrides=[f"run_dir={run_dir}", ONE_LAMBDA])
    rows = {r.k: r for r in tune.sweep(cfg, str(run_dir), trial=flaky)["rows"]}
    assert rows[1].status == "finished" and rows[1].evaluations == 2
    assert rows[2].status == "failed" and "forced failure of the k=2 trial" in rows[2].error
    assert "| failed |" in (run_dir / "tune" / "results.md").read_text()


def terminated_trials(experiment: Path) -> set[str]:
    ids = set()
    for state in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        ids |= {t["trial_id"] for t in (json.loads(entry[0]) for entry in data["trial_data"]) if t["status"] == "TERMINATED"}
    return ids


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_skips_the_finished_trial(prepared, tmp_path) -> None:
    run_dir = copy_of(prepared, tmp_path)
    command = [sys.executable, "-m", "pipelines.tune", "--config", str(CONFIG), "--set", f"run_dir={run_dir}",
               "--set", "ray_address=local", "--set", ONE_LAMBDA, "--set", "sweep.max_concurrent_trials=1"]
    experiment = run_dir / "tune" / "lam_0.5"
    trials = run_dir / "tune" / "trials" / "lam_0.5"

    def second_one_running() -> bool:  # the first trial is done, the second has checkpointed and is not done
        done = terminated_trials(experiment)
        return len(done) == 1 and any(t.name not in done and list(t.glob("rl/checkpoints/step_*/trainer_state.json"))
                                      and not (t / "rl" / "summary.json").exists() for t in trials.glob("*"))

    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not second_one_running() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "shared engine pool shut down" in err
    done = terminated_trials(experiment)
    assert len(done) == 1
    (finished,) = done
    metrics = trials / finished / "rl" / "metrics" / "metrics.jsonl"
    before = metrics.read_text()
    (running,) = [t.name for t in trials.glob("*") if t.name != finished]

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the Tune experiment" in second.stderr
    assert metrics.read_text() == before  # the finished trial was not run again
    rows = list(csv.DictReader((run_dir / "tune" / "results.csv").read_text().splitlines()))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert terminated_trials(experiment) == {finished, running}
    # the interrupted trial continued from its checkpoint: its start evaluation (step 0) was not run again
    records = [json.loads(line) for line in (trials / running / "rl" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "valid/reward" in r].count(0) == 1
