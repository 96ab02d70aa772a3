"""Turning a model into codes: the whole-dataset code table, and dlib-style per-batch encoding.

The representation is the encoder mean (dlib's "mean" postprocessing), computed in eval mode
without gradients, in batches, on the model's device. Models are duck-typed: anything with
``encode(x) -> (mu, logvar)`` and ``parameters()`` (metrics never import ``fastfvae.models``).
Data is a `DSprites`-like object with ``float_batch(rows, device)`` and ``len``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from fastfvae.errors import FastFVAEError


def model_device(model):
    """The device of the model's first parameter (CPU for a parameter-less model)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode and inference mode for the duration; the training flag is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def encode_rows(model, data, rows: np.ndarray, batch_size: int = 1024, device=None,
                progress: bool = False) -> np.ndarray:
    """float32 [n, D] encoder means of the images at ``rows``, in batches of ``batch_size``.

    ``progress``: show a progress bar on stderr (encoding all of dSprites takes minutes on a CPU).
    """
    if not hasattr(model, "encode"):
        raise FastFVAEError(f"{type(model).__name__} has no encode(x) -> (mu, logvar); expected a VAE")
    import torch

    device = model_device(model) if device is None else torch.device(device)
    rows = np.asarray(rows, dtype=np.int64)
    chunks = []
    starts = range(0, rows.shape[0], batch_size)
    if progress:
        from rich.console import Console
        from rich.progress import track

        starts = track(starts, description=f"encoding {rows.shape[0]:,} images",
                       console=Console(stderr=True), transient=True)
    with eval_mode(model):
        for start in starts:
            mu, _ = model.encode(_images(data, rows[start:start + batch_size], device))
            chunks.append(mu.float())  # stays on the device: one copy back at the end
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(chunks).cpu().numpy(), dtype=np.float32)


def _images(data, rows: np.ndarray, device):
    """float32 {0,1} [n, 1, 64, 64] on ``device``; on a GPU the bit-packed bytes travel (8x less)."""
    import torch

    if device.type != "cpu" and hasattr(data, "packed"):
        from fastfvae.data.loaders.unpack import unpack_bits

        return unpack_bits(torch.from_numpy(data.packed[rows]).to(device, non_blocking=True))
    return data.float_batch(rows, device)


def encode_dataset(model, data, batch_size: int = 1024, device=None, progress: bool = False) -> np.ndarray:
    """The code table: float32 [len(data), D] encoder means of every row, in row order."""
    return encode_rows(model, data, np.arange(len(data), dtype=np.int64), batch_size, device, progress)


class PerBatchEncoder:
    """dlib's way: a representation function that encodes the sampled images on every call."""

    def __init__(self, model, data, batch_size: int = 1024, device=None):
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return encode_rows(self.model, self.data, rows, self.batch_size, self.device)


class CachedEncoder:
    """A representation function that encodes each distinct row once, on first request.

    With dlib's default sample sizes nearly every dSprites row is drawn, so this costs the
    same as `encode_dataset`; with reduced sizes (a quick score during training) it encodes
    only the rows the metric draws.
    """

    def __init__(self, model, data, batch_size: int = 1024, device=None):
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device
        self.table: np.ndarray | None = None
        self.done = np.zeros(len(data), dtype=bool)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        missing = np.unique(rows[~self.done[rows]])
        if missing.size:
            codes = encode_rows(self.model, self.data, missing, self.batch_size, self.device)
            if self.table is None:
                self.table = np.zeros((len(self.data), codes.shape[1]), dtype=np.float32)
            self.table[missing] = codes
            self.done[missing] = True
        return self.table[rows]

    @property
    def num_encoded(self) -> int:
        return int(self.done.sum())
