"""EpochSampler: every loader and the reference loop depend on its exact batch sequence."""

import numpy as np
import pytest

from fastfvae.data.grid import FactorGrid
from fastfvae.data.sampling import EpochSampler, epoch_permutation
from fastfvae.errors import FastFVAEError


def test_each_epoch_is_a_permutation_and_reshuffled():
    sampler = EpochSampler(num_rows=100, batch_size=10, seed=3)
    first = np.concatenate([sampler.next_rows() for _ in range(10)])
    second = np.concatenate([sampler.next_rows() for _ in range(10)])
    assert sorted(first.tolist()) == list(range(100))
    assert sorted(second.tolist()) == list(range(100))
    assert not np.array_equal(first, second)
    assert sampler.epoch == 1


def test_partial_last_batch_is_dropped():
    sampler = EpochSampler(num_rows=25, batch_size=10, seed=0)
    batches = [sampler.next_rows() for _ in range(3)]
    assert [len(b) for b in batches] == [10, 10, 10]
    assert np.array_equal(batches[0], epoch_permutation(25, 0, 0)[:10])
    assert np.array_equal(batches[2], epoch_permutation(25, 0, 1)[:10])


def test_resume_from_state_continues_the_same_sequence():
    straight = EpochSampler(num_rows=50, batch_size=8, seed=7)
    expected = [straight.next_rows() for _ in range(20)]
    first = EpochSampler(num_rows=50, batch_size=8, seed=7)
    got = [first.next_rows() for _ in range(9)]
    resumed = EpochSampler(num_rows=50, batch_size=8, seed=0)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_rows() for _ in range(11)]
    for a, b in zip(expected, got):
        assert np.array_equal(a, b)


def test_loading_another_seeds_state_into_a_used_sampler_drops_its_cached_order():
    other = EpochSampler(num_rows=50, batch_size=8, seed=1)
    sampler = EpochSampler(num_rows=50, batch_size=8, seed=0)
    sampler.next_rows()  # caches the seed-0 order of epoch 0
    sampler.load_state_dict(other.state_dict())
    assert np.array_equal(sampler.next_rows(), other.next_rows())


def test_seed_changes_order():
    assert not np.array_equal(epoch_permutation(1000, 0, 0), epoch_permutation(1000, 1, 0))


def test_bad_batch_size_and_mismatched_state_are_one_line_errors():
    with pytest.raises(FastFVAEError, match="batch size"):
        EpochSampler(num_rows=10, batch_size=11)
    sampler = EpochSampler(num_rows=10, batch_size=2)
    with pytest.raises(FastFVAEError, match="sampler state"):
        sampler.load_state_dict({**sampler.state_dict(), "batch_size": 5})


def test_factor_grid_bases_and_round_trip():
    grid = FactorGrid((3, 6, 10, 8, 8))
    assert grid.bases.tolist() == [3840, 640, 64, 8, 1]
    assert grid.num_rows == 11520
    rows = np.arange(grid.num_rows)
    assert np.array_equal(grid.rows_from_factors(grid.factors_of(rows)), rows)
    with pytest.raises(FastFVAEError, match="out of range"):
        grid.rows_from_factors(np.array([[3, 0, 0, 0, 0]]))
