"""Per-sample LoRA (haps_ray.lora) against an independent reference: the model with W + alpha·B_i A_i merged in.

Tiny random-weight Llama, Qwen2 and Mistral models, fp32. The reference never touches the wrapper code: it
deep-copies the plain model and adds the low-rank update to `o_proj.weight` directly, then runs one sample at a
time without padding.
"""

from __future__ import annotations

import copy

import pytest
import torch

from haps_ray.lora import Adapter, adapter_shapes, attach_lora, use_adapters
from tests.helpers import ARCHS, merged_model, random_adapter

def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = torch.tensor(s)
        mask[row, width - len(s) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [1, 2])
def test_mixed_batch_equals_merged_reference_per_sample(make_tiny, arch: str, k: int) -> None:
    model, tok = make_tiny(arch)
    plain = copy.deepcopy(model)
    attach_lora(model, k)
    # different ranks (zero-padded internally), alphas, a None sample, and different prompt lengths
    adapters = [
        random_adapter(model, k, 8, 0.5, seed=1),
        None,
        random_adapter(model, k, 4, 1.0, seed=2),
        random_adapter(model, k, 8, 0.25, seed=3),
    ]
    prompts = random_prompts(model.config.vocab_size, [7, 3, 11, 5])
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad(), use_adapters(model, adapters):
        batched = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    width = ids.shape[1]
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        with torch.no_grad():
            expected = merged_model(plain, adapter)(input_ids=torch.tensor([prompt])).logits[0]
            base = plain(input_ids=torch.tensor([prompt])).logits[0]
        got = batched[i, width - len(prompt) :]
        assert (got - expected).abs().max().item() < 1e-5, f"sample {i}"
        if adapter is not None:  # the comparison is not vacuous: the adapter does move the logits
            assert (expected - base).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_no_adapter_is_exactly_the_base_model(make_tiny, arch: str) -> None:
    model, tok = make_tiny(arch)
    plain = copy.deepcopy(model)
    attach_lora(model, 2)
    ids, mask, pos = left_pad(random_prompts(model.config.vocab_size, [6, 9]), tok.pad_token_id)
    with torch.no_grad():
        reference = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        outside = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with use_adapters(model, None):
            none = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with use_adapters(model, [None, random_adapter(model, 2, 8, 1.0, seed=5)]):
            mixed = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(outside, reference)
    assert torch.equal(none, reference)
    assert torch.equal(mixed[0], reference[0])  # a None sample in a mixed batch: zero factors add exactly 0
    assert not torch.allclose(mixed[1], reference[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_generate_with_kv_cache_and_left_padding(make_tiny, arch: str) -> None:
    model, tok = make_tiny(arch)
    plain = copy.deepcopy(model)
    attach_lora(model, 1)
    adapters = [random_adapter(model, 1, 8, 1.0, seed=11), None, random_adapter(model, 1, 8, 1.0, seed=12)]
    prompts = random_prompts(model.config.vocab_size, [4, 9, 6], seed=3)
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), use_adapters(model, adapters):
        batched = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, ids.shape[1] :]
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        with torch.no_grad():
            single = merged_model(plain, adapter).generate(input_ids=torch.tensor([prompt]), **settings)
        assert batched[i].tolist() == single[0, len(prompt) :].tolist(), f"sample {i}"


def test_factors_get_gradients_and_weights_do_not(make_tiny) -> None:
    model, tok = make_tiny("llama")
    attach_lora(model, 2)
    model.train()  # training mode: dropout is 0 in these configs, the path must still be differentiable
    adapter = random_adapter(model, 2, 4, 1.0, seed=7)
    A, B = adapter.A.clone().requires_grad_(True), adapter.B.clone().requires_grad_(True)
    ids = torch.tensor(random_prompts(model.config.vocab_size, [5, 5]))
    with use_adapters(model, [Adapter(A, B, 1.0), None]):
        model(input_ids=ids).logits[0].logsumexp(-1).sum().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_context_manager_clears_factors_even_on_error(make_tiny) -> None:
    model, _ = make_tiny("llama")
    layers = attach_lora(model, 1)
    with pytest.raises(RuntimeError, match="boom"):
        with use_adapters(model, [random_adapter(model, 1, 4, 1.0, seed=0)]):
            assert layers[0].A is not None
            raise RuntimeError("boom")
    assert layers[0].A is None


def test_attach_is_idempotent_and_reports_shapes(make_tiny) -> None:
    model, _ = make_tiny("qwen2")
    first = attach_lora(model, 2)
    assert attach_lora(model, 2) == first
    hidden = model.config.hidden_size
    assert adapter_shapes(model) == [(hidden, hidden), (hidden, hidden)]
    with pytest.raises(ValueError, match="already carries per-sample LoRA on 2 layers"):
        attach_lora(model, 1)
    with pytest.raises(ValueError, match=r"must be in \[1, 2\]"):
        attach_lora(copy.deepcopy(model), 3)


def test_bad_adapters_are_rejected(make_tiny) -> None:
    model, _ = make_tiny("llama")
    attach_lora(model, 1)
    hidden = model.config.hidden_size
    ids = torch.tensor(random_prompts(model.config.vocab_size, [3, 3]))
    with pytest.raises(ValueError, match="adapter 0 has 2 layers, model has only 1"):
        with use_adapters(model, [Adapter(torch.zeros(2, 4, hidden), torch.zeros(2, hidden, 4), 1.0)]):
            pass
    with pytest.raises(ValueError, match="do not fit o_proj"):
        with use_adapters(model, [Adapter(torch.zeros(1, 4, hidden + 1), torch.zeros(1, hidden, 4), 1.0)]):
            pass
    with pytest.raises(ValueError, match="input batch 2 != adapter batch 1"):
        with use_adapters(model, [random_adapter(model, 1, 4, 1.0, seed=0)]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="disagree on layers or rank"):
        Adapter(torch.zeros(1, 4, hidden), torch.zeros(1, hidden, 3), 1.0)
    plain, _ = make_tiny("llama")
    with pytest.raises(ValueError, match="call attach_lora first"):
        with use_adapters(plain, [random_adapter(plain, 1, 4, 1.0, seed=0)]):
            pass
