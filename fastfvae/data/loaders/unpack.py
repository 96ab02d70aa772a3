"""Bit unpacking of dSprites rows in pure torch ops (graph-safe: no host sync, static shapes).

A packed row is ``np.packbits`` of a flattened 64x64 image (MSB first). `gather_unpack` is
written so that ``torch.compile`` can place it inside a compiled training step: one
``index_select`` of the bytes, a broadcast right shift by 7..0, ``& 1``, and a cast.
"""

from __future__ import annotations

import torch

IMAGE_SIZE = 64


def unpack_bits(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 512] bit-packed rows -> float32 [B, 1, 64, 64] in {0., 1.}, on the same device."""
    shifts = torch.arange(7, -1, -1, device=packed_rows.device, dtype=torch.uint8)
    bits = (packed_rows.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed_rows.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE).to(torch.float32)


def gather_unpack(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (int64 [B], same device) of the resident packed set uint8 [N, 512], unpacked."""
    return unpack_bits(packed.index_select(0, rows))


def uniform_rows(num_rows: int, batch_size: int, device, generator: torch.Generator | None = None):
    """int64 [B] rows drawn uniformly (with replacement) on ``device``.

    Inside ``torch.compile`` pass ``generator=None``: Dynamo (torch 2.13) cannot trace an
    explicit ``torch.Generator`` argument, so in-graph rows come from the device's default
    generator (Inductor's Philox stream on GPU); eagerly, a loader passes its own generator.
    """
    return torch.randint(0, num_rows, (batch_size,), device=device, generator=generator)
