"""`torch` loader: a plain ``torch.utils.data.DataLoader``, the baseline.

The batch sampler is an `EpochSampler` (infinite; epochs roll over), the dataset fetches a
whole batch at once (``__getitems__``) as the dataset's ``float_batch`` of its rows (numpy
unpacking of bits, or uint8 images / 255, on the host), ``num_workers`` worker processes
(default 0 on the CPU, up to 4 for a GPU), ``pin_memory`` when the target is CUDA. Workers run ahead (``prefetch_factor``
batches each), so the loader tracks the consumed position itself and restarts the
DataLoader iterator on ``load_state_dict``. Workers are forked (Linux default) and touch only
numpy (and a file read on demand, which each process opens for itself), never CUDA, so forking
after CUDA is initialised is safe; ``multiprocessing_context="spawn"`` is available where
fork is not.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from fastfvae.data.loaders.base import BatchLoader
from fastfvae.data.sampling import EpochSampler
from fastfvae.errors import FastFVAEError


class _Rows(Dataset):
    """Map-style view of a dataset whose batches are fetched whole."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, row: int):
        return self.__getitems__([row])

    def __getitems__(self, rows):
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return self.data.float_batch(rows.numpy()), rows


def _as_is(batch):
    return batch


class TorchLoader(BatchLoader):
    kind = "torch"

    def __init__(self, data, batch_size: int, seed: int = 0, device="cpu", num_workers: int | None = None,
                 prefetch_factor: int = 2, multiprocessing_context=None):
        super().__init__(data, batch_size, seed, device)
        if num_workers is None:  # the CPU trains on every core; a GPU run can spare some
            num_workers = 0 if self.device.type == "cpu" else min(4, os.cpu_count() or 1)
        if num_workers < 0:
            raise FastFVAEError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._iter = None

    def _make_iter(self):
        sampler = EpochSampler(self.num_rows, self.batch_size, self.seed)
        sampler.load_state_dict(self._position.state_dict())
        workers = self.num_workers > 0
        loader = DataLoader(
            _Rows(self.data), batch_sampler=sampler, collate_fn=_as_is, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch_factor if workers else None,
            multiprocessing_context=self.multiprocessing_context if workers else None,
        )
        return iter(loader)

    def _produce(self):
        if self._iter is None:
            self._iter = self._make_iter()
        images, rows = next(self._iter)
        return images.to(self.device, non_blocking=True), rows

    def close(self) -> None:
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # worker iterators only
        if shutdown is not None:
            shutdown()
