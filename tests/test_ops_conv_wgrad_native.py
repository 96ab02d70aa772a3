"""The native weight gradient of the VAE's inner 4x4 stride-2 padding-1 layers
(kernels/native/conv_s2_wgrad.cpp, ``torch.ops.fastfvae_native.conv_4s2_weight_grad``) against
torch's Conv2d / ConvTranspose2d weight gradients in float64.

One sum serves both kinds of layer (big [B, Cb, 2H, 2W], small [B, Cs, H, W]): a Conv2d's (big =
its input, small = the output's gradient) and a ConvTranspose2d's (big = the output's gradient,
small = its input). Checked: that identity itself, the VAE's layer shapes (batch 64), batch 1 /
odd, several chunks of the batch, odd grids, width 1, channel counts off the kernels' 16-lane
blocks and odd ones, float32 and bfloat16, NCHW and strided inputs, each variant (AVX-512 with
and without vdpbf16ps, scalar) in a subprocess (scalar in the default run, the others under
``-m slow``: `each_variant`), the same bits on 1-4 threads, opcheck, refused inputs, and the
wiring in fastfvae.fast.conv (bf16 step, and fp32 on AVX-512: native, the oneDNN path's
gradients; fp32 with `S2_WGRAD_FP32` off: oneDNN).
The library comes from tests/test_ops_native.py's fixtures; without cmake or a C++ compiler
these tests skip (the identity test runs anyway).
"""

import pytest
import torch
import torch.nn.functional as F
from test_ops_native import each_variant, isa_supported, native_lib, native_on, run_with_isa  # noqa: F401  (fixtures)
from torch import nn

from fastfvae.fast import conv as by_hand
from fastfvae.ops import native_conv

F32, BF16 = torch.float32, torch.bfloat16
# max |error| / max(|reference|, 1e-30): float32 sums of up to 64 * 16 * 16 products of values
# exact in float64 (the inputs are rounded to their dtype before the reference sees them)
TOL = 2e-5
CL = torch.channels_last

VAE_SHAPES = [(64, cs, cb, h, h) for cs, cb in ((32, 32), (64, 32), (64, 64), (32, 64)) for h in (4, 8, 16)]
ODD_SHAPES = [  # B, Cs, Cb, H, W (small's grid; big is 2H x 2W)
    (1, 32, 32, 16, 16),
    (3, 64, 32, 1, 1),
    (5, 17, 6, 3, 7),     # odd batch: the last image pair has one image
    (2, 33, 70, 5, 4),    # Cb past a 16-lane block and past 64
    (1, 5, 3, 2, 3),
    (4, 7, 16, 4, 1),     # width 1
    (3, 1, 1, 1, 2),
    (2, 9, 48, 6, 5),     # 48 channels: column groups across taps
    (19, 8, 16, 8, 8),    # chunks of 256 steps (4 planes): bf16 10 pairs as 4 + 4 + 2, the last
                          # pair one image; fp32 19 images as 4 + 4 + 4 + 4 + 3
]


def _weight_grad_ref(big, small, transposed):
    """torch's weight gradient of the layer (module doc) in float64, [Cs, Cb, 4, 4]."""
    cs, cb = small.shape[1], big.shape[1]
    if transposed:  # ConvTranspose2d(cs, cb): input small, output gradient big
        w = torch.zeros(cs, cb, 4, 4, dtype=torch.float64, requires_grad=True)
        out = F.conv_transpose2d(small.double(), w, stride=2, padding=1)
        return torch.autograd.grad(out, w, big.double())[0]
    w = torch.zeros(cs, cb, 4, 4, dtype=torch.float64, requires_grad=True)  # Conv2d(cb, cs): input big
    out = F.conv2d(big.double(), w, stride=2, padding=1)
    return torch.autograd.grad(out, w, small.double())[0]


def _sum_by_taps(big, small):
    """dw[cs, cb, kh, kw] = sum small[b, cs, i, j] big[b, cb, 2i + kh - 1, 2j + kw - 1], float64."""
    h2, w2 = big.shape[2:]
    padded = F.pad(big.double(), (1, 1, 1, 1))
    dw = torch.zeros(small.shape[1], big.shape[1], 4, 4, dtype=torch.float64)
    for kh in range(4):
        for kw in range(4):
            dw[:, :, kh, kw] = torch.einsum("bsij,bcij->sc", small.double(), padded[:, :, kh:kh + h2:2, kw:kw + w2:2])
    return dw


def _err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _operands(B, cs, cb, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(B, cb, 2 * H, 2 * W, generator=g).to(dtype)
    small = torch.randn(B, cs, H, W, generator=g).to(dtype)
    return big, small


def _check(B, cs, cb, H, W, dtype, layout=None, seed=0):
    big, small = _operands(B, cs, cb, H, W, dtype, seed)
    for transposed in (False, True):
        want = _weight_grad_ref(big, small, transposed)
        a, b = (layout(big), layout(small)) if layout else (big.contiguous(memory_format=CL),
                                                             small.contiguous(memory_format=CL))
        got = torch.ops.fastfvae_native.conv_4s2_weight_grad(a, b)
        assert got.dtype == F32 and got.shape == (cs, cb, 4, 4) and got.is_contiguous(memory_format=CL)
        err = _err(got, want)
        assert err <= TOL, ("conv_4s2_weight_grad", (B, cs, cb, H, W), dtype, transposed, err)
        rounded = torch.ops.fastfvae_native.conv_4s2_weight_grad(a, b, BF16)  # the same sums, rounded once
        assert rounded.dtype == BF16 and rounded.is_contiguous(memory_format=CL)
        assert torch.equal(rounded, got.to(BF16))


@pytest.mark.parametrize("shape", [(2, 3, 5, 3, 4), (1, 4, 2, 1, 1), (3, 6, 7, 4, 1)], ids=str)
def test_one_sum_is_both_layers_weight_gradient(shape):
    """The identity the kernel rests on (module doc), in float64, without the library."""
    B, cs, cb, H, W = shape
    big, small = _operands(B, cs, cb, H, W, torch.float64)
    for transposed in (False, True):
        torch.testing.assert_close(_sum_by_taps(big, small), _weight_grad_ref(big, small, transposed),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", VAE_SHAPES + ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values(native_on, shape, dtype):
    _check(*shape, dtype)


def _transposed_storage(x):
    return x.transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", [lambda x: x.contiguous(), _transposed_storage,
                                    lambda x: torch.stack([x, x], 1)[:, 1]], ids=["nchw", "transposed", "strided"])
def test_other_layouts(native_on, dtype, layout):
    _check(3, 32, 17, 4, 5, dtype, layout=layout)


def test_empty_inputs_give_zeros(native_on):
    ops = torch.ops.fastfvae_native
    assert torch.equal(ops.conv_4s2_weight_grad(torch.zeros(0, 8, 4, 4), torch.zeros(0, 3, 2, 2)),
                       torch.zeros(3, 8, 4, 4))


def test_bad_inputs_are_refused(native_on):
    ops = torch.ops.fastfvae_native
    big, small = torch.randn(2, 8, 8, 8), torch.randn(2, 4, 4, 4)
    cases = [
        ((big.double(), small.double()), r"small must be a float32 or bfloat16 \[B, Cs, H, W\] CPU tensor"),
        ((big, small[0]), r"small must be a float32 or bfloat16 \[B, Cs, H, W\]"),
        ((big[:, :, :7], small), r"big must be a Float \[2, Cb, 8, 8\] CPU tensor \(twice small's grid\)"),
        ((big[:1], small), r"big must be a Float \[2, Cb, 8, 8\]"),
        ((big.bfloat16(), small), r"big must be a Float \[2, Cb, 8, 8\]"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match) as info:
            ops.conv_4s2_weight_grad(*args)
        assert "\n" not in str(info.value).split("Exception raised from")[0].strip()
    with pytest.raises(RuntimeError, match="dtype must be float32 or bfloat16") as info:
        ops.conv_4s2_weight_grad(big, small, torch.float16)
    assert "\n" not in str(info.value).split("Exception raised from")[0].strip()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_opcheck(native_on, dtype):
    big, small = _operands(3, 16, 8, 4, 5, dtype)
    args = (big.contiguous(memory_format=CL), small.contiguous(memory_format=CL))
    torch.library.opcheck(torch.ops.fastfvae_native.conv_4s2_weight_grad.default, args)
    torch.library.opcheck(torch.ops.fastfvae_native.conv_4s2_weight_grad.default, args + (BF16,))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_bits_independent_of_thread_count(native_on, dtype):
    """The threads split the output tiles, never the pixels: the same bits on 1-4 threads."""
    from test_ops_native import assert_same_bits, on_each_thread_count

    shapes = [(64, 32, 32, 16, 16), (21, 64, 64, 4, 4), (7, 17, 33, 5, 3)]
    operands = [_operands(*s, dtype, seed=i) for i, s in enumerate(shapes)]
    cl = [(b.contiguous(memory_format=CL), s.contiguous(memory_format=CL)) for b, s in operands]

    def run():
        return [torch.ops.fastfvae_native.conv_4s2_weight_grad(b, s, out) for b, s in cl for out in (F32, BF16)]

    assert_same_bits(on_each_thread_count(run, ["conv_s2_wgrad"]), [f"{s} {o}" for s in shapes for o in ("fp32", "bf16")])


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import test_ops_conv_wgrad_native as t
torch.ops.load_library(sys.argv[1])
print(torch.ops.fastfvae_native.conv_isa())
for dtype in (t.F32, t.BF16):
    for shape in [t.VAE_SHAPES[0], t.VAE_SHAPES[7]] + t.ODD_SHAPES[1:]:
        t._check(*shape, dtype)
print("ok")
"""


@pytest.mark.parametrize("isa", each_variant("avx512_bf16", "avx512", "scalar"))
def test_each_variant_matches_reference(native_lib, isa):
    """FASTFVAE_NATIVE_ISA caps the variant (avx512: the float32 FMA kernel, bf16 on the scalar loop)."""
    chosen = run_with_isa(_ISA_SCRIPT, native_lib, isa)
    assert (chosen == isa) == isa_supported(isa), (chosen, isa)


# --- the choice and the wiring in fastfvae.fast.conv --------------------------------------

def test_choice(native_on, monkeypatch):
    """bf16 with vdpbf16ps (float32 only while S2_WGRAD_FP32, on by default, on AVX-512), 4x4
    stride 2 padding 1, big exactly twice small's grid."""
    big, small, w = torch.randn(2, 8, 8, 8).bfloat16(), torch.randn(2, 4, 4, 4).bfloat16(), torch.randn(4, 8, 4, 4)
    fits = native_conv.s2_wgrad_fits
    ok = native_conv.isa() == "avx512_bf16"
    assert fits(big, small, w, [2, 2], [1, 1]) == ok
    assert native_conv.S2_WGRAD_FP32
    monkeypatch.setattr(native_conv, "S2_WGRAD_FP32", False)
    assert not fits(big.float(), small.float(), w, [2, 2], [1, 1])
    assert not fits(big, small, w, [1, 1], [1, 1])
    assert not fits(big, small, w, [2, 2], [0, 0])
    assert not fits(big, small, w[..., :3, :3], [2, 2], [1, 1])
    assert not fits(big, small, w.half(), [2, 2], [1, 1])  # a result dtype the kernel does not give
    assert not fits(big[:, :, :7], small, w, [2, 2], [1, 1])
    assert not fits(big[:1], small, w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_WGRAD_FP32", True)
    assert fits(big.float(), small.float(), w, [2, 2], [1, 1]) == (native_conv.isa() in native_conv.FP32_S2_ISAS)
    assert not fits(big.float(), small, w, [2, 2], [1, 1])  # mixed dtypes
    monkeypatch.setattr(native_conv, "S2_WGRAD_FP32", False)
    monkeypatch.setattr(native_conv, "S2_WGRAD_IN_STEP", False)
    assert not fits(big, small, w, [2, 2], [1, 1])
    monkeypatch.setattr(native_conv, "S2_WGRAD_IN_STEP", True)
    monkeypatch.setenv(native_conv.CONV_ENV, "0")
    assert not fits(big, small, w, [2, 2], [1, 1])


def _vae_layers():
    torch.manual_seed(0)
    convs = [nn.Conv2d(32, 32, 4, 2, 1), nn.Conv2d(32, 64, 4, 2, 1), nn.Conv2d(64, 64, 4, 2, 1)]
    deconvs = [nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ConvTranspose2d(64, 32, 4, 2, 1),
               nn.ConvTranspose2d(32, 32, 4, 2, 1)]
    return convs, deconvs


def _layer_grads(dtype, batch=6):
    """The parameter gradients of the VAE's six inner 4x4 stride-2 layers through `layer_split`."""
    convs, deconvs = _vae_layers()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, c.in_channels, s, s, generator=g) for c, s in zip(convs, (32, 16, 8))]
    inputs += [torch.randn(batch, d.in_channels, s, s, generator=g) for d, s in zip(deconvs, (4, 8, 16))]
    loss = 0
    for layer, x in zip(convs + deconvs, inputs):
        y = by_hand.layer_split(x.contiguous(memory_format=CL), layer, dtype, relu=True)
        loss = loss + (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    loss.backward()
    return [p.grad for m in convs + deconvs for p in m.parameters()]


def test_the_bf16_layers_take_the_native_weight_gradient_and_match_onednn(native_on, monkeypatch):
    if native_conv.isa() != "avx512_bf16":
        pytest.skip("conv_4s2_weight_grad joins the step only with vdpbf16ps")
    monkeypatch.setattr(native_conv, "S2_WGRAD_IN_STEP", False)
    want = _layer_grads(BF16)
    assert "conv_4s2_weight_grad" not in native_on.called
    monkeypatch.setattr(native_conv, "S2_WGRAD_IN_STEP", True)
    got = _layer_grads(BF16)
    assert native_on.called.count("conv_4s2_weight_grad") == 6
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == F32 and a.shape == b.shape
        rel = (a.double() - b.double()).norm().item() / b.double().norm().item()
        assert rel <= 1e-2, (i, rel)  # both: float32 sums, rounded to the bf16 weight's dtype


def test_the_native_weight_gradient_has_the_weights_layout_and_dtype(native_on, monkeypatch):
    """`_ConvSplitBackward` hands autograd the bf16 weight's own dtype and channels_last
    layout, as oneDNN does, so no cast or layout copy follows."""
    if native_conv.isa() != "avx512_bf16":
        pytest.skip("conv_4s2_weight_grad joins the step only with vdpbf16ps")
    layer = nn.Conv2d(32, 64, 4, 2, 1).to(memory_format=CL)
    x = torch.randn(4, 32, 16, 16).contiguous(memory_format=CL)
    w = layer.weight.detach().to(BF16).requires_grad_()
    y = by_hand._ConvSplitBackward.apply(x.to(BF16), w, None, [2, 2], [1, 1], False, True)
    (gw,) = torch.autograd.grad(y.float().sum(), w)
    assert native_on.called.count("conv_4s2_weight_grad") == 1
    assert gw.dtype == BF16 and gw.is_contiguous(memory_format=CL)


def test_the_fp32_layers_run_it_on_avx512_with_onednn_s_gradients(native_on, monkeypatch):
    monkeypatch.setattr(native_conv, "S2_WGRAD_FP32", False)
    want = _layer_grads(F32)
    assert "conv_4s2_weight_grad" not in native_on.called
    assert all(g is not None and torch.isfinite(g).all() for g in want)
    monkeypatch.setattr(native_conv, "S2_WGRAD_FP32", True)
    got = _layer_grads(F32)
    assert ("conv_4s2_weight_grad" in native_on.called) == (native_conv.isa() in native_conv.FP32_S2_ISAS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_info_lists_the_native_weight_gradient(native_lib):
    from test_ops_native import _info, _row

    from fastfvae.ops import native

    out = _info({native.LIB_ENV: str(native_lib)})
    row = _row(out, "conv_4s2_weight_grad")
    # native where the bf16 step (vdpbf16ps) or the fp32 step (AVX-512) runs it
    assert row[1:3] == (["native", "cuDNN"] if isa_supported("avx512") else ["oneDNN", "cuDNN"]), out
    off = _info({native.LIB_ENV: str(native_lib), native_conv.CONV_ENV: "0"})
    assert _row(off, "conv_4s2_weight_grad")[1] == "oneDNN" and f"{native_conv.CONV_ENV}=0" in off
    capped = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "avx2"})
    assert _row(capped, "conv_4s2_weight_grad")[1] == "oneDNN" and "needs vdpbf16ps" in capped
    if isa_supported("avx512"):
        no_dot = _info({native.LIB_ENV: str(native_lib), "FASTFVAE_NATIVE_ISA": "avx512"})
        assert _row(no_dot, "conv_4s2_weight_grad")[1] == "native" and "fp32 step (bf16: oneDNN" in no_dot
