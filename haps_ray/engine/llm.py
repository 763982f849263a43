"""LLMEngine: one frozen causal LM that generates, scores and differentiates with per-sample LoRA adapters.

The engine wraps `o_proj` of the last k decoder layers once (`haps_ray.lora.attach_lora`) and composes its parts:
the chat encoder (`chat.py`: template, one BOS, EOS ids, left padding), the generator (`generator.py`: the decode
loop, with the prefiller of `prefill.py` and the optional prefix cache and ragged attention) and teacher forcing
(`teacher_forcing.py`: `score`, `adapter_grads`). Every call takes one adapter (or None = the plain base model) per
sample:

    engine = LLMEngine(model, tokenizer, name="llama8b", lora_layers=1)
    gens = engine.generate(messages, adapters, max_new_tokens=64, temperature=1.0, top_p=0.9, seed=0)
    logps = engine.score(messages, [g.token_ids for g in gens], adapters)
    grads = engine.adapter_grads(messages, [g.token_ids for g in gens], adapters, weights=advantages)

The conventions of the outputs are in `generator.py` (generation) and `teacher_forcing.py` (scores, gradients).
Two parts are switchable: `prefix_cache_mb` (0 = off) keeps prompt KV to skip prefilling shared prefixes, and
`ragged_attention` lets an SDPA model attend in runs of rows of similar length while decoding; both change only
speed (outputs equal up to float rounding, see `prefill.py`). Models must compute logits as lm_head(final hidden
state) (Llama, Qwen2, Mistral, ...): teacher forcing applies the head itself.

Other code talks to an engine through `haps_ray.engine.client.EngineClient` (`LocalEngineClient(engine)` here, an
actor client in `actors/engine.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from haps_ray.config import CandidateConfig
from haps_ray.engine.chat import ChatEncoder, Messages
from haps_ray.engine.generator import Generation, Generator
from haps_ray.engine.hf_internals import check_internals
from haps_ray.engine.logprobs import Nucleus
from haps_ray.engine.prefill import Prefiller
from haps_ray.engine.prefix_cache import PrefixCache
from haps_ray.engine.ragged import use_ragged_attention
from haps_ray.engine.teacher_forcing import Completion, TeacherForcing
from haps_ray.lora import Adapter, adapter_shapes, attach_lora
from haps_ray.models import load_model, model_checksum

# Config attributes of models whose logits are not lm_head(hidden): teacher forcing would compute other log-probs.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LLMEngine:
    """A frozen causal LM with per-sample LoRA on `o_proj` of its last `lora_layers` decoder layers."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        lora_layers: int = 1,
        max_batch_size: int = 32,
        prefix_cache_mb: int = 1024,
        ragged_attention: bool = True,
    ) -> None:
        check_internals()
        transforms = [a for a in _LOGIT_TRANSFORMS if getattr(model.config, a, None) not in (None, 1.0)]
        if transforms:
            raise ValueError(f"engine {name!r}: logits are transformed ({transforms}); only lm_head(hidden) models are supported")
        self.name = name
        self.encoder = ChatEncoder(tokenizer, model.generation_config, name=f"engine {name!r}")
        self.model = model.eval()
        self.model.requires_grad_(False)  # frozen: adapter_grads differentiates the factors only
        self.tokenizer = tokenizer
        self.lora = attach_lora(model, lora_layers)
        self.device = next(model.parameters()).device
        self._checksum: str | None = None
        self.prefiller = Prefiller(model, self.encoder, PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 else None,
                                   adapters_below_last_layer=len(self.lora) > 1)
        ragged = ragged_attention and use_ragged_attention(model)
        self.generator = Generator(model, self.encoder, self.prefiller, ragged=ragged, max_batch_size=max_batch_size)
        self.teacher = TeacherForcing(model, self.encoder, max_batch_size=max_batch_size)

    @classmethod
    def from_config(cls, candidate: CandidateConfig, lora_layers: int = 1) -> LLMEngine:
        """Load the candidate's weights (`haps_ray.models.load_model`) and wrap them."""
        model, tokenizer = load_model(candidate.model, dtype=candidate.dtype, device=candidate.device)
        return cls(model, tokenizer, candidate.name, lora_layers=lora_layers, max_batch_size=candidate.max_batch_size,
                   prefix_cache_mb=candidate.prefix_cache_mb, ragged_attention=candidate.ragged_attention)

    # ---- what the engine is --------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.generator.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {value}")
        self.generator.max_batch_size = self.teacher.max_batch_size = value

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.prefiller.prefix_cache

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens run through the model by generate."""
        return self.prefiller.prefill_tokens

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache instead."""
        return self.prefiller.reused_tokens

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. to time prefills from a cold start)."""
        self.prefiller.clear()

    @property
    def checksum(self) -> str:
        """sha256 of the base weights (`haps_ray.models.model_checksum`), computed once on first use."""
        if self._checksum is None:
            self._checksum = model_checksum(self.model)
        return self._checksum

    def info(self) -> dict[str, Any]:
        """What identifies this engine and what adapters it takes."""
        return {
            "name": self.name,
            "model_type": self.model.config.model_type,
            "checksum": self.checksum,
            "lora_layers": len(self.lora),
            "adapter_shapes": adapter_shapes(self.model),  # (d_in, d_out) per wrapped layer, shallowest first
            "hidden_size": self.model.config.hidden_size,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_batch_size": self.max_batch_size,
        }

    def encode_prompt(self, messages: Messages, where: str = "messages") -> list[int]:
        """Token ids of the templated chat, ending with the assistant generation prompt; exactly one BOS."""
        return self.encoder.encode(messages, where)

    # ---- the three calls -----------------------------------------------------------------------

    def generate(self, messages: Sequence[Messages], adapters: Sequence[Adapter | None] | None = None,
                 **sampling: Any) -> list[Generation]:
        """Decode every chat in `messages` with its own adapter (None = the base model). `sampling` takes
        `max_new_tokens`, `temperature`, `top_p`, `stop`, `seed` as `Generator.generate` documents them."""
        prompts = self.encoder.encode_all(messages)
        return self._named(self.generator.generate, prompts, self._adapters(adapters, len(prompts)), **sampling)

    def score(
        self,
        messages: Sequence[Messages],
        completions: Sequence[Completion],
        adapters: Sequence[Adapter | None] | None = None,
        nucleus: Nucleus | None = None,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion after its templated prompt (text is tokenized without specials);
        full softmax, or under `nucleus`."""
        return self._named(self.teacher.score, self.encoder.encode_all(messages), completions,
                           self._adapters(adapters, len(messages)), nucleus)

    def adapter_grads(
        self,
        messages: Sequence[Messages],
        completions: Sequence[Completion],
        adapters: Sequence[Adapter],
        weights: Sequence[float],
        nucleus: Nucleus | None = None,
    ) -> list[tuple[Any, Any]]:
        """Per sample (dA, dB) = d(w_i · Σ_t log p(y_t)) / d(A_i, B_i), log p full or under `nucleus`; see
        `teacher_forcing.py`."""
        return self._named(self.teacher.adapter_grads, self.encoder.encode_all(messages), completions, list(adapters),
                           weights, nucleus)

    def _adapters(self, adapters: Sequence[Adapter | None] | None, n: int) -> list[Adapter | None]:
        return [None] * n if adapters is None else list(adapters)

    def _named(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a part's call; a ValueError about the request names this engine."""
        try:
            return call(*args, **kwargs)
        except ValueError as err:
            raise ValueError(f"engine {self.name!r}: {err}") from None
