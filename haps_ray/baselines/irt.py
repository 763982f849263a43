"""IRT-Router's multidimensional IRT (MIRT) router, over teams instead of single models.

Paper: Song et al., "IRT-Router: Effective and Interpretable Multi-LLM Routing via Item Response Theory" (ACL 2025,
arXiv 2506.01048), the MIRT variant. A query q has a discrimination vector a_q and a difficulty b_q, both read off
its embedding; a model m has an ability vector θ_m read off the embedding of its textual descriptor; the probability
that m answers q well is P(q, m) = σ(a_q · θ_m − b_q), fitted by binary cross-entropy on observed performance. The
router picks the model maximising (1 − λ)·P − λ·cost. Its cold-start warm-up: a new query's embedding is mixed with
the mean embedding of its k most similar training queries, (1 − w)·e_q + w·mean(kNN), before a_q and b_q are read.

The one change for two roles: the "models" are the teams z ∈ Z = M^K; θ_z is read off the embedding of the team's
descriptor ("teacher: <name> (<description>); student: ..." from `router.candidate_descriptions`). The utility is
HAPS's reward in expectation: (1 − λ)·E[shape(perf)] − λ·Ĉ_z, with Ĉ_z the team's mean normalised train cost and
E[shape] = 2P − 1 under the paper's shaping (−1 for a zero score; exact for 0/1 accuracy), P otherwise. λ comes
from `reward.lam` (λ = 0 removes cost, as the HAPS paper sets it). Warm-up: `baselines.irt_warmup_k` and
`irt_warmup_weight`. Valid selects the epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from haps_ray.baselines.base import BaselineRouter, RoutingData

LR = 3e-3


class MIRT(nn.Module):
    def __init__(self, query_dim: int, z_embeddings: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.register_buffer("z_text", z_embeddings.clone())  # (Z, d) team descriptor embeddings
        self.ability = nn.Sequential(nn.Linear(z_embeddings.shape[1], dim), nn.Tanh(), nn.Linear(dim, dim))
        self.discrimination = nn.Linear(query_dim, dim)
        self.difficulty = nn.Linear(query_dim, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, Z) logits of P(q, z)."""
        theta = self.ability(self.z_text)  # (Z, h)
        a = nn.functional.softplus(self.discrimination(embeddings))  # (N, h), discrimination is non-negative
        return a @ theta.T - self.difficulty(embeddings)  # (N, Z)


class IRTRouter(BaselineRouter):
    name = "irt"

    def build(self, query_dim: int, z_embeddings: torch.Tensor) -> nn.Module:
        return MIRT(query_dim, z_embeddings, self.cfg.hidden)

    def warm_up(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cold-start warm-up: (1 − w)·e + w·mean of the k most cosine-similar train embeddings (k = 0: e)."""
        k = min(self.cfg.irt_warmup_k, len(self.bank))
        if k == 0 or self.cfg.irt_warmup_weight == 0:
            return embeddings
        sim = nn.functional.normalize(embeddings, dim=-1) @ nn.functional.normalize(self.bank, dim=-1).T  # (N, B)
        neighbours = self.bank[sim.topk(k, dim=1).indices].mean(dim=1)  # (N, d)
        w = self.cfg.irt_warmup_weight
        return (1 - w) * embeddings + w * neighbours

    def utility(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        expected = 2 * p - 1 if self.spec.shaping else p
        return (1 - self.spec.lam) * expected - self.spec.lam * self.z_cost

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.utility(self.model(self.warm_up(embeddings)))

    def fit(self, train: RoutingData, valid: RoutingData) -> dict[str, Any]:
        self.bank = train.embeddings.clone()
        self.z_cost = torch.nan_to_num(torch.where(train.available, train.cost_norm, torch.nan).nanmean(dim=0), nan=1.0)
        self._fresh(train)
        target = train.perf.clamp(0, 1)  # F1 is a soft label, accuracy a hard one
        mask = train.available
        # train queries go through the same warm-up as new ones, so a and b are learned on the inputs routing sees
        inputs = self.warm_up(train.embeddings)
        bce = nn.BCEWithLogitsLoss(reduction="sum")

        def loss() -> torch.Tensor:
            logits = self.model(inputs)
            return bce(logits[mask], target[mask]) / mask.sum()

        return self.train_epochs(train, valid, loss, LR)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "bank": self.bank.contiguous(), "z_cost": self.z_cost.contiguous()}

    def load_extra_state(self, tensors) -> None:
        self.bank, self.z_cost = tensors["bank"], tensors["z_cost"]
