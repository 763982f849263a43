"""Sentence features from token states: the mask-mean the router's heads and the retriever both use.

    features = mean_pool(hidden, attention_mask)      # (B, T, d), (B, T) -> (B, d) float32
"""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, d) over positions where attention_mask (B, T) is 1: (B, d) in float32.

    A row without any real token gives zeros. `where()`, not a product: padded positions must not leak even a NaN.
    """
    mask = attention_mask.bool().unsqueeze(-1)  # (B, T, 1)
    summed = torch.where(mask, hidden.float(), 0.0).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1).float()
