"""The native Bernoulli reconstruction loss (kernels/native/bernoulli.cpp,
``torch.ops.fastfvae_native.bernoulli_nll_sum`` / ``bernoulli_nll_grad``) and its use in the
fast step (`fastfvae.ops.native_recon`).

Checked: the sum against torch's BCE-with-logits in float64 (and torch's own float32 one), the
gradient against (sigmoid(l) - x) * scale in float64, over empty, one-element, off-vector and
multi-block sizes, the step's [64, 4, 32, 32] channels_last and other dense layouts, float32
and bfloat16 logits (x float32 or bfloat16), large |l| (+-20, +-100), +-inf and NaN (torch's inf /
NaN results); each variant (AVX-512, scalar) in a subprocess (scalar in the default run); the
same bits on 1-4 threads; opcheck; refused inputs; the autograd wrapper; and the bf16 fast step
taking the fused loss (the fp32 step keeping torch's). The library comes from
tests/test_ops_native.py's fixtures; without cmake or a C++ compiler these tests skip.
"""

import pytest
from cpu_bf16 import needs_cpu_bf16
import torch
import torch.nn.functional as F
from test_ops_native import each_variant, isa_supported, native_lib, native_on, run_with_isa  # noqa: F401  (fixtures)
from train_data import one_thread, small_config, small_dsprites  # noqa: F401 (autouse fixture)

from fastfvae.ops import native_recon

F32, BF16 = torch.float32, torch.bfloat16
CL = torch.channels_last
INF, NAN = float("inf"), float("nan")
# |sum - float64 sum| / sum |per element| of the native float32 sum: float32 lane partials of up
# to 512 terms and a 16-lane tree per 8192-element block, ~1 ulp exp / log per element
SUM_TOL = 2e-6
# |grad - float64| of the float32 gradient: sigmoid to a few ulps of 1, then (s - x) * scale
GRAD_ATOL = 4e-7

# (shape, layout): contiguous, channels_last or a permutation that is dense but neither
CASES = [
    ((64, 4, 32, 32), "cl"),     # the bf16 step's space-to-depth logits
    ((64, 4, 32, 32), "c"),
    ((0,), "c"),
    ((1,), "c"),
    ((17,), "c"),                # one vector and a tail
    ((3, 8193), "c"),            # past one block, a tail in the last
    ((5, 3, 7, 7), "cl"),
    ((5, 3, 7, 7), "perm"),
    ((2, 1, 64, 64), "c"),       # the plain image
    ((4, 3, 9, 11), "perm"),
    ((2, 0, 3, 3), "cl"),
]


def _layout(t, layout):
    if layout == "cl" and t.dim() == 4:
        return t.contiguous(memory_format=CL)
    if layout == "perm" and t.dim() == 4:  # dense, strides of a [H, B, W, C] tensor
        return t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    return t.contiguous()


def _operands(shape, dtype, layout="c", x_dtype=F32, seed=0, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    x = (torch.rand(shape, generator=g) < 0.3).to(x_dtype)
    return _layout(logits, layout), _layout(x, layout)


def _ref_sum(logits, x):
    return F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="sum")


def _check_sum(logits, x):
    ops = torch.ops.fastfvae_native
    got = ops.bernoulli_nll_sum(logits, x)
    assert got.dtype == F32 and got.dim() == 0
    ref = _ref_sum(logits, x)
    if not torch.isfinite(ref):
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and (torch.isnan(ref) or got.item() == ref.item())
        return
    per = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
    scale = per.abs().sum().clamp_min(1e-30).item()
    err = abs(got.item() - ref.item()) / scale
    assert err <= SUM_TOL, (tuple(logits.shape), logits.dtype, err)
    # and torch's own float32 result (what the step computed before) within the same bound
    f32 = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum")
    assert abs(got.item() - f32.item()) / scale <= 2 * SUM_TOL


def _check_grad(logits, x, scale):
    got = torch.ops.fastfvae_native.bernoulli_nll_grad(logits, x, scale)
    assert got.dtype == logits.dtype and got.shape == logits.shape and got.stride() == logits.stride()
    ref = (torch.sigmoid(logits.double()) - x.double()) * scale
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    bound = GRAD_ATOL * abs(scale) + (2.0 ** -8 * ref[fin].abs() if logits.dtype == BF16 else 0.0)
    err = (got.double()[fin] - ref[fin]).abs()
    assert bool((err <= bound).all()), (tuple(logits.shape), logits.dtype, err.max().item())


def _check(shape, dtype, layout, x_dtype=F32, seed=0):
    logits, x = _operands(shape, dtype, layout, x_dtype, seed)
    _check_sum(logits, x)
    for scale in (1.0, 1 / 64, -3.5):
        _check_grad(logits, x, scale)


def _specials(dtype):
    """(logits, x) pairs of 37 elements (two vectors and a tail) for each special value and label."""
    out = []
    for value in (20.0, -20.0, 100.0, -100.0, INF, -INF, NAN, 0.0, -0.0):
        for label in (0.0, 1.0):
            out.append((torch.full((37,), value).to(dtype), torch.full((37,), label)))
    return out


def _check_specials(dtype):
    for logits, x in _specials(dtype):
        got = torch.ops.fastfvae_native.bernoulli_nll_sum(logits, x)
        torch_f32 = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum")
        # torch's inf / NaN results, and its finite ones within float32 round-off: torch's float32
        # formula, not the float64 value (l = -20, x = 0: -20 - (-20 - 2e-9) is 0 in float32)
        want = torch_f32.double()
        assert torch.isnan(got) == torch.isnan(torch_f32), (logits[0].item(), x[0].item(), got, torch_f32)
        assert torch.isinf(got) == torch.isinf(torch_f32) and (not torch.isinf(got) or got == torch_f32)
        if torch.isfinite(want):  # relative (37 equal terms), or a few subnormal spacings per element
            assert abs(got.item() - want.item()) <= 4e-6 * abs(want.item()) + 37 * 1e-44, (logits[0], x[0], got, want)
        grad = torch.ops.fastfvae_native.bernoulli_nll_grad(logits, x, 0.5)
        torch_grad = ((torch.sigmoid(logits.float()) - x) * 0.5).to(dtype)
        assert torch.equal(torch.isnan(grad), torch.isnan(torch_grad)), (logits[0], x[0])
        fin = ~torch.isnan(torch_grad)
        assert torch.allclose(grad[fin].double(), torch_grad[fin].double(), rtol=2 ** -8, atol=1e-7)
    # large |l| mixed among ordinary ones, in one sum
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4099, generator=g) * 3
    idx = torch.randperm(4099, generator=g)
    for k, value in enumerate((20.0, -20.0, 100.0, -100.0)):
        logits[idx[k * 50:(k + 1) * 50]] = value
    x = (torch.rand(4099, generator=g) < 0.5).float()
    _check_sum(logits.to(dtype), x)
    _check_grad(logits.to(dtype), x, 1 / 64)


@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_torch_bce_with_logits(native_on, shape, layout, dtype):
    _check(shape, dtype, layout)


def _one_channel(dtype):
    """[4, 1, 16, 16] logits with the channel stride 1 (as the fp32 step's channels_last decoder
    output) and contiguous x (its images): the strides differ in the size-1 dimension only."""
    logits, x = _operands((4, 1, 16, 16), dtype, "c")
    logits = torch.empty_strided(logits.shape, (256, 1, 16, 1), dtype=dtype).copy_(logits)
    assert logits.stride() != x.stride()
    return logits, x


def test_size_one_dimensions_may_have_any_stride(native_on):
    """[B, 1, H, W] channels_last logits with contiguous x (the fp32 step's pair): one memory layout."""
    for dtype in (F32, BF16):
        logits, x = _one_channel(dtype)
        _check_sum(logits, x)
        _check_grad(logits, x, 0.5)


def test_bf16_labels(native_on):
    """x may have bfloat16 logits' dtype (exact for {0, 1} and for soft labels on bf16's grid)."""
    _check((64, 4, 32, 32), BF16, "cl", x_dtype=BF16)
    logits, _ = _operands((5, 3, 7, 7), BF16, "cl")
    soft = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)).to(BF16).contiguous(memory_format=CL)
    _check_sum(logits, soft)
    _check_grad(logits, soft, 0.25)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_large_inf_and_nan_logits_as_torch(native_on, dtype):
    """+-20 and +-100 (exp(-|l|) underflows: log1p is t itself), and torch's inf / NaN: l = +inf
    with x = 0 gives +inf, with x = 1 NaN (0 * inf); l = -inf NaN (-inf - -inf); a NaN l NaN."""
    _check_specials(dtype)


def test_opcheck(native_on):
    for dtype in (F32, BF16):
        logits, x = _operands((3, 4, 5, 7), dtype, "cl")
        torch.library.opcheck(torch.ops.fastfvae_native.bernoulli_nll_sum.default, (logits, x))
        torch.library.opcheck(torch.ops.fastfvae_native.bernoulli_nll_grad.default, (logits, x, 0.125))


def test_bits_independent_of_thread_count(native_on):
    """Fixed element blocks whatever the threads, their partials added in block order."""
    from test_ops_native import assert_same_bits, on_each_thread_count

    ops = [_operands(s, dt, lay, seed=i) for i, (s, lay) in enumerate([((64, 4, 32, 32), "cl"), ((3, 70001), "c")])
           for dt in (F32, BF16)]

    def run():
        out = []
        for logits, x in ops:
            out += [torch.ops.fastfvae_native.bernoulli_nll_sum(logits, x),
                    torch.ops.fastfvae_native.bernoulli_nll_grad(logits, x, 1 / 64)]
        return out

    names = [f"{i} {what}" for i in range(len(ops)) for what in ("sum", "grad")]
    assert_same_bits(on_each_thread_count(run, ["bernoulli"]), names)


REFUSED = (r"bernoulli_nll: logits must be a float32 or bfloat16 CPU tensor and x a float32 \(or logits' dtype\) "
           r"one of the same sizes")


def test_refused_inputs_name_the_problem(native_on):
    ops = torch.ops.fastfvae_native
    logits, x = _operands((2, 4, 6, 6), F32, "cl")
    cases = [
        (logits.double(), x.double()),                          # float64
        (logits.half(), x.half()),
        (logits, x[:1]),                                         # sizes
        (logits, x.contiguous()),                                # strides
        (logits.to(BF16), x.to(torch.float16)),                  # x neither float32 nor logits' dtype
        (logits, x.to(BF16)),                                    # bf16 x for float32 logits
        (logits[:, :, ::2], x[:, :, ::2]),                       # not dense
        (logits.expand(2, 4, 6, 6)[:, :1].expand(2, 4, 6, 6), x[:, :1].expand(2, 4, 6, 6)),  # overlapping
    ]
    for a, b in cases:
        for call in (lambda: ops.bernoulli_nll_sum(a, b), lambda: ops.bernoulli_nll_grad(a, b, 1.0)):
            with pytest.raises(RuntimeError, match=REFUSED) as info:
                call()
            assert "\n" not in str(info.value).split("Exception raised from")[0].strip()


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_bernoulli_native as t
torch.ops.load_library(sys.argv[1])
for dtype in (t.F32, t.BF16):
    for shape, layout in t.CASES:
        t._check(shape, dtype, layout)
    t._check_specials(dtype)
print(torch.ops.fastfvae_native.bernoulli_isa())
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512", "scalar"))
def test_each_variant_matches_torch(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant; both pass the same checks."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


# --- the wrapper and the step -----------------------------------------------------------------

def _need_avx512():
    if torch.ops.fastfvae_native.bernoulli_isa() != "avx512":
        pytest.skip("the fused loss joins the step on the AVX-512 variant only")


def test_choice(native_on, monkeypatch):
    """bf16 logits with float32 (or bf16) x of the same layout on the AVX-512 variant; float32
    logits only with FUSED_BERNOULLI_FP32; other pairs keep the torch ops."""
    _need_avx512()
    logits, x = _operands((2, 4, 8, 8), BF16, "cl")
    fits = native_recon.fits
    assert fits(logits, x) and fits(logits, x.to(BF16))
    assert not fits(logits, x.contiguous())                     # another layout than the logits'
    one_l, one_x = _one_channel(BF16)                           # size-1 channels: any stride there
    assert fits(one_l, one_x)
    assert not fits(logits, x.double())
    assert not fits(logits.half(), x)
    flat_l, flat_x = logits.reshape(2, -1), x.reshape(2, -1)
    assert not fits(flat_l, flat_x)                             # not [B, C, H, W]
    assert not fits(logits, x.clone().requires_grad_())
    assert not fits(logits.float(), x)                          # fp32: torch's summation order
    monkeypatch.setattr(native_recon, "FUSED_BERNOULLI_FP32", True)
    assert fits(logits.float(), x)
    monkeypatch.setattr(native_recon, "FUSED_BERNOULLI_IN_STEP", False)
    assert not fits(logits, x) and not native_recon.takes_logits(logits)
    monkeypatch.setattr(native_recon, "FUSED_BERNOULLI_IN_STEP", True)
    monkeypatch.setenv("FASTFVAE_NO_NATIVE", "1")
    assert not fits(logits, x)


def test_the_wrapper_is_the_objective_and_its_gradient(native_on):
    """`native_recon.recon_loss` against `objectives.recon_loss` on the float32 logits: the value
    and the logits' gradient (bf16, as the cast's backward would round it) for an upstream gradient."""
    from fastfvae.objectives import recon_loss

    _need_avx512()
    for dtype in (BF16, F32):
        logits, x = _operands((64, 4, 32, 32), dtype, "cl", scale=3.0)
        a = logits.clone().requires_grad_()
        loss = native_recon.recon_loss(a, x)
        (loss * 2.5).backward()
        b = logits.clone().requires_grad_()
        want = recon_loss(b.float(), x)
        (want * 2.5).backward()
        assert native_on.called.count("bernoulli_nll_sum") >= 1 and "bernoulli_nll_grad" in native_on.called
        assert loss.dtype == F32 and loss.dim() == 0
        assert abs(loss.item() - want.item()) <= 2e-6 * want.item()
        assert a.grad.dtype == dtype and a.grad.stride() == logits.stride()
        tol = 2.0 ** -8 if dtype == BF16 else 1e-6
        assert torch.allclose(a.grad.double(), b.grad.double(), rtol=tol, atol=2.5 / 64 * 1e-6)


def _run_fast(monkeypatch, fused, precision, steps=4):
    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.train.reference import StepShapes, draw_step_inputs
    from fastfvae.train.state import TrainState

    monkeypatch.setattr(native_recon, "FUSED_BERNOULLI_IN_STEP", fused)
    cfg = small_config(batch_size=16, d_hidden=64, d_layers=3)
    data = small_dsprites(256)
    state = TrainState.create(cfg, len(data))
    step = FastStep(state, data, FastOptions(precision=precision))
    shapes, metrics = StepShapes.of(cfg, data=data), []
    for _ in range(steps):
        metrics.append(step(draw_step_inputs(shapes, state.sampler, state.generator)))
        state.step += 1
    step.sync_state()
    return metrics, state


def test_the_bf16_fast_step_takes_the_fused_loss(native_on, monkeypatch):
    """Every bf16 by-hand step runs the fused loss once each way, and its losses are the torch
    path's (float32 logits into BCE-with-logits) within the bf16 parity tolerance."""
    from fastfvae.fast import PARITY_RTOL

    _need_avx512()
    want, _ = _run_fast(monkeypatch, False, "bf16")
    assert "bernoulli_nll_sum" not in native_on.called and "bernoulli_nll_grad" not in native_on.called
    got, _ = _run_fast(monkeypatch, True, "bf16")
    assert native_on.called.count("bernoulli_nll_sum") == 4 and native_on.called.count("bernoulli_nll_grad") == 4
    for a, b in zip(got, want):
        for k in ("loss", "recon", "kl"):
            torch.testing.assert_close(a[k], b[k], rtol=PARITY_RTOL["bf16"], atol=PARITY_RTOL["bf16"])


def test_the_fp32_fast_step_keeps_torchs_loss(native_on, monkeypatch):
    """fp32 is the parity precision: its loss stays torch's BCE-with-logits, bit for bit the
    step with the fused loss switched off."""
    got, state = _run_fast(monkeypatch, True, "fp32", steps=2)
    assert "bernoulli_nll_sum" not in native_on.called
    want, ref_state = _run_fast(monkeypatch, False, "fp32", steps=2)
    for a, b in zip(got, want):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(state.models.vae.parameters(), ref_state.models.vae.parameters()):
        assert torch.equal(p, q)


def test_info_lists_the_fused_loss(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    out = _info({native.LIB_ENV: str(native_lib)})
    row = _row(out, "bernoulli_nll")
    assert row[1:3] == (["native", "torch"] if isa_supported("avx512") else ["torch", "torch"]), out
    capped = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "scalar"})
    assert _row(capped, "bernoulli_nll")[1] == "torch" and "the fused pass needs AVX-512" in capped


def test_info_row_on_its_own_loads_the_library_first(native_lib):
    """`recon_row` as the first thing a process asks (nothing loaded yet): the library it loads
    has the op, so the row does not call it an older build."""
    import os
    import subprocess
    import sys

    from fastfvae.ops import native

    env = {k: v for k, v in os.environ.items() if k not in (native.LIB_ENV, native.DISABLE_ENV)}
    env[native.LIB_ENV] = str(native_lib)
    proc = subprocess.run([sys.executable, "-c", "from fastfvae.cli.info import recon_row; print(recon_row())"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "older build" not in proc.stdout, proc.stdout
    assert ("'native'" in proc.stdout) == isa_supported("avx512"), proc.stdout


@needs_cpu_bf16
def test_a_library_without_the_op_loads_and_the_step_keeps_torchs_loss(native_on, monkeypatch):
    """A library built before bernoulli_nll (the calls absent, as `native.has` answers for it)
    still loads (the calls are not among those checked at load), and the bf16 step, the choice
    and the info row fall back to torch's BCE-with-logits."""
    from fastfvae.cli.info import recon_row
    from fastfvae.ops import native

    assert not set(native_recon.CALLS) & set(native.NATIVE_OPS + native.NATIVE_CALLS + tuple(native.NATIVE_CALL_ARGS))
    real_has = native.has
    monkeypatch.setattr(native, "has", lambda *names: not set(names) & set(native_recon.CALLS) and real_has(*names))
    logits, x = _operands((2, 4, 8, 8), BF16, "cl")
    assert native.active() and not native_recon.available() and not native_recon.fits(logits, x)
    assert recon_row()[1] == "torch" and "older build" in recon_row()[3]
    _run_fast(monkeypatch, True, "bf16", steps=2)
    assert "bernoulli_nll_sum" not in native_on.called and "bernoulli_nll_grad" not in native_on.called
