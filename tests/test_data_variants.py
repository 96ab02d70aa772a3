"""Colour and noisy dSprites: disentanglement_lib's observations draw for draw, the torch
rendering of the step, graph-safety, and everything stored shared with the wrapped dSprites."""

import numpy as np
import pytest
import torch

from fastfvae.data import ColorDSprites, DSprites, GroundTruthData, NoisyDSprites
from fastfvae.data.dsprites import FACTOR_SIZES, NUM_IMAGES, classes_of, values_of
from fastfvae.data.loaders import make_loader
from fastfvae.errors import FastFVAEError

VARIANTS = [ColorDSprites, NoisyDSprites]


@pytest.fixture(scope="module")
def full():
    """A full-size dSprites (737,280 rows) whose images are zero except random sprites at the
    rows the tests draw: zero pages cost no memory, so it is cheap to build."""
    packed = np.zeros((NUM_IMAGES, 512), dtype=np.uint8)
    classes = classes_of(np.arange(NUM_IMAGES))
    rows = np.random.default_rng(0).choice(NUM_IMAGES, size=4000, replace=False)
    packed[rows] = np.random.default_rng(1).integers(0, 256, (len(rows), 512), dtype=np.uint8)
    data = DSprites(packed, classes, np.zeros((NUM_IMAGES, 6)), source="sparse test set")
    # Every row dlib_sample_observations draws for the seeds below must hold a sprite.
    data.test_rows = np.sort(rows)
    return data


@pytest.fixture(scope="module")
def small():
    n = 40
    images = np.random.default_rng(2).integers(0, 2, (n, 64, 64), dtype=np.uint8)
    return DSprites.from_images(images, classes_of(np.arange(n)))


# --- disentanglement_lib's definitions, transcribed (data/ground_truth/dsprites.py, util.py) ------
def dlib_all_factors(latent, random_state):
    """SplitDiscreteStateSpace.sample_all_factors for dsprites_full (latent indices 1..5)."""
    all_factors = np.zeros((latent.shape[0], 6), dtype=np.int64)
    all_factors[:, [1, 2, 3, 4, 5]] = latent
    all_factors[:, 0] = random_state.randint(FACTOR_SIZES[0], size=latent.shape[0])
    return all_factors


def dlib_no_color(images, latent, random_state):
    bases = np.prod(FACTOR_SIZES) / np.cumprod(FACTOR_SIZES)
    indices = np.array(np.dot(dlib_all_factors(latent, random_state), bases), dtype=np.int64)
    return np.expand_dims(images(indices).astype(np.float32), axis=3)


def dlib_color(images, latent, random_state):
    observations = np.repeat(dlib_no_color(images, latent, random_state), 3, axis=3)
    color = np.repeat(np.repeat(random_state.uniform(0.5, 1, [observations.shape[0], 1, 1, 3]),
                                observations.shape[1], axis=1), observations.shape[2], axis=2)
    return observations * color


def dlib_noisy(images, latent, random_state):
    observations = np.repeat(dlib_no_color(images, latent, random_state), 3, axis=3)
    color = random_state.uniform(0, 1, [observations.shape[0], 64, 64, 3])
    return np.minimum(observations + color, 1.)


DLIB = {ColorDSprites: dlib_color, NoisyDSprites: dlib_noisy}


def latent_of_rows(rows):
    return classes_of(rows)[:, 1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_observations_match_disentanglement_lib_draw_for_draw(full, variant):
    data = variant(full)
    factors = latent_of_rows(full.test_rows[:64])
    ours_state, dlib_state = np.random.RandomState(7), np.random.RandomState(7)
    ours = data.sample_observations_from_factors(factors, ours_state)
    expected = DLIB[variant](full.images_at, factors, dlib_state)
    assert ours.dtype == np.float32 and ours.shape == (64, 64, 64, 3)
    assert np.array_equal(ours, expected.astype(np.float32))
    # Same calls, same order: both random states are left in the same place.
    assert ours_state.randint(1 << 30) == dlib_state.randint(1 << 30)
    # Sprites are there, and not all the same value (the comparison above is not vacuous).
    assert ours.max() > 0.5 and ours.std() > 0.1


def test_the_two_variants_draw_what_dlib_draws(full):
    factors = latent_of_rows(full.test_rows[:16])
    colour = ColorDSprites(full).sample_observations_from_factors(factors, np.random.RandomState(3))
    sprite = full.images_at(full.test_rows[:16]).astype(bool)
    on = colour[sprite]  # [pixels, 3]: one colour per observation, each channel in [0.5, 1)
    assert on.min() >= 0.5 and on.max() < 1.0
    assert (colour[~sprite] == 0).all()
    noisy = NoisyDSprites(full).sample_observations_from_factors(factors, np.random.RandomState(3))
    assert (noisy[sprite] == 1).all()
    background = noisy[~sprite]
    assert 0.45 < background.mean() < 0.55 and background.min() >= 0 and background.max() < 1


def test_factors_rows_and_sampling_are_the_base_datasets(full):
    data = ColorDSprites(full)
    assert isinstance(data, GroundTruthData)
    assert data.factor_names == ("shape", "scale", "orientation", "posX", "posY")
    assert data.factor_sizes == (3, 6, 40, 32, 32) and data.latent_grid == full.latent_grid
    assert len(data) == NUM_IMAGES and data.is_full
    a, b = np.random.RandomState(5), np.random.RandomState(5)
    factors = data.sample_factors(100, a)
    assert np.array_equal(factors, full.sample_factors(100, b))
    assert np.array_equal(data.rows_from_factors(factors), full.rows_from_factors(factors))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stored_side_is_the_base_one_channel_bits(small, variant):
    data = variant(small)
    assert (data.storage, data.base_channels, data.channels) == ("bits", 1, 3)
    assert data.packed is small.packed and data.source == small.source
    rows = np.array([3, 0, 39, 3])
    assert np.array_equal(data.images_at(rows), small.images_at(rows))
    base = data.float_batch(rows)
    assert base.shape == (4, 1, 64, 64) and torch.equal(base, small.float_batch(rows))
    assert data.observation_shape == (64, 64, 3)
    with make_loader("device", data, 8, seed=1) as loader, make_loader("torch", data, 8, seed=1) as reference:
        images, got = loader.next_batch_with_rows()
        assert images.shape == (8, 1, 64, 64)
        assert torch.equal(images, small.float_batch(got.numpy()))
        assert torch.equal(reference.next_batch(), images)


# --- render: the step's torch path ---------------------------------------------------------
def dlib_layout_uniforms(variant, n, seed):
    """(uniforms U[0,1) in dlib's draw layout, the same in observation_noise_shape layout)."""
    if variant is ColorDSprites:
        u = np.random.RandomState(seed).random_sample((n, 1, 1, 3))
        return u, u[:, 0, 0, :]
    u = np.random.RandomState(seed).random_sample((n, 64, 64, 3))
    return u, u.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_maps_uniforms_to_dlibs_distributions_exactly(small, variant):
    data = variant(small)
    rows = np.arange(12)
    dlib_u, noise = dlib_layout_uniforms(variant, len(rows), seed=11)
    assert noise.shape == data.observation_noise_shape(len(rows))
    # numpy's uniform(low, high) is low + (high - low) * random_sample: render in float64
    # from the same uniforms gives disentanglement_lib's float64 observations bit for bit.
    base = data.float_batch(rows).double()
    rendered = data.render(base, torch.from_numpy(np.ascontiguousarray(noise)))
    assert rendered.dtype == torch.float64 and rendered.shape == (12, 3, 64, 64)
    observations = np.repeat(small.images_at(rows).astype(np.float32)[..., None], 3, axis=3)
    if variant is ColorDSprites:
        expected = observations * (0.5 + 0.5 * dlib_u)
    else:
        expected = np.minimum(observations + dlib_u, 1.0)
    assert np.array_equal(rendered.permute(0, 2, 3, 1).numpy(), expected)
    # fp32, as the step runs it: the same up to rounding.
    rendered32 = data.render(data.float_batch(rows), torch.from_numpy(np.ascontiguousarray(noise)).float())
    assert rendered32.dtype == torch.float32
    torch.testing.assert_close(rendered32.double(), rendered, rtol=0, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_in_bf16_keeps_bf16(small, variant):
    data = variant(small)
    base = data.float_batch(np.arange(8))
    noise = torch.rand(data.observation_noise_shape(8), generator=torch.Generator().manual_seed(0))
    out = data.render(base.bfloat16(), noise)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 3, 64, 64)
    torch.testing.assert_close(out.float(), data.render(base, noise), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_is_one_graph_without_host_sync(small, variant):
    data = variant(small)
    base = data.float_batch(np.arange(8))
    noise = torch.rand(data.observation_noise_shape(8), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(data.render, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(base, noise), data.render(base, noise))
    # With the uniforms drawn inside the graph, as a compiled step draws them.
    drawn = torch.compile(lambda x: data.render(x, torch.rand(data.observation_noise_shape(x.shape[0]))),
                          fullgraph=True, backend="aot_eager")(base)
    assert drawn.shape == (8, 3, 64, 64) and 0.0 <= drawn.min() and drawn.max() <= 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_refuses_wrong_shapes(small, variant):
    data = variant(small)
    base = data.float_batch(np.arange(4))
    with pytest.raises(FastFVAEError, match=r"needs uniforms of shape \[4, 3"):
        data.render(base, torch.rand(4, 1))
    with pytest.raises(FastFVAEError, match="needs uniforms"):
        data.render(base, None)
    with pytest.raises(FastFVAEError, match=r"renders base images \[B, 1, 64, 64\]"):
        data.render(base.expand(4, 3, 64, 64), torch.rand(data.observation_noise_shape(4)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_observations_of_rows_are_the_sample_of_their_factors(full, variant):
    data = variant(full)
    rows = full.test_rows[100:110]
    nchw = data.observations(rows, np.random.RandomState(4))
    nhwc = data.sample_observations_from_factors(latent_of_rows(rows), np.random.RandomState(4))
    assert nchw.dtype == torch.float32 and nchw.shape == (10, 3, 64, 64)
    assert np.array_equal(nchw.permute(0, 2, 3, 1).numpy(), nhwc)
    with pytest.raises(FastFVAEError, match="pass a numpy RandomState"):
        data.observations(rows)


def test_plain_dsprites_observations_are_its_images(full):
    factors = latent_of_rows(full.test_rows[:8])
    state = np.random.RandomState(0)
    observed = full.sample_observations_from_factors(factors, state)
    assert observed.shape == (8, 64, 64, 1) and observed.dtype == np.float32
    assert np.array_equal(observed[..., 0], full.images_at(full.test_rows[:8]))
    assert state.randint(1 << 30) == np.random.RandomState(0).randint(1 << 30)  # nothing drawn
    assert full.observation_noise_shape(8) is None
    x = full.float_batch(full.test_rows[:8])
    assert full.render(x, None) is x


def test_a_variant_wraps_only_a_dsprites():
    with pytest.raises(FastFVAEError, match="wraps a DSprites"):
        ColorDSprites(np.zeros((3, 512), np.uint8))


def test_values_table_is_unchanged_by_wrapping(small):
    data = NoisyDSprites(small)
    assert np.array_equal(data.latents_classes, small.latents_classes)
    assert np.array_equal(data.latents_values, values_of(small.latents_classes))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_render_under_inductor(small, variant):
    data = variant(small)
    base = data.float_batch(np.arange(16))
    noise = torch.rand(data.observation_noise_shape(16), generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(data.render, fullgraph=True)
    torch.testing.assert_close(compiled(base, noise), data.render(base, noise), rtol=0, atol=1e-7)
