"""dSprites layout: row order, index/classes round trips, factor values, dlib-exact sampling."""

import numpy as np
import pytest

from fastfvae.data import (
    BASES, FACTOR_SIZES, NUM_IMAGES, DSprites, classes_of, index_of, possible_values, values_of,
)
from fastfvae.data.dsprites import LATENT_GRID
from fastfvae.errors import FastFVAEError


def metadata_bases(sizes):
    """The real file's metadata rule: ``latents_bases = concat(sizes[::-1].cumprod()[::-1][1:], [1])``."""
    sizes = np.asarray(sizes)
    return np.concatenate((sizes[::-1].cumprod()[::-1][1:], np.array([1])))


def dlib_sample_factors(num, random_state, factor_sizes=FACTOR_SIZES, latent_indices=(1, 2, 3, 4, 5)):
    """disentanglement_lib 1.5 ``SplitDiscreteStateSpace.sample_latent_factors`` (docs/metrics-parity.md §3)."""
    factors = np.zeros((num, len(latent_indices)), dtype=np.int64)
    for pos, i in enumerate(latent_indices):
        factors[:, pos] = random_state.randint(factor_sizes[i], size=num)
    return factors


def test_bases_and_row_order_follow_the_metadata_rule():
    assert NUM_IMAGES == 737280
    assert tuple(metadata_bases(FACTOR_SIZES)) == BASES == (737280, 245760, 40960, 1024, 32, 1)
    rows = np.arange(NUM_IMAGES)
    classes = classes_of(rows)
    # posY fastest, then posX, orientation, scale, shape
    assert classes[:3].tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 2]]
    assert classes[32].tolist() == [0, 0, 0, 0, 1, 0]
    assert classes[1024].tolist() == [0, 0, 0, 1, 0, 0]
    assert classes[40960].tolist() == [0, 0, 1, 0, 0, 0]
    assert classes[245760].tolist() == [0, 1, 0, 0, 0, 0]
    assert classes[-1].tolist() == [0, 2, 5, 39, 31, 31]
    assert np.array_equal(classes @ metadata_bases(FACTOR_SIZES), rows)
    assert np.array_equal(index_of(classes), rows)


def test_index_and_classes_round_trip_on_random_rows():
    rs = np.random.RandomState(1)
    rows = rs.randint(NUM_IMAGES, size=5000)
    assert np.array_equal(index_of(classes_of(rows)), rows)
    classes = np.stack([rs.randint(s, size=100) for s in FACTOR_SIZES], axis=1)
    assert np.array_equal(classes_of(index_of(classes)), classes)
    with pytest.raises(FastFVAEError):
        index_of(classes[:, :5])
    with pytest.raises(FastFVAEError):
        classes_of(np.array([NUM_IMAGES]))


def test_possible_values_match_the_real_metadata():
    v = possible_values()
    assert v["color"].tolist() == [1.0]
    assert v["shape"].tolist() == [1.0, 2.0, 3.0]
    assert np.allclose(v["scale"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert np.array_equal(v["orientation"], np.linspace(0, 2 * np.pi, 40))
    assert np.array_equal(v["posX"], np.linspace(0, 1, 32)) and np.array_equal(v["posY"], v["posX"])
    classes = np.array([[0, 2, 5, 39, 31, 0]])
    assert np.allclose(values_of(classes), [[1.0, 3.0, 1.0, 2 * np.pi, 1.0, 0.0]])


def test_sample_factors_is_draw_for_draw_dlib():
    data = DSprites(np.zeros((1, 512), np.uint8), np.zeros((1, 6), np.int64), np.zeros((1, 6)))
    for n in (1, 7, 64, 1000):
        ours_rs, dlib_rs = np.random.RandomState(n), np.random.RandomState(n)
        ours = data.sample_factors(n, ours_rs)
        ref = dlib_sample_factors(n, dlib_rs)
        dlib_rs.randint(1, size=n)  # dlib's observation step fills colour: draws nothing
        assert ours.dtype == np.int64 and np.array_equal(ours, ref)
        # both generators are left in the same state: the next draws agree too
        assert np.array_equal(ours_rs.randint(1 << 30, size=4), dlib_rs.randint(1 << 30, size=4))
    assert LATENT_GRID.sizes == (3, 6, 40, 32, 32)


def test_rows_from_factors_uses_the_real_order():
    full = DSprites(np.zeros((NUM_IMAGES, 512), np.uint8), classes_of(np.arange(NUM_IMAGES)),
                    np.zeros((NUM_IMAGES, 6)))
    factors = full.sample_factors(300, np.random.RandomState(0))
    rows = full.rows_from_factors(factors)
    assert np.array_equal(full.latents_classes[rows, 1:], factors)
    small = DSprites(np.zeros((3, 512), np.uint8), np.zeros((3, 6), np.int64), np.zeros((3, 6)))
    with pytest.raises(FastFVAEError, match="full dataset"):
        small.rows_from_factors(factors)


def test_container_exposes_the_metadata_helpers():
    """The issue's API lives on the container too: possible_values, index_of, classes_of."""
    from fastfvae.data import DSprites

    classes = np.array([[0, 2, 5, 39, 31, 0], [0, 0, 0, 0, 0, 1]])
    data = DSprites.from_images(np.zeros((2, 64, 64), np.uint8), classes)
    assert data.index_of(classes).tolist() == [2 * 245760 + 5 * 40960 + 39 * 1024 + 31 * 32, 1]
    assert np.array_equal(data.classes_of(data.index_of(classes)), classes)
    assert np.allclose(data.possible_values["scale"], np.linspace(0.5, 1.0, 6))
    assert np.allclose(data.possible_values["orientation"][[0, -1]], [0.0, 2 * np.pi])
