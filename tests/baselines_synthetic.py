"""A synthetic action-level dataset D for the baseline-router tests: the best assignment depends on a topic word.

Two candidates (a cheap 'small', a dear 'large'), two roles, so Z has four teams. Each topic has one team that
scores 1 and a second-best that scores 0.5; on 'geometry' the cheapest and the dearest team both score 1, so with
λ > 0 only the cost decides. Questions vary their wording around the topic word.
"""

from __future__ import annotations

import itertools
import random

import pyarrow as pa

from haps_ray.tasks.problem import Problem

CANDIDATES = ["small", "large"]
ROLES = ["teacher", "student"]
ZS = list(itertools.product(range(2), repeat=2))
# topic -> perf of each z in z_index order ((0,0), (0,1), (1,0), (1,1))
TOPICS = {
    "chemistry": [0.0, 1.0, 0.5, 0.0],
    "history": [0.0, 0.5, 1.0, 0.0],
    "poetry": [0.0, 0.0, 0.5, 1.0],
    "geometry": [1.0, 0.0, 0.0, 1.0],
}
OPENERS = ["Which statement about", "In the study of", "A student of", "Consider this case from", "What do experts in",
           "Pick the right answer on", "Here is a quiz on", "An exam question on"]
ENDINGS = ["is correct?", "holds here?", "best explains it?", "would you choose?", "is most accurate?",
           "fits the facts?", "follows?", "is true?"]
PRICE = {0: 1.0, 1: 4.0}  # USD per episode per role's candidate (so a team costs the sum)


def problem(i: int, topic: str, rng: random.Random) -> Problem:
    question = f"{rng.choice(OPENERS)} {topic}, {rng.choice(['one', 'which', 'what'])} {rng.choice(ENDINGS)} (#{i})"
    return Problem(id=f"p{i}", task="mmlu", question=question, answer="A", choices=["w", "x", "y", "z"])


def make_problems(n: int, seed: int, offset: int = 0) -> list[tuple[Problem, str]]:
    rng = random.Random(seed)
    topics = list(TOPICS)
    return [(problem(offset + i, topics[i % len(topics)], rng), topics[i % len(topics)]) for i in range(n)]


def d_table(splits: dict[str, list[tuple[Problem, str]]], candidates: list[str] = CANDIDATES,
            drop: set[tuple[str, int]] | None = None) -> pa.Table:
    """D's columns the baselines read (the reward is derived on read by haps_ray.dataset.with_reward)."""
    rows = []
    for split, items in splits.items():
        for p, topic in items:
            for j, z in enumerate(ZS):
                if drop and (p.id, j) in drop:
                    continue
                rows.append({"split": split, "problem_id": p.id, "z_index": j, "z": list(z),
                             "z_names": [candidates[c] for c in z], "roles": ROLES, "engine_names": candidates,
                             "perf": TOPICS[topic][j], "cost": sum(PRICE[c] for c in z)})
    return pa.Table.from_pylist(rows)
