"""Gathering rows of a resident dataset on the device, and turning them into float batches
(graph-safe: no host sync, static shapes).

Two storages (`fastfvae.data.base.GroundTruthData.storage`):

* ``"bits"`` — uint8 [N, 512], each row ``np.packbits`` of a flattened binary 64x64 image
  (MSB first). `gather_unpack` is written so that ``torch.compile`` can place it inside a
  compiled training step, where it traces to pure torch ops: one ``index_select`` of the
  bytes, a broadcast right shift by 7..0, ``& 1``, and a cast.
* ``"uint8"`` — uint8 [N, 64, 64, C], NHWC as the files hold them. `gather_uint8` is one
  ``index_select``, a permute to NCHW, a cast and a division by 255.

`gather_batch` picks between them by the resident array's rank (static metadata), and
`uniform_rows` draws rows in the graph.
"""

from __future__ import annotations

import numpy as np
import torch

from fastfvae.data.dsprites import IMAGE_SIZE

_BIT_TABLES: dict[torch.device, torch.Tensor] = {}


def _bit_table(device: torch.device) -> torch.Tensor:
    """float32 [256, 8]: the 8 bits (MSB first) of every byte value."""
    table = _BIT_TABLES.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
        table = ((values >> torch.arange(7, -1, -1)) & 1).to(device=device, dtype=torch.float32)
        _BIT_TABLES[device] = table
    return table


def unpack_bits(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 512] bit-packed rows -> float32 [B, 1, 64, 64] in {0., 1.}, on the same device.

    Under ``torch.compile`` this is a broadcast shift by 7..0, ``& 1`` and a cast, which
    Inductor fuses into one kernel. Eagerly, on a GPU, a lookup in a [256, 8] table of bits
    does the same in two kernels; on the CPU, ``np.unpackbits`` (2x faster than the table,
    8x faster than unfused shifts). The same result on every path.
    """
    n = packed_rows.shape[0]
    if torch.compiler.is_compiling():
        shifts = torch.arange(7, -1, -1, device=packed_rows.device, dtype=torch.uint8)
        bits = ((packed_rows.unsqueeze(-1) >> shifts) & 1).to(torch.float32)
    elif packed_rows.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed_rows.contiguous().numpy(), axis=1)).to(torch.float32)
    else:
        bits = _bit_table(packed_rows.device).index_select(0, packed_rows.reshape(-1).to(torch.int64))
    return bits.reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """float32 [65536, 16]: for bytes (b0, b1) of two image rows 2i, 2i+1 at the same column
    byte, entry 256*b0 + b1 holds their 4 pixel pairs in space-to-depth order: index
    4*jj + 2*rh + rw = pixel (rh, 2*jj + rw) of the 2x8 block (bits MSB first)."""
    table = _PAIR_TABLES.get(device)
    if table is None:
        bits = _bit_table(torch.device("cpu"))                          # [256, 8]
        b0 = bits.view(256, 1, 4, 1, 2).expand(256, 256, 4, 1, 2)       # rh = 0: [b0, b1, jj, rh, rw]
        b1 = bits.view(1, 256, 4, 1, 2).expand(256, 256, 4, 1, 2)
        table = torch.cat([b0, b1], dim=3).reshape(65536, 16).to(device)
        _PAIR_TABLES[device] = table
    return table


def unpack_bits_s2d(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 512] bit-packed rows -> their `fastfvae.fast.conv.space_to_depth` layout,
    float32 [B, 4, 32, 32] (channels_last, channel 2*rh + rw = pixel (2i + rh, 2j + rw)):
    one lookup per pair of bytes in a 65536-entry table, no strided copy."""
    n, half = packed_rows.shape[0], IMAGE_SIZE // 2
    pairs = packed_rows.view(n, half, 2, IMAGE_SIZE // 8).to(torch.int64)
    index = pairs[:, :, 0] * 256 + pairs[:, :, 1]                        # [B, 32, 8]
    blocks = _pair_table(packed_rows.device).index_select(0, index.reshape(-1))
    return blocks.view(n, half, half, 4).permute(0, 3, 1, 2)


def gather_unpack_s2d(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`gather_unpack` in space-to-depth layout (`unpack_bits_s2d`)."""
    return unpack_bits_s2d(packed.index_select(0, rows))


def gather_unpack(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (int64 [B], same device) of the resident packed set uint8 [N, 512], unpacked."""
    return unpack_bits(packed.index_select(0, rows))


def uint8_to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 [B, 64, 64, C] (NHWC) -> ``dtype`` [B, C, 64, 64] = images / 255, same device.

    ``memory_format=torch.channels_last`` keeps the NHWC bytes' layout (no transposing copy);
    the default gives a contiguous NCHW tensor. The division is by 255 in ``dtype``, as
    disentanglement_lib's ``images.astype(np.float32) / 255.`` is, so float32 batches equal
    its observations exactly on the CPU.
    """
    return images.permute(0, 3, 1, 2).to(dtype, memory_format=memory_format).div(255.0)


def gather_uint8(packed: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Rows ``rows`` (int64 [B], same device) of the resident uint8 set [N, 64, 64, C], as
    ``dtype`` [B, C, 64, 64] in [0, 1] (`uint8_to_float`)."""
    return uint8_to_float(packed.index_select(0, rows), dtype, memory_format)


def gather_batch(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """float32 [B, C, 64, 64] rows of a resident set of either storage: bit-packed [N, 512]
    (`gather_unpack`, C = 1) or uint8 [N, 64, 64, C] (`gather_uint8`)."""
    if packed.dim() == 2:
        return gather_unpack(packed, rows)
    return gather_uint8(packed, rows)


def uniform_rows(num_rows: int, batch_size: int, device, generator: torch.Generator | None = None):
    """int64 [B] rows drawn uniformly (with replacement) on ``device``.

    Inside ``torch.compile`` pass ``generator=None``: Dynamo (torch 2.13) cannot trace an
    explicit ``torch.Generator`` argument, so in-graph rows come from the device's default
    generator (Inductor's Philox stream on GPU); eagerly, a loader passes its own generator.
    """
    return torch.randint(0, num_rows, (batch_size,), device=device, generator=generator)
