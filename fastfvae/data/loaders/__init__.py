"""Batch loaders for training: ``device`` (resident on the device), ``dali``, ``torch``.

All give the same interface (see `fastfvae.data.loaders.base`) and, in the default
``epoch`` order, the same batches for the same seed: the `EpochSampler` order.
"""

from __future__ import annotations

from fastfvae.data.loaders.base import BatchLoader, EpochOrder
from fastfvae.data.loaders.device import DeviceLoader
from fastfvae.data.loaders.torch_loader import TorchLoader
from fastfvae.data.loaders.unpack import (
    gather_batch, gather_uint8, gather_unpack, uint8_to_float, uniform_rows, unpack_bits,
)
from fastfvae.errors import FastFVAEError

LOADER_KINDS = ("device", "dali", "torch")

__all__ = ["LOADER_KINDS", "BatchLoader", "DeviceLoader", "TorchLoader", "EpochOrder",
           "make_loader", "gather_batch", "gather_uint8", "gather_unpack", "uint8_to_float",
           "uniform_rows", "unpack_bits"]


def make_loader(kind: str, data, batch_size: int, seed: int = 0, device="cpu", **options) -> BatchLoader:
    """Build a loader by name. Options: device: ``order``; dali: ``num_threads``,
    ``prefetch_queue_depth``; torch: ``num_workers``, ``prefetch_factor``, ``multiprocessing_context``."""
    if kind == "device":
        return DeviceLoader(data, batch_size, seed, device, **options)
    if kind == "torch":
        return TorchLoader(data, batch_size, seed, device, **options)
    if kind == "dali":
        from fastfvae.data.loaders.dali import DaliLoader

        return DaliLoader(data, batch_size, seed, device, **options)
    raise FastFVAEError(f"unknown loader {kind!r}; expected one of {', '.join(LOADER_KINDS)}")
