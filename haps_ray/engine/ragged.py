"""Ragged decode attention: a left-padded decode batch attends in runs of rows of similar length.

Rows that decode together are left padded to the longest one, so plain SDPA reads every row's keys and values
over the longest row's width: with one 800-token prompt among 200-token ones, three quarters of that memory
traffic is padding, and on a CPU (where decode attention is bound by memory) it costs as much as real tokens.
If the rows are ordered by length, a run of rows [r0, r1) whose longest row holds n valid positions needs only
the last n positions of the cache; slicing them is a view, so each run costs one SDPA call over its own width.

The generator passes `row_spans=[(r0, r1, n), ...]` to the model's forward; transformers hands extra keyword
arguments on to the attention function. Without them (prefill, scoring, training) this is plain SDPA. Masked
positions contribute exactly zero to a softmax, so a run's output equals the padded one up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from haps_ray.engine.hf_internals import (
    attention_implementation, register_attention, sdpa_attention_forward, set_attention_implementation,
)

RAGGED_SDPA = "haps_ragged_sdpa"

# A run may attend over at most this share of padding beyond its rows' valid positions: a longer run costs one
# SDPA call less (tens of microseconds per layer), padding costs memory traffic in proportion to its width.
RUN_PADDING_WASTE = 0.1

RowSpans = list[tuple[int, int, int]]


def ragged_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    row_spans: RowSpans | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA per run of rows `(r0, r1, n)` over the last n key positions; plain SDPA without `row_spans`."""
    width = key.shape[-2]
    if row_spans is None or (attention_mask is not None and attention_mask.shape[-1] != width):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for r0, r1, n in row_spans:
        n = min(n, width)
        mask = None if attention_mask is None else attention_mask[r0:r1, ..., width - n :]
        out, _ = sdpa_attention_forward(
            module, query[r0:r1], key[r0:r1, :, width - n :], value[r0:r1, :, width - n :], mask, **kwargs
        )
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


register_attention(RAGGED_SDPA, ragged_sdpa_forward)


def use_ragged_attention(model: PreTrainedModel) -> bool:
    """Switch a model that runs SDPA to `ragged_sdpa_forward` (identical without `row_spans`); other attention
    implementations (eager, flash-attention, ...) are left alone. True when the model now takes `row_spans`."""
    if attention_implementation(model) == "sdpa":
        set_attention_implementation(model, RAGGED_SDPA)
    return attention_implementation(model) == RAGGED_SDPA


def row_spans(lengths: Sequence[int], waste: float = RUN_PADDING_WASTE) -> RowSpans:
    """Runs `(r0, r1, n)` of consecutive rows, `lengths` in non-increasing order (valid positions per row), such
    that attending over the run's longest row's n positions adds at most `waste` x the run's valid positions."""
    if any(a < b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"row lengths must be in non-increasing order, got {list(lengths)}")
    spans: RowSpans = []
    start, tokens = 0, 0
    for row, length in enumerate(lengths):
        if row > start and (row + 1 - start) * lengths[start] > (1 + waste) * (tokens + length):
            spans.append((start, row, lengths[start]))
            start, tokens = row, 0
        tokens += length
    if lengths:
        spans.append((start, len(lengths), lengths[start]))
    return spans
