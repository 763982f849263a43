"""The paper's ablations as trainable configurations: each variant's RL update moves exactly the parameter groups
it should (tiny real engines, real rollouts, real adapter gradients), and bad combinations fail naming the field.

    HAPS                     router.low_level true,  share_backbone true           rl.train_router true
    w/o low-level router     router.low_level false (no heads, frozen engines)     rl.train_router true
    w/o parameter sharing    share_backbone false, separate_backbone trained       rl.train_router false
    separate frozen features share_backbone false, separate_backbone frozen        rl.train_router true
"""

import pytest
import torch

from haps_ray.config import CandidateConfig, ConfigError, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.trainer import LocalRollouts, rl_step
from haps_ray.routing.policy import HAPSPolicy, check_structure
from haps_ray.tasks import load_problems
from tests.helpers import FIXTURES
from tests.test_rl_learner import CountingEngine

VARIANTS = {
    "haps": ({}, {}),
    "no_low_level": ({"low_level": False}, {}),
    "no_sharing": ({"share_backbone": False}, {"train_router": False}),
    "separate_frozen": ({"share_backbone": False, "separate_backbone": "frozen"}, {}),
}
# which of the policy's parts one update must move (every other part must stay bit-identical)
MOVES = {
    "haps": {"router", "heads"},
    "no_low_level": {"router"},
    "no_sharing": {"heads", "feature_backbone"},
    "separate_frozen": {"router", "heads"},
}


def make_learner(make_tiny, router_fields: dict, rl_fields: dict):
    cfg = ExperimentConfig(
        task=TaskConfig(name="mmlu", max_rounds=1),
        candidates=[CandidateConfig(name="a", model="tiny-llama"), CandidateConfig(name="b", model="tiny-qwen2")],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, init="authors", **router_fields),
        rl=RLConfig(router_lr=1e-3, generator_lr=1e-3, batch_size=4, baseline="none", **rl_fields),
    )
    cfg.reward.shaping = True  # random tiny engines score 0, shaped to -1: every advantage is non-zero
    cfg.train_decoding.max_new_tokens = 4
    engines = {"a": CountingEngine(LLMEngine(*make_tiny("llama"), name="a")),
               "b": CountingEngine(LLMEngine(*make_tiny("qwen2"), name="b"))}
    shapes = {name: e.engine.info()["adapter_shapes"] for name, e in engines.items()}
    torch.manual_seed(0)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes=shapes)
    learner = JointLearner(policy, cfg.rl, total_steps=4)
    rollouts = LocalRollouts(cfg, {name: LocalEngineClient(e) for name, e in engines.items()})
    return cfg, learner, rollouts, engines


def parts(policy: HAPSPolicy) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter of the policy by part, detached copies."""
    out = {"router": dict(policy.router.model.named_parameters()), "heads": dict(policy.hypernet.named_parameters()),
           "feature_backbone": dict(policy.feature_model.named_parameters()) if policy.feature_model is not None else {}}
    return {part: {k: v.detach().clone() for k, v in params.items()} for part, params in out.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_its_groups_and_no_others(make_tiny, variant):
    router_fields, rl_fields = VARIANTS[variant]
    cfg, learner, rollouts, engines = make_learner(make_tiny, router_fields, rl_fields)
    policy = learner.policy
    assert {g["name"] for g in learner.optimizer.param_groups} == MOVES[variant]
    before = parts(policy)
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    metrics, results = rl_step(learner, problems[:4], cfg.rl, rollouts, seed=0)
    assert len(results) == 4 and all(r.error is None for r in results)
    after = parts(policy)
    for part, params in before.items():
        moved = any(not torch.equal(params[k], after[part][k]) for k in params)
        if part in MOVES[variant]:
            assert moved, f"{variant}: {part} did not move"
            assert metrics[f"grad_norm/{part}"] > 0
        else:
            assert not moved, f"{variant}: {part} moved"
    if variant == "no_low_level":
        assert not before["heads"] and policy.hypernet.names == []
        assert all(not r.calls or not any(c.adapter for c in r.calls) for r in results)  # frozen engines
        assert engines["a"].grad_calls == engines["b"].grad_calls == 0
    else:
        assert engines["a"].grad_calls + engines["b"].grad_calls > 0


def test_without_low_level_router_is_trained_with_no_heads_at_all(make_tiny, tmp_path):
    _, learner, _, _ = make_learner(make_tiny, {"low_level": False}, {})
    policy = learner.policy
    actions = policy.act(["What is 2 + 2?"], mode="sample", seed=0)
    assert actions[0].adapters == {} and actions[0].log_prob.requires_grad  # the router still learns
    assert sum(p.numel() for p in policy.hypernet.parameters()) == 0
    policy.save(tmp_path / "p")
    loaded = HAPSPolicy.load(tmp_path / "p", device="cpu")
    assert loaded.cfg.low_level is False and loaded.hypernet.names == []
    assert loaded.act(["What is 2 + 2?"], mode="greedy")[0].adapters == {}


def test_frozen_router_gives_a_constant_decision_log_prob(make_tiny):
    _, learner, _, _ = make_learner(make_tiny, {"share_backbone": False}, {"train_router": False})
    action = learner.policy.act(["What is 2 + 2?"], mode="sample", seed=0)[0]
    assert not action.log_prob.requires_grad
    adapter = next(iter(action.adapters.values()))
    assert adapter.A.requires_grad  # through the heads and the trained separate backbone
    assert all(p.requires_grad for p in learner.policy.feature_model.parameters())


def test_an_init_policy_of_another_variant_is_refused(make_tiny, tmp_path):
    _, learner, _, _ = make_learner(make_tiny, {}, {})
    learner.policy.save(tmp_path / "haps")
    check_structure(tmp_path / "haps", RouterConfig())
    with pytest.raises(ValueError, match=r"router.low_level=True \(config: False\)"):
        check_structure(tmp_path / "haps", RouterConfig(low_level=False))
    with pytest.raises(ValueError, match=r"router.share_backbone=True \(config: False\)"):
        check_structure(tmp_path / "haps", RouterConfig(share_backbone=False))


@pytest.mark.parametrize("make, field", [
    (lambda: RouterConfig(low_level=False, share_backbone=False), "share_backbone"),
    (lambda: RouterConfig(separate_backbone="frozen"), "separate_backbone"),
    (lambda: RouterConfig(separate_backbone="sometimes"), "separate_backbone"),
    (lambda: RLConfig(train_router="no"), "train_router"),
    (lambda: ExperimentConfig(candidates=[CandidateConfig(name="a", model="x")], router=RouterConfig(low_level=False),
                              rl=RLConfig(train_router=False)), "rl.train_router"),
])
def test_bad_ablation_settings_fail_naming_the_field(make, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        make()
