"""Adapter learning through remote engines: the hypernetwork learns, from rewards alone and with gradients
computed inside EngineActors, to make a frozen tiny transformer answer each problem's category letter.

The frozen engine is a tiny random Llama first fitted (here, in seconds) to open its reply with one of 16
letters, uniformly and whatever the question: a base model that "answers with a letter" but knows nothing,
so the starting reward is about 1/16. Each problem's category names the letter that earns reward 1.
"""

import random

import pytest
import ray
import torch

from actors.engine import EngineActor
from haps_ray.config import CandidateConfig, ExperimentConfig, RLConfig, RouterConfig, TaskConfig
from haps_ray.engine import LLMEngine
from haps_ray.episodes import EpisodeRunner
from haps_ray.rl.cost import PriceTable
from haps_ray.rl.learner import JointLearner
from haps_ray.rl.rollout import adapter_gradients, run_plans
from haps_ray.rl.trainer import rl_step
from haps_ray.routing.policy import HAPSPolicy
from haps_ray.tasks import Episode, Problem
from haps_ray.tasks.parsing import Parsed

LETTERS = [chr(ord("A") + i) for i in range(16)]
CATEGORIES = {"red": "C", "green": "G", "blue": "K", "gold": "N"}


class LetterEpisode(Episode):
    """One Student call; its first character is the answer (test protocol)."""

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
    out = []
    for i in range(n):
        colour = rng.choice(sorted(CATEGORIES))
        out.append(Problem(id=f"{colour}-{seed}-{i}", task="mmlu", subject=colour,
                           question=f"Item {i} is {colour}. Which letter?", choices=["", "", "", ""],
                           answer=CATEGORIES[colour]))
    return out


def letter_model(make_tiny, path):
    """A tiny Llama fitted to start every reply with a uniformly random one of 16 letters; saved to `path`."""
    model, tokenizer = make_tiny("llama")
    letter_ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in LETTERS]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                             add_generation_prompt=True) for p in make_problems(32, 99)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.requires_grad_(True).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        logits = model(**batch).logits[:, -1].float()
        loss = -logits.log_softmax(-1)[:, letter_ids].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def setup(model_dir, engines):
    cfg = ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", roles=["student"]),
        candidates=[CandidateConfig(name="letters", model=str(model_dir), dtype="float32", device="cpu", num_cpus=0.5)],
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, lora_rank=4, hidden=64),
        rl=RLConfig(router_lr=1e-3, generator_lr=3e-3, batch_size=8, group_size=4, baseline="leave_one_out"),
    )
    cfg.train_decoding.max_new_tokens = 1
    local = LLMEngine.from_config(cfg.candidates[0])
    torch.manual_seed(0)
    policy = HAPSPolicy.from_config(cfg, adapter_shapes={"letters": local.info()["adapter_shapes"]})
    learner = JointLearner(policy, cfg.rl, total_steps=200)
    engines = engines or {"letters": local}
    runner = EpisodeRunner(engines, cfg.train_decoding, PriceTable.from_candidates(cfg.candidates), cfg.reward)

    def rollout(problems, plans, seed):
        return run_plans(runner, cfg.task, ["letters"], problems, plans, seed, episode_factory=letter_episode)

    def gradients(results, plans, weights):
        return adapter_gradients(results, plans, weights, engines)

    return cfg, learner, rollout, gradients


def mean_reward(learner, rollout, problems) -> float:
    plans = learner.propose(problems, mode="greedy")
    return sum(r.reward for r in rollout(problems, plans, 0)) / len(problems)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_adapters_learn_through_engine_actors(make_tiny, tmp_path, ray_local):
    model_dir = letter_model(make_tiny, tmp_path / "letters")
    candidate = CandidateConfig(name="letters", model=str(model_dir), dtype="float32", device="cpu", num_cpus=0.5)
    actor = EngineActor.options(num_cpus=0.5).remote(candidate, 1)
    cfg, learner, rollout, gradients = setup(model_dir, {"letters": actor})
    train, held_out = make_problems(64, 1), make_problems(32, 2)

    # one update through the actors equals the same update in-process
    _, twin, twin_rollout, twin_gradients = setup(model_dir, None)
    rl_step(learner, train[:8], cfg.rl, rollout, gradients, seed=0)
    rl_step(twin, train[:8], cfg.rl, twin_rollout, twin_gradients, seed=0)
    for a, b in zip(learner.policy.parameters(), twin.policy.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)

    before = mean_reward(learner, rollout, held_out)
    assert before < 0.3
    for step in range(1, 60):
        start = (step * cfg.rl.batch_size) % len(train)
        rl_step(learner, train[start:start + cfg.rl.batch_size], cfg.rl, rollout, gradients, seed=step)
    after = mean_reward(learner, rollout, held_out)
    assert after >= 0.8, f"held-out reward {after:.2f} (before {before:.2f})"
