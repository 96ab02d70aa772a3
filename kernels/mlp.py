"""One GEMM kernel for a Linear + LeakyReLU layer's forward, dgrad and wgrad + bgrad.

``C[M, N] = A[M, K] @ B[K, N]`` with any strides (so transposes are free), fp32 accumulation
and three optional fusions:

* epilogue ``HAS_BIAS`` / ``ACT``: ``C = leaky_relu(C + bias[N], slope)`` -- the forward
  ``y = leaky_relu(x @ W.T + b)`` with A = x, B = W.T;
* prologue ``MASK_A``: each A tile is multiplied by the LeakyReLU derivative recomputed from
  the layer output Y (same layout as A): ``A * (Y > 0 ? 1 : slope)``. The output sign equals
  the pre-activation sign for slope >= 0, so no pre-activation is saved. dgrad:
  ``dx = (g * act'(y)) @ W`` (A = g, B = W); wgrad: ``dW = (g * act'(y)).T @ x`` (A = g.T);
* ``ROWSUM``: the programs of the first column block also write the row sums of the
  (masked) A over K -- the bias gradient ``db = sum_M g * act'(y)`` fused into wgrad.

fp32 operands use TF32 only when the caller asks (torch.backends.cuda.matmul.allow_tf32).
Autotuned on a GPU (``FASTFVAE_AUTOTUNE=0``: one fixed config, for quick test runs); under the
interpreter one heuristic config runs (autotune fails there).
"""

import os

import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTFVAE_AUTOTUNE=0: one fixed config on the GPU (quick test runs: no autotuning per shape).
_AUTOTUNE = not _INTERPRETING and os.environ.get("FASTFVAE_AUTOTUNE", "1") != "0"


def _configs(shapes) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# Autotuned on a GPU, from one list per operand kind: every config in them compiles for sm_90
# without register spills for every launch of the fast step's D (widths 1000 and 1024, batches
# 64-2048; tests/test_kernels_sm90.py). fp32 "ieee" runs the dot as FMAs (no tensor cores): its
# accumulator and operand fragments live in registers, so its tiles are smaller per warp.
_CONFIGS_16BIT = _configs([
    (16, 64, 64, 4, 4), (32, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 4, 4),
    (64, 128, 32, 8, 3), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
])
_CONFIGS_TF32 = _configs([
    (32, 64, 32, 4, 4), (32, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 128, 32, 8, 3),
    (128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
])
_CONFIGS_IEEE = _configs([
    (16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (32, 64, 32, 4, 3), (32, 128, 32, 8, 3),
    (64, 128, 32, 8, 3), (128, 64, 32, 8, 3),
])
_ALL_CONFIGS = _CONFIGS_16BIT + _CONFIGS_TF32 + _CONFIGS_IEEE
# FASTFVAE_AUTOTUNE=0: one fixed config per kind on the GPU (quick test runs: no autotuning per
# shape). The interpreter cannot autotune, and each interpreted Triton op costs ~0.3 ms whatever
# the tile size, so there it runs one large tile per 512 rows/columns.
_FIXED_TENSOR_CORES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
_FIXED_IEEE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def configs_for(precision: str, itemsize: int) -> list:
    """The autotuner's candidates for a launch: fp32 "ieee", fp32 as TF32, or 16-bit operands."""
    if itemsize == 4:
        return _CONFIGS_IEEE if precision == "ieee" else _CONFIGS_TF32
    return _CONFIGS_16BIT


def fixed_config(precision: str) -> dict:
    """The one config of FASTFVAE_AUTOTUNE=0."""
    return _FIXED_IEEE if precision == "ieee" else _FIXED_TENSOR_CORES


_KEY = ["M", "N", "K", "HAS_BIAS", "ACT", "MASK_A", "ROWSUM", "PRECISION", "ALIGN8"]


#: The integer arguments the launcher tells the kernel about (`_alignment_bits`), in order.
_ALIGNABLE = ("M", "N", "K", "s_am", "s_ak", "s_bk", "s_bn", "s_cm", "s_cn", "s_ym", "s_yk")


@triton.jit
def _multiple_of_8(x, BIT: tl.constexpr, ALIGN8: tl.constexpr):
    """x, declared a multiple of 8 when bit BIT of ALIGN8 says so (the launcher checked it)."""
    if (ALIGN8 >> BIT) & 1:
        x = (x // 8) * 8  # exact (x is a multiple of 8); Triton's analysis reads the factor 8
    return x


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, y_ptr, rowsum_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_ym, s_yk,
    slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, MASK_A: tl.constexpr, ROWSUM: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Triton itself only assumes 16-divisibility of integer arguments; D's width 1000 is a
    # multiple of 8, not 16, and 8 elements are what 16-byte vector loads / cp.async need
    # (8 bf16, or 4 fp32 with 32-byte rows): without these facts every operand load is scalar
    # and unpipelined. ALIGN8 has one bit per _ALIGNABLE argument.
    M = _multiple_of_8(M, 0, ALIGN8)
    N = _multiple_of_8(N, 1, ALIGN8)
    K = _multiple_of_8(K, 2, ALIGN8)
    s_am = _multiple_of_8(s_am, 3, ALIGN8)
    s_ak = _multiple_of_8(s_ak, 4, ALIGN8)
    s_bk = _multiple_of_8(s_bk, 5, ALIGN8)
    s_bn = _multiple_of_8(s_bn, 6, ALIGN8)
    s_cm = _multiple_of_8(s_cm, 7, ALIGN8)
    s_cn = _multiple_of_8(s_cn, 8, ALIGN8)
    s_ym = _multiple_of_8(s_ym, 9, ALIGN8)
    s_yk = _multiple_of_8(s_yk, 10, ALIGN8)
    # Grouped launch order: GROUP_M row blocks share B tiles in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a_mask = (rm[:, None] < M) & (kk[None, :] < K)
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=a_mask, other=0.0)
        if MASK_A:
            y = tl.load(y_ptr + rm[:, None] * s_ym + kk[None, :] * s_yk, mask=a_mask, other=0.0)
            a = tl.where(y > 0, a, a * slope).to(a_ptr.dtype.element_ty)
        if ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT:
        acc = tl.where(acc > 0, acc, acc * slope)
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    if ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_ptr + rm, rowsum.to(rowsum_ptr.dtype.element_ty), mask=rm < M)


def _prune(configs, named_args, **kwargs):
    """The autotuner's pruning hook: only the list of the launch's operand kind."""
    precision = kwargs.get("PRECISION", named_args.get("PRECISION"))
    allowed = configs_for(precision, named_args["a_ptr"].element_size())
    return [c for c in configs if any(c is a for a in allowed)]


_gemm_tuned = triton.autotune(configs=_ALL_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _gemm_kernel) if _AUTOTUNE else None


def _interpreter_blocks(M: int, N: int, K: int) -> dict:
    def block(n: int) -> int:
        return min(max(triton.next_power_of_2(n), 16), 512)

    return {"BLOCK_M": block(M), "BLOCK_N": block(N), "BLOCK_K": block(K), "GROUP_M": 8}


def _alignment_bits(values) -> int:
    """One bit per value (in `_ALIGNABLE` order) that is a non-zero multiple of 8."""
    return sum(1 << i for i, v in enumerate(values) if v != 0 and v % 8 == 0)


def _launch(a, a_strides, b, b_strides, c, M, N, K, *, bias=None, act=False, y=None, y_strides=(0, 0),
            rowsum=None, slope=1.0, tf32=False):
    """C[M, N] = A @ B with the fusions named in the module doc; strides as (row, col) pairs."""
    # "ieee" matters for fp32 operands only; 16-bit operands always run on tensor cores.
    precision = "ieee" if (a.dtype.itemsize == 4 and not tf32) else "tf32"
    ints = (M, N, K, *a_strides, *b_strides, c.stride(0), c.stride(1), *y_strides)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if _INTERPRETING:
        kernel, blocks = _gemm_kernel, _interpreter_blocks(M, N, K)
    else:
        kernel, blocks = (_gemm_tuned, {}) if _AUTOTUNE else (_gemm_kernel, fixed_config(precision))
    kernel[grid](
        a, b, c, bias if bias is not None else c, y if y is not None else a,
        rowsum if rowsum is not None else c,
        *ints, float(slope),
        HAS_BIAS=bias is not None, ACT=act, MASK_A=y is not None, ROWSUM=rowsum is not None,
        PRECISION=precision, ALIGN8=_alignment_bits(ints), **blocks,
    )


def linear_act_forward(x, w, bias, out, slope: float, act: bool, tf32: bool = False) -> None:
    """``out[M, N] = leaky_relu(x[M, K] @ w[N, K].T + bias[N], slope)`` (no activation if not act)."""
    M, K = x.shape
    N = w.shape[0]
    _launch(x, (x.stride(0), x.stride(1)), w, (w.stride(1), w.stride(0)), out, M, N, K,
            bias=bias, act=act, slope=slope, tf32=tf32)


def linear_act_grad_input(grad, w, y, out, slope: float, tf32: bool = False) -> None:
    """``out[M, K] = (grad * act'(y)) @ w`` with grad, y [M, N] and w [N, K]; y None: no mask."""
    M, N = grad.shape
    K = w.shape[1]
    _launch(grad, (grad.stride(0), grad.stride(1)), w, (w.stride(0), w.stride(1)), out, M, K, N,
            y=y, y_strides=(y.stride(0), y.stride(1)) if y is not None else (0, 0), slope=slope, tf32=tf32)


def linear_act_grad_weight(grad, x, y, out_w, out_b, slope: float, tf32: bool = False) -> None:
    """``out_w[N, K] = (grad * act'(y)).T @ x`` and ``out_b[N] = sum_M grad * act'(y)`` (out_b may be None)."""
    M, N = grad.shape
    K = x.shape[1]
    _launch(grad, (grad.stride(1), grad.stride(0)), x, (x.stride(0), x.stride(1)), out_w, N, K, M,
            y=y, y_strides=(y.stride(1), y.stride(0)) if y is not None else (0, 0), rowsum=out_b,
            slope=slope, tf32=tf32)
