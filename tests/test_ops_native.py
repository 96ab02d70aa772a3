"""The native CPU library (kernels/native, built with CMake): every op against the torch
reference, values and gradients, through the public ops with the native backend active.

The library is built once per session into a temporary folder (or taken from
``FASTFVAE_NATIVE_LIB``); without cmake or a C++ compiler these tests skip. The checks that
run each SIMD variant in a subprocess run one in the default run, the others under
``-m slow`` (`each_variant`). Loading it here
changes nothing for the other tests: dispatch follows `fastfvae.ops.native`'s state, which
each test that wants the native path patches (and pytest restores).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfvae.ops import gaussian_kl, gaussian_sample_kl, native, permute_dims, reparameterize
from fastfvae.ops.gaussian import _reference_backward, _reference_forward
from ops_backends import opcheck_gaussian_ops

REPO = Path(__file__).resolve().parents[1]
# Overflow to inf is the expected float32 result in the extreme-value tests.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


#: The one CMake build of a test session: {"lib": Path} or {"error": why it failed}.
_BUILD: dict = {}


@pytest.fixture(scope="session")
def native_lib(tmp_path_factory) -> Path:
    """The library's path: $FASTFVAE_NATIVE_LIB, else a fresh CMake build of this checkout.

    The other native test files import this fixture, and pytest keeps a session fixture's value
    per module that defines it, so each of them would run its own build (minutes each on a
    two-core machine): the build, or its failure, is kept in ``_BUILD`` and made once."""
    given = os.environ.get(native.LIB_ENV)
    if given:
        if not Path(given).is_file():
            pytest.fail(f"{native.LIB_ENV}={given} does not exist")
        return Path(given)
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the native library cannot be built")
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX): the native library cannot be built")
    if not _BUILD:
        _BUILD.update(_build(tmp_path_factory.mktemp("native_build")))
    assert "error" not in _BUILD, _BUILD.get("error")
    return _BUILD["lib"]


def _build(build: Path) -> dict:
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return {"error": f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"}
    lib = build / native.LIB_NAME
    return {"lib": lib} if lib.is_file() else {"error": f"the build made no {lib}"}


class _Recorder:
    """torch.ops.fastfvae_native, recording which ops dispatch called."""

    def __init__(self, namespace):
        self._namespace = namespace
        self.called: list[str] = []

    def __getattr__(self, name):
        self.called.append(name)
        return getattr(self._namespace, name)


@pytest.fixture
def native_on(native_lib, monkeypatch) -> _Recorder:
    """The native backend active for CPU tensors in this test (the state restored after)."""
    if not hasattr(torch.ops.fastfvae_native, "permute_dims"):
        torch.ops.load_library(str(native_lib))
    monkeypatch.setattr(native, "_STATE", {"tried": True, "path": native_lib, "reason": None})
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.delenv("FASTFVAE_TRITON_ON_CPU", raising=False)
    recorder = _Recorder(torch.ops.fastfvae_native)
    monkeypatch.setattr(native, "ops", lambda: recorder)
    return recorder


#: the /proc/cpuinfo flag of each GEMM (and convolution) variant FASTFVAE_NATIVE_ISA can cap to
ISA_FLAGS = {"avx512_bf16": " avx512_bf16", "avx512": " avx512bw", "avx2": " avx2", "scalar": ""}


def isa_supported(isa: str) -> bool:
    """Whether this CPU runs the GEMM variant ``isa`` (the scalar one always)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return ISA_FLAGS[isa] in flags


def each_variant(*isas: str, default: str = "scalar") -> list:
    """``isas`` as the parameters of a test that runs each FASTFVAE_NATIVE_ISA variant in a
    subprocess of its own (an interpreter and torch each: seconds on a small machine): ``default``
    in the default run, the others marked ``slow`` (``pytest -m slow``, which CI runs as well).
    The default run's in-process tests check the variant this CPU dispatches to; the scalar loop
    is the one they never reach on an AVX machine. The cap is an upper bound, so
    ``default="avx512_bf16"`` is the best variant this CPU has."""
    assert default in isas, (default, isas)
    return [isa if isa == default else pytest.param(isa, marks=pytest.mark.slow) for isa in isas]


def run_with_isa(script: str, native_lib: Path, isa: str, drop_env=()) -> str:
    """``script`` (argv: the library, the tests folder) in a subprocess on one thread with
    FASTFVAE_NATIVE_ISA=isa and without ``drop_env``; it prints the variant it ran, then "ok".
    Returns that variant."""
    env = dict(os.environ, FASTFVAE_NATIVE_ISA=isa, OMP_NUM_THREADS="1")
    for name in drop_env:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", script, str(native_lib), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen, status = proc.stdout.split()[-2:]
    assert status == "ok"
    return chosen


def _reference_permute(z, keys):
    return z.gather(0, keys.argsort(dim=0, stable=True))


def _check_permute(z, keys):
    """Values and gradient exactly those of gather(argsort(stable))."""
    leaf = z.detach().requires_grad_() if z.is_floating_point() else z
    out = permute_dims(leaf, keys)
    assert out.dtype == z.dtype and out.shape == z.shape and out.is_contiguous()
    assert torch.equal(out, _reference_permute(z, keys))
    if z.is_floating_point():
        grad = torch.randn(out.shape).to(z.dtype)
        (gz,) = torch.autograd.grad(out, leaf, grad)
        ref_leaf = z.detach().requires_grad_()
        (ref,) = torch.autograd.grad(_reference_permute(ref_leaf, keys), ref_leaf, grad)
        assert torch.equal(gz, ref)


# --- permute_dims ----------------------------------------------------------------------------

@pytest.mark.parametrize("D", [1, 10, 33])
@pytest.mark.parametrize("B", [1, 2, 3, 64, 127, 1000, 4097])
def test_permute_matches_stable_argsort(native_on, B, D):
    g = torch.Generator().manual_seed(B * 100 + D)
    _check_permute(torch.randn(B, D, generator=g), torch.rand(B, D, generator=g))
    assert native_on.called.count("permute_dims") == 1 and native_on.called.count("permute_dims_backward") == 1


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                     torch.int64, torch.int8, torch.bool, torch.complex128])
def test_permute_dtypes(native_on, z_dtype, key_dtype):
    """Any z dtype (elements moved, never read); 16-bit keys tie often, so stability counts."""
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(300, 7, generator=g) * 50).to(z_dtype)
    keys = torch.rand(300, 7, generator=g).to(key_dtype)
    _check_permute(z, keys)
    assert "permute_dims" in native_on.called


@pytest.mark.parametrize("rows", [40, 1200])  # the comparison sort, and the radix sort from 600 rows
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.float64])
def test_permute_ties_nan_inf_and_signed_zero(native_on, key_dtype, rows):
    g = torch.Generator().manual_seed(2)
    keys = torch.randint(0, 3, (rows, 6), generator=g).to(key_dtype)  # many ties
    keys[3, 2], keys[7, 2] = float("nan"), float("nan")
    keys[5, 1], keys[6, 1], keys[0, 1] = -0.0, 0.0, -0.0
    keys[0, 0], keys[1, 0], keys[2, 0] = -float("inf"), float("inf"), float("nan")
    keys[:, 4] = 0.25
    keys[:, 5] = -0.0
    keys[rows // 2:, 3] = -keys[rows // 2:, 3]  # negative keys, ties with -0.0
    _check_permute(torch.randn(rows, 6, generator=g), keys)


def test_permute_non_contiguous_and_stride0_grad(native_on):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 37, generator=g).t()
    keys = torch.rand(37, 20, generator=g)[:, ::2]
    _check_permute(z, keys)
    leaf = z.detach().requires_grad_()
    permute_dims(leaf, keys).sum().backward()  # the gradient arrives with stride 0
    assert torch.equal(leaf.grad, torch.ones_like(z))


def test_permute_large_and_thread_count_independent(native_on):
    """A large batch over several threads (at::parallel_for), the same result on one thread."""
    g = torch.Generator().manual_seed(5)
    z, keys = torch.randn(200_000, 10, generator=g), torch.rand(200_000, 10, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = permute_dims(z, keys)
        torch.set_num_threads(1)
        one = permute_dims(z, keys)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, _reference_permute(z, keys)) and torch.equal(one, many)


# --- threads --------------------------------------------------------------------------------

THREADS = (1, 2, 3, 4)
# The sources of the library whose ops thread with at::parallel_for (parallel_probe.h).
THREADED_SOURCES = ("gaussian", "permute", "mlp", "mlp_gemm", "conv_image", "conv_s2", "conv_s2_wgrad", "conv_s2_fwd",
                    "relu_bias", "bernoulli")


def on_each_thread_count(fn, sources):
    """{t: fn()} for each torch.set_num_threads(t) of THREADS, after checking that an
    at::parallel_for compiled in each of ``sources`` does run on t threads (a source compiled
    without OpenMP runs it on one, whatever the setting)."""
    saved = torch.get_num_threads()
    results = {}
    try:
        for t in THREADS:
            torch.set_num_threads(t)
            for source in sources:
                seen = torch.ops.fastfvae_native.parallel_threads(source, 64)
                assert seen == t, f"{source}: at::parallel_for ran on {seen} thread(s) with set_num_threads({t})"
            results[t] = [r.detach().clone() if isinstance(r, torch.Tensor) else r for r in fn()]
    finally:
        torch.set_num_threads(saved)
    return results


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(results, names):
    """Every result of every thread count bit for bit that of one thread (NaNs included)."""
    one = results[THREADS[0]]
    assert len(one) == len(names)
    for t, got in results.items():
        for name, a, b in zip(names, got, one):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, t)
            assert torch.equal(_bits(a), _bits(b)), f"{name}: {t} threads differ from 1 thread"


def test_every_threaded_source_runs_on_the_set_thread_count(native_lib):
    """torch.set_num_threads(t) reaches every source's at::parallel_for: the library is compiled
    with OpenMP throughout (without -fopenmp a source's parallel_for is a serial loop)."""
    if not hasattr(torch.ops.fastfvae_native, "permute_dims"):
        torch.ops.load_library(str(native_lib))
    on_each_thread_count(lambda: [], THREADED_SOURCES)
    with pytest.raises(RuntimeError, match="unknown source"):
        torch.ops.fastfvae_native.parallel_threads("nope", 4)


@pytest.mark.parametrize("shape", [(200_000, 10), (4099, 37), (700, 64)], ids=str)  # radix / comparison sorts
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_permute_bits_independent_of_thread_count(native_on, shape, key_dtype):
    g = torch.Generator().manual_seed(shape[0])
    z = torch.randn(shape, generator=g)
    keys = torch.randint(0, 50, shape, generator=g).to(key_dtype)  # ties: the row order decides
    n = torch.ops.fastfvae_native
    results = on_each_thread_count(lambda: [n.permute_dims(z, keys), n.permute_dims_backward(z, keys)], ["permute"])
    assert_same_bits(results, ["permute_dims", "permute_dims_backward"])
    assert torch.equal(results[2][0], _reference_permute(z, keys))


# --- Gaussian ops ------------------------------------------------------------------------------

# (atol, rtol) of native vs the torch reference: the two differ only in exp's last bit (libm,
# libmvec vs torch's vectorised exp) and the KL's summation order.
TOL = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-12),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _close(actual, expected, dtype, scale=1.0):
    """Within ulps of the largest |expected| (z = mu + exp(lv / 2) * eps cancels: an ulp of
    the product can be a large part of a small sum)."""
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    finite = expected[torch.isfinite(expected)].abs()
    magnitude = max(1.0, finite.max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale * magnitude, rtol=rtol, equal_nan=True)


def _inputs(shape, dtype, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(3)]


def _public_values_and_grads(mu, logvar, eps, gz, gkl):
    """Each public op's outputs and (mu, logvar, eps) gradients."""
    leaves = [t.detach().requires_grad_() for t in (mu, logvar, eps)]
    z, kl = gaussian_sample_kl(*leaves)
    out = [z, kl, *torch.autograd.grad((z, kl), leaves, (gz, gkl))]
    z = reparameterize(*leaves)
    out += [z, *torch.autograd.grad(z, leaves, gz)]
    kl = gaussian_kl(*leaves[:2])
    out += [kl, *torch.autograd.grad(kl, leaves[:2], gkl)]
    return [t.detach() for t in out]


SHAPES = [(1, 1), (2, 10), (3, 33), (64, 10), (127, 10), (1000, 10), (7,), (2, 3, 5), (4096, 37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_ops_match_reference(native_on, monkeypatch, shape, dtype):
    mu, logvar, eps = _inputs(shape, dtype, seed=sum(shape))
    g = torch.Generator().manual_seed(1)
    gz = torch.randn(shape, generator=g).to(dtype)
    gkl = torch.randn(shape[:-1], generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    got = _public_values_and_grads(mu, logvar, eps, gz, gkl)
    for name in ("gaussian_sample_kl", "reparameterize", "gaussian_kl", "gaussian_backward"):
        assert name in native_on.called
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    calls = len(native_on.called)
    expected = _public_values_and_grads(mu, logvar, eps, gz, gkl)
    assert len(native_on.called) == calls  # FASTFVAE_NO_NATIVE=1: the reference ran
    for a, e in zip(got, expected):
        _close(a, e, dtype, scale=shape[-1] if a.dim() < mu.dim() else 1.0)


def _extreme_inputs():
    """Large |logvar| (exp(lv / 2) overflowing float32 above 177), zeros, infinities, NaN, in
    rows 0-2 at positions inside the 16- and 8-wide vector blocks and in the scalar tail; row 3
    has one KL term beyond float32 (logvar 200), row 4 is ordinary."""
    special_lv = [200.0, 175.0, 161.0, 100.0, 88.0, 80.0, -1e30, 1e30, -100.0, 1e-4, 0.0, -0.0,
                  float("inf"), -float("inf"), float("nan"), 170.0]
    special_eps = [1e-30, 1e-38, 0.0, -0.0, 1.0, -2.0, float("nan"), 1e-20]
    g = torch.Generator().manual_seed(4)
    mu, logvar, eps = (torch.randn(5, 37, generator=g) for _ in range(3))
    flat_lv, flat_eps = logvar[:3].reshape(-1), eps[:3].reshape(-1)
    for i, lv in enumerate(special_lv):
        for j, e in enumerate(special_eps):
            k = (i * 11 + j * 23) % flat_lv.numel()
            flat_lv[k], flat_eps[k] = lv, e
    logvar[:3], eps[:3] = flat_lv.view(3, 37), flat_eps.view(3, 37)
    mu[0, :8] = 0.0
    mu[1, 3] = 1e20  # mu^2 overflows float32
    logvar[3, 20] = 200.0
    return mu, logvar, eps


def _close_elementwise(actual, expected, bound, rtol=1e-5):
    """NaN and +-inf where expected has them; elsewhere within rtol of ``bound`` (the sizes of
    the terms summed, so a cancelling sum is held to the precision of its terms)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    inf = torch.isinf(expected)
    assert torch.equal(actual[inf], expected[inf]) and not torch.isinf(actual[~inf]).any()
    finite = torch.isfinite(expected)
    bound = torch.nan_to_num(bound.double(), nan=0.0)[finite]  # a NaN bound (inf * 0): exact
    err = (actual[finite].double() - expected[finite].double()).abs()
    assert (err <= rtol * bound + 1e-30).all(), (err - rtol * bound).max()


def test_gaussian_extremes_match_reference(native_on):
    mu, logvar, eps = _extreme_inputs()
    m, lv, e = (t.double() for t in (mu, logvar, eps))
    z, kl = torch.ops.fastfvae.gaussian_sample_kl(mu, logvar, eps)
    z_ref, kl_ref = _reference_forward(mu, logvar, eps, True, True)
    _close_elementwise(z, z_ref, m.abs() + (torch.exp(0.5 * lv) * e).abs())
    kl_terms = (m * m + lv.exp() + lv.abs() + 1.0).sum(-1)
    _close_elementwise(kl, kl_ref, kl_terms)
    assert torch.isinf(kl[3]) and torch.isfinite(kl[4]) and torch.isnan(z).any()
    assert torch.equal(z[(eps == 0.0) & torch.isfinite(logvar)], mu[(eps == 0.0) & torch.isfinite(logvar)])
    gz, gkl = torch.randn(5, 37), torch.randn(5)
    bounds = (gz.double().abs() + (gkl.double()[:, None] * m).abs(),
              (gz.double() * e * torch.exp(0.5 * lv)).abs() + (gkl.double()[:, None] * lv.exp()).abs() + gkl.abs()[:, None])
    for args in ((eps, gz, gkl), (eps, gz, None), (None, None, gkl), (eps, None, None)):
        got = torch.ops.fastfvae.gaussian_backward(mu, logvar, *args)
        for a, ref, bound in zip(got, _reference_backward(mu, logvar, *args), bounds):
            _close_elementwise(a, ref, bound)
    assert native_on.called.count("gaussian_backward") == 4


def test_gaussian_eps_zero_gives_mu_exactly_and_large_logvar_stays_finite(native_on):
    mu = torch.randn(3, 20)
    logvar = torch.full((3, 20), 300.0)
    assert torch.equal(reparameterize(mu, logvar, torch.zeros(3, 20)), mu)
    z = reparameterize(torch.zeros(3, 20), logvar, torch.full((3, 20), 1e-60, dtype=torch.float64).float())
    assert torch.equal(z, torch.zeros(3, 20))  # 1e-60 is 0 in float32
    z = reparameterize(torch.zeros(3, 20), torch.full((3, 20), 160.0), torch.full((3, 20), 1e-30))
    torch.testing.assert_close(z, torch.full((3, 20), float(torch.tensor(80.0, dtype=torch.float64).exp() * 1e-30)))


def test_gaussian_thread_count_independent(native_on):
    mu, logvar, eps = _inputs((100_000, 10), torch.float32, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = gaussian_sample_kl(mu, logvar, eps)
        torch.set_num_threads(1)
        one = gaussian_sample_kl(mu, logvar, eps)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(many, one))
    z_ref, kl_ref = _reference_forward(mu, logvar, eps, True, True)
    _close(many[0], z_ref, torch.float32)
    _close(many[1], kl_ref, torch.float32, scale=10)


GAUSSIAN_OUTPUTS = ["sample_kl.z", "sample_kl.kl", "reparameterize", "gaussian_kl",
                    "backward(eps, gz, gkl).mu", "backward(eps, gz, gkl).logvar",
                    "backward(eps, gz).mu", "backward(eps, gz).logvar", "backward(gkl).mu", "backward(gkl).logvar"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(100_000, 10), (4099, 37), (3, 20_011)], ids=str)
def test_gaussian_bits_independent_of_thread_count(native_on, shape, dtype):
    """Every Gaussian op on 1-4 threads, bit for bit: the rows go in fixed blocks whatever the
    thread count (a block's vector loop and scalar tail see the same elements), each KL row is
    summed in one block, in order. Extreme values in the data reach the scalar path too."""
    mu, logvar, eps = _inputs(shape, dtype, seed=shape[0])
    logvar.view(-1)[::997] = 170.0  # exp(lv / 2) overflows float32: the lane goes scalar
    g = torch.Generator().manual_seed(2)
    gz = torch.randn(shape, generator=g).to(dtype)
    gkl = torch.randn(shape[:-1], generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    n = torch.ops.fastfvae_native

    def run():
        return [*n.gaussian_sample_kl(mu, logvar, eps), n.reparameterize(mu, logvar, eps), n.gaussian_kl(mu, logvar),
                *n.gaussian_backward(mu, logvar, eps, gz, gkl), *n.gaussian_backward(mu, logvar, eps, gz, None),
                *n.gaussian_backward(mu, logvar, None, None, gkl)]

    assert_same_bits(on_each_thread_count(run, ["gaussian"]), GAUSSIAN_OUTPUTS)


_ISA_SCRIPT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from test_ops_native import _close_elementwise, _extreme_inputs, _inputs
from fastfvae.ops.gaussian import _reference_backward, _reference_forward
n = torch.ops.fastfvae_native
print(n.isa())
cases = [_extreme_inputs()] + [_inputs(s, torch.float32, seed=i) for i, s in enumerate([(1, 15), (3, 17), (64, 10)])]
for i, (mu, lv, eps) in enumerate(cases):
    bound = (mu.double().abs() + (torch.exp(0.5 * lv.double()) * eps.double()).abs())
    z, kl = n.gaussian_sample_kl(mu, lv, eps)
    z_ref, kl_ref = _reference_forward(mu, lv, eps, True, True)
    _close_elementwise(z, z_ref, bound)
    _close_elementwise(kl, kl_ref, (mu.double() ** 2 + lv.double().exp() + lv.double().abs() + 1).sum(-1))
    gz, gkl = torch.randn(mu.shape), torch.randn(mu.shape[:-1])
    gbound = (gz.double().abs() * (1 + bound) + gkl.double().abs()[..., None] * (1 + bound + lv.double().exp()))
    for a, e in zip(n.gaussian_backward(mu, lv, eps, gz, gkl), _reference_backward(mu, lv, eps, gz, gkl)):
        _close_elementwise(a, e, gbound)
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512", "avx2", "scalar"))
def test_each_simd_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant picked at run time, so each is checked on this CPU."""
    env = dict(os.environ, FASTFVAE_NATIVE_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(native_lib), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen, status = proc.stdout.split()
    assert status == "ok"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    supported = {"avx512": " avx512f" in flags, "avx2": " avx2" in flags, "scalar": True}
    if supported[isa]:
        assert chosen == isa
    else:
        assert chosen != isa


# --- registration and dispatch --------------------------------------------------------------

def test_opcheck_with_native_active(native_on):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(9, 4, generator=g).requires_grad_()
    keys = torch.rand(9, 4, generator=g)
    ops = torch.ops.fastfvae
    torch.library.opcheck(ops.permute_dims.default, (z, keys))
    torch.library.opcheck(ops.permute_dims_backward.default, (z, keys))
    mu, logvar, eps = (t.requires_grad_() for t in _inputs((6, 5), torch.float32, seed=7))
    opcheck_gaussian_ops(mu, logvar, eps)
    x, w, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)
    torch.library.opcheck(ops.linear_leaky_relu.default, (x.requires_grad_(), w.requires_grad_(), b, 0.2))
    for name in native.NATIVE_OPS:
        assert name in native_on.called


def test_disable_flag_and_other_devices_run_the_reference(native_on, monkeypatch):
    from fastfvae.ops.dispatch import use_native

    z, keys = torch.randn(8, 3), torch.rand(8, 3)
    assert use_native(z, keys)
    assert not use_native(z.to("meta"))
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    assert not use_native(z, keys)
    assert torch.equal(permute_dims(z, keys), _reference_permute(z, keys))
    assert native_on.called == []


def test_triton_interpreter_takes_precedence_on_cpu(native_on, monkeypatch):
    from fastfvae.ops.dispatch import interpreting, kernels

    if not interpreting():
        pytest.skip("TRITON_INTERPRET=1 is not set (tests/conftest.py sets it only without CUDA)")
    monkeypatch.setenv("FASTFVAE_TRITON_ON_CPU", "1")
    module = kernels("permute")
    launches = []
    original = module.permute_columns
    monkeypatch.setattr(module, "permute_columns", lambda *a: (launches.append(1), original(*a))[1])
    z, keys = torch.randn(8, 3), torch.rand(8, 3)
    assert torch.equal(permute_dims(z, keys), _reference_permute(z, keys))
    assert launches and native_on.called == []


# --- loading and `fastfvae info` -------------------------------------------------------------

#: `fastfvae info`'s output by its whole environment: the native test files ask for the same
#: few environments (the library, with FASTFVAE_NATIVE_CONV=0, with a variant cap), one
#: subprocess (seconds) each.
_INFO: dict = {}


def _info(env_updates: dict) -> str:
    """`fastfvae info` in a subprocess with os.environ less the library's variables, plus
    ``env_updates``; run once per distinct environment in a session."""
    env = {k: v for k, v in os.environ.items() if k not in (native.LIB_ENV, native.DISABLE_ENV)}
    env.update(env_updates)
    key = tuple(sorted((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST"))  # pytest sets it per test
    if key not in _INFO:
        proc = subprocess.run([sys.executable, "-c", "import sys; from fastfvae.cli import main; sys.exit(main(['info']))"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _INFO[key] = proc.stdout
    return _INFO[key]


def _row(text: str, op: str) -> list[str]:
    return next(line for line in text.splitlines() if line.split()[0] == op).split()


def test_info_with_the_library_loaded_from_the_environment(native_lib):
    out = _info({native.LIB_ENV: str(native_lib)})
    for op in native.NATIVE_OPS:
        assert _row(out, op)[1:3] == ["native", "triton"], out
    assert str(native_lib) in out and any(isa in out for isa in ("avx512", "avx2", "scalar"))
    assert "GEMM " in out  # the variant of the linear_leaky_relu / discriminator GEMM
    off = _info({native.LIB_ENV: str(native_lib), native.DISABLE_ENV: "1"})
    assert _row(off, "permute_dims")[1] == "reference" and "FASTFVAE_NO_NATIVE=1" in off


def test_info_and_ops_without_the_library(tmp_path):
    missing = tmp_path / "missing" / native.LIB_NAME
    out = _info({native.LIB_ENV: str(missing)})
    row = _row(out, "gaussian_sample_kl")
    assert row[1:3] == ["reference", "triton"] and "cmake -S . -B build" in out and str(missing) in out
    assert len(out.strip().splitlines()) == 11  # the header, one line per op and the bf16 line
    from fastfvae.fast.precision import bf16_support

    assert _row(out, "precision_bf16")[1] == bf16_support("cpu")[0]


_FALLBACK_SCRIPT = """
import torch
from fastfvae.ops import native, permute_dims
z, keys = torch.randn(5, 2), torch.rand(5, 2)
assert torch.equal(permute_dims(z, keys), z.gather(0, keys.argsort(dim=0, stable=True)))
print(native.loaded(), native.status()[1])
"""


def test_a_library_that_does_not_load_falls_back_to_the_reference(tmp_path):
    broken = tmp_path / native.LIB_NAME
    broken.write_text("not a shared library")
    out = _info({native.LIB_ENV: str(broken)})
    assert _row(out, "permute_dims")[1] == "reference" and "does not load" in out
    env = dict(os.environ, **{native.LIB_ENV: str(broken)})
    env.pop(native.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("False ") and "does not load" in proc.stdout


_OUTDATED_SCRIPT = """
from fastfvae.ops import native, native_mlp
native.NATIVE_CALL_ARGS["mlp_update"] = ("signals", "an_argument_newer_sources_added")
print(native.loaded(), native_mlp.available(), native.status()[1])
"""


def test_a_library_built_from_older_sources_is_reported_at_load(native_lib):
    """A call registered without an argument the Python side passes (a stale build) makes the
    library count as not loaded, with the call and a rebuild hint, instead of failing at the
    first training step."""
    env = dict(os.environ, **{native.LIB_ENV: str(native_lib)})
    env.pop(native.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _OUTDATED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("False False ")
    assert "lacks mlp_update(signals, an_argument_newer_sources_added); rebuild" in proc.stdout
