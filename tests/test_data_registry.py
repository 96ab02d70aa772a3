"""The dataset registry: the built-ins by name, each a GroundTruthData of the right kind, and
one-line errors for unknown names and bad registrations."""

import numpy as np
import pytest

import fastfvae.data.registry as registry
from fastfvae.data import (
    DATASETS, ColorDSprites, DSprites, GroundTruthData, NoisyDSprites, classes_of, dataset_channels, load_dataset,
    register_dataset, save_npz,
)
from fastfvae.errors import FastFVAEError


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (a dataset it registers does not outlive it)."""
    monkeypatch.setattr(registry, "DATASETS", list(registry.DATASETS))
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "_CHANNELS", dict(registry._CHANNELS))
    return registry


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    n = 30
    images = np.random.default_rng(0).integers(0, 2, (n, 64, 64), dtype=np.uint8)
    path = tmp_path_factory.mktemp("registry") / "small.npz"
    save_npz(DSprites.from_images(images, classes_of(np.arange(n))), path)
    return path


def test_the_built_ins_in_order():
    assert DATASETS[:4] == ["dsprites", "color_dsprites", "noisy_dsprites", "shapes3d"]
    assert [dataset_channels(name) for name in DATASETS[:4]] == [1, 3, 3, 3]


@pytest.mark.parametrize("name, kind, channels", [("dsprites", DSprites, 1), ("color_dsprites", ColorDSprites, 3),
                                                  ("noisy_dsprites", NoisyDSprites, 3)])
def test_the_dsprites_family_loads_a_given_file(small_file, name, kind, channels):
    data = load_dataset(name, str(small_file), require_full=False)
    assert type(data) is kind and isinstance(data, GroundTruthData)
    assert data.name == name and data.channels == channels == dataset_channels(name)
    assert (data.storage, data.base_channels, len(data)) == ("bits", 1, 30)
    assert data.source == str(small_file)
    # A file short of the full set is refused where the full set is required (the default).
    with pytest.raises(FastFVAEError, match="holds 30 images, expected 737280"):
        load_dataset(name, str(small_file))


def test_without_a_path_the_dsprites_family_shares_the_default_set(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFVAE_HOME", str(tmp_path))  # no real file cached: the procedural set
    plain, colour = load_dataset("dsprites"), load_dataset("color_dsprites")
    assert plain.source == "procedural" and plain.is_full
    assert colour.base is plain and colour.packed is plain.packed  # one set in memory, not two


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FastFVAEError) as info:
        load_dataset("mnist")
    assert str(info.value) == ("unknown dataset 'mnist'; expected one of "
                               "dsprites, color_dsprites, noisy_dsprites, shapes3d")
    with pytest.raises(FastFVAEError, match="unknown dataset 'mnist'"):
        dataset_channels("mnist")


def test_a_registered_dataset_is_listed_and_loaded(scratch_registry, small_file):
    seen = []

    def factory(path=None, **options):
        seen.append((path, options))
        return ColorDSprites(load_dataset("dsprites", path, **options))

    register_dataset("my_dsprites", factory, channels=3)
    assert "my_dsprites" in scratch_registry.DATASETS and scratch_registry.DATASETS[-1] == "my_dsprites"
    data = scratch_registry.load_dataset("my_dsprites", str(small_file), require_full=False)
    assert len(data) == 30 and seen == [(str(small_file), {"require_full": False})]
    assert scratch_registry.dataset_channels("my_dsprites") == 3
    # Without channels, dataset_channels loads the default to find out.
    register_dataset("lazy_channels", lambda path=None, **o: load_dataset("dsprites", str(small_file),
                                                                           require_full=False))
    assert scratch_registry.dataset_channels("lazy_channels") == 1


def test_bad_registrations_are_refused(scratch_registry):
    with pytest.raises(FastFVAEError, match="'dsprites' is already registered"):
        register_dataset("dsprites", lambda path=None: None)
    with pytest.raises(FastFVAEError, match="non-empty string"):
        register_dataset(" spaced ", lambda path=None: None)
    with pytest.raises(FastFVAEError, match="channels must be 1 or 3, got 2"):
        register_dataset("two", lambda path=None: None, channels=2)
    register_dataset("not_data", lambda path=None: np.zeros(3))
    with pytest.raises(FastFVAEError, match="its factory returned ndarray, expected a GroundTruthData"):
        scratch_registry.load_dataset("not_data")
