"""Shapes and structure of the VAE and the discriminator (the contracts other parts rely on)."""

import pytest
import torch

from fastfvae.models import VAE, Decoder, Discriminator, Encoder


@pytest.mark.parametrize("z_dim,fc_dim", [(10, 128), (3, 256)])
def test_vae_shapes(z_dim, fc_dim):
    torch.manual_seed(0)
    vae = VAE(z_dim, fc_dim)
    x = torch.rand(5, 1, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, z_dim)
    assert vae.decode(mu).shape == (5, 1, 64, 64)
    assert vae(x).shape == (5, 1, 64, 64)
    assert isinstance(vae.encoder, Encoder) and isinstance(vae.decoder, Decoder)


def test_encoder_architecture():
    """4 convs 4x4 stride 2 with 32, 32, 64, 64 channels, FC 128, head 2*z."""
    enc = Encoder(10)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 128), (128, 20)]


def test_decoder_mirrors_encoder():
    dec = Decoder(10)
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 128), (128, 1024)]
    deconvs = [m for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [64, 32, 32, 1]
    assert all(d.kernel_size == (4, 4) and d.stride == (2, 2) for d in deconvs)


def test_discriminator_structure_and_keys():
    d = Discriminator(10)
    keys = list(d.state_dict())
    assert keys == [f"net.{i}.{p}" for i in range(0, 13, 2) for p in ("weight", "bias")]
    linears = [m for m in d.net if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 1000)] + [(1000, 1000)] * 5 + [(1000, 2)]
    acts = [m for m in d.net if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 6 and all(a.negative_slope == 0.2 for a in acts)
    assert d(torch.randn(7, 10)).shape == (7, 2)


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        VAE(0)
    with pytest.raises(ValueError):
        Discriminator(10, num_layers=0)
