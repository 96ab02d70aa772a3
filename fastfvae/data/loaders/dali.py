"""`dali` loader: an NVIDIA DALI pipeline fed by a batch-mode external source.

Install with ``pip install 'fastfvae[dali]'`` (``nvidia-dali-cuda130``); DALI is imported
only when this loader is built. Design and the pitfalls it avoids:

- **Order.** ``fn.external_source(batch=True, batch_info=True)`` calls `_EpochSource` with
  the pipeline's iteration number; global batch ``g = start + iteration`` maps to epoch
  ``g // batches_per_epoch`` of the `EpochSampler` order, so every epoch is reshuffled by
  its index and the batches equal the other loaders'. The source also emits the rows, so
  the rows handed out always match the batch, whatever was prefetched.
- **No epoch end.** The source never raises ``StopIteration`` and the iterator is built with
  ``size=-1``: the stream is infinite, there is no iterator reset to forget, and nothing
  hangs at an epoch boundary (DALI's own ``epoch_idx`` is never used).
- **No fork.** The callback runs in-process (``parallel=False``), so no worker process is
  forked after CUDA is initialised. (A parallel external source would need
  ``py_start_method="spawn"`` and a picklable source; packing keeps this callback cheap —
  one numpy fancy index of B x 512 bytes — so it is not needed.)
- **Prefetch.** ``prefetch_queue_depth`` batches are produced ahead (async, pipelined
  executor); the loader's state is the consumed position, and ``load_state_dict`` rebuilds
  the pipeline to start at that position.
- **Unpacking** happens in torch after the pipeline (on the target device): DALI moves the
  stored bytes (``.gpu()`` in the pipeline when a CUDA device is the target, ``device_id=None``
  CPU-only mode otherwise) — bit-packed rows (8x less than pixels), unpacked by
  `unpack_bits`, or uint8 HWC images, turned into float NCHW by `uint8_to_float` — the same
  code the `device` loader uses.
"""

from __future__ import annotations

import numpy as np
import torch

from fastfvae.data.loaders.base import BatchLoader
from fastfvae.data.sampling import EpochOrder
from fastfvae.data.loaders.device import storage_of
from fastfvae.data.loaders.unpack import uint8_to_float, unpack_bits
from fastfvae.errors import FastFVAEError


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as exc:
        raise FastFVAEError(
            "the dali loader needs NVIDIA DALI; install it with `pip install 'fastfvae[dali]'` "
            f"(nvidia-dali-cuda130), or use --loader device|torch ({exc})"
        ) from None
    return fn, pipeline_def, types, DALIGenericIterator


class _EpochSource:
    """Batch-mode external-source callback: (stored rows, rows [B, 1]) of batch start + i;
    ``read(rows)`` gives the stored rows (packed bits [B, 512] or uint8 images [B, 64, 64, C])."""

    def __init__(self, read, order: EpochOrder, start: int):
        self.read, self.order, self.start = read, order, start

    def __call__(self, info):
        rows = self.order.rows(self.start + info.iteration)
        return np.ascontiguousarray(self.read(rows)), rows.reshape(-1, 1)


class DaliLoader(BatchLoader):
    kind = "dali"

    def __init__(self, data, batch_size: int, seed: int = 0, device="cpu", num_threads: int = 1,
                 prefetch_queue_depth: int = 2):
        self._modules = _import_dali()
        super().__init__(data, batch_size, seed, device)
        self.storage = storage_of(data)
        if prefetch_queue_depth < 1:
            raise FastFVAEError(f"prefetch_queue_depth must be >= 1, got {prefetch_queue_depth}")
        self.num_threads, self.prefetch_queue_depth = num_threads, prefetch_queue_depth
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise FastFVAEError(f"the dali loader runs on cpu or cuda devices, got {self.device}")
        self._iter = None
        self._pipe = None

    def _build(self):
        fn, pipeline_def, types, DALIGenericIterator = self._modules
        if self.storage == "bits":
            packed = self.data.packed
            read, ndim = (lambda rows: packed[rows]), 1
        else:  # uint8 images, in memory or read from the file on demand
            read, ndim = self.data.images_at, 3
        source = _EpochSource(read, self.epoch_order, self.global_batch)
        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch_queue_depth, seed=self.seed)
        def pipeline():
            packed, rows = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                              dtype=[types.UINT8, types.INT64], ndim=[ndim, 1])
            return (packed.gpu() if gpu else packed), rows

        self._pipe = pipeline()
        self._iter = DALIGenericIterator([self._pipe], ["packed", "rows"], size=-1, auto_reset=False)

    def _produce(self):
        if self._iter is None:
            self._build()
        out = next(self._iter)[0]
        stored = out["packed"].to(self.device, non_blocking=True)
        images = unpack_bits(stored) if self.storage == "bits" else uint8_to_float(stored)
        return images, out["rows"].reshape(-1)

    def close(self) -> None:
        self._iter = self._pipe = None
