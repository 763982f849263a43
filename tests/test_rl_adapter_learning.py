"""Adapter learning through remote engines: from rewards alone, with every adapter gradient computed inside an
EngineActor, the hypernetwork learns to make a frozen tiny transformer answer each problem's category letter.

The frozen engine is a tiny random Llama first fitted (a few seconds) to open every reply with one of 4
letters, uniformly and whatever the question: a base model that "answers with a letter" but knows nothing,
so each category's letter is its greedy answer on about a quarter of problems. Each problem's category names
the letter that earns reward 1. Training samples at T=1 (the training default), G=4 rollouts per problem, and
uses no baseline (REINFORCE on the 0/1 reward, as the authors' code does): with a leave-one-out baseline the
wrong samples' negative advantages push probability off every letter into the rest of a 49k-token vocabulary,
and once no letter is sampled the reward, and the signal, is gone (seen on one of three problem draws). The
reward is measured on held-out problems with greedy decoding, as evaluation does. The router has one
candidate, so its decision is fixed and its backbone is left frozen (router_lr=0): what is under test is the
generator path, rollout -> EngineActor.adapter_grads -> heads. That an update through the actors equals the
in-process update is tests/test_rl_remote_update.py. The generator learning rate is 3e-3 (not the paper's 1e-5,
which moves nothing in 100 updates of a test): at 1e-2 the held-out reward oscillated (0.0-0.78 after 100 updates
in 6 of 8 runs over 4 seeds and both top-p samplers tried), at 3e-3 it reached 1.0 by update 50 in all 4 seeds.
"""

import random

import pytest
import ray
import torch

from actors.engine import EngineActor, EngineActorClient
from haps_ray.config import CandidateConfig, DecodingConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.episodes import EpisodeRunner
from haps_ray.rl.cost import PriceTable
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.rollout import adapter_gradients, run_plans
from haps_ray.rl.trainer import EVAL, TRAIN, rl_step
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import Episode, Problem
from haps_ray.tasks.parsing import Parsed

LETTERS = ["A", "B", "C", "D"]
CATEGORY_LETTER = {"red": "A", "green": "B", "blue": "C", "gold": "D"}
TOPIC_REPEATS = 20  # a random backbone pools near-uniformly: the category word must dominate the prompt
STEPS = 100


class LetterEpisode(Episode):
    """Test protocol: one Student call whose first character is the answer."""

    task = "mmlu"

    def __init__(self, problem, assignment, adapters=None):
        super().__init__(problem, assignment, adapters)
        self._ask("student", [{"role": "user", "content": problem.question}])

    @property
    def max_calls(self) -> int:
        return 1

    def _parse(self, role, text):
        return Parsed("answer", text.strip()[:1])

    def _on_turn(self, role, parsed):
        self._finish(parsed.arg)


def letter_episode(task, problem, assignment, adapters=None):
    return LetterEpisode(problem, assignment, adapters)


def make_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        colour = rng.choice(sorted(CATEGORY_LETTER))
        problems.append(Problem(id=f"{colour}-{seed}-{i}", task="mmlu", subject=colour,
                                question=f"Item {i}: {(colour + ' ') * TOPIC_REPEATS}Which letter?",
                                choices=["", "", "", ""], answer=CATEGORY_LETTER[colour]))
    return problems


def fit_letter_model(make_tiny, path) -> str:
    """Save to `path` a tiny Llama fitted to start every reply with a uniformly random one of 16 letters."""
    model, tokenizer = make_tiny("llama")
    letter_ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in LETTERS]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                             add_generation_prompt=True) for p in make_problems(32, 99)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
        loss = -logits.log_softmax(-1)[:, letter_ids].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class LetterRollouts:
    """`haps_ray.rl.trainer.Rollouts` running `LetterEpisode`s: sampled for training, greedy for evaluation."""

    def __init__(self, cfg: ExperimentConfig, engines: dict) -> None:
        prices = PriceTable.from_candidates(cfg.candidates)
        self.cfg, self.engines = cfg, engines
        self.runners = {TRAIN: EpisodeRunner(engines, cfg.train_decoding, prices, cfg.reward),
                        EVAL: EpisodeRunner(engines, DecodingConfig(max_new_tokens=1, temperature=0.0), prices, cfg.reward)}

    def run(self, problems, plans, seed, phase):
        return run_plans(self.runners[phase], self.cfg.task, ["letters"], problems, plans, seed, episode_factory=letter_episode)

    def gradients(self, calls, plans, weights):
        return adapter_gradients(calls, plans, weights, self.engines)


@pytest.mark.slow
def test_adapters_learn_through_engine_actors(make_tiny, tmp_path, ray_session):
    candidate = CandidateConfig(name="letters", model=fit_letter_model(make_tiny, tmp_path / "letters"),
                                dtype="float32", device="cpu", num_cpus=0.5)
    cfg = ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", roles=["student"]),
        candidates=[candidate],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, lora_rank=4, hidden=64),
        rl=RLConfig(router_lr=0.0, generator_lr=3e-3, batch_size=8, group_size=4, baseline="none"),
    )
    cfg.train_decoding.max_new_tokens = 1
    actor = EngineActor.options(num_cpus=0.5).remote(candidate, cfg.router.lora_layers)
    try:
        torch.manual_seed(0)
        shapes = {"letters": ray.get(actor.info.remote())["adapter_shapes"]}
        learner = JointLearner(HAPSPolicy.from_config(cfg, adapter_shapes=shapes), cfg.rl, total_steps=STEPS)
        rollouts = LetterRollouts(cfg, {"letters": EngineActorClient(actor)})

        def held_out_reward(problems) -> float:
            plans = learner.propose(problems, mode="greedy")
            results = rollouts.run(problems, plans, 0, EVAL)
            return sum(r.reward for r in results) / len(results)

        train, held_out = make_problems(64, 1), make_problems(32, 2)
        before = held_out_reward(held_out)
        assert before <= 0.4, f"the base model already answers {before:.2f} of held-out problems"
        head_grads = []
        for step in range(STEPS):
            start = (step * cfg.rl.batch_size) % len(train)
            metrics, _ = rl_step(learner, train[start:start + cfg.rl.batch_size], cfg.rl, rollouts, seed=step)
            head_grads.append(metrics["grad_norm/heads"])
        after = held_out_reward(held_out)
        assert sum(g > 0 for g in head_grads) >= STEPS // 2, "the actors returned no adapter gradients"
        assert after >= 0.8, f"held-out reward {after:.2f} (before {before:.2f})"
    finally:
        ray.kill(actor)
