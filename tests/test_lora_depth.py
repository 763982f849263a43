"""One engine for every LoRA depth of a sweep: an engine wrapped at the deepest K takes adapters of k <= K layers
and must then equal an engine wrapped at exactly k (generation, scores and adapter gradients)."""

from __future__ import annotations

import torch

from tests.helpers import CHATS, make_engine, random_adapter

DEEP = 2  # the sweep's deepest k (the tiny models have 2 layers); the batch mixes k=1 and k=2 adapters


def test_shallow_adapters_on_a_deeper_engine_equal_an_engine_wrapped_at_their_k(make_tiny) -> None:
    deep, _ = make_engine(make_tiny, "llama", k=DEEP)
    exact = {k: make_engine(make_tiny, "llama", k=k)[0] for k in (1, 2)}
    # a mixed batch: k=1 and k=2 adapters of different ranks, and a sample without adapter
    adapters = [random_adapter(exact[1].model, 1, 4, 1.0, seed=1), random_adapter(exact[2].model, 2, 8, 0.5, seed=2), None]
    reference = [exact[1], exact[2], exact[1]]  # None: any engine, the base model
    out = deep.generate(CHATS, adapters, max_new_tokens=8, temperature=0.0)
    for i, (ad, engine) in enumerate(zip(adapters, reference)):
        alone = engine.generate([CHATS[i]], [ad], max_new_tokens=8, temperature=0.0)[0]
        assert out[i].token_ids == alone.token_ids, f"sample {i}"
    plain = deep.generate(CHATS[:2], None, max_new_tokens=8, temperature=0.0)
    assert [g.token_ids for g in out[:2]] != [g.token_ids for g in plain]  # the adapters do change the output

    completions = [[11, 220, 4821, 17], "Paris is the answer"]
    scores = deep.score(CHATS[:2], completions, adapters[:2])
    grads = deep.adapter_grads(CHATS[:2], completions, adapters[:2], [0.7, -1.3])
    for i, k in enumerate((1, 2)):
        ref_score = exact[k].score([CHATS[i]], [completions[i]], [adapters[i]])[0]
        assert torch.allclose(torch.tensor(scores[i]), torch.tensor(ref_score), atol=1e-5)
        (dA, dB), = exact[k].adapter_grads([CHATS[i]], [completions[i]], [adapters[i]], [[0.7, -1.3][i]])
        assert grads[i][0].shape == adapters[i].A.shape and grads[i][1].shape == adapters[i].B.shape
        assert torch.allclose(grads[i][0], dA, atol=1e-5, rtol=1e-4) and torch.allclose(grads[i][1], dB, atol=1e-5, rtol=1e-4)
        assert dA.abs().max() > 1e-4  # not vacuous
