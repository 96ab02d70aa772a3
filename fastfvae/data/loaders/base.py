"""The one interface every loader gives the training loops, and the shared epoch order.

A loader takes any `fastfvae.data.base.GroundTruthData` and yields float32 batches of its
stored images on its target device — [B, 1, 64, 64] in {0., 1.} for bit-packed storage
(dSprites and its variants, whose step renders the observations), [B, C, 64, 64] = images / 255
for uint8 storage (3dshapes):
``next_batch()`` (also ``next(loader)`` / ``for x in loader``), or
``next_batch_with_rows()`` -> ``(images, rows)`` with the int64 row indices of the batch.
The stream is infinite: epochs roll over (reshuffled) without ``StopIteration``.

A step that needs a second batch (FactorVAE's permuted batch for the discriminator) simply
calls ``next_batch()`` again: the second batch is the next batch of the same order.

``state_dict()`` is the position after the last batch *handed out* (not the last batch a
background pipeline prefetched), so ``load_state_dict`` resumes bit-exactly, and an
``epoch``-order state from one loader kind resumes on any other kind.
"""

from __future__ import annotations

import torch

from fastfvae.data.sampling import EpochOrder, EpochSampler
from fastfvae.errors import FastFVAEError


class BatchLoader:
    """Base: validates arguments, tracks the consumed position, implements the iterator protocol.

    Subclasses implement ``_produce() -> (images, rows)`` (the batch at `global_batch`) and,
    if they prefetch, ``close()``: `load_state_dict` calls ``_restart()`` (by default
    ``close()``), and the next `_produce` starts afresh at the loaded position.
    """

    kind = "base"
    order = "epoch"

    def __init__(self, data, batch_size: int, seed: int = 0, device="cpu"):
        if len(data) < 1:
            raise FastFVAEError("the dataset is empty; expected at least one image")
        self.data = data
        self.device = torch.device(device)
        # Validates batch_size against the dataset size; holds the consumed position.
        self._position = EpochSampler(len(data), batch_size, seed)

    @property
    def epoch_order(self) -> EpochOrder:
        """The EpochSampler order for the current seed (a resumed state may change the seed)."""
        return self._position.order

    # --- geometry ------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self._position.num_rows

    @property
    def batch_size(self) -> int:
        return self._position.batch_size

    @property
    def seed(self) -> int:
        return self._position.seed

    @property
    def batches_per_epoch(self) -> int:
        return self._position.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.global_batch // self.batches_per_epoch

    @property
    def global_batch(self) -> int:
        """Index of the next batch, counted from epoch 0 batch 0."""
        p = self._position
        return p.epoch * p.batches_per_epoch + p.batch_index

    # --- the interface -------------------------------------------------------------------
    def next_batch_with_rows(self):
        images, rows = self._produce()
        self._position.advance()
        return images, rows

    def next_batch(self) -> torch.Tensor:
        return self.next_batch_with_rows()[0]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"order": self.order, "sampler": self._position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a loader's `state_dict`, or from a bare `EpochSampler.state_dict()`."""
        if "num_rows" in state:  # a bare EpochSampler state (the reference loop's checkpoint)
            state = {"order": "epoch", "sampler": state}
        if state.get("order", "epoch") != self.order:
            raise FastFVAEError(
                f"loader state is for the {state.get('order')!r} row order, this loader uses {self.order!r}"
            )
        self._position.load_state_dict(state["sampler"])
        self._restart()

    def close(self) -> None:
        """Release background workers or pipelines (the loader may be used again after)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- for subclasses ------------------------------------------------------------------
    def _produce(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _restart(self) -> None:
        """Forget prefetched batches (the position changed); rebuilt on the next batch."""
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={self.num_rows}, batch_size={self.batch_size}, "
                f"seed={self.seed}, device={self.device}, order={self.order!r})")
