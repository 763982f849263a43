"""Token log-probabilities without the full-vocabulary log-softmax: the one path engine, router and SFT use.

log p(y) = logit[y] - logsumexp(logits), computed for a chunk of rows at a time in float32 (exact for bf16/fp16
logits too), so no (rows, vocabulary) float copy of the whole batch ever exists. `head_log_probs` goes further for
the gradient path: it applies the LM head itself, chunk by chunk, under activation checkpointing, so neither the
logits nor the log-softmax of a batch are kept for the backward pass (each chunk's logits are recomputed there).
At batch 32 x 257 positions x a 128k vocabulary, full fp32 logits alone are ~4 GB; a chunk of 128 rows is 64 MB.

    logp = selective_log_softmax(logits, tokens)                   # logits (N, V), tokens (N,) -> (N,)
    logp = head_log_probs(hidden, model.get_output_embeddings(), targets)   # hidden (N, d): gradients flow
    logp = selective_log_softmax(logits, tokens, nucleus=Nucleus(1.0, 0.9))  # under what top-p sampling drew from

Support (`rl.logprob_support`): by default log p is under the model's full, untempered softmax. With a `Nucleus` it
is under the distribution training rollouts are sampled from: softmax(logits / T) renormalised over the top-p
nucleus, the nucleus chosen exactly as the sampler chooses it (transformers' `TopPLogitsWarper` on the same tempered
logits). The nucleus is a discrete choice and carries no gradient. A target outside its row's nucleus (a stored
trajectory teacher-forced under a new adapter, or a token on the nucleus edge where recomputed logits differ in the
last bits) is added to that row's support, so its log-prob stays finite: exact wherever the target is in the nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import TopPLogitsWarper

# Rows per chunk: bounds the float32 (rows, vocabulary) block that exists at once (128 x 128k x 4 B = 64 MiB);
# a 128-row head product is still a large matrix multiply (128 x d x V) on any device.
CHUNK_ROWS = 128


@dataclass(frozen=True)
class Nucleus:
    """The support of sampled tokens: softmax(logits / temperature) over the top_p nucleus (temperature > 0)."""

    temperature: float
    top_p: float

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"a nucleus needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


def _nucleus_log_probs(chunk: torch.Tensor, idx: torch.Tensor, nucleus: Nucleus) -> torch.Tensor:
    """log p(idx) under softmax(chunk / T) renormalised over the nucleus (plus the target): chunk (c, V) float32."""
    scaled = chunk / nucleus.temperature
    with torch.no_grad():
        keep = torch.isfinite(TopPLogitsWarper(nucleus.top_p)(None, scaled.detach())) if nucleus.top_p < 1 else \
            torch.ones_like(scaled, dtype=torch.bool)
        keep.scatter_(-1, idx[:, None], True)
    chosen = scaled.gather(-1, idx[:, None]).squeeze(-1)
    return chosen - scaled.masked_fill(~keep, float("-inf")).logsumexp(dim=-1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = CHUNK_ROWS,
                          nucleus: Nucleus | None = None) -> torch.Tensor:
    """log_softmax(logits)[..., index] in float32: logits (..., V), index (...) -> (...); with `nucleus`, under the
    renormalised tempered nucleus instead (see the module docstring).

    Rows are processed `chunk_rows` at a time; each chunk is upcast on its own, never the whole batch.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match index {tuple(index.shape)}")
    flat, idx = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    parts = []
    for start in range(0, flat.shape[0], chunk_rows):
        chunk = flat[start:start + chunk_rows].float()  # (c, V)
        rows = idx[start:start + chunk_rows]
        if nucleus is not None:
            parts.append(_nucleus_log_probs(chunk, rows, nucleus))
            continue
        chosen = chunk.gather(-1, rows[:, None]).squeeze(-1)  # (c,)
        parts.append(chosen - chunk.logsumexp(dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return out.view(index.shape)


def _chunk_log_probs(hidden: torch.Tensor, index: torch.Tensor, head: nn.Module, nucleus: Nucleus | None) -> torch.Tensor:
    return selective_log_softmax(head(hidden), index, chunk_rows=hidden.shape[0] or 1, nucleus=nucleus)


def head_log_probs(
    hidden: torch.Tensor, head: nn.Module, index: torch.Tensor, chunk_rows: int = CHUNK_ROWS,
    nucleus: Nucleus | None = None,
) -> torch.Tensor:
    """log p(index | hidden) under `head` (the LM head: hidden -> logits): hidden (N, d), index (N,) -> (N,) float32;
    the full softmax, or with `nucleus` the renormalised tempered nucleus.

    With gradients on, each chunk runs under activation checkpointing: only `hidden` is saved, and the chunk's
    logits are recomputed during backward, so peak memory holds one chunk's (rows, vocabulary) block.
    """
    if hidden.dim() != 2 or index.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and index (N,), got {tuple(hidden.shape)} and {tuple(index.shape)}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, i = hidden[start:start + chunk_rows], index[start:start + chunk_rows]
        parts.append(checkpoint(_chunk_log_probs, h, i, head, nucleus, use_reentrant=False) if grad
                     else _chunk_log_probs(h, i, head, nucleus))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
