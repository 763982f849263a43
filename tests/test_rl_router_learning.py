"""Router learning: with engines whose quality depends on the problem, RL makes the router pick the right one.

The engines here are `ScriptedEngine` test doubles (this test is about the router, not about LLMs): each is
an expert on one topic, answering the key for problems of its topic and a wrong letter otherwise; as Teacher
it always submits. So the reward depends only on which engine plays the Student, and the oracle scores 1.
"""

import random

import pytest

from haps_ray.config import CandidateConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.engine import Generation, LocalEngineClient
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.trainer import EVAL, LocalRollouts, rl_step
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


def experts_config(rl: RLConfig) -> ExperimentConfig:
    """One-round MMLU over the two scripted experts (closed: no heads), routed by a tiny random Llama."""
    return ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", max_rounds=1),
        candidates=[CandidateConfig(name="astro", model="scripted", open_source=False),
                    CandidateConfig(name="chef", model="scripted", open_source=False)],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256),
        rl=rl,
    )


def scripted_clients(problems: list[Problem]) -> dict[str, LocalEngineClient]:
    return {"astro": LocalEngineClient(ScriptedEngine("astronomy", problems)),
            "chef": LocalEngineClient(ScriptedEngine("cooking", problems))}


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
    cfg = experts_config(RLConfig(router_lr=3e-3, generator_lr=0.0, batch_size=8, group_size=4, epochs=5,
                                  baseline="leave_one_out"))
    policy = HAPSPolicy.from_config(cfg)
    learner = JointLearner(policy, cfg.rl, total_steps=cfg.rl.epochs * len(train) // cfg.rl.batch_size)
    rollouts = LocalRollouts(cfg, scripted_clients(train + held_out))

    def held_out_reward() -> float:
        plans = learner.propose(held_out, mode="greedy")
        return sum(r.reward for r in rollouts.run(held_out, plans, 0, EVAL)) / len(held_out)

    before = held_out_reward()
    rng = random.Random(0)
    step = 0
    for _ in range(cfg.rl.epochs):
        order = list(train)
        rng.shuffle(order)
        for start in range(0, len(order), cfg.rl.batch_size):
            metrics, _ = rl_step(learner, order[start:start + cfg.rl.batch_size], cfg.rl, rollouts, seed=step)
            step += 1
    after = held_out_reward()
    oracle = 1.0
    assert after >= 0.9 * oracle, f"held-out reward {after:.2f} (before RL {before:.2f})"
    assert metrics["grad_norm/router"] > 0 and "grad_norm/heads" not in metrics  # closed candidates: no heads


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_rl_trainer_with_the_default_baseline_learns_checkpoints_and_resumes(tmp_path):
    """`RLTrainer.fit` at the default advantage baseline (batch_mean), with three settings changed: router_lr 1e-3
    (the paper's 1e-6 does not move a random 2-layer router in 20 updates), group_size 2 (with one rollout per
    problem the batch-mean advantage only contrasts different problems, and this router then settles on one
    assignment for every topic: measured, valid reward flat at 0.44 for lr 3e-4..3e-3), and eval_every_questions 32
    (evaluate every 4 of the 20 updates of 8 questions). The run is interrupted at its second evaluation, resumed from the newest checkpoint
    by a fresh learner, and must still end with a router that picks the right expert."""
    from haps_ray.checkpoint import read_state
    from haps_ray.training import planned_steps

    train, valid = make_problems(32, seed=1), make_problems(16, seed=2)
    cfg = experts_config(RLConfig(router_lr=1e-3, batch_size=8, group_size=2, epochs=5, eval_every_questions=32, patience=10,
                                  keep_checkpoints=3))
    assert cfg.rl.baseline == "batch_mean"
    total = planned_steps(len(train), cfg.rl.batch_size, cfg.rl.epochs, cfg.rl.max_steps)
    rollouts = LocalRollouts(cfg, scripted_clients(train + valid))
    logged, evaluations = [], []

    def trainer():
        from haps_ray.rl.trainer import RLTrainer

        return RLTrainer(cfg, JointLearner(HAPSPolicy.from_config(cfg), cfg.rl, total), rollouts, total)

    def interrupt_at_second(state, metrics, checkpoint):
        evaluations.append((state.step, metrics["valid/reward"], checkpoint))
        if len(evaluations) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        trainer().fit(train, valid, tmp_path, log=lambda m, step: logged.append(step), callback=interrupt_at_second)
    assert [e[0] for e in evaluations] == [0, 4] and all(e[2].is_dir() for e in evaluations)
    assert read_state(evaluations[-1][2]).step == 4
    before = evaluations[0][1]

    resumed_from = len(logged)
    summary = trainer().fit(train, valid, tmp_path, log=lambda m, step: logged.append(step),
                            callback=lambda state, metrics, path: evaluations.append((state.step, metrics["valid/reward"], path)))
    assert logged[resumed_from] == 5  # the resumed run goes on with update 5
    assert summary["steps"] == total == 20 and [e[0] for e in evaluations[2:]] == [8, 12, 16, 20]
    assert summary["best_valid_reward"] >= 0.9 > before, (before, [e[1] for e in evaluations])
    best = HAPSPolicy.load(summary["best_policy"], device="cpu")
    picks = best.router.greedy(valid)
    right = sum(cfg.candidates[d.z[1]].name == ("astro" if p.subject == "astronomy" else "chef") for d, p in zip(picks, valid))
    assert right / len(valid) >= 0.9
    kept = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [12, 16, 20]  # rl.keep_checkpoints = 3 newest step checkpoints, then best/ and last/
    assert (tmp_path / "best").is_dir() and read_state(tmp_path / "last").finished
    done = len(logged)
    again = trainer().fit(train, valid, tmp_path, log=lambda m, step: logged.append(step))
    assert again["steps"] == total and len(logged) == done  # a finished run has nothing left to do


def test_evaluations_follow_the_questions_used_not_the_updates(tmp_path):
    """rl.eval_every_questions = 4 with updates of 3 questions: evaluations after updates 2 (6 questions, past 4)
    and 3 (9, past 8), besides the start."""
    from haps_ray.rl.trainer import RLTrainer

    train, valid = make_problems(9, seed=1), make_problems(2, seed=2)
    cfg = experts_config(RLConfig(batch_size=3, epochs=1, eval_every_questions=4, checkpoint_every=100))
    steps = []
    trainer = RLTrainer(cfg, JointLearner(HAPSPolicy.from_config(cfg), cfg.rl, 3), LocalRollouts(cfg, scripted_clients(train + valid)), 3)
    trainer.fit(train, valid, tmp_path, log=lambda m, step: None, callback=lambda state, m, path: steps.append((state.step, state.questions)))
    assert steps == [(0, 0), (2, 6), (3, 9)]
