"""Ragged decode attention (haps_ray.engine.ragged) and the reserved KV cache's in-place row dropping
(haps_ray.engine.hf_internals.ReservedLayer)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from haps_ray.engine import LLMEngine
from haps_ray.engine import generator as generator_module
from haps_ray.engine.hf_internals import ReservedLayer
from haps_ray.engine.prefill import prefill_groups
from haps_ray.engine.ragged import RAGGED_SDPA, ragged_sdpa_forward, row_spans, use_ragged_attention
from tests.helpers import CHATS, assert_matches_merged_references, random_adapter


def test_row_spans_cover_rows_in_order_and_bound_padding() -> None:
    lengths = [900, 880, 400, 390, 385, 120, 118, 30]
    spans = row_spans(lengths, waste=0.1)
    assert [r for r0, r1, _ in spans for r in range(r0, r1)] == list(range(len(lengths)))
    for r0, r1, n in spans:
        assert n == lengths[r0]
        assert (r1 - r0) * n <= 1.1 * sum(lengths[r0:r1])
    assert spans == [(0, 2, 900), (2, 5, 400), (5, 7, 120), (7, 8, 30)]
    assert row_spans([50, 50, 50]) == [(0, 3, 50)]
    assert row_spans([]) == []
    with pytest.raises(ValueError, match="non-increasing"):
        row_spans([10, 20])


def padded_decode_batch(lengths: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 8, seed: int = 0):
    """One decode step's query and a left-padded cache (garbage in padding) with its bool padding mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + 3  # every row is left padded, the longest one too
    query = torch.randn(len(lengths), heads, 1, dim, generator=g)
    key = torch.randn(len(lengths), kv_heads, width, dim, generator=g)
    value = torch.randn(len(lengths), kv_heads, width, dim, generator=g)
    mask = torch.zeros(len(lengths), 1, 1, width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, ..., width - n :] = True
    return query, key, value, mask


def test_ragged_attention_equals_padded_sdpa() -> None:
    lengths = [40, 37, 20, 19, 5]
    query, key, value, mask = padded_decode_batch(lengths)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    expected, _ = ragged_sdpa_forward(module, query, key, value, mask)  # no spans: plain SDPA
    reference = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask)
    assert torch.allclose(expected, reference.transpose(1, 2), atol=1e-6)
    spans = row_spans(lengths)
    assert len(spans) > 1
    got, _ = ragged_sdpa_forward(module, query, key, value, mask, row_spans=spans)
    assert torch.allclose(got, expected, atol=1e-6)
    # a span must cover its rows' valid positions: one too short drops a real key and changes the output
    short = [(r0, r1, n - 1) for r0, r1, n in spans]
    wrong, _ = ragged_sdpa_forward(module, query, key, value, mask, row_spans=short)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_only_sdpa_models_switch_to_ragged_attention(make_tiny) -> None:
    model, tok = make_tiny("llama")
    assert use_ragged_attention(model) and model.config._attn_implementation == RAGGED_SDPA
    eager, _ = make_tiny("llama")
    eager.set_attn_implementation("eager")
    assert not use_ragged_attention(eager) and eager.config._attn_implementation == "eager"
    engine = LLMEngine(eager, tok, name="eager")
    assert engine.generate(CHATS[:2], max_new_tokens=3)[0].n_output_tokens == 3


def test_reserved_layer_drops_rows_in_place() -> None:
    layer = ReservedLayer(reserve=4)
    keys = torch.arange(5 * 2 * 3 * 2, dtype=torch.float32).reshape(5, 2, 3, 2)
    layer.update(keys, -keys)
    buffer = layer._key_buffer.data_ptr()
    layer.batch_select_indices(torch.tensor([0, 2, 3]))
    assert torch.equal(layer.keys, keys[[0, 2, 3]]) and torch.equal(layer.values, -keys[[0, 2, 3]])
    step = torch.full((3, 2, 1, 2), 7.0)
    layer.update(step, -step)
    assert layer.keys.data_ptr() == buffer  # neither the drop nor the next step allocated a new buffer
    assert torch.equal(layer.keys, torch.cat([keys[[0, 2, 3]], step], dim=2))
    layer.batch_select_indices(torch.tensor([2, 0]))  # not ascending: rows re-ordered by a copy
    assert torch.equal(layer.keys, torch.cat([keys[[3, 0]], step[:2]], dim=2))


def test_rows_of_different_lengths_decode_in_spans_and_leave_the_batch(make_tiny, monkeypatch) -> None:
    """Prompts of very different lengths (several spans per step) with rows ending at different steps (in-place
    row drops): every sample still equals its own unpadded merged-weight run."""
    model, tok = make_tiny("qwen2")
    long_chat = [{"role": "user", "content": "Explain, step by step and with examples, " + "why the sky looks blue " * 12}]
    chats = [CHATS[0], long_chat, CHATS[1], CHATS[2]]
    adapters = [random_adapter(model, 1, 8, 1.0, seed=71), None, random_adapter(model, 1, 4, 0.5, seed=72), None]
    free = LLMEngine(copy.deepcopy(model), tok, name="free").generate(chats, adapters, max_new_tokens=12)
    # an extra EOS id that ends the longest prompt's sample (row 0) early: the rows after it move up
    eos = free[1].token_ids[3]
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    plain = copy.deepcopy(model)
    engine = LLMEngine(model, tok, name="tiny-qwen2", prefix_cache_mb=0)
    seen: list[list] = []

    def recording_row_spans(lengths, *args):
        seen.append(row_spans(lengths, *args))
        return seen[-1]

    monkeypatch.setattr(generator_module, "row_spans", recording_row_spans)
    gens = engine.generate(chats, adapters, max_new_tokens=12)
    assert len({g.n_output_tokens for g in gens}) > 1 and max(g.n_output_tokens for g in gens) == 12
    assert any(len(spans) > 1 for spans in seen)
    assert len({sum(r1 - r0 for r0, r1, _ in spans) for spans in seen}) > 1  # rows left the batch
    assert_matches_merged_references(engine, plain, chats, adapters, gens)


@pytest.fixture
def nan_filled_empty_tensors():
    """torch.empty & co. return NaN-filled memory: any uninitialised padding that reaches attention shows up."""
    flag = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = flag


def test_merged_group_caches_leave_no_uninitialised_padding(make_tiny, nan_filled_empty_tensors) -> None:
    model, tok = make_tiny("mistral")
    plain = copy.deepcopy(model)
    engine = LLMEngine(model, tok, name="tiny-mistral")
    chats = [CHATS[1], CHATS[2], CHATS[0], CHATS[1] + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]
    assert len(prefill_groups([len(engine.encode_prompt(c)) for c in chats])) > 1
    adapters = [None, random_adapter(model, 1, 8, 1.0, seed=81), None, None]
    gens = engine.generate(chats, adapters, max_new_tokens=6)
    assert all(torch.isfinite(torch.tensor(g.logprobs)).all() for g in gens)
    assert_matches_merged_references(engine, plain, chats, adapters, gens)
