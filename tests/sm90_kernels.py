"""Compile every fastfvae Triton kernel variant the fast step can launch for sm_90 (H100/H200),
on a machine without a GPU, and measure what the GPU would run: registers, spills, shared memory,
global-load and cp.async widths, pipeline stages.

    python tests/sm90_kernels.py [--json OUT] [--jobs N]      (prints one line per variant)

The variants come from the real launchers (`fastfvae.kernels.*`), called with meta tensors of
the fast step's shapes (the paper's D 6 x 1000 on z 10, and width 1024; batches 64 .. 2048: the
paper config, B and 2B rows, batch 256 and 1024) and a recording stand-in for each kernel, so
the arguments, strides and constexprs are exactly those a launch passes. Each is specialised as
Triton's launcher would (`native_specialize_impl`: 16-divisible integers and pointers, integers
equal to 1 as constants) and compiled for ``GPUTarget("cuda", 90, 32)`` with Triton's bundled
ptxas; the GEMM in every config its autotuner may pick for that precision (plus the fixed one).
Runs without TRITON_INTERPRET (a compiled kernel is needed, not the interpreter's stand-in).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: it compiles kernels, it does not interpret them")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from fastfvae.kernels import gaussian, mlp, permute  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BATCHES = (64, 128, 256, 512, 1024, 2048)
Z_DIM = 10
WIDTHS = (1000, 1024)
LAYERS = 6


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _record(module, name: str, launch) -> list:
    """The (args, kwargs) of every launch of ``module.name`` made by ``launch()``."""
    real = getattr(module, name)
    recorder = _Recorder(real)
    setattr(module, name, recorder)
    try:
        launch()
    finally:
        setattr(module, name, real)
    return recorder.calls


def gemm_calls(width: int, dtype: torch.dtype, tf32: bool, batches=BATCHES, roles=("first", "hidden", "last")):
    """(role label, args, kwargs) of the D GEMM launches of one fast-step D (fwd, dgrad, wgrad per layer)."""
    layers = {"first": (Z_DIM, width, 0.2), "hidden": (width, width, 0.2), "last": (width, 2, 1.0)}
    out = []
    saved = mlp._AUTOTUNE, mlp._INTERPRETING
    mlp._AUTOTUNE, mlp._INTERPRETING = False, False  # the launcher's GPU path, one call per launch
    try:
        for B in batches:
            for role in roles:
                K, N, slope = layers[role]
                act = slope != 1.0
                x, w, b, y = _meta(B, K, dtype=dtype), _meta(N, K, dtype=dtype), _meta(N, dtype=dtype), _meta(B, N, dtype=dtype)
                gw, gb, gx = _meta(N, K, dtype=dtype), _meta(N, dtype=dtype), _meta(B, K, dtype=dtype)
                mask = y if act else None
                for kind, launch in (
                    ("fwd", lambda: mlp.linear_act_forward(x, w, b, y, slope, act=act, tf32=tf32)),
                    ("dgrad", lambda: mlp.linear_act_grad_input(y, w, mask, gx, slope, tf32=tf32)),
                    ("wgrad", lambda: mlp.linear_act_grad_weight(y, x, mask, gw, gb, slope, tf32=tf32)),
                ):
                    for args, kwargs in _record(mlp, "_gemm_kernel", launch):
                        out.append((f"{kind} {role} {K}->{N} B={B}", args, kwargs))
    finally:
        mlp._AUTOTUNE, mlp._INTERPRETING = saved
    return out


def _specialise(fn, args, constexprs: dict):
    """(signature, constexprs, attrs) as Triton's launcher specialises ``fn(*args, **constexprs)``."""
    signature, consts, attrs = {}, dict(constexprs), {}
    positional = [n for n in fn.arg_names if n not in constexprs]
    for name, value in zip(positional, args):
        i = fn.arg_names.index(name)
        ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
        if ty == "constexpr":
            signature[name], consts[name] = "constexpr", key
        else:
            signature[name] = ty
            if isinstance(key, str) and CUDABackend.parse_attr(key):
                attrs[(i,)] = CUDABackend.parse_attr(key)
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, consts, attrs


def _variants():
    """Every distinct compile: dicts with kernel, label, options and the specialisation."""
    seen, out = set(), []

    def add(module, kernel_name, label, args, kwargs, configs, **info):
        fn = getattr(module, kernel_name)
        for config in configs:
            constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            constexprs.update(config.get("blocks", {}))
            warps, stages = config.get("num_warps", kwargs.get("num_warps", 4)), config.get("num_stages", kwargs.get("num_stages", 3))
            signature, consts, attrs = _specialise(fn, args, constexprs)
            key = (kernel_name, repr(sorted(signature.items())), repr(sorted(consts.items())), repr(sorted(attrs.items())), warps, stages)
            if key in seen:
                continue
            seen.add(key)
            out.append(dict(module=module.__name__, kernel=kernel_name, label=label, signature=signature,
                            constexprs=consts, attrs=attrs, num_warps=warps, num_stages=stages, **info))

    for width in WIDTHS:
        for dtype, tf32, precision in ((torch.float32, False, "fp32"), (torch.float32, True, "tf32"),
                                       (torch.bfloat16, False, "bf16")):
            roles = ("first", "hidden", "last") if width == 1000 else ("hidden",)
            for label, args, kwargs in gemm_calls(width, dtype, tf32, roles=roles):
                fixed = mlp.fixed_config(kwargs["PRECISION"])
                configs = [{"blocks": {k: v for k, v in fixed.items() if k.isupper()},
                            "num_warps": fixed["num_warps"], "num_stages": fixed["num_stages"]}]
                configs += [{"blocks": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}
                            for c in mlp.configs_for(kwargs["PRECISION"], args[0].element_size())]
                add(mlp, "_gemm_kernel", label, args, kwargs, configs, width=width, precision=precision,
                    gemm=True, mask_a=bool(kwargs["MASK_A"]), hidden=label.split()[1] == "hidden")
    for dtype in (torch.float32, torch.bfloat16):
        for B in BATCHES:
            mu = _meta(B, Z_DIM, dtype=dtype)
            kl = _meta(B, dtype=torch.float32)
            for z, k in ((mu, kl), (mu, None), (None, kl)):
                for args, kwargs in _record(gaussian, "_gaussian_fwd_kernel", lambda: gaussian.gaussian_forward(mu, mu, mu, z, k)):
                    add(gaussian, "_gaussian_fwd_kernel", f"fwd B={B}", args, kwargs, [{}], precision=str(dtype)[6:])
            for gz, gkl in ((mu, kl), (mu, None), (None, kl)):
                for args, kwargs in _record(gaussian, "_gaussian_bwd_kernel",
                                            lambda: gaussian.gaussian_backward(mu, mu, mu, gz, gkl, mu, mu)):
                    add(gaussian, "_gaussian_bwd_kernel", f"bwd B={B}", args, kwargs, [{}], precision=str(dtype)[6:])
    for B in BATCHES:
        z = _meta(B, Z_DIM, dtype=torch.float32)
        for inverse in (False, True):
            for args, kwargs in _record(permute, "_permute_kernel", lambda: permute.permute_columns(z, z, z, inverse)):
                add(permute, "_permute_kernel", f"{'inverse' if inverse else 'forward'} B={B}", args, kwargs, [{}],
                    precision="fp32")
    return out


_WIDTH = {"b8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4, "f32": 4, "b64": 8,
          "u64": 8, "s64": 8, "f64": 8, "u8": 1, "s8": 1}


def analyse_ptx(ptx: str) -> dict:
    """Global-load widths (bytes per thread per instruction), cp.async sizes and the pipeline's
    prefetch depth (cp.async groups committed before the first wait)."""
    loads = set()
    for vec, ty in re.findall(r"\bld\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.([busf]\d+)\b", ptx):
        loads.add(int(vec or 1) * _WIDTH[ty])
    cp_sizes = {int(s, 0) for s in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)}
    first_wait = ptx.find("cp.async.wait_group")
    prologue = ptx[:first_wait] if first_wait >= 0 else ""
    return {"ld_global_bytes": sorted(loads), "cp_async_bytes": sorted(cp_sizes),
            "prefetch_groups": prologue.count("cp.async.commit_group")}


def _ptxas(ptx: str) -> dict:
    """Registers and spills from ``ptxas -v`` (the flags Triton's own build uses)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(TARGET.arch).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr).groups())
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads}


def compile_variant(v: dict) -> dict:
    import importlib

    fn = getattr(importlib.import_module(v["module"]), v["kernel"])
    row = {k: v[k] for k in v if k not in ("signature", "constexprs", "attrs", "module")}
    row["config"] = {k: v["constexprs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in v["constexprs"]}
    try:
        kernel = triton.compile(ASTSource(fn, v["signature"], v["constexprs"], v["attrs"]), target=TARGET,
                                options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]})
        ptx = kernel.asm["ptx"]
        row.update(shared=kernel.metadata.shared, **analyse_ptx(ptx), **_ptxas(ptx))
        # the GEMM's operand loads per stage: A and B (and Y, with the mask fused into A)
        if v.get("gemm"):
            row["stages"] = 1 + row["prefetch_groups"] // (3 if v["mask_a"] else 2)
    except Exception as exc:  # reported, and the test fails on it
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return row


def measure(jobs: int = 2) -> list[dict]:
    variants = _variants()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_variant, variants, chunksize=4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    rows = measure(args.jobs)
    for r in rows:
        if "error" in r:
            print(r["kernel"], r["label"], r.get("precision"), "ERROR", r["error"].splitlines()[0])
            continue
        print(f"{r['kernel']:22s} {r.get('precision', ''):5s} {r['label']:28s} {str(r['config']):44s} w{r['num_warps']} "
              f"s{r['num_stages']} regs {r['regs']:3d} spill {r['spill_stores']:3d}/{r['spill_loads']:3d} "
              f"shared {r['shared']:6d} ld {r['ld_global_bytes']} cp.async {r['cp_async_bytes']} stages {r.get('stages', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
