"""The configs that mirror the paper (tune_configs/{hotpotqa,mmlu}_*.yaml and their sweeps) use the paper's or the
authors' setting wherever the project offers both."""

import pytest

from haps_ray.config import load_config
from tests.helpers import FIXTURES

ROOT = FIXTURES.parent.parent

PAPER = sorted((ROOT / "tune_configs").glob("hotpotqa_*.yaml")) + sorted((ROOT / "tune_configs").glob("mmlu_*.yaml"))
PAPER_SWEEPS = sorted(p for p in (ROOT / "tune_configs").glob("sweep_*.yaml") if "offline" not in p.name)


def test_there_are_paper_configs_and_sweeps():
    assert len(PAPER) >= 6 and len(PAPER_SWEEPS) == 6


@pytest.mark.parametrize("path", PAPER + PAPER_SWEEPS, ids=lambda p: p.name)
def test_reinforce_log_probs_are_under_the_sampling_nucleus(path):
    cfg = load_config(path)
    assert cfg.rl.logprob_support == "nucleus" and cfg.train_decoding.top_p < 1


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=lambda p: p.name)
def test_depth_sweeps_share_one_adapter_across_the_k_layers(path):
    cfg = load_config(path)
    assert "router.lora_layers" in cfg.sweep.space and cfg.router.per_layer_adapters is False


@pytest.mark.parametrize("path", [p for p in PAPER + PAPER_SWEEPS if "hotpotqa" in p.name], ids=lambda p: p.name)
def test_hotpotqa_runs_the_papers_turn_order(path):
    assert load_config(path).task.protocol_order == "paper"
