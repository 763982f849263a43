"""Losses of the joint objective, written so the generator term can be computed on remote engines.

The REINFORCE objective (paper eq. 9, with shaping applied to R) over a batch of N episodes is

    L = -(1/N) Σ_i A_i · [ ρ · log π(z_i | x_i)  +  Σ_{calls c of i} Σ_t log p_{θ_m(c)}(y_t | ·, ΔW_i,m(c)) ]

where ρ = 1 when the router decision is reinforced (0 reproduces the authors' code). The second term
depends on the hypernetwork only through the adapter factors (A, B) of episode i for engine m, so an
engine hosting m computes g = ∂/∂(A,B) of Σ_t w_i log p(y_t) with w_i = -A_i / N (`generator_weights`),
and the learner finishes the chain rule with `torch.autograd.backward(factors, grad_tensors=g)`.
The reward-weighted likelihood objective (paper eq. 5) is the same with A_i replaced by the reward of a
row of D (`reward_weighted_router_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def router_pg_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-(1/N) Σ_i A_i log π(z_i|x_i); advantages are constants."""
    adv = advantages.detach().to(log_probs.dtype)
    return -(adv * log_probs).mean()


def reward_weighted_router_loss(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Paper eq. 5 over rows of D: -(1/N) Σ_(x,z) R(x,z) log π(z|x)."""
    return -(rewards.detach().to(log_probs.dtype) * log_probs).mean()


def generator_weights(advantages: Sequence[float] | torch.Tensor) -> list[float]:
    """Per-episode weights w_i = -A_i / N that engines multiply into Σ_t log p before differentiating."""
    adv = torch.as_tensor(advantages, dtype=torch.float64).flatten()
    n = max(adv.numel(), 1)
    return [float(-a / n) for a in adv]


def backward_joint(
    router_loss: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    factor_grads: Sequence[torch.Tensor],
) -> None:
    """One backward pass through the policy for the router loss plus remote adapter gradients.

    `factors` are the hypernetwork's output tensors (with graph); `factor_grads` the matching ∂L/∂factor
    returned by the engines (same shapes). Either part may be empty.
    """
    if len(factors) != len(factor_grads):
        raise ValueError(f"{len(factors)} factor tensors but {len(factor_grads)} gradients")
    tensors, grads = [], []
    if router_loss is not None and router_loss.requires_grad:
        tensors.append(router_loss)
        grads.append(torch.ones_like(router_loss))
    for factor, grad in zip(factors, factor_grads):
        if factor.shape != grad.shape:
            raise ValueError(f"adapter gradient shape {tuple(grad.shape)} != factor shape {tuple(factor.shape)}")
        if factor.requires_grad:
            tensors.append(factor)
            grads.append(grad.to(device=factor.device, dtype=factor.dtype))
    if tensors:
        torch.autograd.backward(tensors, grad_tensors=grads)
