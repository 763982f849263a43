"""GraphRouter: edge prediction on a heterogeneous task–query–team graph.

Paper: Feng et al., "GraphRouter: A Graph-based Router for LLM Selections" (ICLR 2025, arXiv 2410.03834). Their
graph has task nodes, query nodes and LLM nodes (features: text embeddings of the task description, the query and
the LLM's textual descriptor); task–query edges, and query–LLM edges carrying the observed performance and cost.
Two `GeneralConv` layers with edge features (torch-geometric) propagate over it, and an MLP on the (query, LLM)
node pair predicts each edge; training hides the edge features of the queries being predicted, routing adds new
query nodes whose LLM edges carry no observation (inductive), and the highest-scoring LLM edge wins. Training
targets which LLM is best for a query under the chosen scenario's effect ("Performance First" in the HAPS paper).

The one change for two roles: the LLM nodes are the teams z ∈ Z = M^K, with the team descriptor ("teacher: <name>
(<description>); student: ...", from `router.candidate_descriptions`) as their text; the edge features are the
observed (perf, Ĉ) of (query, z) from D, and the best edge is the best HAPS reward under `reward.lam` (λ = 0 is
"Performance First"; λ > 0 trains on performance and cost). Graph library: torch-geometric (`GeneralConv`).
Valid selects the epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_geometric.nn import GeneralConv

from haps_ray.baselines.base import BaselineRouter, RoutingData

LR = 3e-3
EDGE_DIM = 3  # (perf, cost_norm, observed flag)
MASKED_SHARE = 0.5  # share of train queries whose edges are hidden each epoch and predicted (GraphRouter's split)


class GraphNet(nn.Module):
    def __init__(self, query_dim: int, z_dim: int, hidden: int) -> None:
        super().__init__()
        self.query_in = nn.Linear(query_dim, hidden)  # GraphRouter's FeatureAlign: each node type to one width
        self.z_in = nn.Linear(z_dim, hidden)
        self.task = nn.Parameter(torch.zeros(1, hidden))
        self.conv1 = GeneralConv(hidden, hidden, in_edge_channels=EDGE_DIM, aggr="mean")
        self.conv2 = GeneralConv(hidden, hidden, in_edge_channels=EDGE_DIM, aggr="mean")
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, queries: torch.Tensor, z_text: torch.Tensor, edge_attr_qz: torch.Tensor) -> torch.Tensor:
        """queries (N, d), z_text (Z, d'), edge_attr_qz (N, Z, EDGE_DIM) -> (N, Z) edge logits."""
        n, n_z = queries.shape[0], z_text.shape[0]
        x = torch.cat([self.task, self.query_in(queries), self.z_in(z_text)])  # nodes: task, queries, teams
        q_idx = torch.arange(n).repeat_interleave(n_z) + 1
        z_idx = torch.arange(n_z).repeat(n) + 1 + n
        t_idx = torch.zeros(n, dtype=torch.long)
        src = torch.cat([q_idx, z_idx, t_idx, torch.arange(n) + 1])
        dst = torch.cat([z_idx, q_idx, torch.arange(n) + 1, t_idx])
        attr_qz = edge_attr_qz.reshape(n * n_z, EDGE_DIM)
        attr = torch.cat([attr_qz, attr_qz, torch.zeros(2 * n, EDGE_DIM)])  # task edges carry no observation
        edge_index = torch.stack([src, dst])
        h = torch.relu(self.conv1(x, edge_index, attr))
        h = self.conv2(h, edge_index, attr)
        pair = torch.cat([h[q_idx], h[z_idx]], dim=-1)  # (N·Z, 2h)
        return self.edge_mlp(pair).reshape(n, n_z)


def edge_features(data: RoutingData, observed: torch.Tensor) -> torch.Tensor:
    """(N, Z, EDGE_DIM): (perf, Ĉ, 1) where `observed` (N,) and D holds the row, zeros elsewhere."""
    seen = (data.available & observed[:, None]).float()
    return torch.stack([data.perf * seen, data.cost_norm * seen, seen], dim=-1)


class GraphRouterRouter(BaselineRouter):
    name = "graphrouter"

    def build(self, query_dim: int, z_embeddings: torch.Tensor) -> nn.Module:
        return GraphNet(query_dim, z_embeddings.shape[1], self.cfg.hidden)

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """New queries join the train graph (whose edges are all observed) with unobserved edges of their own."""
        bank = self.bank
        n = bank.embeddings.shape[0]
        queries = torch.cat([bank.embeddings, embeddings])
        attr = torch.cat([edge_features(bank, torch.ones(n, dtype=torch.bool)),
                          torch.zeros(embeddings.shape[0], self.z_embeddings.shape[0], EDGE_DIM)])
        return self.model(queries, self.z_embeddings, attr)[n:]

    def fit(self, train: RoutingData, valid: RoutingData) -> dict[str, Any]:
        self.bank = train
        self._fresh(train)
        best = torch.where(train.available, train.reward, -torch.inf)
        label = (best >= best.max(dim=1, keepdim=True).values - 1e-9).float()  # every best team of a query is a positive
        bce = nn.BCEWithLogitsLoss(reduction="sum")
        generator = torch.Generator().manual_seed(self.seed)

        def loss() -> torch.Tensor:
            hidden = torch.rand(len(train), generator=generator) < MASKED_SHARE
            logits = self.model(train.embeddings, train.z_embeddings, edge_features(train, ~hidden))
            mask = train.available & hidden[:, None]
            return bce(logits[mask], label[mask]) / mask.sum().clamp(min=1)

        return self.train_epochs(train, valid, loss, LR)

    def extra_state(self) -> dict[str, torch.Tensor]:
        b = self.bank
        return {**super().extra_state(), "bank.embeddings": b.embeddings, "bank.perf": b.perf,
                "bank.cost_norm": b.cost_norm, "bank.reward": b.reward, "bank.available": b.available}

    def load_extra_state(self, tensors) -> None:
        n = tensors["bank.embeddings"].shape[0]
        self.bank = RoutingData([str(i) for i in range(n)], tensors["bank.embeddings"], tensors["bank.reward"],
                                tensors["bank.perf"], tensors["bank.cost_norm"], tensors["bank.available"],
                                tensors["z_embeddings"])
