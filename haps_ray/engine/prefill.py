"""Prefill: the KV cache and first logits of a batch of prompts, in groups of similar length, reusing cached prefixes.

    prefiller = Prefiller(model, encoder, prefix_cache=PrefixCache(1 << 30), adapters_below_last_layer=False)
    cache, logits = prefiller.prefill(prompts, adapters, reserve=max_new_tokens - 1)

Prompts are prefilled in `prefill_groups` of similar (uncached) length, since prefill cost grows with the padded
width, and their caches are then padded on the left and stacked into one decode batch (decoding gains from width).
A sliding-window cache shorter than the longest prompt keeps only its window, which cannot be re-padded: such
batches (and caches of any other layer type) are prefilled as one padded batch.

With a `PrefixCache` (`haps_ray.engine.prefix_cache`), the KV of every prompt prefilled is kept and a new prompt
prefills only what no kept prompt shares with it; prefixes several prompts of one call share (a system prompt, G
samples of a problem) are prefilled once first. Only rows whose KV depends on their tokens alone take part: no
adapter, or adapters on the last layer's o_proj only (which act after every layer's keys and values exist). A
reused prefix's KV equals a recomputed one up to float rounding (as a different batch's would), so greedy outputs
can differ where two tokens tie that closely; an empty cache (`clear`) reproduces a run bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from haps_ray.engine.chat import ChatEncoder
from haps_ray.engine.hf_internals import ReservedLayer, merge_width_limit, new_cache
from haps_ray.engine.prefix_cache import PrefixCache, common_prefix_length
from haps_ray.lora import Adapter, use_adapters

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


def _left_pad_kv(states: torch.Tensor, width: int) -> torch.Tensor:
    """(b, heads, t, d) -> (b, heads, width, d) with zeros in front (masked out by the attention mask)."""
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[-2], 0))


class Prefiller:
    """Prefills prompt batches for one model; counts prompt tokens run through the model and taken from the cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        encoder: ChatEncoder,
        prefix_cache: PrefixCache | None,
        adapters_below_last_layer: bool,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.device = next(model.parameters()).device
        self._merge_width_limit = merge_width_limit(model.config)
        # prefixes are re-padded when group caches merge, which a sliding-window cache cannot do
        self.prefix_cache = prefix_cache if self._merge_width_limit == float("inf") else None
        self._adapters_change_kv = adapters_below_last_layer
        self.prefill_tokens = 0  # prompt tokens run through the model
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache instead

    def clear(self) -> None:
        """Forget every cached prompt prefix (e.g. to time prefills from a cold start)."""
        if self.prefix_cache is not None:
            self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes, self.prefix_cache.block)

    def new_cache(self, reserve: int) -> DynamicCache:
        return new_cache(self.model.config, reserve)

    def _reusable(self, adapters: list[Adapter | None]) -> list[bool]:
        if self.prefix_cache is None:
            return [False] * len(adapters)
        return [adapter is None or not self._adapters_change_kv for adapter in adapters]

    def prefill(
        self, prompts: list[list[int]], adapters: list[Adapter | None], reserve: int
    ) -> tuple[DynamicCache, torch.Tensor]:
        """KV cache of every prompt (rows in prompt order, left padded to the longest, room for `reserve` decoded
        positions) and its last-position logits (b, V) in float32."""
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

    def _prefill_shared_prefixes(self, prompts: list[list[int]]) -> None:
        """Prefill, once, each block-aligned prefix that several `prompts` share beyond what the prefix cache
        holds; it goes into the cache, so every prompt then prefills only its own part. Prefixes shared among
        these prefixes are found the same way, recursively."""
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
            self.prefill(prefixes, [None] * len(prefixes), reserve=0)

    def _merge_caches(self, parts: list[DynamicCache], groups: list[list[int]], width: int, reserve: int) -> DynamicCache:
        """One cache from the groups' caches (`groups[g]` = the rows part g holds): each part is copied once, right
        aligned at `width`, into buffers with room for `reserve` decoded positions. The padding in front is zeroed:
        it is masked, but a masked NaN would still poison the attention's weighted sum."""
        merged = self.new_cache(reserve)
        rows = [torch.tensor(g, device=self.device) for g in groups]
        n = sum(len(g) for g in groups)
        for i, layer in enumerate(merged.layers):
            first = parts[0].layers[i].keys
            room = reserve if isinstance(layer, ReservedLayer) else 0
            keys = first.new_empty((n, first.shape[1], width + room, first.shape[3]))
            values = torch.empty_like(keys)
            for part, index in zip(parts, rows):
                for buffer, states in ((keys, part.layers[i].keys), (values, part.layers[i].values)):
                    buffer[index, :, : width - states.shape[-2]] = 0
                    buffer[index, :, width - states.shape[-2] : width] = states
            if isinstance(layer, ReservedLayer):
                layer.adopt(keys, values, width)
            else:  # a sliding-window layer keeps a copy of its own
                layer.update(keys, values)
        return merged

    def _prefill_group(
        self, prompts: list[list[int]], adapters: list[Adapter | None], reuse: list[bool], reserve: int
    ) -> tuple[DynamicCache, torch.Tensor]:
        """(cache, last-position logits) of one padded forward over the prompts' uncached parts. Cache rows hold
        each prompt's KV left padded to the longest prompt, as `ChatEncoder.left_pad` lays out the tokens.

        A row of `reuse` takes the longest prefix the prefix cache holds and prefills the rest; its KV is stored
        afterwards. During the forward, rows lay out as [padding | cached prefix | padding | new tokens];
        positions count real tokens only.
        """
        found = [self.prefix_cache.lookup(p) if use else None for p, use in zip(prompts, reuse)]
        cached = [0 if f is None else f[1] for f in found]
        new = [p[n:] for p, n in zip(prompts, cached)]
        past = max(cached)
        ids, new_mask, positions = self.encoder.left_pad(new, self.device, starts=cached)
        past_mask = torch.zeros((len(prompts), past), dtype=torch.long, device=self.device)
        for row, n in enumerate(cached):
            past_mask[row, past - n :] = 1
        mask = torch.cat([past_mask, new_mask], dim=1)
        # after a reuse the cache is re-packed (`_close_gaps`): it needs room for the new tokens only
        cache = self.new_cache(ids.shape[1] if past else reserve)
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
                cache=cache, use_cache=True, logits_to_keep=1,
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
        compact = self.new_cache(reserve)
        for i, layer in enumerate(cache.layers):
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            compact.update(layer.keys.gather(2, gather), layer.values.gather(2, gather), i)
        return compact
