"""Per-column permutation of a [B, D] matrix by sort keys, forward and inverse, in one launch.

Column j of the output is column j of the input reordered by the ascending order of
``keys[:, j]``: ``out[r, j] = z[src(r, j), j]`` where ``src(., j)`` is the stable argsort of
``keys[:, j]`` (equal keys keep their row order; NaN sorts last; -0.0 equals +0.0: exactly
``torch.argsort(dim=0, stable=True)``). The inverse mode is the gradient of the forward:
``out[src(r, j), j] = z[r, j]``.

Each key is packed with its row into one int64 whose signed order is the (key, row)
lexicographic order: the float's bits mapped to a monotone int32 in the high word, the row
in the low word. The rank of a row is then the number of smaller packed words in its column
(O(B^2) compares, no data exchange between threads), and the row is scattered to its rank.
A program ranks BLOCK_I rows of BLOCK_D columns against all B keys of those columns, so the
grid is (columns / BLOCK_D, rows / BLOCK_I): one launch, parallel over rows and columns.
Up to MAX_BATCH rows; callers use torch's sort beyond (a bitonic ``tl.sort`` kernel was
measured to take minutes to compile at B = 8192). No indices are saved for the backward.
"""

import os

import triton
import triton.language as tl

MAX_BATCH = 4096
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Compares one program holds: the interpreter pays per op, not per element, so it takes more.
_TILE = (1 << 18) if _INTERPRETING else 8192


@triton.jit
def _packed_keys(keys_ptr, row, col, valid, s_key_b, s_key_d):
    """(key, row) packed into int64s whose signed order is the lexicographic order."""
    key = tl.load(keys_ptr + row * s_key_b + col * s_key_d, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 sorts equal to +0.0
    bits = key.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    mono = tl.where(key != key, 0x7FFFFFFF, mono)  # every NaN sorts last
    packed = (mono.to(tl.int64) << 32) | row.to(tl.int64)
    return tl.where(valid, packed, 0x7FFFFFFFFFFFFFFF)  # padding sorts after every real word


@triton.jit
def _permute_kernel(
    src_ptr, keys_ptr, out_ptr,
    B, D,
    s_src_b, s_src_d, s_key_b, s_key_d, s_out_b, s_out_d,
    INVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
):
    col = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]  # [BLOCK_D, 1]
    all_rows = tl.arange(0, BLOCK_B)[None, :]  # [1, BLOCK_B]
    every = _packed_keys(keys_ptr, all_rows, col, (col < D) & (all_rows < B), s_key_b, s_key_d)
    row = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]  # [1, BLOCK_I]
    valid = (col < D) & (row < B)
    mine = _packed_keys(keys_ptr, row, col, valid, s_key_b, s_key_d)  # [BLOCK_D, BLOCK_I]
    smaller = every[:, None, :] < mine[:, :, None]  # [BLOCK_D, BLOCK_I, BLOCK_B]
    rank = tl.sum(smaller.to(tl.int32), axis=2).to(tl.int64)  # where each row lands
    r = row.to(tl.int64)
    c = col.to(tl.int64)
    if INVERSE:
        vals = tl.load(src_ptr + rank * s_src_b + c * s_src_d, mask=valid)
        tl.store(out_ptr + r * s_out_b + c * s_out_d, vals, mask=valid)
    else:
        vals = tl.load(src_ptr + r * s_src_b + c * s_src_d, mask=valid)
        tl.store(out_ptr + rank * s_out_b + c * s_out_d, vals, mask=valid)


def permute_columns(src, keys, out, inverse: bool) -> None:
    """Launch the kernel: ``out`` [B, D] gets ``src`` [B, D] permuted (or un-permuted) by ``keys``.

    All three are 2-D tensors on one device, any strides; ``keys`` a float type of at most
    32 bits; ``1 <= B <= MAX_BATCH``; ``out`` must not overlap ``src``.
    """
    B, D = src.shape
    block_b = max(triton.next_power_of_2(B), 2)
    block_d = max(1, min(triton.next_power_of_2(D), _TILE // (block_b * block_b)))
    block_i = max(1, min(block_b, _TILE // (block_d * block_b)))
    grid = (triton.cdiv(D, block_d), triton.cdiv(B, block_i))
    _permute_kernel[grid](
        src, keys, out, B, D,
        src.stride(0), src.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        INVERSE=inverse, BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_I=block_i,
    )
