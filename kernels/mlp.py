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
_FIXED = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
# Autotuned on a GPU. The interpreter cannot autotune, and each interpreted Triton op costs
# ~0.3 ms whatever the tile size, so there it runs one large tile per 512 rows/columns.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 32, 4, 4), (64, 64, 32, 4, 4),
        (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
    ]
]
_KEY = ["M", "N", "K", "HAS_BIAS", "ACT", "MASK_A", "ROWSUM", "PRECISION"]


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, y_ptr, rowsum_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_ym, s_yk,
    slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, MASK_A: tl.constexpr, ROWSUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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


_gemm_tuned = triton.autotune(configs=_CONFIGS, key=_KEY)(_gemm_kernel) if _AUTOTUNE else None


def _interpreter_blocks(M: int, N: int, K: int) -> dict:
    def block(n: int) -> int:
        return min(max(triton.next_power_of_2(n), 16), 512)

    return {"BLOCK_M": block(M), "BLOCK_N": block(N), "BLOCK_K": block(K), "GROUP_M": 8}


def _launch(a, a_strides, b, b_strides, c, M, N, K, *, bias=None, act=False, y=None, y_strides=(0, 0),
            rowsum=None, slope=1.0, tf32=False):
    """C[M, N] = A @ B with the fusions named in the module doc; strides as (row, col) pairs."""
    # "ieee" matters for fp32 operands only; 16-bit operands always run on tensor cores.
    precision = "ieee" if (a.dtype.itemsize == 4 and not tf32) else "tf32"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if _INTERPRETING:
        kernel, blocks = _gemm_kernel, _interpreter_blocks(M, N, K)
    else:
        kernel, blocks = (_gemm_tuned, {}) if _AUTOTUNE else (_gemm_kernel, _FIXED)
    kernel[grid](
        a, b, c, bias if bias is not None else c, y if y is not None else a,
        rowsum if rowsum is not None else c,
        M, N, K, *a_strides, *b_strides, c.stride(0), c.stride(1), *y_strides,
        float(slope),
        HAS_BIAS=bias is not None, ACT=act, MASK_A=y is not None, ROWSUM=rowsum is not None,
        PRECISION=precision, **blocks,
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
