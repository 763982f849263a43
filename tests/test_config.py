"""Config mapping: YAML onto pydantic models 1:1, checked on construction and assignment, errors that name the field."""

import copy
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from haps_ray.config import (
    CandidateConfig, ConfigError, DatasetConfig, ExperimentConfig, RetrieverConfig, RLConfig, RouterConfig, TaskConfig,
    config_from_dict, describe_config, from_dict, load_config, save_config,
)

ROOT = Path(__file__).resolve().parent.parent
# dataset.splits defaults to [train, valid]; the pipelines that read them need their paths
BASE = {"candidates": [{"name": "a", "model": "tiny-llama"}, {"name": "b", "model": "tiny-qwen2"}],
        "task": {"train_path": "train.jsonl", "valid_path": "valid.jsonl"}}


def with_(**sections):
    """BASE with each given section merged into BASE's section of that name (or replacing a non-mapping)."""
    data = copy.deepcopy(BASE)
    for name, value in sections.items():
        data[name] = {**data[name], **value} if isinstance(data.get(name), dict) and isinstance(value, dict) else value
    return data


def test_defaults_and_nested_sections():
    cfg = config_from_dict(with_(rl={"router_lr": 1e-5}, task={"name": "hotpotqa"}))
    assert cfg.rl.router_lr == 1e-5 and cfg.rl.generator_lr == 1e-5
    assert cfg.task.name == "hotpotqa"
    assert cfg.train_decoding.temperature == 1.0 and cfg.train_decoding.top_p == 0.9
    assert cfg.eval_decoding.temperature == 0.0
    assert [c.name for c in cfg.candidates] == ["a", "b"]


@pytest.mark.parametrize(
    "data, field",
    [
        (with_(rl={"router_lrr": 1.0}), "rl.router_lrr"),
        (with_(rl={"router_lr": "fast"}), "rl.router_lr"),
        (with_(rl={"epochs": 1.5}), "rl.epochs"),
        (with_(task={"name": "gsm8k"}), "task.name"),
        (with_(reward={"lam": 1.5}), "reward.lam"),
        (with_(rl={"baseline": "leave_one_out", "group_size": 1}), "rl.baseline"),
        ({"candidates": [{"name": "a"}]}, "candidates[0].model"),
        ({"candidates": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, "candidates"),
        ({"candidates": []}, "candidates"),
        (with_(router={"share_backbone": "yes"}), "router.share_backbone"),
        (with_(candidates=[{"name": "a", "model": "x", "dtype": "int3"}]), "candidates[0].dtype"),
        # each bound names its own field, not a neighbour checked in the same breath
        (with_(candidates=[{"name": "a", "model": "x", "price_out": -1}]), "candidates[0].price_out"),
        (with_(candidates=[{"name": "a", "model": "x", "num_gpus": -1}]), "candidates[0].num_gpus"),
        (with_(rl={"learner_num_gpus": -1}), "rl.learner_num_gpus"),
        (with_(rl={"generator_lr": -1}), "rl.generator_lr"),
        (with_(rl={"patience": 0}), "rl.patience"),
        (with_(rl={"group_size": 0}), "rl.group_size"),
        (with_(router={"mlp_layers": 0}), "router.mlp_layers"),
        (with_(task={"n_test": -1}), "task.n_test"),
        # enumerated strings
        (with_(router={"device": "tpu"}), "router.device"),
        (with_(retriever={"device": "tpu"}), "retriever.device"),
        (with_(router={"dtype": "int8"}), "router.dtype"),
        (with_(retriever={"pooling": "max"}), "retriever.pooling"),
        (with_(dataset={"tie_policy": "last"}), "dataset.tie_policy"),
        (with_(dataset={"balance": "smote"}), "dataset.balance"),
        (with_(router={"init": "xavier"}), "router.init"),
        (with_(reward={"metric": "bleu"}), "reward.metric"),
        (with_(dataset={"splits": ["train", "dev"]}), "dataset.splits[1]"),
        (with_(dataset={"splits": ["train", "train"]}), "dataset.splits"),
        (with_(rl={"objective": "ppo"}), "rl.objective"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
        config_from_dict(data)


def test_overrides_are_yaml_parsed():
    cfg = config_from_dict(BASE, overrides=["rl.epochs=7", "reward.lam=0.5", "router.share_backbone=false"])
    assert cfg.rl.epochs == 7 and cfg.reward.lam == 0.5 and cfg.router.share_backbone is False
    with pytest.raises(ConfigError, match="rl.nope"):
        config_from_dict(BASE, overrides=["rl.nope=1"])


def test_yaml_round_trip(tmp_path):
    cfg = config_from_dict(with_(reward={"lam": 0.2}))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("candidates: [{name: a, model: x}]\nsft: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: sft.lr"):
        load_config(path)


def test_every_field_is_documented():
    rows = describe_config()
    undocumented = [name for name, _, help_text in rows if not help_text]
    assert not undocumented
    assert any(name == "candidates[].price_in" for name, _, _ in rows)


def test_readme_config_reference_is_current():
    # PYTHONPATH: this checkout's package, even where another checkout is the one installed (a git worktree)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "scripts/readme_reference.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: CandidateConfig(name="a", model="x", price_out=-1), "price_out"),
        (lambda: CandidateConfig(name="a", model="x", price_in=-1), "price_in"),
        (lambda: CandidateConfig(name="a", model="x", num_gpus=-1), "num_gpus"),
        (lambda: CandidateConfig(name="a", model="x", num_cpus=-1), "num_cpus"),
        (lambda: CandidateConfig(name="a", model="x", device="tpu"), "device"),
        (lambda: CandidateConfig(name="a"), "model"),
        (lambda: RLConfig(learner_num_cpus=-1), "learner_num_cpus"),
        (lambda: RLConfig(eval_every_questions=0), "eval_every_questions"),
        (lambda: RLConfig(batch_size=0), "batch_size"),
        (lambda: RLConfig(baseline="leave_one_out"), "baseline"),
        (lambda: RouterConfig(hidden=0), "hidden"),
        (lambda: RetrieverConfig(device="tpu"), "device"),
        (lambda: TaskConfig(n_train=-1), "n_train"),
    ],
)
def test_configs_built_in_code_are_validated(make, field):
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ":"):
        make()


def test_assignment_is_validated():
    cfg = config_from_dict(BASE)
    with pytest.raises(ConfigError, match="^router_lr:"):
        cfg.rl.router_lr = -1
    assert cfg.rl.router_lr == 1e-6  # a rejected value is not kept
    with pytest.raises(ConfigError, match="^share_backbone:"):
        cfg.router.share_backbone = "yes"
    with pytest.raises(ConfigError, match="^candidates:"):
        cfg.candidates = []
    with pytest.raises(ConfigError, match="^candidates: names must be unique"):
        cfg.candidates = [CandidateConfig(name="a", model="x")] * 2  # assigning a field re-checks the cross-field rules
    assert [c.name for c in cfg.candidates] == ["a", "b"]


def test_a_stage_refuses_splits_without_a_path_but_a_config_for_a_policy_needs_none():
    assert ExperimentConfig(candidates=[CandidateConfig(name="a", model="x")])  # holds a policy or a learner: no data
    cfg = config_from_dict(with_(dataset={"splits": ["train", "valid", "test"]}))
    with pytest.raises(ConfigError, match=r"^dataset.splits: split 'test' needs task.test_path"):
        cfg.require_splits(cfg.dataset.splits, "dataset.splits")
    cfg = config_from_dict(with_(dataset={"splits": ["train", "valid", "test"]}, task={"test_path": "test.jsonl"}))
    cfg.require_splits(cfg.dataset.splits, "dataset.splits")
    only_train = config_from_dict({"candidates": BASE["candidates"], "task": {"train_path": "t"}})
    only_train.require_splits(["train"], "task")
    with pytest.raises(ConfigError, match=r"^task: split 'valid' needs task.valid_path"):
        only_train.require_splits(["train", "valid"], "task")


@pytest.mark.parametrize(
    "section, value, accepted",
    [
        ({"rl": {"epochs": True}}, None, False),        # a boolean is not an integer
        ({"rl": {"epochs": 1.5}}, None, False),         # nor is a fraction
        ({"rl": {"epochs": "2"}}, None, False),         # nor a string
        ({"rl": {"router_lr": "fast"}}, None, False),   # a string is not a number
        ({"rl": {"router_lr": True}}, None, False),     # nor is a boolean
        ({"rl": {"router_lr": float("inf")}}, None, False),
        ({"router": {"share_backbone": "yes"}}, None, False),
        ({"router": {"share_backbone": 1}}, None, False),
        ({"task": {"roles": "teacher"}}, None, False),  # a string is not a list
        ({"task": {"seed": None}}, None, False),
        ({"rl": {"router_lr": 1}}, ("rl", "router_lr", 1.0), True),  # an integer is a number
        ({"rl": {"epochs": 2}}, ("rl", "epochs", 2), True),
        ({"router": {"share_backbone": False}}, ("router", "share_backbone", False), True),
    ],
)
def test_types_are_strict(section, value, accepted):
    if not accepted:
        with pytest.raises(ConfigError):
            config_from_dict(with_(**section))
        return
    cfg = config_from_dict(with_(**section))
    name, field, expected = value
    got = getattr(getattr(cfg, name), field)
    assert got == expected and type(got) is type(expected)


def test_every_error_on_one_line():
    with pytest.raises(ConfigError) as err:
        config_from_dict(with_(rl={"router_lr": -1, "patience": 0}, sft={"lr": 0}))
    assert "\n" not in str(err.value)
    assert [part.split(":")[0] for part in str(err.value).split("; ")] == ["sft.lr", "rl.router_lr", "rl.patience"]


def test_from_dict_names_where():
    assert from_dict(RouterConfig, {"lora_rank": 4}, "router").lora_rank == 4
    with pytest.raises(ConfigError, match=r"^router.device: .*'tpu'"):
        from_dict(RouterConfig, {"device": "tpu"}, "router")
    with pytest.raises(ConfigError, match=r"^router.nope: unknown field"):
        from_dict(RouterConfig, {"nope": 1}, "router")
    with pytest.raises(ConfigError, match=r"^router: "):
        from_dict(RouterConfig, [1], "router")


def test_configs_pickle_and_compare():
    cfg = config_from_dict(with_(dataset=DatasetConfig(splits=["train"]).model_dump()))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg != config_from_dict(with_(rl={"epochs": 9}))


def test_overrides_do_not_touch_the_callers_mapping():
    data = with_()
    config_from_dict(data, overrides=["task.n_train=5"])
    assert data == with_()


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("rl:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line \d+") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_reference_shows_section_defaults_of_the_parent():
    rows = {name: default for name, default, _ in describe_config()}
    assert rows["train_decoding.temperature"] == "1.0" and rows["eval_decoding.temperature"] == "0.0"
    assert rows["candidates[].name"] == "'(required)'" and rows["rl.objective"] == "'reinforce'"


def test_tune_configs_load():
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        load_config(path)


def run_cli(tmp_path: Path, config: dict) -> tuple[subprocess.CompletedProcess, Path, float]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipelines.build_dataset", "--config", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result, path, time.monotonic() - started


def assert_one_clean_line(result: subprocess.CompletedProcess, path: Path, seconds: float, *names: str) -> None:
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert all(name in lines[0] for name in names), lines[0]
    # the config is checked before Ray starts: no start-up lines, and none of its seconds of start-up
    assert "Ray" not in result.stdout + result.stderr and "ray.init" not in result.stdout + result.stderr
    assert seconds < 60  # the imports only


def test_cli_reports_a_bad_field_in_one_line(tmp_path):
    result, path, seconds = run_cli(tmp_path, with_(rl={"router_lr": -1}))
    assert_one_clean_line(result, path, seconds, "rl.router_lr")


def test_cli_reports_a_cross_field_error_in_one_line(tmp_path):
    result, path, seconds = run_cli(tmp_path, with_(dataset={"splits": ["train", "valid", "test"]}))
    assert_one_clean_line(result, path, seconds, "dataset.splits", "task.test_path")
