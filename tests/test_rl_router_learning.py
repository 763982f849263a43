"""Router learning: with engines whose quality depends on the problem, RL makes the router pick the right one.

The engines here are `ScriptedEngine` test doubles (this test is about the router, not about LLMs): each is
an expert on one topic, answering the key for problems of its topic and a wrong letter otherwise; as Teacher
it always submits. So the reward depends only on which engine plays the Student, and the oracle scores 1.
"""

import random

import pytest

from haps_ray.config import CandidateConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.engine import Generation
from haps_ray.episodes import EpisodeRunner
from haps_ray.rl.cost import PriceTable
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.rollout import adapter_gradients, run_plans
from haps_ray.rl.trainer import rl_step
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import Problem

TOPICS = {"astronomy": "stars", "cooking": "pots"}


class ScriptedEngine:
    """Test double for an LLMEngine: an expert on one topic, wrong elsewhere."""

    def __init__(self, topic: str, problems: list[Problem]) -> None:
        self.topic = topic
        self.by_question = {p.question: p for p in problems}

    def generate(self, messages, adapters=None, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None, seed=None):
        out = []
        for chat in messages:
            text = chat[-1]["content"]
            if chat[0]["content"].startswith("You are the Teacher"):
                reply = "Feedback: fine.\nDecision: Submit"
            else:
                problem = next(p for q, p in self.by_question.items() if q in text)
                right = problem.subject == self.topic
                letter = problem.answer if right else "ABCD"[("ABCD".index(problem.answer) + 1) % 4]
                reply = f"Solution: thinking.\nAnswer: {letter}"
            out.append(Generation(reply, [1, 2], [-0.1, -0.1], 10, 2, "stop"))
        return out


def make_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        problems.append(Problem(
            id=f"{topic}-{seed}-{i}", task="mmlu", subject=topic,
            # the topic dominates the text, so a tiny random backbone can tell topics apart quickly
            question=f"Question {seed}.{i}: " + f"{topic} {TOPICS[topic]} " * 12 + "- which option is right?",
            choices=["one", "two", "three", "four"], answer="ABCD"[rng.randrange(4)],
        ))
    return problems


@pytest.mark.slow
def test_rl_router_reaches_oracle_on_held_out_problems():
    train, held_out = make_problems(32, seed=1), make_problems(16, seed=2)
    cfg = ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", max_rounds=1, train_path="unused", valid_path="unused"),  # dataset.splits needs both paths; never read here
        candidates=[CandidateConfig(name="astro", model="scripted", open_source=False),
                    CandidateConfig(name="chef", model="scripted", open_source=False)],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256),
        rl=RLConfig(router_lr=3e-3, generator_lr=0.0, batch_size=8, group_size=4, epochs=5, baseline="leave_one_out"),
    )
    policy = HAPSPolicy.from_config(cfg)
    learner = JointLearner(policy, cfg.rl, total_steps=cfg.rl.epochs * len(train) // cfg.rl.batch_size)
    engines = {"astro": ScriptedEngine("astronomy", train + held_out), "chef": ScriptedEngine("cooking", train + held_out)}
    runner = EpisodeRunner(engines, cfg.eval_decoding, PriceTable.from_candidates(cfg.candidates), cfg.reward)
    names = [c.name for c in cfg.candidates]

    def rollout(problems, plans, seed):
        return run_plans(runner, cfg.task, names, problems, plans, seed)

    def gradients(results, plans, weights):
        return adapter_gradients(results, plans, weights, engines)

    def held_out_reward() -> float:
        plans = learner.propose(held_out, mode="greedy")
        return sum(r.reward for r in rollout(held_out, plans, 0)) / len(held_out)

    before = held_out_reward()
    rng = random.Random(0)
    step = 0
    for _ in range(cfg.rl.epochs):
        order = list(train)
        rng.shuffle(order)
        for start in range(0, len(order), cfg.rl.batch_size):
            metrics, _ = rl_step(learner, order[start:start + cfg.rl.batch_size], cfg.rl, rollout, gradients, seed=step)
            step += 1
    after = held_out_reward()
    oracle = 1.0
    assert after >= 0.9 * oracle, f"held-out reward {after:.2f} (before RL {before:.2f})"
    assert metrics["grad_norm/router"] > 0 and "grad_norm/heads" not in metrics  # closed candidates: no heads
