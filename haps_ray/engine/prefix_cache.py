"""PrefixCache: KV states of recent prompts, found again by the longest prefix a new prompt shares with them.

Prompts in this pipeline repeat a lot of tokens: every call of a role opens with the same system prompt, a later
round's prompt restates the problem of the earlier one, and RL samples G episodes of each problem. The engine keeps
the KV of the prompts it prefilled here and prefills only what a new prompt does not share with one of them.

Matching goes by blocks of `block` tokens (as in vLLM's prefix caching): an entry is indexed under a hash of each
of its block-aligned prefixes, so a lookup hashes the new prompt's prefixes and takes the longest one indexed,
then checks the tokens themselves (a hash collision is a miss, never a wrong reuse). A match always leaves at
least one token of the prompt to prefill, since the engine needs the logits of its last position.

Entries are evicted least recently used first once their tensors exceed `max_bytes`.

The cache holds positions-from-zero KV of whole prompts, so it is only valid for KV that does not depend on
anything but the tokens: the engine stores and reuses rows whose adapter leaves every layer's keys and values
unchanged (no adapter, or one on `o_proj` of the last layer only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (1, kv_heads, tokens, head_dim)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: list[LayerKV]
    nbytes: int
    keys: list[int]  # its hashes in the index


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """An LRU store of per-layer prompt KV, looked up by longest shared block-aligned prefix."""

    def __init__(self, max_bytes: int, block: int = 16) -> None:
        if max_bytes <= 0 or block < 1:
            raise ValueError(f"need max_bytes > 0 and block >= 1, got {max_bytes}, {block}")
        self.max_bytes = max_bytes
        self.block = block
        self.nbytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[int, int] = {}  # hash of a block-aligned prefix -> id of the newest entry holding it
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def usable(self, n: int, prompt_length: int) -> int:
        """How many of `n` shared tokens a prompt of `prompt_length` can take from the cache: whole blocks,
        leaving at least its last token to prefill."""
        return min(n, prompt_length - 1) // self.block * self.block

    def _prefix_hashes(self, tokens: Sequence[int], upto: int) -> list[int]:
        hashes, h = [], 0
        for start in range(0, upto - self.block + 1, self.block):
            h = hash((h, tuple(tokens[start : start + self.block])))
            hashes.append(h)
        return hashes

    def _find(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(entry id, length) of the longest cached prefix of `tokens` a lookup may use."""
        hashes = self._prefix_hashes(tokens, self.usable(len(tokens), len(tokens)))
        for depth in range(len(hashes), 0, -1):
            entry_id = self._index.get(hashes[depth - 1])
            if entry_id is not None:
                length = depth * self.block
                return (entry_id, length) if self._entries[entry_id].tokens[:length] == tuple(tokens[:length]) else None
        return None

    def lookup(self, tokens: Sequence[int]) -> tuple[list[LayerKV], int] | None:
        """(per-layer KV of the longest cached prefix, its length), or None when no whole block matches.
        The KV tensors may run past that length: use the first `length` positions."""
        found = self._find(tokens)
        if found is None:
            return None
        entry_id, length = found
        self._entries.move_to_end(entry_id)
        return self._entries[entry_id].layers, length

    def match_length(self, tokens: Sequence[int]) -> int:
        """Length of the prefix `lookup` would return (0 for none), without touching the LRU order."""
        found = self._find(tokens)
        return 0 if found is None else found[1]

    def store(self, tokens: Sequence[int], layers: list[LayerKV]) -> None:
        """Keep the KV of `tokens` (each layer's tensors hold exactly len(tokens) positions)."""
        if len(tokens) < self.block:
            return
        for keys, values in layers:
            if keys.shape[-2] != len(tokens) or values.shape[-2] != len(tokens):
                raise ValueError(f"KV holds {keys.shape[-2]} positions for {len(tokens)} tokens")
        tokens = tuple(tokens)
        hashes = self._prefix_hashes(tokens, len(tokens))
        newest = self._index.get(hashes[-1])
        if newest is not None and self._entries[newest].tokens[: len(hashes) * self.block] == tokens[: len(hashes) * self.block]:
            # already held (same whole blocks): refresh it rather than keep two copies
            self._entries.move_to_end(newest)
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = _Entry(tokens, layers, nbytes, hashes)
        self.nbytes += nbytes
        for h in hashes:
            self._index[h] = entry_id
        while self.nbytes > self.max_bytes:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for h in entry.keys:
            if self._index.get(h) == entry_id:
                del self._index[h]
