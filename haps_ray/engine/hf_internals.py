"""Every use of transformers internals that are not public API, in one place, with a check that they still exist.

The engine's decode loop needs more control over the KV cache than `generate` exposes: a cache layer that keeps
room for the tokens still to come (written in place instead of concatenated every step), dropping finished rows
inside it, building a cache from tensors, and knowing which layers are sliding-window ones. The router needs a
custom 4-D attention mask, whose format depends on the attention implementation. These rely on:

    DynamicLayer: subclassed; its `lazy_initialization`, `is_initialized`, `keys`/`values`, `get_seq_length`,
                  `batch_select_indices`
    DynamicCache: `DynamicCache(config=...)` and its `layers`, `DynamicCache(ddp_cache_data=...)`
    config._attn_implementation (read), `set_attn_implementation`, a 4-D mask passed through as-is
    transformers.integrations.sdpa_attention.sdpa_attention_forward and masking_utils.sdpa_mask (wrapped by the
    ragged attention function)

`check_internals()` verifies each of them and raises `TransformersInternalsError` naming what changed; the engine
calls it on construction and a test calls it on the installed version. pyproject.toml pins the transformers range
the test suite covers; widen it only after that test passes on the new version.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = [
    "ReservedLayer", "TransformersInternalsError", "attention_implementation", "cache_from_tensors",
    "check_internals", "custom_attention_mask", "merge_width_limit", "new_cache", "register_attention",
    "sdpa_attention_forward", "set_attention_implementation",
]


class TransformersInternalsError(RuntimeError):
    """The installed transformers no longer has an internal this project relies on."""


def check_internals() -> None:
    """Raise `TransformersInternalsError` naming every internal (see the module docstring) that is missing."""
    problems = []
    for name in ("lazy_initialization", "get_seq_length", "batch_select_indices", "update"):
        if not callable(getattr(DynamicLayer, name, None)):
            problems.append(f"transformers.cache_utils.DynamicLayer.{name} is gone")
    parameters = inspect.signature(DynamicCache.__init__).parameters
    for name in ("config", "ddp_cache_data"):
        if name not in parameters:
            problems.append(f"DynamicCache(...) no longer takes `{name}`")
    if not callable(getattr(PreTrainedModel, "set_attn_implementation", None)):
        problems.append("PreTrainedModel.set_attn_implementation is gone")
    if not hasattr(PretrainedConfig(), "_attn_implementation"):
        problems.append("PretrainedConfig._attn_implementation is gone")
    if not problems:
        layer = DynamicLayer()
        keys = torch.zeros(2, 1, 3, 4)
        layer.lazy_initialization(keys, keys)
        if not getattr(layer, "is_initialized", False) or not hasattr(layer, "keys"):
            problems.append("DynamicLayer.lazy_initialization no longer sets `is_initialized` / `keys`")
        cache = DynamicCache(ddp_cache_data=[(keys, keys)])
        if not getattr(cache, "layers", None) or not torch.equal(cache.layers[0].keys, keys):
            problems.append("DynamicCache(ddp_cache_data=...) no longer builds `layers` holding the given tensors")
    if problems:
        raise TransformersInternalsError(
            f"transformers {transformers.__version__} changed internals haps_ray.engine relies on: "
            + "; ".join(problems) + ". Install the range pinned in pyproject.toml."
        )


class ReservedLayer(DynamicLayer):
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


def new_cache(config: PretrainedConfig, reserve: int) -> DynamicCache:
    """An empty cache shaped by `config`; its full-attention layers are `ReservedLayer(reserve)`."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def layer_kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer: (b, kv_heads, t, head_dim) each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the given per-layer (keys, values) (not copied)."""
    return DynamicCache(ddp_cache_data=list(layers))


def merge_width_limit(config: PretrainedConfig) -> float:
    """Prompt widths below this can have separately prefilled caches padded and stacked into one: no limit for
    full-attention layers, the window for sliding-window layers (which keep only their window), 0 for any other
    cache layer type (or a config that declares no layers up front)."""
    layers = DynamicCache(config=config).layers
    limit = float("inf") if layers else 0.0
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            limit = min(limit, layer.sliding_window)
        elif type(layer) is not DynamicLayer:
            return 0.0
    return limit


def attention_implementation(model: PreTrainedModel) -> str:
    """The attention implementation the model runs (sdpa, eager, flash_attention_2, or a registered name)."""
    return model.config._attn_implementation


def set_attention_implementation(model: PreTrainedModel, name: str) -> None:
    model.set_attn_implementation(name)


def register_attention(name: str, forward: Callable[..., Any]) -> None:
    """Register an attention function that takes SDPA's masks (so a model switched to it builds those)."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def custom_attention_mask(allowed: torch.Tensor, model: PreTrainedModel, dtype: torch.dtype) -> torch.Tensor:
    """A (b, 1, q, k) mask in the form the model's attention takes as-is: boolean (True = attend) for SDPA-style
    implementations, additive (0 / dtype min) for eager attention."""
    if allowed.dim() != 4:
        raise ValueError(f"a custom attention mask must be 4-D (b, 1, q, k), got {tuple(allowed.shape)}")
    if attention_implementation(model) == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
