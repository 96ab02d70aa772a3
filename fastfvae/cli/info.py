"""`fastfvae info`: which implementation each fused op runs on CPU and on CUDA, and why.

The rules are `fastfvae.ops.dispatch`'s (read at call time from the same environment
variables), so this prints what a call made now would run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

DESCRIPTION = """\
One line per fused op (torch.ops.fastfvae.*): the implementation CPU tensors and CUDA tensors
run (native: the C++ library that `pip install` builds, or CMake by hand; triton: the Triton
kernels; reference: plain torch) and why: for native, which library file was loaded and where
it came from ($FASTFVAE_NATIVE_LIB, the source checkout's build/, or the one pip install put in
the package), or why none was (an install that skipped the build says what it lacked). Float
dtypes the kernels do not take (float64) always run the reference. With the library loaded,
more lines say which of the fast step's convolutions run on it rather than on oneDNN, and
whether its reconstruction loss does. The last line says how `--precision bf16` runs here:
native (bfloat16 instructions), emulated (slower than fp32) or unsupported (refused).
"""

#: The public ops, in the order they are listed.
OPS = (
    "permute_dims", "permute_dims_backward",
    "gaussian_sample_kl", "reparameterize", "gaussian_kl", "gaussian_backward",
    "linear_leaky_relu", "linear_leaky_relu_grad_input", "linear_leaky_relu_grad_weight",
)


def _flag(name: str) -> bool:
    import os

    return os.environ.get(name, "0") not in ("", "0")


def cpu_choice(op: str) -> tuple[str, str]:
    """(implementation, why) for CPU tensors."""
    from fastfvae.ops import native

    if _flag("FASTFVAE_TRITON_ON_CPU"):
        return "triton", "FASTFVAE_TRITON_ON_CPU=1: the Triton kernels under Triton's interpreter"
    if op not in native.NATIVE_OPS:
        return "reference", "no native implementation of this op yet"
    runs_native, why = native.status()
    if runs_native and op.startswith("linear_leaky_relu"):
        from fastfvae.ops.mlp import NATIVE_MLP_DTYPES

        names = ", ".join(str(d).removeprefix("torch.") for d in NATIVE_MLP_DTYPES)
        why += f"; for {names} (other dtypes run the reference: in bfloat16 it is faster for this op)"
    return ("native" if runs_native else "reference"), why


def cuda_choice(op: str) -> tuple[str, str]:
    """(implementation, why) for CUDA tensors."""
    here = "" if torch.cuda.is_available() else " (no CUDA device here)"
    if _flag("FASTFVAE_NO_TRITON"):
        return "reference", f"FASTFVAE_NO_TRITON=1{here}"
    if importlib.util.find_spec("triton") is None:
        return "triton", f"Triton is not installed: CUDA calls fail{here}"
    return "triton", f"the Triton kernels{here}"


def conv_rows() -> list[tuple[str, str, str, str]]:
    """The fast step's convolutions that the native library can take (`fastfvae.ops.native_conv`),
    listed when the library is loaded: (name, cpu, cuda, why)."""
    from fastfvae.ops import native, native_conv

    if not native.loaded():
        return []
    on = native_conv.enabled()
    if os.environ.get(native_conv.CONV_ENV, "1") in ("0", ""):
        off_why = f"{native_conv.CONV_ENV}=0"
    elif not native_conv.has_ops():
        off_why = (f"the loaded library {native._STATE['path']} has no native convolutions (an older build): "
                   f"rebuild it: {native.BUILD_HINT}")
    else:
        off_why = native.status()[1]
    isa = native_conv.isa()
    from fastfvae.fast.conv import NATIVE_PLAIN_FP32

    if on and native_conv.image_isa_fits():
        which = "fp32 and bf16" if NATIVE_PLAIN_FP32 else "bf16 step (fp32 step: oneDNN, switched off)"
        image = ("native", f"cpu: the encoder's first and the decoder's last layer, {which} ({isa})")
    elif on:
        image = ("oneDNN", f"cpu: oneDNN: the native kernels need AVX-512 (this CPU: {native.gemm_isa()})")
    else:
        image = ("oneDNN", f"cpu: {off_why}")
    cpu_isa = native.gemm_isa()

    def strided(in_step: str, fp32_flag: bool, what: str) -> tuple[str, str]:
        """(cpu implementation, why) of a strided kernel switched into the step by the
        `native_conv` flag ``in_step``: its bf16 variant needs vdpbf16ps, its float32 one AVX-512
        and its fp32 route (``fp32_flag``, `native_fp32_convolutions`)."""
        stepped = on and getattr(native_conv, in_step)
        bf16 = stepped and isa == "avx512_bf16"
        fp32 = stepped and fp32_flag and isa in native_conv.FP32_S2_ISAS
        if not on:
            return "oneDNN", f"cpu: {off_why}"
        if not stepped:
            return "oneDNN", f"cpu: oneDNN: switched out of the step (native_conv.{in_step})"
        if not (bf16 or fp32):
            if isa not in native_conv.FP32_S2_ISAS:
                return "oneDNN", f"cpu: oneDNN: needs vdpbf16ps (bf16) or AVX-512 (fp32; this CPU: {cpu_isa})"
            return "oneDNN", f"cpu: oneDNN: bf16 needs vdpbf16ps (this CPU: {cpu_isa}), the fp32 route is switched off"
        steps = ("bf16 and fp32 steps" if bf16 and fp32 else "bf16 step (fp32: oneDNN, switched off)" if bf16
                 else f"fp32 step (bf16: oneDNN, needs vdpbf16ps; this CPU: {cpu_isa})")
        return "native", f"cpu: {steps}: {what}"

    dgrad_fp32 = "" if native_conv.S2_DGRAD_FP32 else " (fp32: the input gradients on oneDNN, switched off)"
    s2_impl, s2_why = strided("S2_IN_STEP", native_conv.S2_FP32,
                              f"the decoder's transposed convolutions, strided input gradients up to width "
                              f"{native_conv.DGRAD_MAX_WIDTH}{dgrad_fp32}")
    fw_impl, fw_why = strided("S2_FWD_IN_STEP", native_conv.S2_FWD_FP32,
                              f"the encoder's strided convolutions' forward and the decoder's transposed "
                              f"convolutions' input gradients, inputs from width {native_conv.S2_FWD_MIN_WIDTH}")
    wg_impl, wg_why = strided("S2_WGRAD_IN_STEP", native_conv.S2_WGRAD_FP32,
                              "the weight gradients of the encoder's strided and the decoder's transposed convolutions")
    has_rb = hasattr(torch.ops.fastfvae_native, "relu_grad_bias")
    rb_row = fused_pass_row(
        "relu_grad_bias", "threshold_backward + sum",
        "cpu: bf16 step: the ReLU convolutions' backward mask and float32 bias gradient in one pass"
        + (" (fp32 too)" if native_conv.FUSED_RELU_BIAS_FP32 else " (fp32: threshold_backward + sum, switched off)"),
        active=on, off_why=off_why, has=has_rb, isa_ok=on and has_rb and native_conv.relu_grad_isa() == "avx512",
        flag="fastfvae.ops.native_conv.FUSED_RELU_BIAS_IN_STEP", flag_on=native_conv.FUSED_RELU_BIAS_IN_STEP)
    return [("conv_image_layers", image[0], "cuDNN", f"{image[1]}; cuda: torch"),
            ("conv_transpose_4s2", s2_impl, "cuDNN", f"{s2_why}; cuda: torch"),
            ("conv_4s2", fw_impl, "cuDNN", f"{fw_why}; cuda: torch"),
            ("conv_4s2_weight_grad", wg_impl, "cuDNN", f"{wg_why}; cuda: torch"),
            rb_row, recon_row()]


def recon_row() -> tuple[str, str, str, str]:
    """The fast step's reconstruction loss (`fastfvae.ops.native_recon`): (name, cpu, cuda, why)."""
    from fastfvae.ops import native, native_recon

    active = native.active()  # loads the library first: `native.has` answers for a loaded one
    has = native.loaded() and native.has(*native_recon.CALLS)
    return fused_pass_row(
        "bernoulli_nll", "torch's BCE-with-logits",
        "cpu: bf16 step: the BCE-with-logits sum of the bf16 logits and its gradient, one pass each"
        + (" (fp32 too)" if native_recon.FUSED_BERNOULLI_FP32 else " (fp32: torch's, the parity precision)"),
        active=active, off_why=native.status()[1], has=has, isa_ok=active and has and native_recon.isa() == "avx512",
        flag="fastfvae.ops.native_recon.FUSED_BERNOULLI_IN_STEP", flag_on=native_recon.FUSED_BERNOULLI_IN_STEP,
        call="bernoulli_nll_sum")


def fused_pass_row(name: str, torch_path: str, on_why: str, *, active: bool, off_why: str, has: bool, isa_ok: bool,
                   flag: str, flag_on: bool, call: str | None = None) -> tuple[str, str, str, str]:
    """(name, cpu, cuda, why) of a fused native pass of the fast step that replaces torch ops
    (``torch_path``): native when the library is active (else ``off_why``), has the call (else an
    older build), runs it on AVX-512 and the step's ``flag`` is on; on CUDA always torch."""
    from fastfvae.ops import native

    on = active and has and isa_ok and flag_on
    if on:
        why = on_why
    elif not active:
        why = f"cpu: {off_why}"
    elif not has:
        why = f"cpu: the loaded library has no {call or name} (an older build): rebuild it: {native.BUILD_HINT}"
    elif not flag_on:
        why = f"cpu: {torch_path}: {flag} is off"
    else:
        why = f"cpu: {torch_path}: the fused pass needs AVX-512 (this CPU: {native.gemm_isa()})"
    return (name, "native" if on else "torch", "torch", f"{why}; cuda: torch")


def bf16_row() -> tuple[str, str, str, str]:
    """How `--precision bf16` runs on this CPU and on CUDA (`fastfvae.fast.precision.bf16_support`)."""
    from fastfvae.fast.precision import bf16_support

    cpu, cpu_why = bf16_support("cpu")
    if torch.cuda.is_available():
        cuda, cuda_why = bf16_support("cuda")
    else:
        cuda, cuda_why = "-", "no CUDA device here"
    return ("precision_bf16", cpu, cuda, f"cpu: {cpu_why}; cuda: {cuda_why}")


def lines() -> list[str]:
    """The table `fastfvae info` prints: a header, then one line per op (and, with the native
    library loaded, per native fast-step convolution), then how bf16 runs."""
    rows = [("op", "cpu", "cuda", "why")]
    for op in OPS:
        cpu, cpu_why = cpu_choice(op)
        cuda, cuda_why = cuda_choice(op)
        rows.append((op, cpu, cuda, f"cpu: {cpu_why}; cuda: {cuda_why}"))
    rows += conv_rows()
    rows.append(bf16_row())
    w_op, w_cpu, w_cuda = (max(len(r[i]) for r in rows) for i in range(3))
    return [f"{op:<{w_op}}  {cpu:<{w_cpu}}  {cuda:<{w_cuda}}  {why}" for op, cpu, cuda, why in rows]


def run(args) -> int:
    print("\n".join(lines()))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="which implementation each fused op runs (native, triton, reference)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
