"""Routing: the routing prompt, the high-level router (z and exact log π(z|x)), hypernetwork LoRA heads, and
the joint policy that RL, evaluation and serving call (`HAPSPolicy.act`)."""

from haps_ray.routing.high_level import Decision, GeneratedAssignment, HighLevelRouter, PromptBatch, Routed, TargetScores
from haps_ray.routing.hypernet import HyperNetwork, LoRAHead, shapes_from_hf_config
from haps_ray.routing.policy import Action, HAPSPolicy
from haps_ray.routing.prompt import RoutingSpec, parse_assignment, problem_text, routing_messages

__all__ = [
    "Action",
    "Decision",
    "GeneratedAssignment",
    "HAPSPolicy",
    "HighLevelRouter",
    "HyperNetwork",
    "LoRAHead",
    "PromptBatch",
    "Routed",
    "RoutingSpec",
    "TargetScores",
    "parse_assignment",
    "problem_text",
    "routing_messages",
    "shapes_from_hf_config",
]
