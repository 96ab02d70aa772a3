"""unpack_bits_s2d / gather_unpack_s2d: bit-packed rows straight into the space-to-depth
layout of `fastfvae.fast.conv`, exactly what unpacking and then `space_to_depth` gives."""

import numpy as np
import pytest
import torch

from fastfvae.data import pack_images
from fastfvae.data.loaders.unpack import gather_unpack, gather_unpack_s2d, unpack_bits, unpack_bits_s2d
from fastfvae.fast.conv import space_to_depth


def packed_of(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pack_images(images.astype(np.uint8)))


def expected(images: np.ndarray) -> np.ndarray:
    """[n, 4, 32, 32] by definition: channel 2*rh + rw, position (i, j) = pixel (2i + rh, 2j + rw)."""
    return np.stack([images[:, rh::2, rw::2] for rh in (0, 1) for rw in (0, 1)], axis=1).astype(np.float32)


def check(packed: torch.Tensor, images: np.ndarray | None = None) -> torch.Tensor:
    out = unpack_bits_s2d(packed)
    assert out.dtype == torch.float32 and out.device == packed.device
    assert out.shape == (packed.shape[0], 4, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, space_to_depth(unpack_bits(packed)))
    if images is not None:
        assert np.array_equal(out.numpy(), expected(images))
    return out


def test_random_rows():
    images = np.random.default_rng(0).integers(0, 2, (17, 64, 64))
    check(packed_of(images), images)


def test_edge_patterns():
    images = np.zeros((8, 64, 64), dtype=np.uint8)
    images[1] = 1                          # all ones
    for k, (r, c) in enumerate([(0, 0), (0, 63), (63, 0), (63, 63)]):
        images[2 + k, r, c] = 1            # single bits at the corners
    images[6, ::2] = 1                     # even rows: channels 0 and 1 only
    images[7, :, 1::2] = 1                 # odd columns: channels 1 and 3 only
    out = check(packed_of(images), images)
    assert out[0].sum() == 0 and out[1].sum() == 4096
    assert out[2, 0, 0, 0] == 1 and out[3, 1, 0, 31] == 1 and out[4, 2, 31, 0] == 1 and out[5, 3, 31, 31] == 1
    assert out[2:6].sum() == 4
    assert out[6, :2].sum() == 2048 and out[6, 2:].sum() == 0
    assert out[7, 1::2].sum() == 2048 and out[7, 0::2].sum() == 0


def test_every_single_pixel():
    """All 4096 one-pixel images: the one 1 lands where the definition puts it."""
    pixels = np.arange(4096)
    images = np.zeros((4096, 64, 64), dtype=np.uint8)
    images[pixels, pixels // 64, pixels % 64] = 1
    packed = packed_of(images)
    r, c = pixels // 64, pixels % 64
    where = (2 * (r % 2) + c % 2) * 1024 + (r // 2) * 32 + c // 2
    for chunk in range(0, 4096, 1024):
        out = unpack_bits_s2d(packed[chunk:chunk + 1024]).contiguous().view(1024, -1)
        assert torch.equal(out.sum(1), torch.ones(1024))
        assert torch.equal(out.argmax(1), torch.from_numpy(where[chunk:chunk + 1024]))


def test_every_byte_pair_of_the_table():
    """256 images holding each of the 65536 (upper byte, lower byte) pairs once, at every
    row pair and column byte: the whole pair table against np.unpackbits."""
    values = np.arange(65536).reshape(256, 32, 8)              # image, row pair, column byte
    packed = np.zeros((256, 64, 8), dtype=np.uint8)
    packed[:, 0::2] = values >> 8
    packed[:, 1::2] = values & 255
    packed = torch.from_numpy(packed.reshape(256, 512))
    images = np.unpackbits(packed.numpy(), axis=1).reshape(256, 64, 64)
    check(packed, images)


def test_row_strided_input():
    images = np.random.default_rng(1).integers(0, 2, (10, 64, 64))
    packed = packed_of(images)
    check(packed[::3], images[::3])


@pytest.mark.parametrize("rows", [[4, 0, 4, 9, 1], [7], []], ids=["repeats", "one", "none"])
def test_gather_unpack_s2d_picks_the_rows(rows):
    images = np.random.default_rng(2).integers(0, 2, (10, 64, 64))
    packed = packed_of(images)
    index = torch.tensor(rows, dtype=torch.int64)
    out = gather_unpack_s2d(packed, index)
    assert out.shape == (len(rows), 4, 32, 32) and out.dtype == torch.float32
    assert np.array_equal(out.numpy(), expected(images[rows]).reshape(len(rows), 4, 32, 32))
    assert torch.equal(out, space_to_depth(gather_unpack(packed, index)))
