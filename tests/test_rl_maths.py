"""Advantages and the split (router + remote adapter) backward pass against direct autograd."""

import pytest
import torch

from haps_ray.rl.advantages import compute_advantages
from haps_ray.rl.losses import backward_joint, generator_weights, router_pg_loss


def test_batch_mean_and_none():
    r = [1.0, 0.0, 0.5, 0.5]
    assert torch.allclose(compute_advantages(r, baseline="batch_mean"), torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(compute_advantages(r, baseline="none"), torch.tensor(r, dtype=torch.float64))


def test_leave_one_out_by_group():
    r = [1.0, 0.0, 0.0, 3.0, 1.0]
    adv = compute_advantages(r, group_ids=[0, 0, 0, 1, 1], baseline="leave_one_out")
    expected = [1 - 0.0, 0 - 0.5, 0 - 0.5, 3 - 1, 1 - 3]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="group 2 has 1 rollout"):
        compute_advantages([1.0, 2.0, 3.0], group_ids=[1, 1, 2], baseline="leave_one_out")


def test_normalize_gives_unit_std():
    adv = compute_advantages([0.0, 1.0, 2.0, 7.0], normalize=True)
    assert abs(float(adv.std()) - 1.0) < 1e-6 and abs(float(adv.mean())) < 1e-9


def test_split_backward_equals_direct_autograd():
    """Router loss + engine-side gradients of w_i Σ log p equal autograd of the full REINFORCE loss."""
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    W = torch.randn(3, 6)
    targets = torch.tensor([1, 4, 2])

    def policy(th):
        log_pi = torch.log_softmax(W @ th, dim=0)  # router: one z per episode
        factors = [th[:3] * 2.0, th[3:] ** 2, th[1:4].sin()]  # hypernetwork output per episode
        return log_pi, factors

    def engine_logp(factor, y):  # a stand-in frozen model: Σ_t log p(y_t | factor)
        return torch.log_softmax(torch.outer(factor, torch.arange(1.0, 6.0)).sum(0), dim=0)[y]

    rewards = torch.tensor([1.0, 0.0, 0.5])
    adv = compute_advantages(rewards).float()

    log_pi, factors = policy(theta)
    direct = router_pg_loss(log_pi, adv) - sum(a * engine_logp(f, y) for a, f, y in zip(adv, factors, targets)) / 3
    (g_direct,) = torch.autograd.grad(direct, theta)

    log_pi, factors = policy(theta)
    weights = generator_weights(adv)
    remote = []
    for w, f, y in zip(weights, factors, targets):
        leaf = f.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(w * engine_logp(leaf, y), leaf)
        remote.append(g)
    backward_joint(router_pg_loss(log_pi, adv), factors, remote)
    assert torch.allclose(theta.grad, g_direct, atol=1e-6)


def test_backward_joint_rejects_shape_mismatch():
    f = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        backward_joint(None, [f], [torch.zeros(3, 2)])
