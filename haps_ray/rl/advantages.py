"""Advantages for the joint policy gradient: reward minus a baseline, optionally normalised.

Baselines (RLConfig.baseline):
- batch_mean     A_i = R_i - mean(R)                        (variance reduction across the batch)
- leave_one_out  A_i = R_i - mean_{j in group(i), j != i} R_j  (G rollouts of the same problem; RLOO)
- none           A_i = R_i                                  (the authors' code: raw reward, no baseline)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def compute_advantages(
    rewards: Sequence[float] | torch.Tensor,
    group_ids: Sequence[int] | None = None,
    baseline: str = "batch_mean",
    normalize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Advantages (N,) in float64 for rewards (N,); `group_ids[i]` names the problem rollout i belongs to."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() == 0:
        return r
    if baseline == "batch_mean":
        adv = r - r.mean()
    elif baseline == "none":
        adv = r.clone()
    elif baseline == "leave_one_out":
        if group_ids is None or len(group_ids) != r.numel():
            raise ValueError("leave_one_out needs one group id per reward")
        groups = torch.as_tensor(list(group_ids))
        adv = torch.empty_like(r)
        for g in groups.unique():
            members = groups == g
            size = int(members.sum())
            if size < 2:
                raise ValueError(f"leave_one_out: group {int(g)} has {size} rollout; needs >= 2 (set rl.group_size >= 2)")
            total = r[members].sum()
            adv[members] = r[members] - (total - r[members]) / (size - 1)
    else:
        raise ValueError(f"unknown baseline {baseline!r} (batch_mean | leave_one_out | none)")
    if normalize and adv.numel() > 1:
        adv = adv / (adv.std() + eps)
    return adv
