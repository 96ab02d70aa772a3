"""Every Triton kernel variant the fast step can launch, compiled for sm_90 (H100/H200) on CPU:
it compiles, it does not spill registers, its shared memory fits the H200's, and D's GEMMs at
widths 1000 (the paper's) and 1024 load their operands with 16-byte cp.async in >= 2 stages.

`tests/sm90_kernels.py` builds the variants from the real launchers (the fast step's shapes:
D 6 x 1000 and 6 x 1024 on z 10, batches 64 .. 2048, fp32 / TF32 / bf16, every autotuner config
of each kind plus the FASTFVAE_AUTOTUNE=0 one) and compiles them in a subprocess (a compiled
kernel needs TRITON_INTERPRET unset). A few minutes on 2 cores, so `-m slow`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow
#: the H200's (and H100's) shared memory per block: 228 KB per SM, 227 KB for one block
SHARED_LIMIT = 227 * 1024


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sm90") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "sm90_kernels.py"), "--json", str(out), "--jobs",
                           str(min(4, os.cpu_count() or 1))], env=env, cwd=HERE.parent, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _name(r: dict) -> str:
    return f"{r['kernel']} {r.get('precision')} {r['label']} {r['config']} w{r['num_warps']} s{r['num_stages']}"


def test_every_variant_compiles(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_gemm_kernel", "_gaussian_fwd_kernel", "_gaussian_bwd_kernel", "_permute_kernel"}
    gemm = [r for r in compiled if r["kernel"] == "_gemm_kernel"]
    # fwd / dgrad / wgrad of the first, hidden and last layer at 1000, hidden at 1024; 3 precisions
    assert {r["label"].split(" B=")[0] for r in gemm} >= {"fwd hidden 1000->1000", "dgrad hidden 1000->1000",
                                                          "wgrad hidden 1000->1000", "fwd first 10->1000",
                                                          "dgrad last 1000->2", "wgrad hidden 1024->1024"}
    assert {r["precision"] for r in gemm} == {"fp32", "tf32", "bf16"}
    errors = [f"{_name(r)}: {r['error'].splitlines()[0]}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_variant_spills_registers(compiled):
    spills = [f"{_name(r)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads, {r['regs']} regs"
              for r in compiled if "error" not in r and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits_the_h200(compiled):
    over = [f"{_name(r)}: {r['shared']} B" for r in compiled if "error" not in r and r["shared"] > SHARED_LIMIT]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("width", [1000, 1024])
def test_hidden_gemms_load_16_bytes_in_pipelined_stages(compiled, width):
    """D's hidden-layer GEMMs (fwd, dgrad + mask, wgrad + mask + bias grad) in fp32 and bf16:
    every operand tile arrives by 16-byte cp.async, >= 2 stages deep; the only other global
    loads are the forward epilogue's bias vector (once per tile)."""
    rows = [r for r in compiled if r["kernel"] == "_gemm_kernel" and r.get("width") == width and r["hidden"]
            and r["precision"] in ("fp32", "bf16") and "error" not in r]
    assert len(rows) >= 2 * 3 * 6  # both precisions, three GEMMs, every config
    bad = []
    for r in rows:
        if r["cp_async_bytes"] != [16] or r["stages"] < 2:
            bad.append(f"{_name(r)}: cp.async {r['cp_async_bytes']} B, {r['stages']} stages")
        if r["ld_global_bytes"] and not r["label"].startswith("fwd"):
            bad.append(f"{_name(r)}: plain global loads of {r['ld_global_bytes']} B")
    assert not bad, "\n".join(bad)
