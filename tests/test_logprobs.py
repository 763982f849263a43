"""The one token log-prob path (haps_ray.engine.logprobs) against plain log_softmax and autograd references."""

import pytest
import torch
from torch import nn

from haps_ray.engine.logprobs import head_log_probs, selective_log_softmax


def test_selective_log_softmax_equals_log_softmax_in_every_chunking():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 1000, generator=g) * 4
    index = torch.randint(0, 1000, (5, 7), generator=g)
    reference = logits.double().log_softmax(-1).gather(-1, index[..., None]).squeeze(-1)
    for chunk in (1, 3, 8, 1000):
        got = selective_log_softmax(logits, index, chunk_rows=chunk)
        assert got.shape == (5, 7) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)


def test_bf16_logits_are_reduced_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 32000, generator=g) * 3).to(torch.bfloat16)
    index = torch.randint(0, 32000, (64,), generator=g)
    reference = logits.double().log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)  # exact, of the bf16 values
    got = selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, atol=1e-4, rtol=0)
    naive = logits.log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)  # a bf16 log_softmax rounds to ~1e-2
    assert (naive.double() - reference).abs().max() > 10 * (got.double() - reference).abs().max()


def test_head_log_probs_values_and_gradients_equal_full_logits_autograd():
    g = torch.Generator().manual_seed(2)
    head = nn.Linear(16, 500, bias=False)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    index = torch.randint(0, 500, (37,), generator=g)
    weights = torch.randn(37, generator=g)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    ref_head = nn.Linear(16, 500, bias=False)
    ref_head.weight.data.copy_(head.weight.data)
    reference = ref_head(ref_hidden).log_softmax(-1).gather(-1, index[:, None]).squeeze(-1)
    (weights * reference).sum().backward()
    got = head_log_probs(hidden, head, index, chunk_rows=8)  # 5 chunks, each recomputed in backward
    (weights * got).sum().backward()
    torch.testing.assert_close(got, reference.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, atol=1e-5, rtol=1e-5)
    assert hidden.grad.abs().max() > 1e-3  # not vacuous


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"logits \(2, 5\) do not match index \(3,\)"):
        selective_log_softmax(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden must be"):
        head_log_probs(torch.zeros(2, 3, 4), nn.Linear(4, 5), torch.zeros(2, dtype=torch.long))
