"""RouteLLM's matrix-factorisation router, over teams instead of two models.

Paper: Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data" (ICLR 2025, arXiv 2406.18665); the
matrix-factorisation router is the variant the authors recommend. Their model: a learned embedding v_m per model,
a projection W of the query embedding e_q, and the score s(q, m) = wᵀ(normalize(v_m) ⊙ W e_q); the probability
that m beats m' on q is σ(s(q, m) − s(q, m')), trained with binary cross-entropy on pairwise wins; at routing time
the strong model is chosen when its predicted win probability over the weak one is at least a threshold α.

The one change for two roles: the "models" are the teams z ∈ Z = M^K (one embedding per assignment), the pairwise
wins are between two teams on the same query, decided by HAPS's reward from D (so λ > 0 makes a cheaper team win
a tie in performance; exact reward ties are dropped, as the paper drops ties), and the "weak model" is the team with
the lowest mean train cost: a query goes to the best-scoring team when σ(s_best − s_weak) ≥ `baselines.
routellm_threshold`, else to the weak team. Valid selects the epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from haps_ray.baselines.base import BaselineRouter, RoutingData

LR, WEIGHT_DECAY = 3e-3, 1e-5  # RouteLLM trains with Adam and a small weight decay; lr raised for full batches


class MatrixFactorization(nn.Module):
    def __init__(self, query_dim: int, num_z: int, dim: int) -> None:
        super().__init__()
        self.z_embed = nn.Embedding(num_z, dim)
        self.text_proj = nn.Linear(query_dim, dim, bias=False)
        self.classifier = nn.Linear(dim, 1, bias=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, Z) scores s(q, z)."""
        z = nn.functional.normalize(self.z_embed.weight, dim=-1)  # (Z, h)
        q = self.text_proj(embeddings)  # (N, h)
        return self.classifier(q.unsqueeze(1) * z.unsqueeze(0)).squeeze(-1)  # (N, Z)


class RouteLLMRouter(BaselineRouter):
    name = "routellm"
    weak: int = 0  # z index of the "weak model": the team with the lowest mean train cost (set by fit)

    def build(self, query_dim: int, z_embeddings: torch.Tensor) -> nn.Module:
        return MatrixFactorization(query_dim, z_embeddings.shape[0], self.cfg.hidden)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(embeddings)

    def choose(self, embeddings: torch.Tensor) -> torch.Tensor:
        s = self.scores(embeddings)  # (N, Z)
        best = s.argmax(dim=1)
        win = torch.sigmoid(s.gather(1, best[:, None]).squeeze(1) - s[:, self.weak])  # P(best beats the weak team)
        return torch.where(win >= self.cfg.routellm_threshold, best, torch.full_like(best, self.weak))

    def fit(self, train: RoutingData, valid: RoutingData) -> dict[str, Any]:
        mean_cost = torch.where(train.available, train.cost_norm, torch.nan).nanmean(dim=0)
        self.weak = int(torch.nan_to_num(mean_cost, nan=torch.inf).argmin())
        self._fresh(train)
        # every ordered pair (a, b) of teams D holds for a query, labelled 1 when a's reward is higher; ties dropped
        n, n_z = train.reward.shape
        a, b = torch.triu_indices(n_z, n_z, offset=1)
        both = train.available[:, a] & train.available[:, b]  # (N, P)
        diff = train.reward[:, a] - train.reward[:, b]
        keep = both & (diff.abs() > 1e-9)
        label = (diff > 0).float()
        bce = nn.BCEWithLogitsLoss(reduction="sum")

        def loss() -> torch.Tensor:
            s = self.model(train.embeddings)  # (N, Z)
            logits = s[:, a] - s[:, b]
            return bce(logits[keep], label[keep]) / keep.sum().clamp(min=1)

        summary = self.train_epochs(train, valid, loss, LR, WEIGHT_DECAY)
        summary["weak_z"] = self.weak
        summary["pairs"] = int(keep.sum())
        return summary

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "weak": torch.tensor([self.weak])}

    def load_extra_state(self, tensors) -> None:
        self.weak = int(tensors["weak"][0])
