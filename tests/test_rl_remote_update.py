"""One joint-RL update computed through EngineActors equals the same update computed in-process.

Frozen weights stay inside the actors; only the r×d adapter gradients travel back. The learner, data and
seeds are identical in both runs, so every policy parameter must agree after the step.
"""

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
from haps_ray.tasks import load_problems

from tests.test_rl_learner import FIXTURES


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def saved_tiny(make_tiny, path, arch):
    model, tokenizer = make_tiny(arch)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def learner_and_step(candidates, engines):
    cfg = ExperimentConfig(
        seed=0,
        task=TaskConfig(name="mmlu", max_rounds=1, train_path="unused", valid_path="unused"),  # dataset.splits needs both paths; never read here
        candidates=candidates,
        router=RouterConfig(backbone="tiny-llama", max_prompt_tokens=256, lora_alpha=1.0, init="authors"),
        rl=RLConfig(router_lr=1e-3, generator_lr=1e-3, batch_size=4, group_size=2, baseline="none"),
    )
    cfg.reward.shaping = True  # tiny random engines score 0; shaped to -1 every rollout carries gradient
    cfg.train_decoding.max_new_tokens = 4
    shapes = {"llama": LLMEngine.from_config(candidates[0]).info()["adapter_shapes"]}
    torch.manual_seed(0)
    learner = JointLearner(HAPSPolicy.from_config(cfg, adapter_shapes=shapes), cfg.rl, total_steps=4)
    runner = EpisodeRunner(engines, cfg.train_decoding, PriceTable.from_candidates(cfg.candidates), cfg.reward)
    names = [c.name for c in candidates]

    def rollout(problems, plans, seed):
        return run_plans(runner, cfg.task, names, problems, plans, seed)

    def gradients(results, plans, weights):
        return adapter_gradients(results, plans, weights, engines)

    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    metrics, results = rl_step(learner, problems[:4], cfg.rl, rollout, gradients, seed=5)
    return learner, metrics, results


def without_logprobs(calls):
    return [{key: value for key, value in call.items() if key != "logprobs"} for call in calls]


@pytest.mark.slow
def test_update_through_engine_actors_equals_in_process(make_tiny, tmp_path, ray_local):
    candidates = [
        CandidateConfig(name="llama", model=saved_tiny(make_tiny, tmp_path / "llama", "llama"), dtype="float32",
                        device="cpu", num_cpus=0.5),
        CandidateConfig(name="qwen", model=saved_tiny(make_tiny, tmp_path / "qwen", "qwen2"), dtype="float32",
                        device="cpu", num_cpus=0.5, open_source=False),
    ]
    actors = {c.name: EngineActor.options(num_cpus=0.5).remote(c, 1) for c in candidates}
    local = {c.name: LLMEngine.from_config(c) for c in candidates}

    remote_learner, remote_metrics, remote_results = learner_and_step(candidates, actors)
    local_learner, local_metrics, local_results = learner_and_step(candidates, local)

    # Token choices and texts must match exactly; log-probs only to float tolerance, since an actor's
    # thread pool may sum in a different order than the driver's.
    assert [without_logprobs(r.calls) for r in remote_results] == [without_logprobs(r.calls) for r in local_results]
    remote_logprobs = [lp for r in remote_results for call in r.calls for lp in call["logprobs"]]
    local_logprobs = [lp for r in local_results for call in r.calls for lp in call["logprobs"]]
    assert remote_logprobs == pytest.approx(local_logprobs, abs=1e-5)
    assert remote_metrics["grad_norm/heads"] > 0
    assert remote_metrics["grad_norm/heads"] == pytest.approx(local_metrics["grad_norm/heads"], rel=1e-5)
    for (name, a), (_, b) in zip(remote_learner.policy.named_parameters(), local_learner.policy.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name
