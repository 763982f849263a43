"""HierRouter trained by RLlib's PPO (new API stack, env runners on the session's local Ray) on the synthetic topic D:
it learns to route held-out problems; the plain-torch policy equals RLlib's module; the PPO config fields act."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from actors.hierrouter import RLlibPPOTrainer, copy_actor, ppo_config
from haps_ray.baselines import load
from haps_ray.baselines.hierrouter import HierRouter, PolicyNet, env_config
from haps_ray.baselines.embeddings import QueryEncoder
from haps_ray.config import BaselinesConfig

from tests.baselines_synthetic import make_problems
from tests.test_baselines import synthetic

MAX_ITERATIONS = 20  # the bound on PPO iterations within which HierRouter must reach the bar


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    encoder = QueryEncoder("all-minilm-l6-v2")
    splits = {"train": make_problems(120, 0), "valid": make_problems(40, 1, 1000), "test": make_problems(80, 2, 2000)}
    return synthetic(encoder, splits, 0.2)


@pytest.mark.slow
def test_hierrouter_ppo_beats_random_and_reaches_08_of_oracle(ray_session, data, tmp_path):
    spec, _, d = data
    cfg = BaselinesConfig(ppo_iterations=MAX_ITERATIONS, ppo_env_runners=1)
    router = HierRouter(spec, cfg, seed=0, trainer=RLlibPPOTrainer())
    summary = router.fit(d["train"], d["valid"])
    assert summary["iterations"] == MAX_ITERATIONS and summary["env_runners"] == 1
    test = d["test"]
    zs = router.route_embeddings(test.embeddings)
    reward = test.routed_reward(torch.tensor([spec.assignments.index(z) for z in zs]))
    assert reward > float(test.reward.mean())
    assert reward >= 0.8 * test.oracle_reward(), (reward, test.oracle_reward(), summary["history"])
    router.save(str(tmp_path / "hier"))
    assert load(str(tmp_path / "hier")).route_embeddings(test.embeddings) == zs


def test_policy_net_equals_the_rllib_module_and_ppo_fields_take_effect(ray_session, data):
    spec, _, d = data
    cfg = BaselinesConfig(ppo_iterations=2, ppo_env_runners=0, ppo_train_batch=32, ppo_lr=0.0, hidden=16)
    algo = ppo_config(env_config(d["train"], spec, cfg), cfg, seed=0).build_algo()
    try:
        module = algo.get_module()
        policy = HierRouter(spec, cfg).build(d["train"].embeddings.shape[1], d["train"].z_embeddings)
        assert isinstance(policy, PolicyNet)
        copy_actor(module, policy)
        obs = torch.from_numpy(np.random.default_rng(0).normal(size=(7, policy.linears[0].in_features)).astype(np.float32))
        expected = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
        torch.testing.assert_close(policy(obs), expected)
    finally:
        algo.stop()
    # lr 0: PPO never moves the weights, so no iteration beats the initial policy on valid
    router = HierRouter(spec, cfg, seed=0, trainer=RLlibPPOTrainer())
    summary = router.fit(d["train"], d["valid"])
    assert summary["iterations"] == 2 and summary["env_runners"] == 0 and summary["env_steps"] == 2 * 32
    assert summary["best_iteration"] == 0 and len({h["valid_reward"] for h in summary["history"]}) == 1
