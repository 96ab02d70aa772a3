"""`device` loader: the whole set resident on the training device, as the dataset stores it.

``packed`` is the dataset's stored array moved to the device once: bit-packed uint8
[N, 512] (0.38 GB for dSprites), or uint8 [N, 64, 64, C] (5.9 GB for 3dshapes; uploaded
block by block, so a file read on demand never sits whole in host memory; on the CPU the
dataset's own array, memory-mapped or in memory, is shared, not copied). A batch is
``gather_batch(packed, rows)`` (`gather_unpack` or `gather_uint8`) — pure torch ops that
``torch.compile`` can put inside the compiled step (no host sync, static shapes). Rows come from

- ``order="epoch"`` (default, parity with the other loaders): the EpochSampler order; each
  epoch's permutation is computed on the host once and uploaded (int64 [N]), and a batch's
  rows are a slice of it (a view: no copy, no sync);
- ``order="random"``: i.i.d. uniform rows from ``torch.randint`` on a device
  ``torch.Generator`` seeded with ``seed`` (with replacement, no epochs; the state is the
  generator state). A compiled step that draws rows itself calls ``uniform_rows`` without a
  generator (see `fastfvae.data.loaders.unpack`).

A compiled step uses ``loader.packed``, ``loader.next_rows()`` (outside the graph) and
``gather_batch`` (inside; or `gather_unpack` / `gather_uint8` by ``loader.storage``), or just
``loader.next_batch()``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fastfvae.data.loaders.base import BatchLoader
from fastfvae.data.loaders.unpack import gather_batch, uniform_rows
from fastfvae.errors import FastFVAEError

ORDERS = ("epoch", "random")
#: Rows per host-to-device copy when a uint8 set is uploaded (about 100 MB of 3dshapes).
UPLOAD_ROWS = 8192


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for a read-only array (a cached render or a
    memory-mapped file): the loader only ever reads the packed rows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def storage_of(data) -> str:
    """The dataset's ``storage`` ("bits" for a dataset that predates the attribute)."""
    storage = getattr(data, "storage", "bits")
    if storage not in ("bits", "uint8"):
        raise FastFVAEError(f"unknown dataset storage {storage!r}; expected bits or uint8")
    return storage


def resident_images(data, device: torch.device) -> torch.Tensor:
    """The dataset's stored images on ``device``: shared with numpy on the CPU (no copy); one
    upload of the packed bits, or a block-by-block upload of a uint8 set, elsewhere."""
    if device.type == "cpu" or storage_of(data) == "bits":
        return _shared_tensor(np.asarray(data.packed)).to(device)
    return upload_blocks(data, device)


def upload_blocks(data, device: torch.device) -> torch.Tensor:
    """A copy of the dataset's stored array on ``device``, made `UPLOAD_ROWS` rows at a time
    from ``data.stored_block``, so the host holds one block, not the set."""
    num = len(data)
    first = data.stored_block(0, min(num, UPLOAD_ROWS))
    out = torch.empty((num, *first.shape[1:]), dtype=torch.uint8, device=device)
    out[:len(first)].copy_(torch.from_numpy(np.ascontiguousarray(first)))
    for start in range(len(first), num, UPLOAD_ROWS):
        stop = min(num, start + UPLOAD_ROWS)
        out[start:stop].copy_(torch.from_numpy(np.ascontiguousarray(data.stored_block(start, stop))))
    return out


class DeviceLoader(BatchLoader):
    kind = "device"

    def __init__(self, data, batch_size: int, seed: int = 0, device="cpu", order: str = "epoch"):
        if order not in ORDERS:
            raise FastFVAEError(f"unknown device-loader order {order!r}; expected one of {', '.join(ORDERS)}")
        super().__init__(data, batch_size, seed, device)
        self.order = order
        self.storage = storage_of(data)
        # On the CPU this shares the numpy buffer (no copy); on a GPU it is an upload.
        self.packed = resident_images(data, self.device)
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
        return gather_batch(self.packed, rows), rows

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
