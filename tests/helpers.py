"""Helpers shared by the test modules: independent references for engines and adapters, a scripted engine double.

References never go through the code under test: `merged_model` deep-copies a plain model and adds the low-rank
update to `o_proj.weight` directly; `hf_greedy` is transformers' own `generate` (greedy) on one unpadded prompt;
`reference_logprobs` is one unpadded forward with a plain log-softmax.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from haps_ray.engine import Generation, LLMEngine
from haps_ray.lora import Adapter, decoder_layers, lora_layers

FIXTURES = Path(__file__).parent / "fixtures"
ARCHS = ["llama", "qwen2", "mistral"]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Name three prime numbers and explain why each one is prime."}],
]


def random_adapter(model: nn.Module, k: int, rank: int, alpha: float, seed: int) -> Adapter:
    """Factors for the last k o_proj layers, large enough to change the model's outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for layer in decoder_layers(model)[-k:]:
        o_proj = getattr(layer.self_attn.o_proj, "base_layer", layer.self_attn.o_proj)
        shapes.append((o_proj.in_features, o_proj.out_features))
    d_in, d_out = shapes[0]
    A = torch.randn(k, rank, d_in, generator=g) / d_in**0.5
    B = torch.randn(k, d_out, rank, generator=g)
    return Adapter(A, B, alpha)


def merged_model(model: nn.Module, adapter: Adapter | None) -> nn.Module:
    """Independent reference: a copy of the model whose last k o_proj weights are W + alpha · B[l] @ A[l]."""
    ref = copy.deepcopy(model)
    for layer in lora_layers(ref):  # unwrap, in case the source model was wrapped already
        for module in ref.modules():
            if getattr(module, "o_proj", None) is layer:
                module.o_proj = layer.base_layer
    if adapter is not None:
        with torch.no_grad():
            for l, layer in enumerate(decoder_layers(ref)[-adapter.num_layers :]):
                layer.self_attn.o_proj.weight += adapter.alpha * adapter.B[l] @ adapter.A[l]
    return ref


def make_engine(make_tiny, arch: str, k: int = 1, **kwargs) -> tuple[LLMEngine, nn.Module]:
    """An engine plus an untouched copy of its base model (the reference's starting point)."""
    model, tok = make_tiny(arch)
    plain = copy.deepcopy(model)
    return LLMEngine(model, tok, name=f"tiny-{arch}", lora_layers=k, **kwargs), plain


def mixed_adapters(engine: LLMEngine, k: int = 1) -> list[Adapter | None]:
    return [random_adapter(engine.model, k, 8, 1.0, seed=21), None, random_adapter(engine.model, k, 4, 0.5, seed=22)]


def reference_logprobs(model: nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt) from one unpadded forward of `model`."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return logp[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def hf_greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_ids: set[int], pad_id: int) -> list[int]:
    """The token oracle: transformers' `generate` (greedy, no padding) on one prompt, EOS kept as the last token."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                             eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    tokens = out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def assert_matches_merged_references(engine: LLMEngine, plain: nn.Module, chats: list, adapters: list, gens: list) -> None:
    """Each generation equals HF greedy `generate` of the merged-weight model on its prompt alone, and its log-probs
    equal that model's plain forward to 1e-5."""
    for i, (chat, adapter, gen) in enumerate(zip(chats, adapters, gens)):
        merged = merged_model(plain, adapter)
        prompt = engine.encode_prompt(chat)
        oracle = hf_greedy(merged, prompt, len(gen.token_ids), engine.encoder.eos_ids, engine.encoder.pad_id)
        assert gen.token_ids == oracle, f"sample {i}"
        with torch.no_grad():
            expected = reference_logprobs(merged, prompt, gen.token_ids)
        assert (torch.tensor(gen.logprobs) - expected).abs().max().item() < 1e-5, f"sample {i}"


class ScriptedEngine:
    """Test double for an engine's `generate`, used where a test is about the episode runner or the router, not the
    model: `respond(messages) -> text`; token counts are word counts. Wrap it in `LocalEngineClient`."""

    def __init__(self, respond, fail: bool = False) -> None:
        self.respond = respond
        self.fail = fail
        self.calls: list[dict] = []

    def generate(self, messages, adapters=None, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None, seed=None):
        self.calls.append({"n": len(messages), "adapters": adapters, "seed": seed, "stop": stop, "temperature": temperature})
        if self.fail:
            raise RuntimeError("engine exploded")
        out = []
        for chat in messages:
            text = self.respond(chat)
            n_in = sum(len(m["content"].split()) for m in chat)
            ids = list(range(len(text.split())))
            out.append(Generation(text, ids, [-0.5] * len(ids), n_in, len(ids), "stop"))
        return out

    def score(self, messages, completions, adapters=None, nucleus=None):
        raise NotImplementedError("ScriptedEngine only generates")

    def adapter_grads(self, messages, completions, adapters, weights, nucleus=None):
        raise NotImplementedError("ScriptedEngine only generates")
