"""RL maths: task rewards and cost-aware reward (`rewards`), token prices and the frozen cost normaliser
(`cost`), advantages, losses, rollout and learner steps.

Submodules are imported explicitly (`from haps_ray.rl.rewards import f1_score`); this package imports
nothing itself, so loading one part never pulls in torch-heavy others.
"""
