"""The loss terms against independent computations: KL vs Monte Carlo, BCE, permute_dims, TC, D loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastfvae.models import Discriminator
from fastfvae.objectives import (
    beta_vae_loss, discriminator_accuracy, discriminator_loss, factor_vae_loss, gaussian_kl,
    gaussian_kl_per_dim, kl_loss, permute_dims, recon_loss, reparameterize, tc_estimate,
)


def test_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], dtype=torch.float64)
    logvar = torch.tensor([[0.2, -1.5, 0.7], [0.0, 1.0, -0.3]], dtype=torch.float64)
    eps = torch.randn(400_000, 2, 3, generator=g, dtype=torch.float64)
    z = reparameterize(mu, logvar, eps)
    std = torch.exp(0.5 * logvar)
    log_q = (-0.5 * ((z - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_p = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    mc = (log_q - log_p).mean(0)
    exact = gaussian_kl(mu, logvar)
    assert exact.shape == (2,)
    assert torch.allclose(exact, mc, atol=0.02), (exact, mc)
    assert torch.allclose(kl_loss(mu, logvar), exact.mean())
    assert torch.allclose(gaussian_kl_per_dim(mu, logvar).sum(1), exact)
    assert float(gaussian_kl(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_reparameterize():
    mu, logvar, eps = torch.tensor([[1.0]]), torch.tensor([[math.log(4.0)]]), torch.tensor([[0.5]])
    assert float(reparameterize(mu, logvar, eps)) == pytest.approx(2.0)


def test_recon_loss_is_bce_summed_over_pixels_mean_over_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 64, 64, generator=g)
    x = (torch.rand(3, 1, 64, 64, generator=g) > 0.5).float()
    p = torch.sigmoid(logits.double())
    by_hand = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum() / 3
    assert float(recon_loss(logits, x)) == pytest.approx(float(by_hand), rel=1e-5)
    # all-zero logits: every pixel costs log 2
    assert float(recon_loss(torch.zeros(2, 1, 64, 64), x[:2])) == pytest.approx(4096 * math.log(2), rel=1e-6)


def test_permute_dims_permutes_each_column_independently():
    g = torch.Generator().manual_seed(2)
    z = torch.arange(64 * 5, dtype=torch.float32).reshape(64, 5)
    keys = torch.rand(64, 5, generator=g)
    out = permute_dims(z, keys)
    orders = []
    for j in range(5):
        order = torch.argsort(keys[:, j])
        assert torch.equal(out[:, j], z[order, j])
        assert torch.equal(out[:, j].sort().values, z[:, j])  # a permutation of the column
        orders.append(order)
    assert not all(torch.equal(orders[0], o) for o in orders[1:])  # columns shuffled differently


def test_tc_estimate_and_losses():
    logits = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    assert float(tc_estimate(logits)) == pytest.approx(0.25)
    assert float(factor_vae_loss(torch.tensor(10.0), torch.tensor(2.0), torch.tensor(0.5), 4.0)) == 14.0
    assert float(beta_vae_loss(torch.tensor(10.0), torch.tensor(2.0), 4.0)) == 18.0
    lq, lp = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0]])
    expected = 0.5 * (F.cross_entropy(lq, torch.tensor([0, 0])) + F.cross_entropy(lp, torch.tensor([1])))
    assert float(discriminator_loss(lq, lp)) == pytest.approx(float(expected))
    assert float(discriminator_accuracy(lq, lp)) == pytest.approx(2 / 3)


def _trained_tc(sample, steps=200, batch=256) -> float:
    """Train a small D as FactorVAE does (codes vs permuted second batch); return its TC estimate."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d = Discriminator(2, hidden=64, num_layers=2)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(steps):
        z, z2 = sample(batch, g), sample(batch, g)
        loss = discriminator_loss(d(z), d(permute_dims(z2, torch.rand(batch, 2, generator=g))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(tc_estimate(d(sample(20_000, g))))


def test_tc_estimate_zero_on_independent_codes_positive_on_dependent():
    rho = 0.9

    def independent(n, g):
        return torch.randn(n, 2, generator=g)

    def dependent(n, g):
        a = torch.randn(n, 2, generator=g)
        return torch.stack([a[:, 0], rho * a[:, 0] + math.sqrt(1 - rho ** 2) * a[:, 1]], dim=1)

    true_tc = -0.5 * math.log(1 - rho ** 2)  # Gaussian TC = -1/2 log det(correlation) = 0.83
    assert abs(_trained_tc(independent)) < 0.08
    assert _trained_tc(dependent) == pytest.approx(true_tc, abs=0.25)
