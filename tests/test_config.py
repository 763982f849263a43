"""Config mapping: YAML onto dataclasses 1:1, errors that name the field."""

import re

import pytest

from haps_ray.config import ConfigError, ExperimentConfig, config_from_dict, describe_config, load_config, save_config

BASE = {"candidates": [{"name": "a", "model": "tiny-llama"}, {"name": "b", "model": "tiny-qwen2"}]}


def with_(**sections):
    data = {**BASE}
    data.update(sections)
    return data


def test_defaults_and_nested_sections():
    cfg = config_from_dict(with_(rl={"router_lr": 1e-5}, task={"name": "hotpotqa"}))
    assert isinstance(cfg, ExperimentConfig)
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
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "scripts/readme_reference.py", "--check"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
