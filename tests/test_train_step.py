"""The reference step: gradient flow (VAE loss -> encoder+decoder only, D loss -> D only, TC -> encoder),
the documented randomness order, and the whole step against an independent by-hand computation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastfvae.data import EpochSampler
from fastfvae.objectives import discriminator_loss, permute_dims
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import draw_step_inputs, reference_step
from train_data import small_config  # noqa: E402
from fastfvae.train.state import TrainState, noise_seed

B = 8


def _setup(**kw):
    cfg = small_config(batch_size=B, d_hidden=32, d_layers=2, **kw)
    state = TrainState.create(cfg, 64)
    g = torch.Generator().manual_seed(123)
    batch = (torch.rand(B, 1, 64, 64, generator=g) > 0.7).float()
    batch2 = (torch.rand(B, 1, 64, 64, generator=g) > 0.7).float()
    inputs = draw_step_inputs(cfg, state.sampler, state.generator)
    return cfg, state, batch, batch2, inputs


def _step(cfg, state, batch, batch2, inputs):
    return reference_step(state.models, state.optims, batch, batch2 if inputs.rows2 is not None else None,
                          inputs.eps, inputs.eps2, inputs.keys, cfg)


def _grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def _vae_loss(vae, disc, x, eps, gamma):
    mu, logvar = vae.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    recon = F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="sum") / x.shape[0]
    kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(1).mean()
    logits = disc(z)
    return recon + kl + gamma * (logits[:, 0] - logits[:, 1]).mean()


class _RecordingAdam:
    """Stands in for D's optimiser: records the gradients it is asked to apply, changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.seen = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.seen.append([p.grad.clone() for p in self.params])


def test_vae_loss_never_updates_d_and_d_grad_is_only_the_d_loss():
    cfg, state, batch, batch2, inputs = _setup(perm_batch="same")
    disc = state.models.disc
    before = copy.deepcopy(disc.state_dict())
    z_q = None
    with torch.no_grad():
        mu, logvar = state.models.vae.encode(batch)
        z_q = mu + inputs.eps * torch.exp(0.5 * logvar)
    vae_opt_params = {id(p) for group in state.optims.vae.param_groups for p in group["params"]}
    assert vae_opt_params == {id(p) for p in state.models.vae.parameters()}  # encoder + decoder only
    recorder = _RecordingAdam(disc.parameters())
    state.optims = state.optims._replace(disc=recorder)
    _step(cfg, state, batch, batch2, inputs)
    # D's parameters are untouched by the VAE update (the recorder never changes them) ...
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())
    # ... and the gradient D's optimiser got is exactly the D loss's, nothing from the VAE loss.
    expected = torch.autograd.grad(
        discriminator_loss(disc(z_q), disc(permute_dims(z_q, inputs.keys[0]))), list(disc.parameters()))
    assert len(recorder.seen) == 1
    for got, want in zip(recorder.seen[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_d_loss_never_reaches_the_encoder():
    cfg, state, batch, batch2, inputs = _setup()
    vae, disc = state.models
    ref_vae = copy.deepcopy(vae)
    _vae_loss(ref_vae, copy.deepcopy(disc), batch, inputs.eps, cfg.gamma).backward()
    _step(cfg, state, batch, batch2, inputs)
    # the encoder's / decoder's grads after the whole step (D updates included) are the VAE loss's alone
    for got, want in zip(_grads(vae), _grads(ref_vae)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tc_gradient_reaches_the_encoder_not_the_decoder():
    grads = {}
    for gamma in (0.0, 35.0):
        cfg, state, batch, batch2, inputs = _setup(gamma=gamma)
        _step(cfg, state, batch, batch2, inputs)
        grads[gamma] = (_grads(state.models.vae.encoder), _grads(state.models.vae.decoder))
    enc0, dec0 = grads[0.0]
    enc35, dec35 = grads[35.0]
    assert all(torch.equal(a, b) for a, b in zip(dec0, dec35))          # TC does not involve the decoder
    diff = sum(float((a - b).abs().sum()) for a, b in zip(enc0, enc35))
    assert diff > 1e-3                                                  # TC gradient reaches the encoder


def test_randomness_order_is_documented_order():
    cfg = TrainConfig(batch_size=B, z_dim=3, d_steps=2)
    sampler = EpochSampler(64, B, seed=cfg.seed)
    g = torch.Generator().manual_seed(noise_seed(cfg.seed))
    inputs = draw_step_inputs(cfg, sampler, g)
    ref_sampler = EpochSampler(64, B, seed=cfg.seed)
    ref_g = torch.Generator().manual_seed(noise_seed(cfg.seed))
    assert np.array_equal(inputs.rows, ref_sampler.next_rows())
    assert np.array_equal(inputs.rows2, ref_sampler.next_rows())
    assert torch.equal(inputs.eps, torch.randn(B, 3, generator=ref_g))
    assert torch.equal(inputs.eps2, torch.randn(B, 3, generator=ref_g))
    assert torch.equal(inputs.keys, torch.rand(2, B, 3, generator=ref_g))
    same = draw_step_inputs(cfg.replace(perm_batch="same"), EpochSampler(64, B), torch.Generator())
    assert same.rows2 is None and same.eps2 is None and same.keys.shape == (2, B, 3)
    beta = draw_step_inputs(cfg.replace(model="betavae"), EpochSampler(64, B), torch.Generator())
    assert beta.rows2 is None and beta.keys is None


@pytest.mark.parametrize("perm_batch", ["second", "same"])
def test_step_matches_by_hand_algorithm(perm_batch):
    """Algorithm 1 written out independently: VAE update, then d_steps D updates on detached codes."""
    cfg, state, batch, batch2, inputs = _setup(perm_batch=perm_batch, d_steps=2)
    vae, disc = copy.deepcopy(state.models.vae), copy.deepcopy(state.models.disc)
    vae_opt = torch.optim.Adam(vae.parameters(), lr=1e-4, betas=(0.9, 0.999))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    with torch.no_grad():
        mu, logvar = vae.encode(batch)
        z_q = mu + inputs.eps * torch.exp(0.5 * logvar)
    loss = _vae_loss(vae, disc, batch, inputs.eps, cfg.gamma)
    vae_opt.zero_grad()
    disc.requires_grad_(False)
    loss.backward()
    disc.requires_grad_(True)
    vae_opt.step()
    with torch.no_grad():
        if perm_batch == "same":
            z_p = z_q
        else:
            mu2, logvar2 = vae.encode(batch2)
            z_p = mu2 + inputs.eps2 * torch.exp(0.5 * logvar2)
    for k in range(2):
        cols = [z_p[torch.argsort(inputs.keys[k][:, j]), j] for j in range(z_p.shape[1])]
        lq, lp = disc(z_q), disc(torch.stack(cols, dim=1))
        d_loss = 0.5 * (F.cross_entropy(lq, torch.zeros(B, dtype=torch.long))
                        + F.cross_entropy(lp, torch.ones(B, dtype=torch.long)))
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()

    metrics = _step(cfg, state, batch, batch2, inputs)
    assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(metrics["d_loss"]) == pytest.approx(float(d_loss.detach()), rel=1e-5)
    for mine, ref in ((state.models.vae, vae), (state.models.disc, disc)):
        for a, b in zip(mine.parameters(), ref.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_beta_vae_step_has_no_discriminator():
    cfg, state, batch, batch2, inputs = _setup(model="betavae", beta=4.0)
    assert state.models.disc is None and state.optims.disc is None
    metrics = _step(cfg, state, batch, batch2, inputs)
    assert set(metrics) == {"loss", "recon", "kl"}
    assert float(metrics["loss"]) == pytest.approx(float(metrics["recon"] + 4.0 * metrics["kl"]), rel=1e-6)
