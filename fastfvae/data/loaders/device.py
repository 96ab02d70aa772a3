"""`device` loader: the whole set resident on the training device, bit-packed.

``packed`` is the dataset's uint8 [N, 512] (0.38 GB for dSprites) moved to the device once;
a batch is ``gather_unpack(packed, rows)`` — pure torch ops that ``torch.compile`` can put
inside the compiled step (no host sync, static shapes). Rows come from

- ``order="epoch"`` (default, parity with the other loaders): the EpochSampler order; each
  epoch's permutation is computed on the host once and uploaded (int64 [N]), and a batch's
  rows are a slice of it (a view: no copy, no sync);
- ``order="random"``: i.i.d. uniform rows from ``torch.randint`` on a device
  ``torch.Generator`` seeded with ``seed`` (with replacement, no epochs; the state is the
  generator state). A compiled step that draws rows itself calls ``uniform_rows`` without a
  generator (see `fastfvae.data.loaders.unpack`).

A compiled step uses ``loader.packed``, ``loader.next_rows()`` (outside the graph) and
``gather_unpack`` (inside), or just ``loader.next_batch()``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fastfvae.data.loaders.base import BatchLoader
from fastfvae.data.loaders.unpack import gather_unpack, uniform_rows
from fastfvae.errors import FastFVAEError

ORDERS = ("epoch", "random")


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for a read-only array (a cached render or a
    memory-mapped file): the loader only ever reads the packed rows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class DeviceLoader(BatchLoader):
    kind = "device"

    def __init__(self, data, batch_size: int, seed: int = 0, device="cpu", order: str = "epoch"):
        if order not in ORDERS:
            raise FastFVAEError(f"unknown device-loader order {order!r}; expected one of {', '.join(ORDERS)}")
        super().__init__(data, batch_size, seed, device)
        self.order = order
        # On the CPU this shares the numpy buffer (no copy); on a GPU it is one upload.
        self.packed = _shared_tensor(data.packed).to(self.device)
        self._perm_epoch, self._perm = -1, None
        self.generator = None
        if order == "random":
            self.generator = torch.Generator(self.device).manual_seed(seed)

    def next_rows(self) -> torch.Tensor:
        """int64 [B] rows of the next batch, on the device; advances the position."""
        if self.order == "random":
            rows = uniform_rows(self.num_rows, self.batch_size, self.device, self.generator)
        else:
            g = self.global_batch
            epoch, batch = divmod(g, self.batches_per_epoch)
            if epoch != self._perm_epoch:
                perm = torch.from_numpy(self.epoch_order.epoch_perm(epoch))
                self._perm, self._perm_epoch = perm.to(self.device), epoch
            rows = self._perm[batch * self.batch_size:(batch + 1) * self.batch_size]
        self._position.advance()
        return rows

    def next_batch_with_rows(self):
        rows = self.next_rows()
        return gather_unpack(self.packed, rows), rows

    def _restart(self) -> None:
        self._perm_epoch, self._perm = -1, None  # the seed may have changed

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.generator is not None:
            if "generator" not in state:
                raise FastFVAEError("random-order loader state has no generator state")
            self.generator.set_state(state["generator"])
