"""The dataset registry: every command and loop reaches its data by name through `load_dataset`.

Built in (disentanglement_lib's names, Locatello et al. 2019):

* ``dsprites`` — dSprites with its 5 latent factors (dlib's ``dsprites_full``);
* ``color_dsprites``, ``noisy_dsprites`` — dSprites whose observations are coloured or set on
  noise (`fastfvae.data.variants`);
* ``shapes3d`` — 3dshapes (Burgess & Kim 2018; `fastfvae.data.shapes3d`).

``path`` is the dataset's file: for the dSprites family a dSprites NPZ/HDF5, or None for
`load_dsprites`' default (the cached real file, else the procedural set); for ``shapes3d``
the ``3dshapes.h5`` file, or None for the one ``fastfvae data download --dataset shapes3d``
put in the cache directory. A factory takes ``(path, **options)`` and returns a
`GroundTruthData`; options (``require_full``, and for shapes3d ``in_memory``) are passed on.
"""

from __future__ import annotations

from typing import Callable

from fastfvae.data.base import GroundTruthData
from fastfvae.errors import FastFVAEError

#: Registered dataset names, in registration order (the built-ins first).
DATASETS: list[str] = []
_FACTORIES: dict[str, Callable[..., GroundTruthData]] = {}
_CHANNELS: dict[str, int | None] = {}


def register_dataset(name: str, factory: Callable[..., GroundTruthData], channels: int | None = None) -> None:
    """Make ``name`` loadable: ``factory(path, **options) -> GroundTruthData``.

    ``channels`` (1 or 3) lets `dataset_channels` answer without loading the data; without
    it, `dataset_channels` loads the dataset's default to find out.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise FastFVAEError(f"a dataset name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in _FACTORIES:
        raise FastFVAEError(f"dataset {name!r} is already registered")
    if channels is not None and channels not in (1, 3):
        raise FastFVAEError(f"dataset {name!r}: channels must be 1 or 3, got {channels}")
    _FACTORIES[name] = factory
    _CHANNELS[name] = channels
    DATASETS.append(name)


def _check_name(name: str) -> None:
    if name not in _FACTORIES:
        raise FastFVAEError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def load_dataset(name: str, path: str | None = None, **options) -> GroundTruthData:
    """The dataset ``name`` read from ``path`` (None: that dataset's default; see the module)."""
    _check_name(name)
    data = _FACTORIES[name](path, **options)
    if not isinstance(data, GroundTruthData):
        raise FastFVAEError(f"dataset {name!r}: its factory returned {type(data).__name__}, "
                            "expected a GroundTruthData")
    return data


def dataset_channels(name: str) -> int:
    """Channels of ``name``'s observations (the model's input and output channels)."""
    _check_name(name)
    channels = _CHANNELS[name]
    return load_dataset(name).channels if channels is None else channels


# --- the built-ins ---------------------------------------------------------------------------------
def _dsprites(path=None, **options):
    from fastfvae.data.load import load_dsprites

    return load_dsprites(path, **options)


def _color_dsprites(path=None, **options):
    from fastfvae.data.variants import ColorDSprites

    return ColorDSprites(_dsprites(path, **options))


def _noisy_dsprites(path=None, **options):
    from fastfvae.data.variants import NoisyDSprites

    return NoisyDSprites(_dsprites(path, **options))


def _shapes3d(path=None, **options):
    from fastfvae.data.shapes3d import load_shapes3d

    return load_shapes3d(path, **options)


register_dataset("dsprites", _dsprites, channels=1)
register_dataset("color_dsprites", _color_dsprites, channels=3)
register_dataset("noisy_dsprites", _noisy_dsprites, channels=3)
register_dataset("shapes3d", _shapes3d, channels=3)
