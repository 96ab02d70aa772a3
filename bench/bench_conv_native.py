"""The native one-channel image-side convolutions (kernels/native/conv_image.cpp) against the
oneDNN calls the fast step makes without them, at the step's sizes (batch 64, 64x64 images,
32 channels next to the image), in interleaved rounds on the threads given.

    OMP_NUM_THREADS=1 python bench/bench_conv_native.py [--threads 1] [--rounds 15] [--batch 64]
    OMP_NUM_THREADS=1 python bench/bench_conv_native.py --step [--threads 1] [--rounds 15]

Each row: ms per call (median over rounds) of oneDNN and native, and their ratio (oneDNN / native:
above 1 the native kernel is faster). bf16 rows use the space-to-depth layout of the bf16 step,
fp32 rows the plain [B, 1, 64, 64] image of the fp32 step; the deconv / dgrad rows are
conv_transpose_4s2 at the 4x4 stride-2 layers, the wgrad rows conv_4s2_weight_grad at the same
six layers (bf16, the result in bf16 channels_last as the step takes it).

``--step``: the whole fast training step (FactorVAE, batch 64, bf16 and fp32) with the native
convolutions and without them (``FASTFVAE_NATIVE_CONV=0``, the oneDNN path; everything else
the same), the two alternating within each round.

``--step-fp32-all``: the fp32 step as it ships on AVX-512 (every convolution that has a native
kernel on it, docs/fast-path.md) against the same step on oneDNN
(``fastfvae.fast.conv.native_fp32_convolutions(False)``), alternating within each round.

``--step-wgrad``: the bf16 step with the inner layers' weight gradients on conv_4s2_weight_grad
and on oneDNN (``native_conv.S2_WGRAD_IN_STEP``), everything else native in both, alternating
within each round; prints the median and the spread of the per-round ratios.

``--step-relu-bias``: the same for the ReLU-fused convolutions' backward prologue on
relu_grad_bias (the mask and the float32 bias gradient in one pass) and on threshold_backward +
sum (``native_conv.FUSED_RELU_BIAS_IN_STEP``), in the bf16 and the fp32 step. The relu_bias
rows time the op alone against those two torch calls at the step's ReLU layers.

``--step-recon``: the bf16 step with the reconstruction loss on bernoulli_nll_sum / _grad and on
torch's ops (``native_recon.FUSED_BERNOULLI_IN_STEP``: the float32 cast, BCE-with-logits, and
sigmoid, sub, mul, cast back in the backward). The bce rows time the op alone against those
torch calls at the step's logits ([B, 4, 32, 32] channels_last, float32 x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastfvae.fast import conv as by_hand  # noqa: E402
from fastfvae.ops import native  # noqa: E402

_aten = torch.ops.aten
CL = torch.channels_last


def _cases(batch: int, c: int = 32):
    """(name, oneDNN call, native call) per pass, bf16 (s2d) then fp32 (plain image)."""
    ops = native.ops()
    g = torch.Generator().manual_seed(0)
    first = torch.nn.Conv2d(1, c, 4, 2, 1)
    last = torch.nn.ConvTranspose2d(c, 1, 4, 2, 1)
    img = torch.rand(batch, 1, 64, 64, generator=g)
    return [row for dt in (torch.bfloat16, torch.float32) for row in _dtype_cases(dt, ops, g, first, last, img, batch, c)]


def _dtype_cases(dt, ops, g, first, last, img, batch, c):
    h = torch.randn(batch, c, 32, 32, generator=g).to(dt).contiguous(memory_format=CL)
    w1, b1 = first.weight.detach().to(dt), first.bias.detach().to(dt)
    w2, b2 = last.weight.detach().to(dt), last.bias.detach().to(dt)
    if dt == torch.bfloat16:  # the bf16 step: space-to-depth forms (fastfvae/fast/conv.py)
        x = by_hand.space_to_depth(img).to(dt)
        gi = by_hand.space_to_depth(torch.randn(batch, 1, 64, 64, generator=g)).to(dt)
        k1 = _s2d_first_kernel(first).to(dt).contiguous(memory_format=CL)
        k2 = _s2d_last_kernel(last).to(dt).contiguous(memory_format=CL)
        flipped = k2.flip(2, 3).transpose(0, 1).contiguous(memory_format=CL)
        b2x4 = b2.expand(4).contiguous()
        s2d = True
        onednn = {
            "first fwd+relu": lambda: torch.ops.mkldnn._convolution_pointwise(x, k1, b1, [1, 1], [1, 1], [1, 1], 1,
                                                                               "relu", [], ""),
            "first wgrad": lambda: _aten.convolution_backward(h, x, k1, None, [1, 1], [1, 1], [1, 1], False,
                                                              [0, 0], 1, [False, True, False])[1],
            "last fwd": lambda: _aten.convolution(h, k2, b2x4, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
            "last dgrad": lambda: _aten.convolution(gi, flipped, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
            "last wgrad": lambda: _aten.convolution_backward(h, gi, flipped, None, [1, 1], [1, 1], [1, 1], False,
                                                             [0, 0], 1, [False, True, False])[1],
        }
    else:  # the fp32 step: the layers as they are, on [B, 1, 64, 64]
        x = img.to(dt)
        gi = torch.randn(batch, 1, 64, 64, generator=g).to(dt)
        s2d = False
        onednn = {
            "first fwd+relu": lambda: torch.ops.mkldnn._convolution_pointwise(x, w1, b1, [1, 1], [2, 2], [1, 1], 1,
                                                                               "relu", [], ""),
            "first wgrad": lambda: _aten.convolution_backward(h, x, w1, None, [2, 2], [1, 1], [1, 1], False,
                                                              [0, 0], 1, [False, True, False])[1],
            "last fwd": lambda: _aten.convolution(h, w2, b2, [2, 2], [1, 1], [1, 1], True, [0, 0], 1),
            "last dgrad": lambda: _aten.convolution_backward(gi, h, w2, None, [2, 2], [1, 1], [1, 1], True,
                                                             [0, 0], 1, [True, False, False])[0],
            "last wgrad": lambda: _aten.convolution_backward(gi, h, w2, None, [2, 2], [1, 1], [1, 1], True,
                                                             [0, 0], 1, [False, True, False])[1],
        }
    mine = {
        "first fwd+relu": lambda: ops.image_conv(x, w1, b1, True, s2d),
        "first wgrad": lambda: ops.image_conv_weight_grad(x, h, s2d),
        "last fwd": lambda: ops.image_conv_transpose(h, w2, b2, s2d),
        "last dgrad": lambda: ops.image_conv(gi, w2, None, False, s2d),
        "last wgrad": lambda: ops.image_conv_weight_grad(gi, h, s2d),
    }
    name = "bf16 s2d" if dt == torch.bfloat16 else "fp32"
    return [(f"{name:8s} {k}", onednn[k], mine[k]) for k in onednn]


def _s2_cases(batch: int):
    """conv_transpose_4s2 against oneDNN at the decoder's transposed convolutions (+ ReLU, as the
    step runs them) and the encoder's strided convolutions' input gradients, bf16."""
    ops, dt, g = native.ops(), torch.bfloat16, torch.Generator().manual_seed(1)
    rows = []
    for ci, co, h in ((64, 64, 4), (64, 32, 8), (32, 32, 16)):
        x = torch.randn(batch, ci, h, h, generator=g).to(dt).contiguous(memory_format=CL)
        w = (torch.randn(ci, co, 4, 4, generator=g) / 16).to(dt)
        b = torch.randn(co, generator=g).to(dt)
        rows.append((f"bf16     deconv {ci}->{co} {h}->{2 * h} +relu",
                     lambda x=x, w=w, b=b: _aten.convolution(x, w, b, [2, 2], [1, 1], [1, 1], True, [0, 0], 1).relu_(),
                     lambda x=x, w=w, b=b: ops.conv_transpose_4s2(x, w, b, True)))
    for ci, co, h in ((32, 32, 32), (32, 64, 16), (64, 64, 8)):
        x = torch.randn(batch, ci, h, h, generator=g).to(dt).contiguous(memory_format=CL)
        gr = torch.randn(batch, co, h // 2, h // 2, generator=g).to(dt).contiguous(memory_format=CL)
        w = (torch.randn(co, ci, 4, 4, generator=g) / 16).to(dt).contiguous(memory_format=CL)
        rows.append((f"bf16     conv {ci}->{co} {h}->{h // 2} dgrad",
                     lambda x=x, gr=gr, w=w: _aten.convolution_backward(gr, x, w, None, [2, 2], [1, 1], [1, 1], False,
                                                                        [0, 0], 1, [True, False, False])[0],
                     lambda gr=gr, w=w: ops.conv_transpose_4s2(gr, w, None, False)))
    return rows


def _wgrad_cases(batch: int):
    """conv_4s2_weight_grad against oneDNN's weight-gradient primitive at the encoder's strided
    convolutions (big = the input, small = the output's gradient) and the decoder's transposed
    ones (big = the output's gradient, small = the input), bf16."""
    ops, dt, g = native.ops(), torch.bfloat16, torch.Generator().manual_seed(2)
    rows = []
    for ci, co, h in ((32, 32, 32), (32, 64, 16), (64, 64, 8)):
        x = torch.randn(batch, ci, h, h, generator=g).to(dt).contiguous(memory_format=CL)
        gr = torch.randn(batch, co, h // 2, h // 2, generator=g).to(dt).contiguous(memory_format=CL)
        w = (torch.randn(co, ci, 4, 4, generator=g) / 16).to(dt).contiguous(memory_format=CL)
        rows.append((f"bf16     conv {ci}->{co} {h}->{h // 2} wgrad",
                     lambda x=x, gr=gr, w=w: _aten.convolution_backward(gr, x, w, None, [2, 2], [1, 1], [1, 1], False,
                                                                        [0, 0], 1, [False, True, False])[1],
                     lambda x=x, gr=gr: ops.conv_4s2_weight_grad(x, gr, dt)))
    for ci, co, h in ((64, 64, 4), (64, 32, 8), (32, 32, 16)):
        x = torch.randn(batch, ci, h, h, generator=g).to(dt).contiguous(memory_format=CL)
        gr = torch.randn(batch, co, 2 * h, 2 * h, generator=g).to(dt).contiguous(memory_format=CL)
        w = (torch.randn(ci, co, 4, 4, generator=g) / 16).to(dt).contiguous(memory_format=CL)
        rows.append((f"bf16     deconv {ci}->{co} {h}->{2 * h} wgrad",
                     lambda x=x, gr=gr, w=w: _aten.convolution_backward(gr, x, w, None, [2, 2], [1, 1], [1, 1], True,
                                                                        [0, 0], 1, [False, True, False])[1],
                     lambda x=x, gr=gr: ops.conv_4s2_weight_grad(gr, x, dt)))
    return rows


def _relu_bias_cases(batch: int):
    """relu_grad_bias against threshold_backward + the bias sum at the VAE's ReLU layers' sizes
    (the first conv's 32 x 32 x 32 output down to the inner layers' 64 x 4 x 4), channels_last:
    bf16 against the float32 sum of _ImageConv ("f32sum") and the bf16 sum of
    _ConvSplitBackward, fp32 against the fp32 sum; "mask" rows: no bias (threshold_backward alone)."""
    ops, g = native.ops(), torch.Generator().manual_seed(3)
    rows = []
    for dt, acc in ((torch.bfloat16, torch.float32), (torch.bfloat16, None), (torch.float32, None)):
        for c, h in ((32, 32), (32, 16), (64, 8), (64, 4)):
            gr = torch.randn(batch, c, h, h, generator=g).to(dt).contiguous(memory_format=CL)
            out = torch.randn(batch, c, h, h, generator=g).relu().to(dt).contiguous(memory_format=CL)
            name = f"{'bf16' if dt == torch.bfloat16 else 'fp32':8s} relu+bias {c}x{h}x{h}"

            def torch_pass(gr=gr, out=out, acc=acc):
                m = _aten.threshold_backward(gr, out, 0)
                return m, m.sum((0, 2, 3), dtype=acc)

            rows.append((name + (" f32sum" if acc else ""), torch_pass,
                         lambda gr=gr, out=out: ops.relu_grad_bias(gr, out, True)))
            if acc is None and h == 32:
                rows.append((name.replace("relu+bias", "relu mask"),
                             lambda gr=gr, out=out: _aten.threshold_backward(gr, out, 0),
                             lambda gr=gr, out=out: ops.relu_grad_bias(gr, out, False)))
    return rows


def _bernoulli_cases(batch: int):
    """bernoulli_nll_sum / _grad against the torch ops they replace in the step, at its
    space-to-depth logits [B, 4, 32, 32] channels_last with float32 {0, 1} x: "fwd" the float32
    cast and BCE-with-logits (sum) / B; "bwd" sigmoid, sub, mul by the scalar and the cast back;
    "fwd+bwd" both through autograd (torch: recon_loss of the float32 cast; native: native_recon)."""
    from fastfvae.objectives import recon_loss
    from fastfvae.ops import native_recon

    ops, g = native.ops(), torch.Generator().manual_seed(5)
    rows = []
    x = (torch.rand(batch, 4, 32, 32, generator=g) < 0.2).float().contiguous(memory_format=CL)
    for dt in (torch.bfloat16, torch.float32):
        logits = (torch.randn(batch, 4, 32, 32, generator=g) * 4).to(dt).contiguous(memory_format=CL)
        scale = torch.tensor(1.0) / batch
        name = f"{'bf16' if dt == torch.bfloat16 else 'fp32':8s} bce"

        def autograd_pass(fn, logits=logits):
            with torch.enable_grad():
                leaf = logits.detach().requires_grad_()
                fn(leaf).backward()
            return leaf.grad

        rows += [
            (f"{name} fwd {batch}x4x32x32",
             lambda logits=logits: F.binary_cross_entropy_with_logits(logits.float(), x, reduction="sum") / batch,
             lambda logits=logits: ops.bernoulli_nll_sum(logits, x) / batch),
            (f"{name} bwd {batch}x4x32x32",
             lambda logits=logits, dt=dt: ((torch.sigmoid(logits.float()) - x) * scale).to(dt),
             lambda logits=logits: ops.bernoulli_nll_grad(logits, x, scale.item())),
            (f"{name} fwd+bwd {batch}x4x32x32",
             lambda f=autograd_pass: f(lambda leaf: recon_loss(leaf.float(), x)),
             lambda f=autograd_pass: f(lambda leaf: native_recon.recon_loss(leaf, x))),
        ]
    return rows


def _s2d_first_kernel(layer):
    c = layer.out_channels
    taps = F.pad(layer.weight.detach()[:, 0], (1, 1, 1, 1)).view(c, 3, 2, 3, 2)
    return taps.permute(0, 2, 4, 1, 3).reshape(c, 4, 3, 3)


def _s2d_last_kernel(layer):
    c = layer.in_channels
    taps = F.pad(layer.weight.detach()[:, 0], (1, 1, 1, 1)).flip(1, 2).view(c, 3, 2, 3, 2).flip(2, 4)
    return taps.permute(2, 4, 0, 1, 3).reshape(4, c, 3, 3)


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _interleaved_steps(switch, precision: str = "bf16", steps: int = 20,
                       rounds: int = 15) -> tuple[float, float, list[float]]:
    """Median ms per step of the fast step with ``switch(True)`` (the native piece on) and
    ``switch(False)``, interleaved round by round (round 0 warms both up), and the per-round
    ratios (off / on). ``switch(None)`` restores the setting afterwards."""
    from bench.conftest import random_bits_dsprites
    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.train.config import TrainConfig
    from fastfvae.train.reference import draw_step_inputs
    from fastfvae.train.state import TrainState

    data = random_bits_dsprites(4096)
    cfg = TrainConfig(batch_size=64, d_steps=1)
    state = TrainState.create(cfg, len(data), torch.device("cpu"))
    step = FastStep(state, data, FastOptions(precision=precision))
    inputs = [draw_step_inputs(cfg, state.sampler, state.generator) for _ in range(steps)]
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds + 1):
            for flag in (True, False) if r % 2 == 0 else (False, True):
                switch(flag)
                t0 = time.perf_counter()
                for inp in inputs:
                    step(inp)
                if r:
                    times[flag].append((time.perf_counter() - t0) / steps * 1e3)
    finally:
        switch(None)
    ratios = [off / on for on, off in zip(times[True], times[False])]
    return statistics.median(times[True]), statistics.median(times[False]), ratios


def _env_switch(name: str):
    """A `_interleaved_steps` switch over the environment variable ``name`` ("1" / "0")."""
    import os

    def switch(on):
        if on is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = "1" if on else "0"
    return switch


def _flag_switch(flag_name: str, module=None):
    """A `_interleaved_steps` switch over the module flag ``flag_name`` of ``module`` (native_conv)."""
    if module is None:
        from fastfvae.ops import native_conv as module

    saved = getattr(module, flag_name)
    return lambda on: setattr(module, flag_name, saved if on is None else on)


def _fp32_routes_switch():
    """A `_interleaved_steps` switch over every float32 native-convolution route at once: off is
    inside ``fastfvae.fast.conv.native_fp32_convolutions(False)``, on (and None, the routes as
    shipped) outside it."""
    import contextlib

    from fastfvae.fast.conv import native_fp32_convolutions

    inside = contextlib.ExitStack()

    def switch(on):
        inside.close()
        if on is False:
            inside.enter_context(native_fp32_convolutions(False))
    return switch


def _print_ratios(what: str, precision: str, threads: int, rounds: int, off_name: str, on_name: str,
                  result: tuple[float, float, list[float]]) -> None:
    on, off, ratios = result
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    print(f"{precision} fast step ({what}), batch 64, {threads} thread(s), {rounds} interleaved rounds of 20 "
          f"steps: {off_name} {off:.2f} ms, {on_name} {on:.2f} ms (medians); per-round ratio median "
          f"{statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--step", action="store_true", help="time the whole fast step, native convolutions on vs off")
    p.add_argument("--step-wgrad", action="store_true",
                   help="time the bf16 fast step, native inner-layer weight gradients on vs off")
    p.add_argument("--step-relu-bias", action="store_true",
                   help="time the bf16 and fp32 fast steps, relu_grad_bias on vs threshold_backward + sum")
    p.add_argument("--step-fp32-all", action="store_true",
                   help="time the fp32 fast step, every convolution with a native kernel on it vs oneDNN")
    p.add_argument("--only", default="", help="time only the rows whose name contains this (e.g. 'bce')")
    p.add_argument("--step-recon", action="store_true",
                   help="time the bf16 fast step, the fused reconstruction loss on vs torch's ops")
    args = p.parse_args(argv)
    if not native.loaded():
        print(f"native library not loaded: {native.status()[1]}")
        return 1
    torch.set_num_threads(args.threads)
    if args.step:
        from fastfvae.ops.native_conv import CONV_ENV

        for precision in ("bf16", "fp32"):
            _print_ratios("native convolutions", precision, args.threads, args.rounds, "oneDNN", "native",
                          _interleaved_steps(_env_switch(CONV_ENV), precision, rounds=args.rounds))
        return 0
    if args.step_fp32_all:
        from fastfvae.ops import native_conv

        if native_conv.isa() not in native_conv.FP32_S2_ISAS:
            print(f"the float32 native convolutions run on AVX-512 only (this CPU: {native_conv.isa()}): "
                  "both sides would be oneDNN")
            return 1
        _print_ratios("every convolution with a native kernel", "fp32", args.threads, args.rounds, "oneDNN",
                      "native", _interleaved_steps(_fp32_routes_switch(), "fp32", rounds=args.rounds))
        return 0
    if args.step_wgrad:
        _print_ratios("inner-layer weight gradients", "bf16", args.threads, args.rounds, "oneDNN wgrad", "native",
                      _interleaved_steps(_flag_switch("S2_WGRAD_IN_STEP"), rounds=args.rounds))
        return 0
    if args.step_relu_bias:
        for precision in ("bf16", "fp32"):
            _print_ratios("ReLU backward prologue", precision, args.threads, args.rounds,
                          "threshold_backward + sum", "relu_grad_bias",
                          _interleaved_steps(_flag_switch("FUSED_RELU_BIAS_IN_STEP"), precision, rounds=args.rounds))
        return 0
    if args.step_recon:
        from fastfvae.ops import native_recon

        _print_ratios("reconstruction loss", "bf16", args.threads, args.rounds, "torch BCE", "bernoulli_nll",
                      _interleaved_steps(_flag_switch("FUSED_BERNOULLI_IN_STEP", native_recon), rounds=args.rounds))
        return 0
    cases = (_cases(args.batch) + _s2_cases(args.batch) + _wgrad_cases(args.batch) + _relu_bias_cases(args.batch)
             + _bernoulli_cases(args.batch))
    cases = [c for c in cases if args.only in c[0]]
    times = {name: ([], []) for name, _, _ in cases}
    with torch.no_grad():
        for _, a, b in cases:  # warm-up (oneDNN primitive creation)
            a(), b(), a(), b()
        for _ in range(args.rounds):
            for name, a, b in cases:
                times[name][0].append(_time(a, args.reps))
                times[name][1].append(_time(b, args.reps))
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.rounds} interleaved rounds, "
          f"native {torch.ops.fastfvae_native.conv_isa()}")
    print(f"{'pass':34s} {'oneDNN ms':>10s} {'native ms':>10s} {'ratio':>7s}")
    for name, _, _ in cases:
        a, b = (statistics.median(t) for t in times[name])
        print(f"{name:34s} {a:10.3f} {b:10.3f} {a / b:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
