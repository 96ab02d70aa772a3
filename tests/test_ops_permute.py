"""permute_dims: values, gradients, randomness and registration, on every backend."""

import math

import pytest
import torch
from ops_backends import backend, cuda_backend, graph_breaks_of  # noqa: F401  (fixtures)
from scipy.stats import chisquare

from fastfvae.errors import FastFVAEError
from fastfvae.ops import permute_dims

BATCHES = [1, 2, 3, 64, 127, 512]
DIMS = [1, 10, 33]


def reference(z, keys):
    return z.gather(0, keys.argsort(dim=0, stable=True))


def _check_values_and_grad(z, keys):
    z = z.detach().requires_grad_()
    out = permute_dims(z, keys)
    z_ref = z.detach().clone().requires_grad_()
    expected = reference(z_ref, keys)
    assert out.dtype == z.dtype and out.shape == z.shape and out.is_contiguous()
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, device=z.device).to(z.dtype)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(z.grad, z_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("B", BATCHES)
def test_matches_gather_of_stable_argsort(backend, monkeypatch, B, D, dtype):
    g = torch.Generator().manual_seed(B * 100 + D)
    z = torch.randn(B, D, generator=g).to(dtype).to(backend.device)
    keys = torch.rand(B, D, generator=g).to(dtype).to(backend.device)
    with backend.expect_kernel(monkeypatch, "permute", "permute_columns"):
        _check_values_and_grad(z, keys)


def test_non_contiguous_inputs_and_stride0_grad(backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 37, generator=g).to(backend.device).t()  # [37, 10], column-major
    keys = torch.rand(37, 20, generator=g).to(backend.device)[:, ::2]  # [37, 10], strided
    assert not z.is_contiguous() and not keys.is_contiguous()
    _check_values_and_grad(z, keys)
    z = z.detach().requires_grad_()
    permute_dims(z, keys).sum().backward()  # gradient arrives with stride 0
    assert torch.equal(z.grad, torch.ones_like(z))


def test_ties_nan_and_signed_zero_follow_stable_argsort(backend):
    g = torch.Generator().manual_seed(2)
    keys = torch.randint(0, 3, (40, 6), generator=g).float()  # many ties
    keys[3, 2], keys[7, 2] = float("nan"), float("nan")
    keys[5, 1], keys[6, 1], keys[0, 1] = -0.0, 0.0, -0.0
    keys[0, 0], keys[1, 0] = -float("inf"), float("inf")
    keys[:, 4] = 0.25  # a column of equal keys keeps its order
    z = torch.randn(40, 6, generator=g)
    out = permute_dims(z.to(backend.device), keys.to(backend.device)).cpu()
    assert torch.equal(out, reference(z, keys))
    assert torch.equal(out[:, 4], z[:, 4])


@pytest.mark.parametrize("B", [1500, 4096, 5000])
def test_large_batches_on_gpu(cuda_backend, B):
    """Up to MAX_BATCH rows in the kernel, the torch fallback above."""
    g = torch.Generator().manual_seed(B)
    z = torch.randn(B, 10, generator=g).cuda()
    keys = torch.rand(B, 10, generator=g).cuda()
    _check_values_and_grad(z, keys)


def test_bfloat16_on_gpu(cuda_backend):
    z = torch.randn(64, 10, device="cuda", dtype=torch.bfloat16)
    _check_values_and_grad(z, torch.rand(64, 10, device="cuda", dtype=torch.bfloat16))


def test_each_column_a_permutation_same_keys_same_result(backend):
    g = torch.Generator().manual_seed(4)
    B, D = 64, 10
    z = (torch.arange(B * D, dtype=torch.float32).view(B, D)).to(backend.device)  # distinct values
    keys = torch.rand(B, D, generator=g).to(backend.device)
    out = permute_dims(z, keys)
    assert torch.equal(out.sort(dim=0).values, z)  # every column holds exactly its own values
    assert torch.equal(permute_dims(z, keys.clone()), out)
    other = permute_dims(z, torch.rand(B, D, generator=g).to(backend.device))
    assert not torch.equal(other, out)
    assert not torch.equal(out, z)


def _permutation_codes(backend, B: int, columns: int, seed: int) -> torch.Tensor:
    """Index (in 0..B!-1, lexicographic) of the permutation each of `columns` columns received."""
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(B, dtype=torch.float32)[:, None].expand(B, columns).contiguous()
    keys = torch.rand(B, columns, generator=g)
    perm = permute_dims(z.to(backend.device), keys.to(backend.device)).cpu().long()
    code = torch.zeros(columns, dtype=torch.long)
    for r in range(B):  # Lehmer code
        smaller_later = (perm[r + 1:] < perm[r]).sum(0)
        code = code + smaller_later * math.factorial(B - 1 - r)
    return code


def test_uniform_and_independent_columns_chi_square(backend):
    """All B! orders equally likely, and the orders of two columns independent."""
    B = 4  # 24 permutations
    if backend.name == "torch":
        n = 48_000
    else:  # the kernel must agree with the reference on the same keys, then fewer draws suffice
        n = 4_800
    codes = _permutation_codes(backend, B, 2 * n, seed=5)
    counts = torch.bincount(codes, minlength=24).double()
    assert chisquare(counts.numpy()).pvalue > 1e-3
    pairs = codes[0::2] * 24 + codes[1::2]  # joint order of adjacent columns
    if backend.name == "torch":
        joint = torch.bincount(pairs, minlength=24 * 24).double()
        assert chisquare(joint.numpy()).pvalue > 1e-3
    torch_codes = _permutation_codes_reference(B, 2 * n, seed=5)
    assert torch.equal(codes, torch_codes)


def _permutation_codes_reference(B, columns, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(B, columns, generator=g)
    perm = keys.argsort(dim=0, stable=True)
    code = torch.zeros(columns, dtype=torch.long)
    for r in range(B):
        code = code + (perm[r + 1:] < perm[r]).sum(0) * math.factorial(B - 1 - r)
    return code


def test_chi_square_detects_a_biased_shuffle():
    """The uniformity test has power: a shuffle that never moves row 0 fails it."""
    g = torch.Generator().manual_seed(6)
    keys = torch.rand(4, 48_000, generator=g)
    keys[0] = -1.0  # row 0 always first
    perm = keys.argsort(dim=0, stable=True)
    code = torch.zeros(48_000, dtype=torch.long)
    for r in range(4):
        code = code + (perm[r + 1:] < perm[r]).sum(0) * math.factorial(3 - r)
    assert chisquare(torch.bincount(code, minlength=24).double().numpy()).pvalue < 1e-6


def test_opcheck(backend):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(9, 4, generator=g).to(backend.device).requires_grad_()
    keys = torch.rand(9, 4, generator=g).to(backend.device)
    torch.library.opcheck(torch.ops.fastfvae.permute_dims.default, (z, keys))
    torch.library.opcheck(torch.ops.fastfvae.permute_dims_backward.default, (z, keys))


def test_compiles_without_graph_breaks(backend):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(16, 5, generator=g).to(backend.device).requires_grad_()
    keys = torch.rand(16, 5, generator=g).to(backend.device)

    def fn(z, keys):
        return permute_dims(z * 2.0, keys) + 1.0

    breaks, graphs, out = graph_breaks_of(fn, z, keys)
    assert (breaks, graphs) == (0, 1)
    assert torch.equal(out, reference(z.detach() * 2.0, keys) + 1.0)
    assert torch.equal(z.grad, torch.full_like(z, 2.0))


def test_gradcheck_float64_reference():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.rand(7, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(permute_dims, (z, keys))
    assert torch.autograd.gradgradcheck(permute_dims, (z, keys))


def test_bad_inputs_raise_fastfvae_error():
    z = torch.randn(4, 3)
    with pytest.raises(FastFVAEError, match="2-D"):
        permute_dims(torch.randn(4), torch.rand(4))
    with pytest.raises(FastFVAEError, match="shape"):
        permute_dims(z, torch.rand(4, 2))
    with pytest.raises(FastFVAEError, match="float"):
        permute_dims(z, torch.randint(0, 5, (4, 3)))


@pytest.mark.parametrize("B", [pytest.param(4096, marks=pytest.mark.slow), 4097])
def test_largest_kernel_batch_and_torch_fallback(backend, B):
    """MAX_BATCH (4096) rows still run the kernel; one more row runs torch's sort, same result."""
    g = torch.Generator().manual_seed(B)
    z = torch.randn(B, 2, generator=g).to(backend.device)
    _check_values_and_grad(z, torch.rand(B, 2, generator=g).to(backend.device))


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    from ops_backends import compile_for_sm90

    sig = dict(zip(["src_ptr", "keys_ptr", "out_ptr", "B", "D", "s_src_b", "s_src_d", "s_key_b", "s_key_d",
                    "s_out_b", "s_out_d"], ["*fp32", "*fp16", "*fp32"] + ["i32"] * 8))
    compile_for_sm90("permute", "_permute_kernel", [
        (sig, {"INVERSE": inverse, "BLOCK_B": bb, "BLOCK_D": bd, "BLOCK_I": bi})
        for bb, bd, bi in [(64, 2, 64), (512, 1, 16), (4096, 1, 2)] for inverse in (False, True)
    ])
