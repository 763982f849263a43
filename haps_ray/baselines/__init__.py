"""Baseline routers fitted on the action-level dataset D: RouteLLM (matrix factorisation), GraphRouter,
IRT-Router and HierRouter. See `base.py` for the interface and each module for its paper and the
one change the two-role setting needs.

    router = ROUTERS["routellm"](RouterSpec.from_config(cfg), cfg.baselines, seed=cfg.seed)
    router.fit(train, valid); router.save(uri); load(uri).route(problems, encoder)
"""

from __future__ import annotations

from haps_ray.baselines.base import BaselineRouter, RouterSpec, RoutingData, check_candidates, load_router, routing_data
from haps_ray.baselines.graphrouter import GraphRouterRouter
from haps_ray.baselines.hierrouter import HierRouter
from haps_ray.baselines.irt import IRTRouter
from haps_ray.baselines.routellm import RouteLLMRouter

ROUTERS: dict[str, type[BaselineRouter]] = {
    "routellm": RouteLLMRouter, "graphrouter": GraphRouterRouter, "irt": IRTRouter, "hierrouter": HierRouter,
}
# Row labels in the results table: the paper's names (pipelines.experiment looks them up for Table 2)
LABELS = {"routellm": "RouteLLM", "graphrouter": "GraphRouter", "irt": "IRT-Router", "hierrouter": "HierRouter"}


def load(uri: str) -> BaselineRouter:
    """A fitted baseline saved under `uri` (any of ROUTERS)."""
    return load_router(uri, ROUTERS)


__all__ = ["ROUTERS", "LABELS", "BaselineRouter", "RouterSpec", "RoutingData", "check_candidates", "load",
           "routing_data"]
