"""Token log-probs under the full softmax or under the renormalised nucleus the rollouts were sampled from
(`rl.logprob_support`): the maths on random logits, then the effect through real tiny engines and the RL rollouts."""

import pytest
import torch
from transformers import TopPLogitsWarper

from haps_ray.config import CandidateConfig, ConfigError, ExperimentConfig, RLConfig, TaskConfig
from haps_ray.engine import LLMEngine, LocalEngineClient
from haps_ray.engine.logprobs import Nucleus, head_log_probs, selective_log_softmax
from haps_ray.engine.sampling import pick_tokens
from haps_ray.rl.learner import Plan
from haps_ray.rl.rollout import trajectories
from haps_ray.rl.trainer import LocalRollouts, logprob_nucleus
from haps_ray.tasks import load_problems
from tests.helpers import FIXTURES, random_adapter

V = 50


def logits_and_nucleus(temperature: float, top_p: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, V, generator=gen) * 3
    in_nucleus = torch.isfinite(TopPLogitsWarper(top_p)(None, logits / temperature))
    return logits, in_nucleus


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 0.5), (1.3, 0.95)])
def test_nucleus_log_probs_sum_to_one_over_the_nucleus(temperature, top_p):
    logits, in_nucleus = logits_and_nucleus(temperature, top_p)
    nucleus = Nucleus(temperature, top_p)
    assert (in_nucleus.sum(-1) < V).all() and (in_nucleus.sum(-1) >= 1).all()  # a real truncation on every row
    for row in range(logits.shape[0]):
        members = in_nucleus[row].nonzero().flatten()
        logp = selective_log_softmax(logits[row].expand(len(members), V), members, nucleus=nucleus)
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
        expected = torch.log_softmax(logits[row, members] / temperature, dim=-1)  # the sampler's distribution
        assert torch.allclose(logp, expected, atol=1e-6)


def test_a_target_outside_the_nucleus_joins_its_rows_support():
    logits, in_nucleus = logits_and_nucleus(1.0, 0.5)
    outside = (~in_nucleus[0]).nonzero().flatten()[0]
    logp = selective_log_softmax(logits[:1], outside[None], nucleus=Nucleus(1.0, 0.5))
    support = in_nucleus[0].clone()
    support[outside] = True
    assert torch.isfinite(logp).all()
    assert float(logp) == pytest.approx(float(logits[0, outside] - logits[0, support].logsumexp(-1)), abs=1e-6)


def test_top_p_one_at_temperature_one_is_the_full_softmax():
    logits, _ = logits_and_nucleus(1.0, 0.9)
    index = torch.arange(6) * 7
    full = selective_log_softmax(logits, index)
    assert torch.allclose(selective_log_softmax(logits, index, nucleus=Nucleus(1.0, 1.0)), full, atol=1e-6)
    assert torch.allclose(full, torch.log_softmax(logits, -1)[torch.arange(6), index], atol=1e-6)
    truncated = selective_log_softmax(logits, index, nucleus=Nucleus(1.0, 0.9))
    assert (truncated >= full - 1e-6).all() and not torch.allclose(truncated, full)  # less mass to share


def test_sampled_tokens_lie_in_the_nucleus_and_gradients_are_the_nucleus_score():
    temperature, top_p = 0.8, 0.9
    logits, in_nucleus = logits_and_nucleus(temperature, top_p, seed=3)
    drawn = pick_tokens(logits, temperature, top_p, torch.Generator().manual_seed(1))
    assert in_nucleus[torch.arange(6), drawn].all()
    head = torch.nn.Linear(V, V, bias=False)  # an identity LM head: the hidden states are the logits
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    hidden = logits.clone().requires_grad_(True)
    head_log_probs(hidden, head, drawn, nucleus=Nucleus(temperature, top_p)).sum().backward()
    # ∂ log p_nuc(y) / ∂ logit_v = (1[v=y] - p_nuc(v)) / T on the nucleus, 0 outside
    p_nuc = torch.softmax((logits / temperature).masked_fill(~in_nucleus, float("-inf")), -1)
    expected = (torch.nn.functional.one_hot(drawn, V).float() - p_nuc) / temperature
    assert torch.allclose(hidden.grad, expected, atol=1e-5)


def test_nucleus_needs_sampled_rollouts_and_a_valid_support():
    with pytest.raises(ConfigError, match=r"^rl.logprob_support:"):
        ExperimentConfig(candidates=[CandidateConfig(name="a", model="x")], rl=RLConfig(logprob_support="nucleus"),
                         train_decoding={"temperature": 0.0})
    with pytest.raises(ConfigError, match=r"^logprob_support:"):
        RLConfig(logprob_support="tempered")
    with pytest.raises(ValueError, match="temperature > 0"):
        Nucleus(0.0, 0.9)


def test_the_setting_changes_the_engines_adapter_gradients(make_tiny):
    """The same rollouts' adapter gradients under rl.logprob_support full vs nucleus (real tiny engine and episodes);
    at top_p 1 and temperature 1 the two settings agree."""
    def setup(support: str, top_p: float):
        cfg = ExperimentConfig(task=TaskConfig(name="mmlu", max_rounds=1),
                               candidates=[CandidateConfig(name="a", model="tiny-llama")],
                               rl=RLConfig(logprob_support=support))
        cfg.train_decoding.top_p, cfg.train_decoding.max_new_tokens = top_p, 6
        return cfg

    engine = LLMEngine(*make_tiny("llama"), name="a")
    adapter = random_adapter(engine.model, 1, 4, 1.0, seed=1)
    problems, _ = load_problems("mmlu", str(FIXTURES / "mmlu_small.jsonl"))
    plans = [Plan(p.id, (0, 0), {"teacher": 0, "student": 0}, 0.0, {"a": adapter}) for p in problems[:3]]
    base = LocalRollouts(setup("full", 0.9), {"a": LocalEngineClient(engine)})
    calls = trajectories(base.run(problems[:3], plans, 0, "train"))
    weights = [1.0, -0.5, 2.0]

    def grads(support: str, top_p: float):
        cfg = setup(support, top_p)
        assert (logprob_nucleus(cfg) is None) is (support == "full")
        return LocalRollouts(cfg, {"a": LocalEngineClient(engine)}).gradients(calls, plans, weights)

    full, nucleus = grads("full", 0.9), grads("nucleus", 0.9)
    assert any(not torch.allclose(f["a"][0], n["a"][0], atol=1e-6) for f, n in zip(full, nucleus))
    for f, n in zip(full, grads("nucleus", 1.0)):
        assert torch.allclose(f["a"][0], n["a"][0], atol=1e-5) and torch.allclose(f["a"][1], n["a"][1], atol=1e-5)
    # the score is the nucleus's too
    chat, tokens = calls[0][0].messages, calls[0][0].token_ids
    full_scores = engine.score([chat], [tokens], [adapter])[0]
    nucleus_scores = engine.score([chat], [tokens], [adapter], nucleus=Nucleus(1.0, 0.9))[0]
    assert all(n >= f - 1e-5 for f, n in zip(full_scores, nucleus_scores)) and nucleus_scores != full_scores
