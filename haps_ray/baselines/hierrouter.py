"""HierRouter: PPO over a sequence of routing decisions, here one decision per agent role.

Paper: "HierRouter: Coordinated Routing of Specialized Large Language Models via Reinforcement Learning" (arXiv
2511.09873). It routes a query through a sequence of decisions, one model per step, as a finite-horizon MDP whose
state holds the query and the choices made so far, trained with PPO on the final outcome.

The one change for two roles: the sequence is the K roles in routing order (`task.roles`): step k chooses role k's
candidate; the state is the query embedding plus the one-hot choices so far and the step; the episode ends after K
steps with the reward D holds for (problem, z) under HAPS's reward (λ applied on read). Choices that leave no
assignment D holds for the problem are masked inside the environment (the episode ends with
`baselines.invalid_penalty`), not by RLlib action masking. Training: RLlib's PPO on the new API stack with env
runners on the local Ray (`actors/hierrouter.py`, injected as `trainer`: the core library does not import Ray);
the policy's actor network is then copied into `PolicyNet` (plain torch), which routes greedily, step by step.
Valid selects the iteration.

    env = RoutingEnv(env_config(train, spec, cfg.baselines))     # a gymnasium.Env over D's train rows
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from haps_ray.baselines.base import BaselineRouter, RouterSpec, RoutingData
from haps_ray.config import BaselinesConfig

logger = logging.getLogger(__name__)


def observation(embedding: np.ndarray, prefix: Sequence[int], num_candidates: int, num_roles: int) -> np.ndarray:
    """[embedding (d), one-hot choices so far (K·M), one-hot step (K)] as float32."""
    choices = np.zeros((num_roles, num_candidates), np.float32)
    for k, c in enumerate(prefix):
        choices[k, c] = 1.0
    step = np.zeros(num_roles, np.float32)
    step[min(len(prefix), num_roles - 1)] = 1.0
    return np.concatenate([embedding.astype(np.float32), choices.ravel(), step])


def env_config(data: RoutingData, spec: RouterSpec, cfg: BaselinesConfig) -> dict[str, Any]:
    """What `RoutingEnv` needs, as plain arrays (it travels to RLlib's env-runner actors)."""
    return {"embeddings": data.embeddings.numpy(), "reward": data.reward.numpy(), "available": data.available.numpy(),
            "num_candidates": len(spec.candidates), "num_roles": len(spec.roles), "invalid_penalty": cfg.invalid_penalty}


class RoutingEnv(gym.Env):
    """One episode = one train problem drawn uniformly; K steps, one candidate per role; terminal reward from D."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.embeddings = np.asarray(config["embeddings"], np.float32)
        self.reward = np.asarray(config["reward"], np.float64)
        self.available = np.asarray(config["available"], bool)
        self.m, self.k = int(config["num_candidates"]), int(config["num_roles"])
        self.penalty = float(config["invalid_penalty"])
        if self.available.shape != (len(self.embeddings), self.m ** self.k):
            raise ValueError(f"available has shape {self.available.shape}, expected ({len(self.embeddings)}, {self.m ** self.k})")
        dim = self.embeddings.shape[1] + self.k * self.m + self.k
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.action_space = gym.spaces.Discrete(self.m)
        self.problem, self.prefix = 0, []

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.problem = int(self.np_random.integers(len(self.embeddings))) if not options else int(options["problem"])
        self.prefix = []
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        return observation(self.embeddings[self.problem], self.prefix, self.m, self.k)

    def allowed(self) -> np.ndarray:
        """(M,) bool: choices for the current role that keep some assignment D holds for this problem reachable."""
        rest = self.k - len(self.prefix) - 1
        base = 0
        for c in self.prefix:
            base = base * self.m + c
        out = np.zeros(self.m, bool)
        for a in range(self.m):
            lo = (base * self.m + a) * self.m ** rest
            out[a] = self.available[self.problem, lo:lo + self.m ** rest].any()
        return out

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = int(action)
        if not self.allowed()[action]:
            # masked here rather than by RLlib action masking: the episode ends with the penalty
            return self._obs(), self.penalty, True, False, {"invalid": True}
        self.prefix.append(action)
        if len(self.prefix) < self.k:
            return self._obs(), 0.0, False, False, {}
        index = 0
        for c in self.prefix:
            index = index * self.m + c
        return self._obs(), float(self.reward[self.problem, index]), True, False, {"z_index": index}


class PolicyNet(nn.Module):
    """PPO's actor network (RLlib's default MLP encoder, tanh, then a linear logits head) in plain torch."""

    def __init__(self, obs_dim: int, hidden: Sequence[int], num_actions: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, num_actions))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)  # (N, M) logits

    @property
    def linears(self) -> list[nn.Linear]:
        return [m for m in self.net if isinstance(m, nn.Linear)]


class PPOTrainer(Protocol):
    """Trains a `PolicyNet` on `RoutingEnv` (RLlib's PPO in `actors.hierrouter.RLlibPPOTrainer`)."""

    def train(self, env_config: dict[str, Any], cfg: BaselinesConfig, seed: int, policy: PolicyNet,
              evaluate: Callable[[], float]) -> dict[str, Any]:
        """Run `cfg.ppo_iterations` iterations, load the best-on-valid actor weights into `policy` (`evaluate` scores
        the weights `policy` holds), and return a summary."""


class HierRouter(BaselineRouter):
    name = "hierrouter"

    def __init__(self, spec: RouterSpec, cfg: BaselinesConfig, seed: int = 0, trainer: PPOTrainer | None = None) -> None:
        super().__init__(spec, cfg, seed)
        self.trainer = trainer

    def build(self, query_dim: int, z_embeddings: torch.Tensor) -> nn.Module:
        m, k = len(self.spec.candidates), len(self.spec.roles)
        return PolicyNet(query_dim + k * m + k, [self.cfg.hidden, self.cfg.hidden], m)

    def _logits(self, embeddings: torch.Tensor, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        m, k = len(self.spec.candidates), len(self.spec.roles)
        obs = np.stack([observation(e, p, m, k) for e, p in zip(embeddings.numpy(), prefixes)])
        return self.model(torch.from_numpy(obs))

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, Z) log π(z|q) = Σ_k log π(z_k | q, z_<k)."""
        out = torch.zeros(len(embeddings), len(self.spec.assignments))
        for j, z in enumerate(self.spec.assignments):
            for k in range(len(z)):
                logp = self._logits(embeddings, [z[:k]] * len(embeddings)).log_softmax(dim=-1)
                out[:, j] += logp[:, z[k]]
        return out

    def choose(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Greedy, one role after the other (how a sequential policy routes)."""
        m = len(self.spec.candidates)
        prefixes: list[list[int]] = [[] for _ in range(len(embeddings))]
        for _ in self.spec.roles:
            picks = self._logits(embeddings, prefixes).argmax(dim=-1).tolist()
            for p, a in zip(prefixes, picks):
                p.append(int(a))
        index = torch.zeros(len(embeddings), dtype=torch.long)
        for k in range(len(self.spec.roles)):
            index = index * m + torch.tensor([p[k] for p in prefixes], dtype=torch.long)
        return index

    def fit(self, train: RoutingData, valid: RoutingData) -> dict[str, Any]:
        if self.trainer is None:
            raise ValueError("HierRouter.fit needs a PPO trainer (actors.hierrouter.RLlibPPOTrainer on a running Ray)")
        policy = self._fresh(train)
        policy.eval()
        summary = self.trainer.train(env_config(train, self.spec, self.cfg), self.cfg, self.seed, policy,
                                     lambda: self.valid_reward(valid))
        self.summary = {"router": self.name, **summary, "valid_oracle": valid.oracle_reward(),
                        "train_problems": len(train), "valid_problems": len(valid)}
        logger.info("%s: best valid reward %.4f at iteration %s (oracle %.4f)", self.name, summary["valid_reward"],
                    summary.get("best_iteration"), self.summary["valid_oracle"])
        return self.summary
