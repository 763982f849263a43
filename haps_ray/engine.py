"""LLMEngine: one frozen causal LM that generates, scores and differentiates with per-sample LoRA adapters.

The engine wraps `o_proj` of the last k decoder layers once (`haps_ray.lora.attach_lora`) and then serves three
batched calls, each taking one adapter (or None = the plain base model) per sample:

    engine = LLMEngine(model, tokenizer, name="llama8b", lora_layers=1)
    gens = engine.generate(messages, adapters, max_new_tokens=64, temperature=1.0, top_p=0.9, seed=0)
    logps = engine.score(messages, [g.token_ids for g in gens], adapters)
    grads = engine.adapter_grads(messages, [g.token_ids for g in gens], adapters, weights=advantages)

Conventions (what the rest of the pipeline relies on):
- Prompts: the chat template is applied once (`add_generation_prompt=True`) and the templated text is tokenized
  without special tokens, so the prompt holds exactly one BOS (the template's); a tokenizer that prepends BOS by
  default but whose template lacks it gets one BOS prepended.
- `Generation.token_ids` are the tokens the model emitted, up to and including the one that ended the sample (EOS,
  or the token completing a stop string); `logprobs` aligns with them, so `score(messages, token_ids)` reproduces
  them. `text` is the decoded output without special tokens, cut before the first stop string.
  `finish_reason` is "stop" (EOS or stop string) or "length" (max_new_tokens reached).
- Log-probs are under the model's untempered, unfiltered distribution (log_softmax of the raw logits), whatever
  temperature/top_p sampled the token: the quantity RL re-scores and differentiates.
- Prefix caching: the engine keeps the KV of prompts it prefilled (`haps_ray.prefix_cache`, `prefix_cache_mb`) and
  prefills only the part of a new prompt that no kept prompt shares; prefixes several prompts of one call share (a
  system prompt, G samples of a problem) are prefilled once. Only rows whose KV depends on the tokens alone take
  part: no adapter, or adapters on the last layer only (k = 1, the default). Off for sliding-window caches.
  A cached prefix's KV equals a recomputed one up to float rounding (as a different batch's would), so greedy
  outputs can differ where two tokens tie that closely; a cold cache (`clear_prefix_cache`) reproduces a run
  bit for bit.
- Decoding: prompts are prefilled in groups of similar (uncached) length (little padding: prefill cost grows with
  the padded width) and their KV caches merged, left padded, into one batch that decodes together (decoding gains
  from width); each new position is written in place into a cache reserved for `max_new_tokens`; rows that finish
  leave the batch (their cache rows moved up in place, their adapter rows dropped). Rows decode longest prompt
  first, and an SDPA model attends in runs of rows of similar length (`haps_ray.attention`), so a short prompt
  does not read the padding up to the longest one. Temperature 0 is greedy; otherwise temperature + nucleus
  sampling from a `torch.Generator` seeded by `seed`, drawn row by row in that decode order.
- Every call runs in chunks of at most `max_batch_size` samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from haps_ray.attention import row_spans, use_ragged_attention
from haps_ray.config import CandidateConfig
from haps_ray.lora import Adapter, adapter_shapes, attach_lora, select_adapter_rows, use_adapters
from haps_ray.models import load_model, model_checksum
from haps_ray.prefix_cache import PrefixCache, common_prefix_length

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One sample's output of `LLMEngine.generate` (see the module docstring for the conventions)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    n_input_tokens: int
    n_output_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class Buckets(Generic[T]):
    """A mixed batch grouped by engine: `groups[key]` holds original indices, in original order."""

    items: list[T]
    groups: dict[Hashable, list[int]] = field(default_factory=dict)

    def select(self, key: Hashable) -> list[T]:
        """The items of one bucket, in their original relative order."""
        return [self.items[i] for i in self.groups[key]]

    def scatter(self, results: dict[Hashable, Sequence[R]]) -> list[R]:
        """Per-bucket results (aligned with `select(key)`) back into one list in the original batch order."""
        out: list[Any] = [None] * len(self.items)
        for key, indices in self.groups.items():
            if key not in results:
                raise KeyError(f"no results for bucket {key!r}")
            got = results[key]
            if len(got) != len(indices):
                raise ValueError(f"bucket {key!r}: {len(got)} results for {len(indices)} items")
            for i, r in zip(indices, got):
                out[i] = r
        return out


def bucket_by_engine(items: Sequence[T], key: Callable[[T], Hashable]) -> Buckets[T]:
    """Group a mixed batch by base model (`key(item)` = engine name) so each engine gets one batched call."""
    buckets: Buckets[T] = Buckets(list(items))
    for i, item in enumerate(buckets.items):
        buckets.groups.setdefault(key(item), []).append(i)
    return buckets


def _pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax when temperature == 0, else temperature + nucleus (top_p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p: a token goes if the mass before it already does
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(dim=-1) - sorted_p >= top_p, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# Padding a prefill group may add at most this share of its real tokens. Prefill FLOPs scale with the padded
# width, while a smaller group costs nothing extra on CPU and little on GPU once it holds a few thousand tokens.
PREFILL_PADDING_WASTE = 0.1


def prefill_groups(lengths: Sequence[int], waste: float = PREFILL_PADDING_WASTE) -> list[list[int]]:
    """Indices grouped by similar length (shortest first) so that left padding each group to its longest
    prompt adds at most `waste` x its real tokens."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > (1 + waste) * (tokens + lengths[i]):
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    if current:
        groups.append(current)
    return groups


class _ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views into buffers with room for `reserve` more
    positions: a decode step writes its token in place, where DynamicLayer copies the whole cache (torch.cat)."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _in_buffer(self) -> bool:
        buffer = self._key_buffer
        return buffer is not None and self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[0] == buffer.shape[0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        buffer = self._key_buffer
        if not self._in_buffer() or end > buffer.shape[-2]:
            shape = (*key_states.shape[:-2], end + self.reserve, key_states.shape[-1])
            self._key_buffer, self._value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                self._key_buffer[..., :length, :] = self.keys
                self._value_buffer[..., :length, :] = self.values
        self._key_buffer[..., length:end, :] = key_states
        self._value_buffer[..., length:end, :] = value_states
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values

    def adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        """Take over buffers whose first `length` positions hold the cache; the rest is room for decoding."""
        self.lazy_initialization(key_buffer, value_buffer)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[..., :length, :], value_buffer[..., :length, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` by moving them up inside the buffers: nothing is allocated, rows before the first
        dropped one stay put, and the room reserved for decoding is kept (DynamicLayer copies the kept rows out,
        after which the next update would copy them again into a new buffer)."""
        keep = indices.tolist()
        length = self.get_seq_length()
        if length == 0 or not self._in_buffer() or any(a >= b for a, b in zip(keep, keep[1:])):
            super().batch_select_indices(indices)
            return
        for buffer in (self._key_buffer, self._value_buffer):
            for target, source in enumerate(keep):
                if target != source:  # source > target: rows move up, never onto a row still to be read
                    buffer[target, :, :length].copy_(buffer[source, :, :length])
        self._key_buffer, self._value_buffer = self._key_buffer[: len(keep)], self._value_buffer[: len(keep)]
        self.keys, self.values = self._key_buffer[..., :length, :], self._value_buffer[..., :length, :]


def _left_pad_kv(states: torch.Tensor, width: int) -> torch.Tensor:
    """(b, heads, t, d) -> (b, heads, width, d) with zeros in front (masked out by the attention mask)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


class LLMEngine:
    """A frozen causal LM with per-sample LoRA on `o_proj` of its last `lora_layers` decoder layers.

    `eos_ids` (tokenizer EOS plus the generation config's) end a sample; `pad_id` fills left padding.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        lora_layers: int = 1,
        max_batch_size: int = 32,
        prefix_cache_mb: int = 1024,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"engine {name!r}: tokenizer has no chat template")
        self.model = model.eval()
        self.model.requires_grad_(False)  # frozen: adapter_grads differentiates the factors only
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self._checksum: str | None = None
        self.lora = attach_lora(model, lora_layers)
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        bos = tokenizer.bos_token_id
        plain = tokenizer("a", add_special_tokens=True)["input_ids"]
        self._bos_to_add = bos if bos is not None and plain and plain[0] == bos else None
        self._merge_width_limit = self._cache_merge_width_limit()
        self._ragged = use_ragged_attention(model)
        # prefixes are re-padded when group caches merge, which a sliding-window cache cannot do
        self.prefix_cache = (
            PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 and self._merge_width_limit == float("inf") else None
        )
        self.prefill_tokens = 0  # prompt tokens run through the model by generate
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache instead

    @classmethod
    def from_config(cls, candidate: CandidateConfig, lora_layers: int = 1) -> LLMEngine:
        """Load the candidate's weights (`haps_ray.models.load_model`) and wrap them."""
        model, tokenizer = load_model(candidate.model, dtype=candidate.dtype, device=candidate.device)
        return cls(model, tokenizer, candidate.name, lora_layers=lora_layers, max_batch_size=candidate.max_batch_size,
                   prefix_cache_mb=candidate.prefix_cache_mb)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. to time prefills from a cold start)."""
        if self.prefix_cache is not None:
            self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes, self.prefix_cache.block)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if source is not None:
                ids.update([source] if isinstance(source, int) else source)
        if not ids:
            raise ValueError(f"engine {self.name!r}: neither tokenizer nor generation config defines an EOS token")
        return ids

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

    # ---- prompts ----

    def encode_prompt(self, messages: Messages, where: str = "messages") -> list[int]:
        """Token ids of the templated chat, ending with the assistant generation prompt; exactly one BOS."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: expected a non-empty list of chat messages, got {type(messages).__name__}")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}[{j}]: a message needs string 'role' and 'content', got {m!r:.80}")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self._bos_to_add is not None and (not ids or ids[0] != self._bos_to_add):
            ids.insert(0, self._bos_to_add)
        return ids

    def _encode_prompts(self, messages: Sequence[Messages]) -> list[list[int]]:
        return [self.encode_prompt(m, where=f"messages[{i}]") for i, m in enumerate(messages)]

    def _left_pad(
        self, seqs: Sequence[list[int]], starts: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids), left padded; positions count real tokens only, from
        `starts[i]` for sequence i (the length of a cached prefix it continues; default 0)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        if starts is not None:
            positions = positions + torch.tensor(starts, dtype=torch.long)[:, None] * mask
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _check_adapters(self, adapters: Sequence[Adapter | None] | None, n: int) -> list[Adapter | None]:
        if adapters is None:
            return [None] * n
        if len(adapters) != n:
            raise ValueError(f"engine {self.name!r}: {len(adapters)} adapters for {n} samples")
        return list(adapters)

    # ---- generation ----

    def generate(
        self,
        messages: Sequence[Messages],
        adapters: Sequence[Adapter | None] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """Decode every chat in `messages` with its own adapter; see the module docstring for the outputs."""
        return self.generate_tokens(
            self._encode_prompts(messages), adapters, max_new_tokens, temperature, top_p, stop, seed
        )

    def generate_tokens(
        self,
        prompts: Sequence[list[int]],
        adapters: Sequence[Adapter | None] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Generation]:
        """`generate` for prompts already templated and tokenized (e.g. by `encode_prompt`)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}]: empty prompt")
        prompts = [list(p) for p in prompts]
        stops = [s for s in (stop or []) if s]
        adapters = self._check_adapters(adapters, len(prompts))
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        out: list[Generation] = []
        for part in _chunks(len(prompts), self.max_batch_size):
            out += self._generate_chunk(prompts[part], adapters[part], max_new_tokens, temperature, top_p, stops, generator)
        return out

    def _new_cache(self, reserve: int) -> DynamicCache:
        """An empty cache whose full-attention layers keep room for `reserve` decoded positions."""
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def _prefill_group(
        self, prompts: list[list[int]], adapters: list[Adapter | None], reuse: list[bool], reserve: int
    ) -> tuple[DynamicCache, torch.Tensor]:
        """(cache, last-position logits) of one padded forward over the prompts' uncached parts. Cache rows hold
        each prompt's KV left padded to the longest prompt, as `_left_pad` lays out the tokens.

        A row of `reuse` takes the longest prefix the prefix cache holds and prefills the rest; its KV is stored
        afterwards. During the forward, rows lay out as [padding | cached prefix | padding | new tokens];
        positions count real tokens only.
        """
        found = [self.prefix_cache.lookup(p) if use else None for p, use in zip(prompts, reuse)]
        cached = [0 if f is None else f[1] for f in found]
        new = [p[n:] for p, n in zip(prompts, cached)]
        past = max(cached)
        ids, new_mask, positions = self._left_pad(new, starts=cached)
        past_mask = torch.zeros((len(prompts), past), dtype=torch.long, device=self.device)
        for row, n in enumerate(cached):
            past_mask[row, past - n :] = 1
        mask = torch.cat([past_mask, new_mask], dim=1)
        # after a reuse the cache is re-packed (`_close_gaps`): it needs room for the new tokens only
        cache = self._new_cache(ids.shape[1] if past else reserve)
        if past:
            reference = next(f[0] for f in found if f is not None)
            for layer, (ref_keys, ref_values) in enumerate(reference):
                empty_keys, empty_values = ref_keys[..., :0, :], ref_values[..., :0, :]
                keys = torch.cat([_left_pad_kv(empty_keys if f is None else f[0][layer][0][..., :n, :], past)
                                  for f, n in zip(found, cached)])
                values = torch.cat([_left_pad_kv(empty_values if f is None else f[0][layer][1][..., :n, :], past)
                                    for f, n in zip(found, cached)])
                cache.update(keys, values, layer)
        with use_adapters(self.model, adapters):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1].float()
        self.prefill_tokens += sum(len(t) for t in new)
        self.reused_tokens += sum(cached)
        if past:
            cache = self._close_gaps(cache, mask, max(len(p) for p in prompts), reserve)
        for row, prompt in enumerate(prompts):
            if reuse[row]:
                self.prefix_cache.store(prompt, [
                    (layer.keys[row : row + 1, :, -len(prompt) :].clone(), layer.values[row : row + 1, :, -len(prompt) :].clone())
                    for layer in cache.layers
                ])
        return cache, logits

    def _close_gaps(self, cache: DynamicCache, mask: torch.Tensor, width: int, reserve: int) -> DynamicCache:
        """The cache with each row's valid positions (`mask` == 1) moved, in order, to its last ones, `width` wide:
        decoding then attends over the longest prompt rather than the longest prefix plus the longest new part."""
        index = torch.zeros((mask.shape[0], width), dtype=torch.long, device=mask.device)
        for row in range(mask.shape[0]):
            valid = mask[row].nonzero().squeeze(-1)
            index[row, width - len(valid) :] = valid
        compact = self._new_cache(reserve)
        for i, layer in enumerate(cache.layers):
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            compact.update(layer.keys.gather(2, gather), layer.values.gather(2, gather), i)
        return compact

    def _reusable(self, adapters: list[Adapter | None]) -> list[bool]:
        """Rows whose KV depends on their tokens alone: an adapter on the last layer's o_proj only acts after
        every layer's keys and values are computed."""
        if self.prefix_cache is None:
            return [False] * len(adapters)
        return [adapter is None or len(self.lora) == 1 for adapter in adapters]

    def _prefill_shared_prefixes(self, prompts: list[list[int]]) -> None:
        """Prefill, once, each block-aligned prefix that several `prompts` share beyond what the prefix cache
        holds (a system prompt, the G samples of a problem); it goes into the cache, so every prompt then
        prefills only its own part. Prefixes shared among these prefixes are found the same way, recursively."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        shared: set[tuple[int, ...]] = set()
        for a, b in zip(order, order[1:]):
            common = common_prefix_length(prompts[a], prompts[b])
            for i in (a, b):
                n = self.prefix_cache.usable(common, len(prompts[i]))
                if n > self.prefix_cache.match_length(prompts[i]):
                    shared.add(tuple(prompts[i][:n]))
        # a prefix of another candidate is served by that one's cache entry
        prefixes = [list(t) for t in sorted(shared) if not any(len(u) > len(t) and u[: len(t)] == t for u in shared)]
        if prefixes:
            self._prefill(prefixes, [None] * len(prefixes), reserve=0)

    def _prefill(
        self, prompts: list[list[int]], adapters: list[Adapter | None], reserve: int
    ) -> tuple[DynamicCache, torch.Tensor]:
        """KV cache of every prompt (rows in prompt order, left padded to the longest, room for `reserve` decoded
        positions) and its last-position logits.

        Prefixes found in (or first put into) the prefix cache are not prefilled again. The rest runs in
        `prefill_groups` of similar length, whose caches are then padded on the left and stacked into one.
        A sliding-window cache shorter than the longest prompt keeps only its window, which cannot be re-padded:
        such chunks (and caches of any other layer type) are prefilled as one padded batch.
        """
        reuse = self._reusable(adapters)
        if any(reuse):
            self._prefill_shared_prefixes([p for p, use in zip(prompts, reuse) if use])
        lengths = [len(p) - (self.prefix_cache.match_length(p) if use else 0) for p, use in zip(prompts, reuse)]
        groups = prefill_groups(lengths)
        width = max(len(p) for p in prompts)
        if len(groups) == 1 or width >= self._merge_width_limit:
            return self._prefill_group(prompts, adapters, reuse, reserve)
        parts = [self._prefill_group([prompts[i] for i in g], [adapters[i] for i in g], [reuse[i] for i in g], reserve=0)
                 for g in groups]
        inverse = torch.argsort(torch.tensor([i for g in groups for i in g], device=self.device))
        merged = self._merge_caches([cache for cache, _ in parts], groups, width, reserve)
        return merged, torch.cat([logits for _, logits in parts])[inverse]

    def _merge_caches(self, parts: list[DynamicCache], groups: list[list[int]], width: int, reserve: int) -> DynamicCache:
        """One cache from the groups' caches (`groups[g]` = the rows part g holds): each part is copied once, right
        aligned at `width`, into buffers with room for `reserve` decoded positions. The padding in front is zeroed:
        it is masked, but a masked NaN would still poison the attention's weighted sum."""
        merged = self._new_cache(reserve)
        rows = [torch.tensor(g, device=self.device) for g in groups]
        n = sum(len(g) for g in groups)
        for i, layer in enumerate(merged.layers):
            first = parts[0].layers[i].keys
            room = reserve if isinstance(layer, _ReservedLayer) else 0
            keys = first.new_empty((n, first.shape[1], width + room, first.shape[3]))
            values = torch.empty_like(keys)
            for part, index in zip(parts, rows):
                for buffer, states in ((keys, part.layers[i].keys), (values, part.layers[i].values)):
                    buffer[index, :, : width - states.shape[-2]] = 0
                    buffer[index, :, width - states.shape[-2] : width] = states
            if isinstance(layer, _ReservedLayer):
                layer.adopt(keys, values, width)
            else:  # a sliding-window layer keeps a copy of its own
                layer.update(keys, values)
        return merged

    def _cache_merge_width_limit(self) -> float:
        """Prompt widths below this can have their group caches merged: no limit for full-attention layers, the
        window for sliding-window layers (which keep only their window), 0 for any other cache layer type (or a
        config that declares no layers up front)."""
        layers = DynamicCache(config=self.model.config).layers
        limit = float("inf") if layers else 0.0
        for layer in layers:
            if getattr(layer, "is_sliding", False):
                limit = min(limit, layer.sliding_window)
            elif type(layer) is not DynamicLayer:
                return 0.0
        return limit

    def _hits_stop(self, tokens: list[int], stops: list[str]) -> bool:
        # decode only a tail long enough to hold any stop string: a token decodes to >= 1 character
        # except special and partial-byte tokens, so a margin of a few tokens covers those
        window = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _finish_text(self, tokens: list[int], stops: list[str]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s in text]
        return text[: min(cuts)] if cuts else text

    @torch.inference_mode()
    def _generate_chunk(
        self,
        prompts: list[list[int]],
        adapters: list[Adapter | None],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stops: list[str],
        generator: torch.Generator | None,
    ) -> list[Generation]:
        n = len(prompts)
        # rows decode longest prompt first, so that rows of similar length are neighbours (`row_spans`)
        active = sorted(range(n), key=lambda i: -len(prompts[i]))  # original index of each row still decoding
        emitted: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finish = ["length"] * n
        rows_prompts, rows_adapters = [prompts[i] for i in active], [adapters[i] for i in active]
        _, mask, positions = self._left_pad(rows_prompts)
        cache, logits = self._prefill(rows_prompts, rows_adapters, reserve=max_new_tokens - 1)
        with use_adapters(self.model, rows_adapters):
            next_pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                tokens = _pick_tokens(logits, temperature, top_p, generator)
                chosen = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                keep = []
                for row, (tok, lp) in enumerate(zip(tokens.tolist(), chosen.tolist())):
                    i = active[row]
                    emitted[i].append(tok)
                    logprobs[i].append(lp)
                    if tok in self.eos_ids or (stops and self._hits_stop(emitted[i], stops)):
                        finish[i] = "stop"
                    else:
                        keep.append(row)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    select_adapter_rows(self.model, index)
                    mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                    active = [active[row] for row in keep]
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                spans = {"row_spans": row_spans([len(prompts[i]) + step + 1 for i in active])} if self._ragged else {}
                logits = self.model(
                    input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True, **spans,
                ).logits[:, -1].float()
                next_pos = next_pos + 1
        return [
            Generation(
                text=self._finish_text(emitted[i], stops),
                token_ids=emitted[i],
                logprobs=logprobs[i],
                n_input_tokens=len(prompts[i]),
                n_output_tokens=len(emitted[i]),
                finish_reason=finish[i],
            )
            for i in range(n)
        ]

    # ---- teacher forcing ----

    def _completion_ids(self, completions: Sequence[list[int] | str]) -> list[list[int]]:
        out = []
        for i, c in enumerate(completions):
            if isinstance(c, str):
                out.append(list(self.tokenizer(c, add_special_tokens=False)["input_ids"]))
            elif isinstance(c, (list, tuple)) and all(isinstance(t, int) for t in c):
                out.append(list(c))
            else:
                raise ValueError(f"completions[{i}]: expected token ids (list[int]) or text, got {type(c).__name__}")
        return out

    def _completion_logprobs(
        self, prompts: list[list[int]], completions: list[list[int]], adapters: Sequence[Adapter | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log p(y_t | prompt, y_<t): (logp, valid) of shape (b, T_max), right-aligned."""
        longest = max(len(c) for c in completions)
        if longest == 0:
            empty = torch.zeros((len(prompts), 0), device=self.device)
            return empty, empty.bool()
        input_ids, mask, positions = self._left_pad([p + c for p, c in zip(prompts, completions)])
        with use_adapters(self.model, adapters):
            # completions are right-aligned under left padding: the last longest+1 positions predict them all
            logits = self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions,
                use_cache=False, logits_to_keep=longest + 1,
            ).logits[:, :-1]
        targets = input_ids[:, -longest:]
        logp = logits.gather(-1, targets[..., None]).squeeze(-1).float() - torch.logsumexp(logits.float(), dim=-1)
        lengths = torch.tensor([len(c) for c in completions], device=self.device)
        valid = torch.arange(longest, device=self.device)[None, :] >= longest - lengths[:, None]
        return torch.where(valid, logp, torch.zeros_like(logp)), valid

    def _teacher_forcing_inputs(
        self, messages: Sequence[Messages], completions: Sequence[list[int] | str], adapters: Sequence[Adapter | None] | None
    ) -> tuple[list[list[int]], list[list[int]], list[Adapter | None]]:
        if len(completions) != len(messages):
            raise ValueError(f"engine {self.name!r}: {len(completions)} completions for {len(messages)} prompts")
        return self._encode_prompts(messages), self._completion_ids(completions), self._check_adapters(adapters, len(messages))

    @torch.inference_mode()
    def score(
        self,
        messages: Sequence[Messages],
        completions: Sequence[list[int] | str],
        adapters: Sequence[Adapter | None] | None = None,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion after its templated prompt (text is tokenized without specials)."""
        prompts, comps, adapters = self._teacher_forcing_inputs(messages, completions, adapters)
        out: list[list[float]] = []
        for part in _chunks(len(prompts), self.max_batch_size):
            logp, _ = self._completion_logprobs(prompts[part], comps[part], adapters[part])
            longest = logp.shape[1]
            out += [logp[row, longest - len(c) :].tolist() for row, c in enumerate(comps[part])]
        return out

    def adapter_grads(
        self,
        messages: Sequence[Messages],
        completions: Sequence[list[int] | str],
        adapters: Sequence[Adapter],
        weights: Sequence[float],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample (dA, dB) = d(w_i · Σ_t log p(y_t)) / d(A_i, B_i), by one forward/backward per chunk.

        The model's weights are frozen and receive no gradient; the returned tensors have the shapes, dtype and
        device of the given factors. Samples do not interact, so one backward of Σ_i w_i·Σ_t log p gives each
        sample's own gradient.
        """
        prompts, comps, adapters = self._teacher_forcing_inputs(messages, completions, adapters)
        if len(weights) != len(prompts):
            raise ValueError(f"engine {self.name!r}: {len(weights)} weights for {len(prompts)} samples")
        for i, ad in enumerate(adapters):
            if not isinstance(ad, Adapter):
                raise ValueError(f"adapters[{i}]: adapter_grads needs an Adapter per sample, got {type(ad).__name__}")
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for part in _chunks(len(prompts), self.max_batch_size):
            # fresh leaves (clone: the caller's tensors may be inference tensors, which cannot require grad)
            leaves = [
                Adapter(a.A.detach().to(self.device).clone().requires_grad_(True),
                        a.B.detach().to(self.device).clone().requires_grad_(True), a.alpha)
                for a in adapters[part]
            ]
            with torch.enable_grad():
                logp, _ = self._completion_logprobs(prompts[part], comps[part], leaves)
                w = torch.tensor(list(weights[part]), dtype=logp.dtype, device=self.device)
                objective = (w * logp.sum(dim=-1)).sum()
                inputs = [t for leaf in leaves for t in (leaf.A, leaf.B)]
                grads = torch.autograd.grad(objective, inputs, allow_unused=True) if objective.requires_grad else [None] * len(inputs)
            for j, given in enumerate(adapters[part]):
                dA, dB = grads[2 * j], grads[2 * j + 1]
                dA = torch.zeros_like(given.A) if dA is None else dA.to(device=given.A.device, dtype=given.A.dtype)
                dB = torch.zeros_like(given.B) if dB is None else dB.to(device=given.B.device, dtype=given.B.dtype)
                out.append((dA, dB))
        return out
