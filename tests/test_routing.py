"""Routing prompt, assignment parsing and the high-level router's exact policy on a tiny Llama router."""

import json
import logging

import pytest
import torch

from haps_ray.config import ConfigError, CandidateConfig, ExperimentConfig, TaskConfig
from haps_ray.models import build_tiny_model
from haps_ray.routing import HighLevelRouter, RoutingSpec, parse_assignment, problem_text, routing_messages
from haps_ray.tasks.problem import Problem

SPEC = RoutingSpec("mmlu", ("teacher", "student"), ("llama", "qwen", "gpt"), candidate_descriptions={"gpt": "closed API"})
QUESTIONS = ["What is 2 + 2?", "Which planet is known as the red planet? Answer with one word."]


def make_router(spec: RoutingSpec = SPEC, **kwargs) -> HighLevelRouter:
    model, tokenizer = build_tiny_model("llama")
    return HighLevelRouter(model, tokenizer, spec, max_prompt_tokens=kwargs.pop("max_prompt_tokens", 512), **kwargs)


def sft(router: HighLevelRouter, problems, z, max_steps: int = 150) -> None:
    """Teacher-force one canonical answer until every answer token has probability > 0.5.

    Then greedy decoding provably reproduces the answer (each greedy step picks the forced token), so the
    comparisons below never depend on how many steps the optimiser happened to need.
    """
    router.model.requires_grad_(True)
    opt = torch.optim.Adam(router.model.parameters(), lr=5e-3)
    answers = [router.spec.canonical_json(z)] * len(problems)
    owner = torch.arange(len(problems))
    targets = [router.target_ids(a) for a in answers]
    for _ in range(max_steps):
        token_lp, mask = router.token_log_probs(router.forward_prompt(router.encode(problems)), owner, targets)
        if bool((token_lp[mask] > torch.log(torch.tensor(0.5))).all()):
            break
        loss = -(torch.where(mask, token_lp, 0.0).sum(-1) / mask.sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise AssertionError(f"SFT did not fit {answers[0]} in {max_steps} steps")
    router.model.requires_grad_(False)


# ---------------------------------------------------------------------------- prompt and parsing


def test_prompt_has_four_parts_and_candidate_ids():
    problem = Problem(id="m1", task="mmlu", question="Pick the prime.", answer="B", choices=["4", "5", "6", "8"])
    text = problem_text(problem)
    assert text.splitlines() == ["Pick the prime.", "A. 4", "B. 5", "C. 6", "D. 8"]
    system, user = routing_messages(SPEC, text)
    assert system["role"] == "system" and user["role"] == "user"
    sections = [block.split("\n", 1)[0] for block in user["content"].split("\n\n") if block.startswith("## ")]
    assert sections == ["## Roles", "## Task", "## Problem", "## Candidate models"]
    assert "- teacher: reviews" in user["content"] and "- student: works" in user["content"]
    assert "0: llama\n1: qwen\n2: gpt (closed API)" in user["content"]
    assert '{"teacher":<id>,"student":<id>}' in user["content"]
    assert "B. 5" in user["content"]


def test_spec_from_config_checks_description_names():
    cfg = ExperimentConfig(candidates=[CandidateConfig(name="a", model="tiny-llama"), CandidateConfig(name="b", model="tiny-qwen2")],
                           task=TaskConfig(train_path="unused", valid_path="unused"))  # dataset.splits needs both paths; never read here
    cfg.task = TaskConfig(name="hotpotqa", roles=["student", "teacher", "critic"], train_path="unused", valid_path="unused")
    spec = RoutingSpec.from_config(cfg)
    assert spec.roles == ("student", "teacher", "critic") and spec.num_assignments == 8
    assert "- critic: is a member of the team with the role 'critic'." in routing_messages(spec, "q")[1]["content"]
    cfg.router.candidate_descriptions = {"c": "nope"}
    with pytest.raises(ConfigError, match=r"router.candidate_descriptions.c"):
        RoutingSpec.from_config(cfg)


def test_canonical_json_and_assignment_order():
    assert SPEC.canonical_json((2, 0)) == '{"teacher":2,"student":0}'
    assert json.loads(SPEC.canonical_json((1, 2))) == {"teacher": 1, "student": 2}
    zs = SPEC.assignments()
    assert len(zs) == 9 and zs[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [SPEC.index(z) for z in zs] == list(range(9))
    with pytest.raises(ValueError, match="not K=2 ids"):
        SPEC.canonical_json((0, 3))


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"teacher":1,"student":2}', (1, 2)),
        ('Sure!\n```json\n{ "Teacher": "0", "student": 2 }\n```', (0, 2)),
        ("{'teacher': 'GPT', 'student': 'llama',}", (2, 0)),
        ("{teacher: 1, student = qwen}", (1, 1)),
        ('{"x": 1} then {"teacher": 2, "student": 2}', (2, 2)),
    ],
)
def test_parse_assignment_tolerates_format_noise(text, expected):
    assert parse_assignment(text, SPEC) == (expected, None)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("teacher 1 student 2", "no JSON object found"),
        ('{"teacher": 1}', "no key 'student'"),
        ('{"teacher": 1, "student": 7}', "'student' -> 7 is not a candidate id"),
        ('{"teacher": true, "student": 0}', "'teacher' -> True is not a candidate id"),
        ('{"teacher":0,"student":0,"student":0', "no JSON object found"),
    ],
)
def test_parse_assignment_reports_why_it_fails(text, reason):
    z, error = parse_assignment(text, SPEC)
    assert z is None and reason in error


# ---------------------------------------------------------------------------- the exact policy


@pytest.fixture(scope="module")
def fitted():
    """A tiny router backbone fitted to answer (0, 2) on QUESTIONS (model, tokenizer)."""
    router = make_router()
    sft(router, QUESTIONS, (0, 2))
    return router.model, router.tokenizer


def test_exact_policy_sums_to_one_and_equals_generated_sequence_probability(fitted):
    router = HighLevelRouter(*fitted, SPEC, max_prompt_tokens=512)
    target = router.target_ids(SPEC.canonical_json((0, 2)))
    assert target[-1] == router.end_id and router.tokenizer.convert_ids_to_tokens(router.end_id) == "<|im_end|>"

    batch = router.encode(QUESTIONS)
    with torch.no_grad():
        state = router.forward_prompt(batch)
        log_pi = router.assignment_log_probs(state)  # (2, 9)
        raw = router.score(state, torch.arange(2).repeat_interleave(9), [router.target_ids(SPEC.canonical_json(z)) for z in SPEC.assignments()] * 2).view(2, 9)
    assert torch.allclose(log_pi.exp().sum(-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(log_pi, raw - raw.logsumexp(-1, keepdim=True), atol=1e-6)

    # Independent reference: HF generate (greedy) on each prompt alone, token log-probs from its raw logits.
    for b, question in enumerate(QUESTIONS):
        single = router.encode([question])
        out = router.model.generate(
            input_ids=single.input_ids, attention_mask=single.attention_mask, max_new_tokens=16, do_sample=False,
            eos_token_id=router.end_id, pad_token_id=router.pad_id, output_logits=True, return_dict_in_generate=True,
        )
        tokens = out.sequences[0, single.input_ids.shape[1] :].tolist()
        steps = torch.stack(out.logits, dim=1)[0].double().log_softmax(-1)  # (n, V), fp64 reference
        generated_logp = sum(float(steps[i, t]) for i, t in enumerate(tokens))
        text = router.tokenizer.decode(tokens, skip_special_tokens=True)
        z, error = parse_assignment(text, SPEC)
        assert error is None and z == (0, 2), text
        assert tokens == target
        assert generated_logp < -1e-3  # not a degenerate certainty: the comparison below has something to compare
        assert abs(float(raw[b, SPEC.index(z)]) - generated_logp) < 2e-5
        # The router's own decoder (shared prompt cache) agrees token by token.
        own = router.generate([question])[0]
        assert own.token_ids == tokens and own.z == (0, 2)
        assert max(abs(a - float(steps[i, t])) for i, (a, t) in enumerate(zip(own.logprobs, tokens))) < 2e-5

    greedy = router.greedy(QUESTIONS)
    assert [d.z for d in greedy] == [(0, 2), (0, 2)]
    assert abs(float(greedy[0].log_prob) - float(log_pi[0, 2])) < 1e-6


def test_every_assignment_scores_like_hf_generate_forced_to_it():
    """Independent reference for all z: HF generate (left-padded batch, its own cache) forced onto s_z."""
    router = make_router()
    batch = router.encode(QUESTIONS)
    prompt_len = batch.input_ids.shape[1]
    with torch.no_grad():
        state = router.forward_prompt(batch)
        log_pi = router.assignment_log_probs(state)
        for z in SPEC.assignments():
            target = router.target_ids(SPEC.canonical_json(z))
            out = router.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=len(target),
                do_sample=False, eos_token_id=router.end_id, pad_token_id=router.pad_id,
                prefix_allowed_tokens_fn=lambda _, ids, target=target: [target[len(ids) - prompt_len]],
                output_logits=True, return_dict_in_generate=True,
            )
            assert out.sequences[:, prompt_len:].tolist() == [target, target]
            steps = torch.stack(out.logits, dim=1).double().log_softmax(-1)  # raw logits, before the forcing
            reference = steps.gather(-1, out.sequences[:, prompt_len:].unsqueeze(-1)).squeeze(-1).sum(-1)  # (2,)
            raw = router.score(state, torch.arange(2), [target, target])
            torch.testing.assert_close(raw.double(), reference, atol=2e-5, rtol=0)
    assert not torch.allclose(log_pi[0], log_pi[1])


@pytest.mark.parametrize("arch, end_token", [("qwen2", "<|im_end|>"), ("mistral", "<|im_end|>")])
def test_other_chat_templates(arch, end_token):
    """Qwen2's ChatML and the tiny Mistral's [INST] template: the answer closes with the template's turn end."""
    model, tokenizer = build_tiny_model(arch)
    router = HighLevelRouter(model, tokenizer, SPEC, max_prompt_tokens=512)
    assert tokenizer.convert_ids_to_tokens(router.target_ids(SPEC.canonical_json((1, 2)))[-1]) == end_token
    rendered = tokenizer.apply_chat_template(
        routing_messages(SPEC, "q") + [{"role": "assistant", "content": SPEC.canonical_json((1, 2))}], tokenize=False
    )
    assert SPEC.canonical_json((1, 2)) + end_token in rendered
    with torch.no_grad():
        log_pi = router.log_probs(QUESTIONS)
    assert torch.allclose(log_pi.exp().sum(-1), torch.ones(2), atol=1e-6)


def test_batched_left_padding_equals_single_prompts():
    router = make_router()
    with torch.no_grad():
        batched = router.log_probs(QUESTIONS)
        singles = torch.cat([router.log_probs([q]) for q in QUESTIONS])
    assert not torch.allclose(batched[0], batched[1])  # the two problems really are routed differently
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_consistent_with_the_table():
    router = make_router()
    problems = QUESTIONS * 4
    first = router.sample(problems, seed=3)
    again = router.sample(problems, seed=3)
    assert [d.z for d in first] == [d.z for d in again]
    assert len({d.z for d in first}) > 1  # a near-uniform random router does not always pick the same z
    with torch.no_grad():
        table = router.log_probs(problems)
    for b, d in enumerate(first):
        assert abs(float(d.log_prob) - float(table[b, SPEC.index(d.z)])) < 1e-5


def test_log_prob_has_gradients_into_the_backbone():
    router = make_router()
    router.model.requires_grad_(True)
    log_prob = router.log_prob(QUESTIONS, [(0, 1), (2, 2)])
    assert log_prob.shape == (2,) and bool((log_prob < 0).all())
    log_prob.sum().backward()
    embed = router.model.get_input_embeddings().weight.grad
    q_proj = router.model.model.layers[0].self_attn.q_proj.weight.grad
    assert embed is not None and float(embed.abs().sum()) > 0 and float(q_proj.abs().sum()) > 0


def test_large_action_space_samples_by_generation_with_counted_fallback(caplog):
    router = make_router(max_exact_assignments=4, max_new_tokens=8)  # |Z| = 9 > 4: generation path
    with pytest.raises(ValueError, match="exceeds router.max_exact_assignments"):
        router.log_probs(QUESTIONS)
    router.model.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="haps_ray.routing.high_level"):
        decisions = router.sample(QUESTIONS, seed=0)
    assert router.counters == {"generated": 2, "invalid": 2, "truncated_prompts": 0}
    assert sum("is not an assignment" in r.message for r in caplog.records) == 2
    for d in decisions:
        assert d.fallback and len(d.z) == 2 and all(0 <= i < 3 for i in d.z)
        assert d.log_prob.requires_grad and torch.isfinite(d.log_prob)
    # log π of a sampled z is the sequence log-probability of its canonical string.
    with torch.no_grad():
        logp, _ = router.target_log_probs(QUESTIONS, [SPEC.canonical_json(d.z) for d in decisions])
    assert torch.allclose(torch.stack([d.log_prob for d in decisions]).detach(), logp, atol=1e-5)


def test_large_action_space_reads_a_valid_generated_answer(fitted):
    router = HighLevelRouter(*fitted, SPEC, max_prompt_tokens=512, max_exact_assignments=4)
    decisions = router.greedy(QUESTIONS)
    assert [(d.z, d.fallback, d.text) for d in decisions] == [((0, 2), False, SPEC.canonical_json((0, 2)))] * 2
    assert router.counters["invalid"] == 0 and router.counters["generated"] == 2
    with torch.no_grad():
        logp, _ = router.target_log_probs(QUESTIONS, [SPEC.canonical_json((0, 2))] * 2)
    assert torch.allclose(torch.stack([d.log_prob for d in decisions]), logp, atol=1e-5)


def test_long_problems_are_truncated_and_counted():
    router = make_router(max_prompt_tokens=260)
    batch = router.encode(["word " * 400, "short"])
    assert batch.input_ids.shape[1] <= 260 and router.counters["truncated_prompts"] == 1
    assert "[...]" in router.tokenizer.decode(batch.input_ids[0])
    tight = make_router(max_prompt_tokens=64)
    problem = Problem(id="p-7", task="mmlu", question="q", answer="A", choices=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"problem p-7: .*router.max_prompt_tokens"):
        tight.encode([problem])
