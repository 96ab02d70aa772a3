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
        self._order: np.ndarray | None = None
        self._order_key: tuple[int, int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def _epoch_order(self) -> np.ndarray:
        if self._order_key != (self.seed, self.epoch):  # the seed may change with load_state_dict
            self._order = epoch_permutation(self.num_rows, self.seed, self.epoch)
            self._order_key = (self.seed, self.epoch)
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
        return self._epoch_order()[start:start + self.batch_size]

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
