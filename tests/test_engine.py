"""LLMEngine (haps_ray.engine) and EngineActor (actors.engine) on tiny random-weight Llama, Qwen2 and Mistral, fp32.

References are independent of the engine: a merged-weight copy of the plain model (W + alpha·B A) run one sample
at a time without padding, plain autograd through that merged weight, and the plain tokenizer.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from haps_ray.config import CandidateConfig
from haps_ray.engine import LLMEngine, bucket_by_engine
from haps_ray.engine.hf_internals import TransformersInternalsError, check_internals
from haps_ray.engine.prefill import prefill_groups
from haps_ray.engine.prefix_cache import common_prefix_length
from haps_ray.lora import decoder_layers
from tests.helpers import (
    ARCHS, CHATS, assert_matches_merged_references, hf_greedy, make_engine, merged_model, mixed_adapters, random_adapter,
    reference_logprobs,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_generate_and_score_match_per_sample_merged_runs(make_tiny, arch: str) -> None:
    engine, plain = make_engine(make_tiny, arch)
    adapters = mixed_adapters(engine)
    groups = prefill_groups([len(engine.encode_prompt(chat)) for chat in CHATS])
    assert len(groups) > 1  # prefilled in groups whose caches are merged (and, for llama/qwen2, rows re-ordered)
    gens = engine.generate(CHATS, adapters, max_new_tokens=6)
    for i, (chat, adapter, gen) in enumerate(zip(CHATS, adapters, gens)):
        oracle = hf_greedy(merged_model(plain, adapter), engine.encode_prompt(chat), 6, engine.encoder.eos_ids,
                           engine.encoder.pad_id)
        assert gen.token_ids == oracle, f"sample {i}"
        assert gen.n_input_tokens == len(engine.encode_prompt(chat))
        assert gen.n_output_tokens == len(gen.token_ids)
        with torch.no_grad():
            expected = reference_logprobs(merged_model(plain, adapter), engine.encode_prompt(chat), gen.token_ids)
        assert (torch.tensor(gen.logprobs) - expected).abs().max().item() < 1e-5
    scored = engine.score(CHATS, [g.token_ids for g in gens], adapters)
    for gen, s in zip(gens, scored):
        assert len(s) == len(gen.token_ids)
        assert (torch.tensor(s) - torch.tensor(gen.logprobs)).abs().max().item() < 1e-5
    base = engine.generate(CHATS, max_new_tokens=6)
    assert base[0].token_ids != gens[0].token_ids or base[2].token_ids != gens[2].token_ids  # adapters matter
    assert base[1].token_ids == gens[1].token_ids  # the None sample is the base model


SYSTEM = ("You are one of two agents on a team. Read the question, reason about it step by step, check each "
          "option in turn and end with the letter of the option you choose.")
SHARED_CHATS = [  # a long shared system prompt, two identical chats (G samples of one problem), one chat without it
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which planet is largest? A) Mars B) Jupiter"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 7 x 8? A) 54 B) 56"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 7 x 8? A) 54 B) 56"}],
    [{"role": "user", "content": "Name a prime number."}],
]


def second_round(chats: list, replies: list[str]) -> list:
    """Each chat extended by its reply and a follow-up: its whole first-round prompt is a prefix of the new one."""
    return [chat + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Check it once more."}]
            for chat, reply in zip(chats, replies)]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_reuses_shared_prompts_and_matches_uncached_references(make_tiny, arch: str) -> None:
    engine, plain = make_engine(make_tiny, arch)
    block = engine.prefix_cache.block
    prompts = [engine.encode_prompt(chat) for chat in SHARED_CHATS]
    shared_system = common_prefix_length(prompts[0], prompts[1]) // block * block
    assert shared_system >= 2 * block
    adapters = [random_adapter(engine.model, 1, 8, 1.0, seed=51), None, random_adapter(engine.model, 1, 4, 0.5, seed=52), None]
    gens = engine.generate(SHARED_CHATS, adapters, max_new_tokens=5)
    assert_matches_merged_references(engine, plain, SHARED_CHATS, adapters, gens)
    # k = 1: adapters act after every layer's KV, so all rows share. The system prompt is prefilled once for
    # the first three rows, the two identical prompts once between them.
    identical = engine.prefix_cache.usable(len(prompts[1]), len(prompts[1]))
    assert engine.reused_tokens >= shared_system + 2 * identical
    assert engine.prefill_tokens + engine.reused_tokens >= sum(len(p) for p in prompts)
    before = engine.reused_tokens
    follow_up = second_round(SHARED_CHATS, [g.text for g in gens])
    again = engine.generate(follow_up, adapters, max_new_tokens=5)
    assert_matches_merged_references(engine, plain, follow_up, adapters, again)
    carried = sum(engine.prefix_cache.usable(common_prefix_length(p, engine.encode_prompt(c)), len(engine.encode_prompt(c)))
                  for p, c in zip(prompts, follow_up))
    assert engine.reused_tokens - before >= carried > 0
    uncached, _ = make_engine(make_tiny, arch, prefix_cache_mb=0)
    assert uncached.prefix_cache is None
    assert [g.token_ids for g in uncached.generate(follow_up, adapters, max_new_tokens=5)] == [g.token_ids for g in again]
    assert uncached.reused_tokens == 0


def test_prefix_cache_skips_rows_whose_adapter_changes_kv(make_tiny) -> None:
    engine, plain = make_engine(make_tiny, "qwen2", k=2)  # the deeper adapted layer feeds the last layer's KV
    adapters = [random_adapter(engine.model, 2, 8, 1.0, seed=61), None, None, random_adapter(engine.model, 2, 4, 1.0, seed=62)]
    gens = engine.generate(SHARED_CHATS, adapters, max_new_tokens=4)
    assert_matches_merged_references(engine, plain, SHARED_CHATS, adapters, gens)
    prompts = [engine.encode_prompt(chat) for chat in SHARED_CHATS]
    # only the two adapter-free rows (the identical pair) share, and only with each other; adapter rows are
    # neither served nor stored
    assert engine.reused_tokens == engine.prefix_cache.usable(len(prompts[1]), len(prompts[1])) * 2
    assert engine.prefix_cache.match_length(prompts[3]) == 0
    assert engine.prefix_cache.match_length(prompts[0]) <= common_prefix_length(prompts[0], prompts[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_grads_equal_autograd_through_merged_weights(make_tiny, arch: str) -> None:
    k = 2
    engine, plain = make_engine(make_tiny, arch, k=k)
    adapters = [random_adapter(engine.model, k, 8, 0.5, seed=31), random_adapter(engine.model, k, 4, 1.0, seed=32)]
    completions = [[11, 220, 4821, 17], "Paris is the answer"]
    weights = [0.7, -1.3]
    grads = engine.adapter_grads(CHATS[:2], completions, adapters, weights)
    assert all(p.grad is None and not p.requires_grad for p in engine.model.parameters())
    for i, (chat, completion, adapter, w) in enumerate(zip(CHATS, completions, adapters, weights)):
        ids = completion if isinstance(completion, list) else engine.tokenizer(completion, add_special_tokens=False)["input_ids"]
        A, B = adapter.A.clone().requires_grad_(True), adapter.B.clone().requires_grad_(True)
        ref = copy.deepcopy(plain)
        for l, layer in enumerate(decoder_layers(ref)[-k:]):
            W = layer.self_attn.o_proj.weight
            layer.self_attn.o_proj = _MergedLinear(W, A, B, l, adapter.alpha)
        (w * reference_logprobs(ref, engine.encode_prompt(chat), ids).sum()).backward()
        dA, dB = grads[i]
        assert dA.shape == adapter.A.shape and dB.shape == adapter.B.shape
        assert torch.allclose(dA, A.grad, atol=1e-5, rtol=1e-4), f"sample {i} dA"
        assert torch.allclose(dB, B.grad, atol=1e-5, rtol=1e-4), f"sample {i} dB"
        assert A.grad.abs().max() > 1e-4  # not vacuous


class _MergedLinear(nn.Module):
    """o_proj with weight W + alpha · B[l] @ A[l], differentiable in A and B: the autograd reference."""

    def __init__(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, l: int, alpha: float) -> None:
        super().__init__()
        self.W, self.A, self.B, self.l, self.alpha = W, A, B, l, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W + self.alpha * self.B[self.l] @ self.A[self.l])


def test_adapter_grads_chunked_and_empty_completion(make_tiny) -> None:
    engine, _ = make_engine(make_tiny, "llama", max_batch_size=2)
    whole, _ = make_engine(make_tiny, "llama", max_batch_size=8)
    adapters = mixed_adapters(engine)
    adapters[1] = random_adapter(engine.model, 1, 8, 1.0, seed=40)
    completions = [[5, 6, 7], [], [8, 9]]
    chunked = engine.adapter_grads(CHATS, completions, adapters, [1.0, 1.0, 2.0])
    full = whole.adapter_grads(CHATS, completions, adapters, [1.0, 1.0, 2.0])
    for (a1, b1), (a2, b2) in zip(chunked, full):
        assert torch.allclose(a1, a2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)
    assert chunked[1][0].abs().max() == 0 and chunked[1][1].abs().max() == 0  # nothing to differentiate
    with pytest.raises(ValueError, match=r"adapters\[1\]: adapter_grads needs an Adapter"):
        engine.adapter_grads(CHATS[:2], [[1], [2]], [adapters[0], None], [1.0, 1.0])


def test_greedy_is_deterministic_and_chunking_changes_nothing(make_tiny) -> None:
    engine, _ = make_engine(make_tiny, "qwen2", max_batch_size=2)
    adapters = mixed_adapters(engine)
    first = engine.generate(CHATS, adapters, max_new_tokens=5)
    again = engine.generate(CHATS, adapters, max_new_tokens=5)
    engine.max_batch_size = 8
    whole = engine.generate(CHATS, adapters, max_new_tokens=5)
    assert [g.token_ids for g in first] == [g.token_ids for g in again] == [g.token_ids for g in whole]
    assert all(g.finish_reason == "length" and g.n_output_tokens == 5 for g in first)


def test_sampling_is_reproducible_with_a_seed(make_tiny) -> None:
    engine, _ = make_engine(make_tiny, "mistral")
    adapters = mixed_adapters(engine)
    a = engine.generate(CHATS, adapters, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate(CHATS, adapters, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    c = engine.generate(CHATS, adapters, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # log-probs are under the untempered distribution: score() reproduces them for sampled tokens too
    scored = engine.score(CHATS, [g.token_ids for g in a], adapters)
    for g, s in zip(a, scored):
        assert torch.allclose(torch.tensor(s), torch.tensor(g.logprobs), atol=1e-5)
    # a nucleus too small to hold more than the top token is greedy decoding
    tiny_p = engine.generate(CHATS, adapters, max_new_tokens=6, temperature=1.0, top_p=1e-9, seed=3)
    greedy = engine.generate(CHATS, adapters, max_new_tokens=6)
    assert [g.token_ids for g in tiny_p] == [g.token_ids for g in greedy]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_is_templated_once_with_one_bos(make_tiny, arch: str) -> None:
    engine, _ = make_engine(make_tiny, arch)
    tok = engine.tokenizer
    text = tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    assert engine.encode_prompt(CHATS[1]) == tok(text, add_special_tokens=False)["input_ids"]
    # a tokenizer that adds BOS by default: the templated text must not get a second one
    model, _ = make_tiny(arch)
    eager = copy.deepcopy(tok)
    eager.add_bos_token = True
    bos = eager.bos_token_id
    ids = LLMEngine(model, eager, name="bos").encode_prompt(CHATS[1])
    assert ids[0] == bos and ids[1] != bos
    naive = eager(eager.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False))["input_ids"]
    if text.startswith(eager.bos_token):  # the template writes BOS itself: the naive route doubles it
        assert naive[:2] == [bos, bos] and ids == naive[1:]
    else:  # the template has no BOS: the engine supplies the one the tokenizer expects
        assert ids == naive


def test_stop_strings_and_eos_end_samples_individually(make_tiny) -> None:
    engine, plain = make_engine(make_tiny, "llama")
    adapters = mixed_adapters(engine)
    free = engine.generate(CHATS, adapters, max_new_tokens=8)
    tok = engine.tokenizer
    # a stop string completed by a middle token of sample 0: the shortest new tail of its decoded text
    texts = [tok.decode(free[0].token_ids[:n], skip_special_tokens=True) for n in range(len(free[0].token_ids) + 1)]
    n, stop = next((n, texts[n][-w:]) for n in range(2, 7) for w in range(2, 6) if texts[n][-w:] not in texts[n - 1])
    head = texts[n]
    stopped = engine.generate(CHATS, adapters, max_new_tokens=8, stop=[stop])
    for i, (full, got) in enumerate(zip(free, stopped)):
        # reference: the shortest prefix of the unstopped output whose text holds the stop string
        ends = [n for n in range(1, len(full.token_ids) + 1) if stop in tok.decode(full.token_ids[:n], skip_special_tokens=True)]
        expected = full.token_ids[: ends[0]] if ends else full.token_ids
        assert got.token_ids == expected, f"sample {i}"
        assert got.finish_reason == ("stop" if ends else "length")
        assert got.text == full.text.split(stop)[0] if ends else got.text == full.text
        assert torch.allclose(torch.tensor(got.logprobs), torch.tensor(full.logprobs[: len(expected)]), atol=1e-5)
    assert stopped[0].token_ids == free[0].token_ids[:n] and stopped[0].text == head[: head.find(stop)]
    # an EOS id (from the generation config) ends a sample and is kept as its last token
    eos = free[1].token_ids[2]
    plain.generation_config.eos_token_id = [tok.eos_token_id, eos]
    with_eos = LLMEngine(plain, tok, name="eos").generate(CHATS[:2], max_new_tokens=8)
    assert with_eos[1].token_ids == free[1].token_ids[:3] and with_eos[1].finish_reason == "stop"
    assert with_eos[1].n_output_tokens == 3 and len(with_eos[1].logprobs) == 3


def test_score_text_completion_and_no_adapter_path(make_tiny) -> None:
    engine, plain = make_engine(make_tiny, "qwen2")
    completions = ["The capital is Paris.", [100, 200, 300, 400, 500]]
    scored = engine.score(CHATS[:2], completions)
    assert engine.score(CHATS[:2], completions, [None, None]) == scored
    for chat, completion, s in zip(CHATS, completions, scored):
        ids = completion if isinstance(completion, list) else engine.tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reference_logprobs(plain, engine.encode_prompt(chat), ids)
        assert len(s) == len(ids) and (torch.tensor(s) - expected).abs().max().item() < 1e-5


def test_bad_inputs_name_the_sample(make_tiny) -> None:
    engine, _ = make_engine(make_tiny, "llama")
    with pytest.raises(ValueError, match=r"messages\[1\]\[0\]: a message needs string 'role' and 'content'"):
        engine.generate([CHATS[0], [{"role": "user"}]], max_new_tokens=2)
    with pytest.raises(ValueError, match="1 adapters for 2 samples"):
        engine.generate(CHATS[:2], [None], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"completions\[0\]: expected token ids"):
        engine.score(CHATS[:1], [[1.5, 2]])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.generate(CHATS[:1], max_new_tokens=0)


def test_prefill_groups_bound_padding_and_cover_every_prompt() -> None:
    lengths = [300, 40, 310, 45, 1200, 42, 305, 600]
    groups = prefill_groups(lengths, waste=0.1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        real = sum(lengths[i] for i in group)
        assert len(group) * max(lengths[i] for i in group) <= 1.1 * real
    assert [sorted(g) for g in groups] == [[1, 3, 5], [0, 2, 6], [7], [4]]
    assert prefill_groups([50] * 4) == [[0, 1, 2, 3]]


def test_bucket_by_engine_scatters_back_in_order() -> None:
    items = [("llama", "q0"), ("qwen", "q1"), ("llama", "q2"), ("mistral", "q3"), ("qwen", "q4")]
    buckets = bucket_by_engine(items, key=lambda item: item[0])
    assert buckets.groups == {"llama": [0, 2], "qwen": [1, 4], "mistral": [3]}
    assert buckets.select("qwen") == [("qwen", "q1"), ("qwen", "q4")]
    results = {name: [f"{name}:{q}" for _, q in buckets.select(name)] for name in buckets.groups}
    assert buckets.scatter(results) == ["llama:q0", "qwen:q1", "llama:q2", "mistral:q3", "qwen:q4"]
    with pytest.raises(ValueError, match="bucket 'qwen': 1 results for 2 items"):
        buckets.scatter({**results, "qwen": ["x"]})


def test_switching_off_prefix_cache_and_ragged_attention_keeps_the_outputs(make_tiny) -> None:
    """candidates[].prefix_cache_mb = 0 and candidates[].ragged_attention = false reach the engine's parts, which
    only change speed: greedy outputs stay the same."""
    plain = LLMEngine.from_config(CandidateConfig(name="p", model="tiny-qwen2", dtype="float32", device="cpu",
                                                  prefix_cache_mb=0, ragged_attention=False))
    fast, _ = make_engine(make_tiny, "qwen2")
    assert plain.prefix_cache is None and not plain.generator.ragged
    assert fast.prefix_cache is not None and fast.generator.ragged
    chats = CHATS + [CHATS[1] + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]
    adapters = mixed_adapters(fast) + [None]
    assert [g.token_ids for g in plain.generate(chats, adapters, max_new_tokens=6)] == \
        [g.token_ids for g in fast.generate(chats, adapters, max_new_tokens=6)]
    assert plain.reused_tokens == 0


def test_from_config_and_info(make_tiny) -> None:
    engine = LLMEngine.from_config(CandidateConfig(name="small", model="tiny-llama", dtype="float32", device="cpu"), 2)
    info = engine.info()
    reference, _ = make_tiny("llama")
    from haps_ray.models import model_checksum

    assert info["name"] == "small" and info["lora_layers"] == 2 and info["model_type"] == "llama"
    assert info["adapter_shapes"] == [(64, 64), (64, 64)] and info["checksum"] == model_checksum(reference)


def test_transformers_internals_are_present_and_a_missing_one_is_named(monkeypatch) -> None:
    check_internals()  # the installed transformers has everything hf_internals relies on
    from transformers.cache_utils import DynamicLayer

    monkeypatch.delattr(DynamicLayer, "batch_select_indices")
    with pytest.raises(TransformersInternalsError, match=r"DynamicLayer.batch_select_indices is gone.*pyproject"):
        check_internals()


# ---- EngineActor on a real local Ray cluster ----


def test_engine_actor_matches_local_engine(ray_session, make_tiny) -> None:
    import ray

    from actors.engine import EngineActorClient, EnginePool
    from haps_ray.config import ExperimentConfig

    candidate = CandidateConfig(name="tiny", model="tiny-mistral", dtype="float32", device="cpu", num_cpus=0.5, replicas=2)
    pool = EnginePool(ExperimentConfig(candidates=[candidate]))
    try:
        actors = pool.handles["tiny"]
        local, _ = make_engine(make_tiny, "mistral")
        adapters = mixed_adapters(local)
        health = ray.get([a.health.remote() for a in actors])
        assert all(h["ok"] and h["name"] == "tiny" for h in health) and len({h["pid"] for h in health}) == 2
        assert pool.wait_ready() == [local.checksum]
        first, second = EngineActorClient(actors[0]), EngineActorClient(actors[1])
        remote = first.generate(CHATS, adapters, max_new_tokens=5, temperature=1.0, seed=3).result()
        mine = local.generate(CHATS, adapters, max_new_tokens=5, temperature=1.0, seed=3)
        assert [g.token_ids for g in remote] == [g.token_ids for g in mine]
        assert [g.text for g in remote] == [g.text for g in mine]
        completions = [g.token_ids for g in mine]
        assert second.score(CHATS, completions, adapters).result() == local.score(CHATS, completions, adapters)
        full = [a if a is not None else random_adapter(local.model, 1, 8, 1.0, seed=50) for a in adapters]
        remote_grads = second.adapter_grads(CHATS, completions, full, [1.0, -0.5, 2.0]).result()
        for (ra, rb), (la, lb) in zip(remote_grads, local.adapter_grads(CHATS, completions, full, [1.0, -0.5, 2.0])):
            assert torch.allclose(ra, la, atol=1e-6) and torch.allclose(rb, lb, atol=1e-6)
        assert ray.get(actors[0].health.remote())["calls"] == 1
    finally:
        pool.shutdown()
