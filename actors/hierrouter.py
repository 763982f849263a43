"""HierRouter's PPO on RLlib's new API stack: `RoutingEnv` sampled by env-runner actors on the (local) Ray.

A thin shell over the core (`haps_ray.baselines.hierrouter`): it builds a `PPOConfig` for the environment, runs the
iterations, copies the actor network of RLlib's default PPO module into the core's `PolicyNet` after each one,
scores it on valid (from D) and keeps the best. No RLlib action masking: the environment masks by itself.

    router = HierRouter(spec, cfg.baselines, seed, trainer=RLlibPPOTrainer())
    router.fit(train, valid)             # needs ray.init() first
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModule
from torch import nn

from haps_ray.baselines.hierrouter import PolicyNet, RoutingEnv
from haps_ray.config import BaselinesConfig

logger = logging.getLogger(__name__)

MINIBATCH, EPOCHS = 64, 4  # PPO's SGD: minibatches of 64 steps, 4 passes over each iteration's batch


def ppo_config(env_config: dict[str, Any], cfg: BaselinesConfig, seed: int) -> PPOConfig:
    """The PPO algorithm config: gamma 1 (the only reward is terminal), the core's MLP shape, no action masking."""
    return (
        PPOConfig()
        .environment(RoutingEnv, env_config=env_config)
        .env_runners(num_env_runners=cfg.ppo_env_runners, num_envs_per_env_runner=1, num_cpus_per_env_runner=1)
        .training(lr=cfg.ppo_lr, gamma=1.0, train_batch_size_per_learner=cfg.ppo_train_batch,
                  minibatch_size=min(MINIBATCH, cfg.ppo_train_batch), num_epochs=EPOCHS, entropy_coeff=0.01)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[cfg.hidden, cfg.hidden], fcnet_activation="tanh",
                                                   head_fcnet_hiddens=[], vf_share_layers=False))
        .debugging(seed=seed)
    )


def actor_linears(module: RLModule) -> list[nn.Linear]:
    """The Linear layers of the default PPO module's policy path (actor encoder, then pi head), in order."""
    layers = [m for m in module.encoder.actor_encoder.modules() if isinstance(m, nn.Linear)]
    return layers + [m for m in module.pi.modules() if isinstance(m, nn.Linear)]


def copy_actor(module: RLModule, policy: PolicyNet) -> None:
    """Load the RLlib module's actor weights into `policy` (same shapes by construction, checked)."""
    source, target = actor_linears(module), policy.linears
    if [tuple(s.weight.shape) for s in source] != [tuple(t.weight.shape) for t in target]:
        raise ValueError(f"RLlib actor layers {[tuple(s.weight.shape) for s in source]} do not match PolicyNet "
                         f"{[tuple(t.weight.shape) for t in target]}")
    with torch.no_grad():
        for s, t in zip(source, target):
            t.weight.copy_(s.weight)
            t.bias.copy_(s.bias)


class RLlibPPOTrainer:
    """`haps_ray.baselines.hierrouter.PPOTrainer` on RLlib (ray must be initialised)."""

    def train(self, env_config: dict[str, Any], cfg: BaselinesConfig, seed: int, policy: PolicyNet,
              evaluate: Callable[[], float]) -> dict[str, Any]:
        algo = ppo_config(env_config, cfg, seed).build_algo()
        try:
            runners = algo.env_runner_group.num_remote_env_runners()
            copy_actor(algo.get_module(), policy)
            best, best_iteration = evaluate(), 0
            best_state = {k: v.clone() for k, v in policy.state_dict().items()}
            history = []
            for iteration in range(1, cfg.ppo_iterations + 1):
                result = algo.train()
                copy_actor(algo.get_module(), policy)
                reward = evaluate()
                returns = result["env_runners"].get("episode_return_mean")
                history.append({"iteration": iteration, "valid_reward": reward,
                                "episode_return_mean": None if returns is None else float(returns),
                                "env_steps": int(result.get("num_env_steps_sampled_lifetime") or 0)})
                if reward > best:
                    best, best_iteration = reward, iteration
                    best_state = {k: v.clone() for k, v in policy.state_dict().items()}
        finally:
            algo.stop()
        policy.load_state_dict(best_state)
        logger.info("HierRouter PPO: %d iterations on %d env runners, best valid reward %.4f at iteration %d",
                    cfg.ppo_iterations, runners, best, best_iteration)
        return {"valid_reward": best, "best_iteration": best_iteration, "iterations": len(history),
                "env_runners": runners, "env_steps": history[-1]["env_steps"] if history else 0,
                "history": history}
