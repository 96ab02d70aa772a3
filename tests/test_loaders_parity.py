"""The three loaders give the EpochSampler's batches: across epochs, reshuffled, and on resume."""

import numpy as np
import pytest
import torch

from fastfvae.data import DSprites, EpochSampler
from fastfvae.data.dsprites import classes_of
from fastfvae.data.loaders import LOADER_KINDS, make_loader
from fastfvae.errors import FastFVAEError

from extras import with_extras

N, B, SEED = 300, 64, 7  # 4 batches an epoch, 44 rows dropped each epoch
STEPS = 10  # two epoch boundaries


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(0).integers(0, 2, (N, 64, 64), dtype=np.uint8)
    return DSprites.from_images(images, classes_of(np.arange(N)))


@pytest.fixture(scope="module")
def reference():
    sampler = EpochSampler(N, B, SEED)
    return [sampler.next_rows() for _ in range(STEPS)]



def extra_of(kind):
    return "dali" if kind == "dali" else None


KINDS = with_extras(LOADER_KINDS, extra_of)
LOADERS = [pytest.param(kind, options, id=name, marks=[pytest.mark.requires_extra("dali")] if kind == "dali" else [])
           for kind, options, name in [("device", {}, "device"), ("dali", {}, "dali"), ("torch", {}, "torch"),
                                       ("torch", {"num_workers": 2}, "torch-2workers")]]


@pytest.mark.parametrize("kind, options", LOADERS)
def test_same_batches_as_epoch_sampler(data, reference, kind, options):
    with make_loader(kind, data, B, SEED, "cpu", **options) as loader:
        for step, rows in enumerate(reference):
            images, got_rows = loader.next_batch_with_rows()
            assert np.array_equal(np.asarray(got_rows), rows), f"step {step}"
            assert images.dtype == torch.float32 and images.shape == (B, 1, 64, 64)
            # Pixels: the numpy unpacking of the same rows of the dataset.
            expected = data.images_at(rows)[:, None].astype(np.float32)
            assert np.array_equal(images.numpy(), expected), f"step {step}"
        assert loader.state_dict()["sampler"]["epoch"] == 2


def test_each_epoch_is_a_fresh_shuffle_without_repeats(reference):
    per_epoch = N // B
    epochs = [np.concatenate(reference[e * per_epoch:(e + 1) * per_epoch]) for e in range(2)]
    for rows in epochs:
        assert len(np.unique(rows)) == per_epoch * B  # no row twice within an epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
    assert not np.array_equal(np.sort(epochs[0]), np.arange(per_epoch * B))  # not the identity


@pytest.mark.parametrize("resume_kind", KINDS)
@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch_on_any_kind(data, reference, kind, resume_kind):
    first = make_loader(kind, data, B, SEED)
    for _ in range(6):  # into epoch 1, batch 2
        first.next_batch()
    state = first.state_dict()
    # The consumed position, not what a pipeline prefetched.
    assert (state["sampler"]["epoch"], state["sampler"]["batch_index"]) == (1, 2)
    second = make_loader(resume_kind, data, B, SEED + 1)  # the state carries the seed
    second.load_state_dict(state)
    for step in range(6, STEPS):
        _, rows = second.next_batch_with_rows()
        assert np.array_equal(np.asarray(rows), reference[step]), f"step {step}"
    first.close()
    second.close()


@pytest.mark.requires_extra("dali")
def test_resume_from_a_bare_epoch_sampler_state(data, reference):
    sampler = EpochSampler(N, B, SEED)
    for _ in range(3):
        sampler.next_rows()
    loader = make_loader("dali", data, B, 0)
    loader.load_state_dict(sampler.state_dict())  # as the reference loop checkpoints it
    assert np.array_equal(np.asarray(loader.next_batch_with_rows()[1]), reference[3])


@pytest.mark.parametrize("kind", KINDS)
def test_rewind_a_running_loader(data, reference, kind):
    loader = make_loader(kind, data, B, SEED)
    loader.next_batch()
    state = loader.state_dict()
    for _ in range(5):  # run ahead (pipelines prefetch further still)
        loader.next_batch()
    loader.load_state_dict(state)
    assert np.array_equal(np.asarray(loader.next_batch_with_rows()[1]), reference[1])
    loader.close()


def test_iterator_protocol(data, reference):
    loader = make_loader("device", data, B, SEED)
    batches = [x for _, x in zip(range(3), loader)]
    assert len(batches) == 3
    assert torch.equal(batches[2], data.float_batch(reference[2]))


def test_bad_arguments(data):
    with pytest.raises(FastFVAEError, match="unknown loader"):
        make_loader("jpeg", data, B)
    with pytest.raises(FastFVAEError, match="batch size"):
        make_loader("torch", data, N + 1)
    with pytest.raises(FastFVAEError, match="order"):
        make_loader("device", data, B, order="sorted")
    random_state = make_loader("device", data, B, order="random").state_dict()
    with pytest.raises(FastFVAEError, match="random"):
        make_loader("torch", data, B).load_state_dict(random_state)


@pytest.mark.requires_extra("dali")
def test_state_of_another_batch_size_is_refused(data):
    with pytest.raises(FastFVAEError, match="rows"):
        make_loader("dali", data, B).load_state_dict(make_loader("device", data, 32).state_dict())
