"""Per-column permutation of a [B, D] matrix by sort keys, forward and inverse, in one launch.

Column j of the output is column j of the input reordered by the ascending order of
``keys[:, j]``: ``out[r, j] = z[src(r, j), j]`` where ``src(., j)`` is the stable argsort of
``keys[:, j]`` (equal keys keep their row order; NaN sorts last; -0.0 equals +0.0: exactly
``torch.argsort(dim=0, stable=True)``). The inverse mode is the gradient of the forward:
``out[src(r, j), j] = z[r, j]``.

Each key is packed with its row into one int64 whose signed order is the (key, row)
lexicographic order: the float's bits mapped to a monotone int32 in the high word, the row
in the low word. Two ways to order the packed words, chosen by batch size:

* ``count`` (B <= COUNT_MAX_BATCH): the rank of each row is the number of smaller packed
  words in its column, O(B^2) compares in registers -- no data exchange between threads,
  and fast under Triton's interpreter;
* ``sort`` (B <= MAX_BATCH): a bitonic ``tl.sort`` of the power-of-2 padded column, whose
  low words are then the source rows.

No permutation indices are saved for the backward: it re-ranks the keys.
"""

import os

import triton
import triton.language as tl

COUNT_MAX_BATCH = 1024
# Larger batches hold too many elements per program; callers fall back to torch.
MAX_BATCH = 8192
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements one program works on at once (compares for `count`, sort slots for `sort`).
_TILE = (1 << 18) if _INTERPRETING else 8192
_PAD = 0x7FFFFFFFFFFFFFFF  # padding sorts after every real packed word


@triton.jit
def _packed_keys(keys_ptr, row, col, valid, s_key_b, s_key_d):
    """(key, row) packed into int64s whose signed order is the lexicographic order."""
    key = tl.load(keys_ptr + row * s_key_b + col * s_key_d, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 sorts equal to +0.0
    bits = key.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    mono = tl.where(key != key, 0x7FFFFFFF, mono)  # every NaN sorts last
    packed = (mono.to(tl.int64) << 32) | row.to(tl.int64)
    return tl.where(valid, packed, _PAD)


@triton.jit
def _permute_kernel(
    src_ptr, keys_ptr, out_ptr,
    B, D,
    s_src_b, s_src_d, s_key_b, s_key_d, s_out_b, s_out_d,
    INVERSE: tl.constexpr, SORT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
):
    col = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)[:, None]  # [BLOCK_D, 1]
    c = col.to(tl.int64)
    if SORT:
        rank = tl.arange(0, BLOCK_B)[None, :]  # [1, BLOCK_B]
        valid = (col < D) & (rank < B)
        packed = tl.sort(_packed_keys(keys_ptr, rank, col, valid, s_key_b, s_key_d), dim=1)
        src_row = packed & 0xFFFFFFFF  # the row that lands at each rank
        r = rank.to(tl.int64)
        if INVERSE:
            vals = tl.load(src_ptr + r * s_src_b + c * s_src_d, mask=valid)
            tl.store(out_ptr + src_row * s_out_b + c * s_out_d, vals, mask=valid)
        else:
            vals = tl.load(src_ptr + src_row * s_src_b + c * s_src_d, mask=valid)
            tl.store(out_ptr + r * s_out_b + c * s_out_d, vals, mask=valid)
    else:
        all_rows = tl.arange(0, BLOCK_B)[None, :]
        every = _packed_keys(keys_ptr, all_rows, col, (col < D) & (all_rows < B), s_key_b, s_key_d)
        for i0 in range(0, B, BLOCK_I):
            row = i0 + tl.arange(0, BLOCK_I)[None, :]  # [1, BLOCK_I]
            valid = (col < D) & (row < B)
            mine = _packed_keys(keys_ptr, row, col, valid, s_key_b, s_key_d)  # [BLOCK_D, BLOCK_I]
            smaller = every[:, None, :] < mine[:, :, None]  # [BLOCK_D, BLOCK_I, BLOCK_B]
            rank = tl.sum(smaller.to(tl.int32), axis=2).to(tl.int64)  # where row i lands
            r = row.to(tl.int64)
            if INVERSE:
                vals = tl.load(src_ptr + rank * s_src_b + c * s_src_d, mask=valid)
                tl.store(out_ptr + r * s_out_b + c * s_out_d, vals, mask=valid)
            else:
                vals = tl.load(src_ptr + r * s_src_b + c * s_src_d, mask=valid)
                tl.store(out_ptr + rank * s_out_b + c * s_out_d, vals, mask=valid)


def permute_columns(src, keys, out, inverse: bool, method: str = "auto") -> None:
    """Launch the kernel: ``out`` [B, D] gets ``src`` [B, D] permuted (or un-permuted) by ``keys``.

    All three are 2-D tensors on one device, any strides; ``keys`` a float type of at most
    32 bits; ``B <= MAX_BATCH``; ``out`` must not overlap ``src``. ``method`` is "count",
    "sort" or "auto" (count up to COUNT_MAX_BATCH rows, sort above).
    """
    B, D = src.shape
    if method == "auto":
        method = "count" if B <= COUNT_MAX_BATCH else "sort"
    block_b = max(triton.next_power_of_2(B), 2)
    per_column = block_b * block_b if method == "count" else block_b
    block_d = max(1, min(triton.next_power_of_2(D), _TILE // per_column))
    block_i = max(1, min(block_b, _TILE // (block_d * block_b)))
    num_warps = max(1, min(8, block_b * block_d // 512)) if method == "sort" else 4
    _permute_kernel[(triton.cdiv(D, block_d),)](
        src, keys, out, B, D,
        src.stride(0), src.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        INVERSE=inverse, SORT=method == "sort",
        BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_I=block_i, num_warps=num_warps,
    )
