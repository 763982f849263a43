"""Joint learner on tiny real engines: a closed candidate is routable but never adapted, generator updates
follow the advantage sign, and a checkpoint restores a learner that makes exactly the update the
uninterrupted one makes."""

import pytest
import torch

from haps_ray.checkpoint import Checkpoints, save_checkpoint
from haps_ray.config import CandidateConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.losses import generator_weights
from haps_ray.rl.rollout import trajectories
from haps_ray.rl.trainer import LocalRollouts, rl_step
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import load_problems
from haps_ray.training import TrainerState
from tests.helpers import FIXTURES


class CountingEngine:
    """Wraps a real LLMEngine and counts adapter_grads calls (to prove a closed engine is never asked)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.grad_calls = 0

    def generate(self, *args, **kwargs):
        return self.engine.generate(*args, **kwargs)

    def score(self, *args, **kwargs):
        return self.engine.score(*args, **kwargs)

    def adapter_grads(self, *args, **kwargs):
        self.grad_calls += 1
        return self.engine.adapter_grads(*args, **kwargs)


def make_setup(make_tiny, seed: int = 0):
    cfg = ExperimentConfig(
        seed=seed,
        task=TaskConfig(name="mmlu", max_rounds=1),
        candidates=[CandidateConfig(name="open", model="tiny-llama"),
                    CandidateConfig(name="closed", model="tiny-qwen2", open_source=False)],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, init="authors"),
        rl=RLConfig(router_lr=1e-3, generator_lr=1e-3, batch_size=4, group_size=2, baseline="none"),
    )
    cfg.reward.shaping = True  # random tiny engines score 0; shaped to -1 the raw-reward advantage is never 0
    cfg.eval_decoding.max_new_tokens = 4
    cfg.train_decoding.max_new_tokens = 4
    engines = {
        "open": CountingEngine(LLMEngine(*make_tiny("llama"), name="open")),
        "closed": CountingEngine(LLMEngine(*make_tiny("qwen2"), name="closed")),
    }
    shapes = {"open": engines["open"].engine.info()["adapter_shapes"]}
    torch.manual_seed(seed)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes=shapes)
    learner = JointLearner(policy, cfg.rl, total_steps=10)
    rollouts = LocalRollouts(cfg, {name: LocalEngineClient(engine) for name, engine in engines.items()})
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    return cfg, engines, learner, rollouts, problems


def params(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for group in learner.optimizer.param_groups for p in group["params"]]


def test_closed_candidate_is_routed_to_but_never_adapted(make_tiny):
    cfg, engines, learner, rollouts, problems = make_setup(make_tiny)
    assert learner.policy.hypernet.names == ["open"]
    batch = problems[:8]
    plans = learner.propose([p for p in batch for _ in range(2)], mode="sample", seed=3)
    closed_index = 1
    assert any(closed_index in p.assignment for p in plans), "the closed candidate must be routable"
    assert all("closed" not in p.adapters for p in plans)
    results = rollouts.run([p for p in batch for _ in range(2)], plans, 0, "train")
    closed_calls = [c for r in results for c in r.calls if c.engine == "closed"]
    assert closed_calls and not any(c.adapter for c in closed_calls)
    grads = rollouts.gradients(trajectories(results), plans, [1.0] * len(results))
    assert all("closed" not in g for g in grads)
    assert engines["closed"].grad_calls == 0 and engines["open"].grad_calls == 1
    opened = [g["open"] for g in grads if "open" in g]
    assert opened and all(float(dA.abs().sum() + dB.abs().sum()) > 0 for dA, dB in opened)


def test_update_moves_router_and_heads(make_tiny):
    cfg, _, learner, rollouts, problems = make_setup(make_tiny)
    before = params(learner)
    metrics, results = rl_step(learner, problems[:4], cfg.rl, rollouts, seed=0)
    assert len(results) == 8 and learner.step == 1
    assert metrics["grad_norm/router"] > 0 and metrics["grad_norm/heads"] > 0
    heads = [p for p in learner.policy.hypernet.parameters()]
    moved = [not torch.equal(a, b) for a, b in zip(before, params(learner))]
    assert any(moved[-len(heads):]) and any(moved[: -len(heads)])


def test_resume_from_checkpoint_reproduces_next_update(make_tiny, tmp_path):
    cfg, _, learner, rollouts, problems = make_setup(make_tiny)
    rl_step(learner, problems[:4], cfg.rl, rollouts, seed=0)
    ckpts = Checkpoints(tmp_path)
    save_checkpoint(ckpts.step(1), lambda path: learner.save(str(path)), cfg, {}, TrainerState(step=1))
    uninterrupted, _ = rl_step(learner, problems[4:8], cfg.rl, rollouts, seed=1)
    expected = params(learner)

    cfg2, _, fresh, rollouts2, _ = make_setup(make_tiny, seed=0)
    assert ckpts.latest() == tmp_path / "checkpoints" / "step_1"
    fresh.restore(str(ckpts.latest()))
    assert fresh.step == 1
    resumed, _ = rl_step(fresh, problems[4:8], cfg2.rl, rollouts2, seed=1)
    assert resumed["train/reward"] == pytest.approx(uninterrupted["train/reward"])
    for a, b in zip(expected, params(fresh)):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_generator_updates_follow_the_advantage_sign(make_tiny):
    """Positive advantage raises the log-likelihood of a rollout's own completion under its new adapter,
    negative lowers it: the engines' vector-Jacobian products and the learner's chain rule agree in sign."""
    cfg, engines, learner, rollouts, problems = make_setup(make_tiny)
    batch = problems[:4]
    open_only = [(0, 0)] * len(batch)  # both roles on the open engine, so every call carries an adapter
    plans = learner.plans_for(batch, open_only)
    results = rollouts.run(batch, plans, 1, "train")
    advantages = [1.0, -1.0, 1.0, -1.0]
    weights = generator_weights(advantages)

    def completion_log_probs(current):
        out = []
        for result, plan in zip(results, current):
            calls = [c for c in result.calls if c.adapter]
            scores = engines["open"].engine.score([c.messages for c in calls], [c.token_ids for c in calls],
                                                  [plan.adapters["open"]] * len(calls))
            out.append(sum(sum(s) for s in scores))
        return out

    before = completion_log_probs(plans)
    current = plans
    for _ in range(3):
        learner.update(batch, open_only, advantages, rollouts.gradients(trajectories(results), current, weights))
        current = learner.plans_for(batch, open_only)
    after = completion_log_probs(current)
    for a, b, adv in zip(after, before, advantages):
        assert (a - b) * adv > 0, (before, after)


def test_rl_trains_and_evaluates_on_the_configured_subset_of_d_s_problems():
    from haps_ray.config import config_from_dict
    from pipelines.train import rl_splits

    source = str(FIXTURES / "mmlu_small.jsonl")
    base = {"candidates": [{"name": "a", "model": "tiny-llama"}], "task": {"train_path": source, "valid_path": source,
                                                                             "n_train": 6, "n_valid": 4}}
    full_train, full_valid = rl_splits(config_from_dict(base))
    assert (len(full_train), len(full_valid)) == (6, 4)
    train, valid = rl_splits(config_from_dict({**base, "rl": {"n_train": 3, "n_valid": 2}}))
    assert (len(train), len(valid)) == (3, 2)
    assert {p.id for p in train} < {p.id for p in full_train} and {p.id for p in valid} < {p.id for p in full_valid}
