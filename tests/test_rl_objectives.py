"""rl.objective: the gradients of reinforce (paper eq. 9), reward_weighted (eq. 5 over D's rows) and both, each
against a hand-built autograd loss of the same policy on a toy batch (tiny Llama open engine + tiny Qwen2 closed)."""

import pytest
import torch

from haps_ray.config import CandidateConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.dataset import StoredEpisode
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.episodes import EpisodeRunner
from haps_ray.lora import use_adapters
from haps_ray.rl.cost import PriceTable
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.trainer import LocalRollouts, rl_step, rollout_advantages
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import load_problems, make_episode
from tests.helpers import FIXTURES


@pytest.fixture(scope="module")
def setup(make_tiny):
    engines = {"open": LLMEngine(*make_tiny("llama"), name="open"), "closed": LLMEngine(*make_tiny("qwen2"), name="closed")}
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    batch = problems[:2]
    cfg = make_cfg("reinforce")
    runner = EpisodeRunner({n: LocalEngineClient(e) for n, e in engines.items()}, cfg.eval_decoding,
                           PriceTable.from_candidates(cfg.candidates), cfg.reward)
    names = [c.name for c in cfg.candidates]
    zs = [(t, s) for t in range(2) for s in range(2)]
    rewards = iter([0.5, -1.0, 1.0, 0.25, -0.5, 1.0, 0.0, 0.75])
    stored = {}
    for p in batch:  # D's rows: every z run with frozen engines, with hand-set rewards
        results = runner.run([make_episode(cfg.task, p, {"teacher": names[t], "student": names[s]}) for t, s in zs])
        stored[p.id] = [StoredEpisode(z, next(rewards), r.calls) for z, r in zip(zs, results)]
    return engines, batch, stored


def make_cfg(objective: str) -> ExperimentConfig:
    cfg = ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", max_rounds=1),
        candidates=[CandidateConfig(name="open", model="tiny-llama"),
                    CandidateConfig(name="closed", model="tiny-qwen2", open_source=False)],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, init="authors"),
        # learning rates 0: the update computes its gradient and leaves the parameters as they are
        rl=RLConfig(objective=objective, batch_size=2, group_size=2, grad_clip=1e9, baseline="none", router_lr=0.0,
                    generator_lr=0.0),
    )
    cfg.reward.shaping = True  # random tiny engines score 0; shaped to -1, every rollout's advantage is non-zero
    cfg.eval_decoding.max_new_tokens = 3
    cfg.train_decoding.max_new_tokens = 3
    return cfg


def learner_gradients(cfg, engines, batch, stored):
    """The gradient the learner's update applies, and the rollouts of the step."""
    torch.manual_seed(0)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes={"open": engines["open"].info()["adapter_shapes"]})
    learner = JointLearner(policy, cfg.rl, total_steps=4)
    rollouts = LocalRollouts(cfg, {n: LocalEngineClient(e) for n, e in engines.items()})
    _, results = rl_step(learner, batch, cfg.rl, rollouts, seed=3, stored=stored)
    return policy, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, results


def episode_loglik(engines, action, calls) -> torch.Tensor:
    """Σ_t log p(y_t) over the calls on engines the action has an adapter for, through plain autograd."""
    total = torch.zeros(())
    for call in calls:
        if call.engine not in action.adapters or not call.token_ids:
            continue
        engine = engines[call.engine]
        prompt = engine.encode_prompt(call.messages)
        with use_adapters(engine.model, [action.adapters[call.engine]]):
            logits = engine.model(input_ids=torch.tensor([prompt + call.token_ids])).logits[0].float()
        logp = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(call.token_ids)[:, None])
        total = total + logp.sum()
    return total


def reference_gradients(policy, engines, terms) -> dict[str, torch.Tensor]:
    """terms: (problems, zs, weights, call lists): loss = -Σ_i weight_i (log π(z_i|x_i) + Σ_t log p_i)."""
    policy.zero_grad(set_to_none=True)
    loss = torch.zeros(())
    for problems, zs, weights, calls in terms:
        for action, w, c in zip(policy.evaluate(problems, zs), weights, calls):
            loss = loss - w * (action.log_prob + episode_loglik(engines, action, c))
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def stored_terms(batch, stored):
    rows = [(p, row) for p in batch for row in stored[p.id]]
    return ([p for p, _ in rows], [row.z for _, row in rows], [row.reward / len(rows) for _, row in rows],
            [row.calls for _, row in rows])


def rollout_terms(cfg, batch, results):
    problems = [p for p in batch for _ in range(cfg.rl.group_size)]
    group_ids = [i for i in range(len(batch)) for _ in range(cfg.rl.group_size)]
    advantages = rollout_advantages(results, group_ids, cfg.rl)
    zs = [tuple({"open": 0, "closed": 1}[r.assignment[role]] for role in cfg.task.roles) for r in results]
    return problems, zs, [a / len(results) for a in advantages], [r.calls for r in results]


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    heads = [g for n, g in got.items() if n.startswith("hypernet.")]
    router = [g for n, g in got.items() if n.startswith("router.")]
    assert max(float(g.abs().max()) for g in heads) > 1e-4 and max(float(g.abs().max()) for g in router) > 1e-4


@pytest.mark.parametrize("objective", ["reinforce", "reward_weighted", "both"])
def test_each_objective_applies_its_hand_built_gradient(setup, objective):
    engines, batch, stored = setup
    cfg = make_cfg(objective)
    policy, got, results = learner_gradients(cfg, engines, batch, stored)
    terms = []
    if objective != "reward_weighted":
        terms.append(rollout_terms(cfg, batch, results))
        assert any(w != 0 for w in terms[-1][2])  # the rollouts carry signal
    else:
        assert results == []  # eq. 5 alone runs no rollouts
    if objective != "reinforce":
        terms.append(stored_terms(batch, stored))
    assert_same(got, reference_gradients(policy, engines, terms))


def test_reward_weighted_needs_the_rows_of_d(setup):
    engines, batch, _ = setup
    cfg = make_cfg("reward_weighted")
    learner = JointLearner(HAPSPolicy.from_config(cfg, adapter_shapes={"open": engines["open"].info()["adapter_shapes"]}),
                           cfg.rl, total_steps=1)
    rollouts = LocalRollouts(cfg, {n: LocalEngineClient(e) for n, e in engines.items()})
    with pytest.raises(ValueError, match="needs the rows of D"):
        rl_step(learner, batch, cfg.rl, rollouts, seed=0)
    with pytest.raises(ValueError, match=r"no rows in D's train split"):
        rl_step(learner, batch, cfg.rl, rollouts, seed=0, stored={})
