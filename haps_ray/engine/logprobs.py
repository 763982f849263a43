"""Token log-probabilities without the full-vocabulary log-softmax: the one path engine, router and SFT use.

log p(y) = logit[y] - logsumexp(logits), computed for a chunk of rows at a time in float32 (exact for bf16/fp16
logits too), so no (rows, vocabulary) float copy of the whole batch ever exists. `head_log_probs` goes further for
the gradient path: it applies the LM head itself, chunk by chunk, under activation checkpointing, so neither the
logits nor the log-softmax of a batch are kept for the backward pass (each chunk's logits are recomputed there).
At batch 32 x 257 positions x a 128k vocabulary, full fp32 logits alone are ~4 GB; a chunk of 128 rows is 64 MB.

    logp = selective_log_softmax(logits, tokens)                   # logits (N, V), tokens (N,) -> (N,)
    logp = head_log_probs(hidden, model.get_output_embeddings(), targets)   # hidden (N, d): gradients flow
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Rows per chunk: bounds the float32 (rows, vocabulary) block that exists at once (128 x 128k x 4 B = 64 MiB);
# a 128-row head product is still a large matrix multiply (128 x d x V) on any device.
CHUNK_ROWS = 128


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """log_softmax(logits)[..., index] in float32: logits (..., V), index (...) -> (...).

    Rows are processed `chunk_rows` at a time; each chunk is upcast on its own, never the whole batch.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match index {tuple(index.shape)}")
    flat, idx = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    parts = []
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start:start + chunk_rows].float()  # (c, V)
        chosen = chunk.gather(-1, idx[start:start + chunk_rows, None]).squeeze(-1)  # (c,)
        parts.append(chosen - chunk.logsumexp(dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(index.shape)


def _chunk_log_probs(hidden: torch.Tensor, index: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return selective_log_softmax(head(hidden), index, chunk_rows=hidden.shape[0] or 1)


def head_log_probs(
    hidden: torch.Tensor, head: nn.Module, index: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """log p(index | hidden) under `head` (the LM head: hidden -> logits): hidden (N, d), index (N,) -> (N,) float32.

    With gradients on, each chunk runs under activation checkpointing: only `hidden` is saved, and the chunk's
    logits are recomputed during backward, so peak memory holds one chunk's (rows, vocabulary) block.
    """
    if hidden.dim() != 2 or index.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and index (N,), got {tuple(hidden.shape)} and {tuple(index.shape)}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, i = hidden[start:start + chunk_rows], index[start:start + chunk_rows]
        parts.append(checkpoint(_chunk_log_probs, h, i, head, use_reentrant=False) if grad else _chunk_log_probs(h, i, head))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
