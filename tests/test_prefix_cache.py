"""PrefixCache (haps_ray.engine.prefix_cache): longest block-aligned prefix lookup, LRU eviction by bytes."""

from __future__ import annotations

import pytest
import torch

from haps_ray.engine.prefix_cache import PrefixCache, common_prefix_length


def kv_of(tokens: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of shape (1, 1, len, 2) whose entries name the token and the layer."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None]
    return [(t.repeat(1, 1, 1, 2) + 1000 * layer, -t.repeat(1, 1, 1, 2) - 1000 * layer) for layer in range(layers)]


def test_lookup_takes_the_longest_whole_block_prefix_and_leaves_a_token() -> None:
    cache = PrefixCache(max_bytes=2**20, block=4)
    stored = list(range(100, 114))  # 14 tokens: blocks end at 4, 8, 12
    cache.store(stored, kv_of(stored))
    layers, n = cache.lookup(stored[:10] + [7, 7, 7])
    assert n == 8 and cache.match_length(stored[:10] + [7, 7, 7]) == 8
    assert layers[1][0][0, 0, :n, 0].tolist() == [1000.0 + t for t in stored[:8]]
    assert layers[1][1][0, 0, :n, 0].tolist() == [-1000.0 - t for t in stored[:8]]
    # the same prompt again: all of it is cached, but its last token must still be prefilled
    assert cache.match_length(stored) == 12
    assert cache.match_length(stored[:12]) == 8
    assert cache.lookup(stored[:3] + [1, 2, 3, 4, 5]) is None  # less than one block shared
    assert cache.lookup([5, 100, 101, 102, 103, 104]) is None  # shared tokens, but not from the start


def test_identical_blocks_are_stored_once_and_longer_entries_serve_their_prefixes() -> None:
    cache = PrefixCache(max_bytes=2**20, block=4)
    long = list(range(20))
    cache.store(long, kv_of(long))
    cache.store(long[:8], kv_of(long[:8]))  # held already, inside the longer entry
    cache.store(long[:18], kv_of(long[:18]))  # same whole blocks (16) as the longer one's first 4
    assert len(cache) == 1
    assert cache.match_length(long[:9] + [99]) == 8
    branch = long[:8] + [50, 51, 52, 53, 54]
    cache.store(branch, kv_of(branch))
    assert len(cache) == 2 and cache.match_length(branch + [1]) == 12 and cache.match_length(long + [1]) == 20


def test_lru_eviction_by_bytes_keeps_recently_used_entries() -> None:
    a, b, c = [[base + i for i in range(8)] for base in (0, 100, 200)]
    entry_bytes = 2 * 2 * 8 * 2 * 4  # layers x (k, v) x tokens x dim x fp32
    cache = PrefixCache(max_bytes=2 * entry_bytes, block=4)
    cache.store(a, kv_of(a))
    cache.store(b, kv_of(b))
    assert cache.lookup(a + [1]) is not None  # a is now the most recently used
    cache.store(c, kv_of(c))
    assert len(cache) == 2 and cache.nbytes == 2 * entry_bytes
    assert cache.match_length(b + [1]) == 0 and cache.match_length(a + [1]) == 8 and cache.match_length(c + [1]) == 8
    too_big = list(range(300, 340))
    cache.store(too_big, kv_of(too_big))  # larger than the whole budget: not kept, nothing evicted for it
    assert len(cache) == 2 and cache.match_length(too_big) == 0


def test_evicting_a_newer_entry_keeps_an_older_ones_deeper_prefixes() -> None:
    old = list(range(12))
    new = old[:4] + [90, 91, 92, 93]
    cache = PrefixCache(max_bytes=2 * (2 * 2 * 12 * 2 * 4), block=4)  # room for two 12-token entries
    cache.store(old, kv_of(old))
    cache.store(new, kv_of(new))  # now indexes the shared first block
    assert cache.lookup(old + [1]) is not None  # old becomes the most recent; new is evicted next
    cache.store(list(range(500, 512)), kv_of(list(range(500, 512))))
    assert cache.match_length(new + [1]) == 0
    assert cache.match_length(old + [1]) == 12  # its own deeper blocks still lead to it


def test_a_hash_collision_is_a_miss_not_a_wrong_reuse() -> None:
    class Colliding(PrefixCache):
        def _prefix_hashes(self, tokens, upto):
            return [depth for depth in range(upto // self.block)]

    cache = Colliding(max_bytes=2**20, block=4)
    cache.store([1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))
    assert cache.lookup([9, 9, 9, 9, 9]) is None
    assert cache.match_length([1, 2, 3, 4, 9]) == 4


def test_store_checks_the_kv_length_and_arguments() -> None:
    cache = PrefixCache(max_bytes=2**20, block=4)
    with pytest.raises(ValueError, match="KV holds 5 positions for 6 tokens"):
        cache.store(list(range(6)), kv_of(list(range(5))))
    cache.store([1, 2, 3], kv_of([1, 2, 3]))  # shorter than a block: nothing a lookup could use
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_bytes > 0"):
        PrefixCache(max_bytes=0)
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([], [1]) == 0
