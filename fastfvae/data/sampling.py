"""Epoch-shuffled batch sampling shared by every loader and the reference loop.

The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(n)``; batch ``i``
of that epoch is the slice ``[i * B, (i + 1) * B)`` (the last partial batch is dropped, so
every batch has the same static shape). The whole state is ``(epoch, batch_index)``, so a
resumed run continues with exactly the batches an uninterrupted run would have seen, and
every loader (torch, DALI, device) can reproduce the same sequence from the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastfvae.errors import FastFVAEError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch (int64 [n])."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class EpochOrder:
    """Rows of global batch ``g`` (counted from epoch 0, batch 0) in the EpochSampler order.

    Caches the current epoch's permutation, so walking forwards costs one permutation per epoch.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.batches_per_epoch = num_rows // batch_size
        self._epoch, self._perm = -1, None

    def epoch_perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm, self._epoch = epoch_permutation(self.num_rows, self.seed, epoch), epoch
        return self._perm

    def rows(self, g: int) -> np.ndarray:
        epoch, batch = divmod(g, self.batches_per_epoch)
        start = batch * self.batch_size
        return self.epoch_perm(epoch)[start:start + self.batch_size]


@dataclass
class EpochSampler:
    """Yields int64 row-index batches of ``batch_size``, reshuffled every epoch."""

    num_rows: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    batch_index: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.batch_size > self.num_rows:
            raise FastFVAEError(
                f"batch size must be between 1 and the dataset size {self.num_rows}, got {self.batch_size}"
            )
        self._order: EpochOrder | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    @property
    def order(self) -> EpochOrder:
        """The `EpochOrder` of the current seed (rebuilt when `load_state_dict` changes the seed)."""
        if self._order is None or self._order.seed != self.seed:
            self._order = EpochOrder(self.num_rows, self.batch_size, self.seed)
        return self._order

    def advance(self) -> None:
        """Move one batch on, to a fresh epoch after the last full batch (`next_rows` without the rows)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        self.batch_index += 1

    def next_rows(self) -> np.ndarray:
        """The next batch of row indices; moves to a fresh shuffle at the end of an epoch."""
        self.advance()
        start = (self.batch_index - 1) * self.batch_size
        return self.order.epoch_perm(self.epoch)[start:start + self.batch_size]

    def __iter__(self):
        while True:
            yield self.next_rows()

    def state_dict(self) -> dict:
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["batch_size"] != self.batch_size:
            raise FastFVAEError(
                f"sampler state is for {state['num_rows']} rows / batch {state['batch_size']}, "
                f"expected {self.num_rows} rows / batch {self.batch_size}"
            )
        self.seed, self.epoch, self.batch_index = state["seed"], state["epoch"], state["batch_index"]
