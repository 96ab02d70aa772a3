"""The ``backend`` fixture shared by the fused-op tests (tests/test_ops_*.py).

Each op test runs once per backend:

* ``torch``  -- CPU tensors, the torch reference path;
* ``interp`` -- CPU tensors through the real Triton kernels under Triton's interpreter
  (``FASTFVAE_TRITON_ON_CPU=1``; tests/conftest.py sets ``TRITON_INTERPRET=1`` when there is
  no CUDA, so this is skipped on GPU machines, where ``cuda`` covers the kernels);
* ``cuda``   -- CUDA tensors, the Triton kernels compiled for the GPU (skipped without CUDA).
"""

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

from fastfvae.ops.dispatch import interpreting, kernels

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = interpreting()


@dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    @property
    def runs_kernels(self) -> bool:
        return self.name != "torch"

    @contextlib.contextmanager
    def expect_kernel(self, monkeypatch, module: str, launcher: str):
        """Count calls of ``fastfvae.kernels.<module>.<launcher>``; on exit, check the dispatch."""
        mod = kernels(module)
        original = getattr(mod, launcher)
        calls = []

        def spy(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(mod, launcher, spy)
        yield calls
        monkeypatch.setattr(mod, launcher, original)
        assert bool(calls) == self.runs_kernels, f"{self.name}: kernel {module}.{launcher} calls = {len(calls)}"


_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("interp", id="interp", marks=pytest.mark.skipif(
        not INTERPRETING, reason="Triton interpreter off (TRITON_INTERPRET=1 is set only without CUDA)")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")),
]


@pytest.fixture(params=_PARAMS)
def backend(request, monkeypatch) -> Backend:
    name = request.param
    monkeypatch.delenv("FASTFVAE_NO_TRITON", raising=False)
    if name == "interp":
        monkeypatch.setenv("FASTFVAE_TRITON_ON_CPU", "1")
    else:
        monkeypatch.delenv("FASTFVAE_TRITON_ON_CPU", raising=False)
    return Backend(name, torch.device("cuda" if name == "cuda" else "cpu"))


@pytest.fixture(params=[pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"))])
def cuda_backend(request, monkeypatch) -> Backend:
    """CUDA only: for checks the interpreter cannot do (bfloat16 tl.dot, large sizes)."""
    monkeypatch.delenv("FASTFVAE_NO_TRITON", raising=False)
    return Backend("cuda", torch.device("cuda"))


def opcheck_gaussian_ops(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> None:
    """`torch.library.opcheck` on every Gaussian op (forward forms and the shared backward, with
    and without the sample's gradient), on whichever implementation the dispatch picks."""
    ops = torch.ops.fastfvae
    torch.library.opcheck(ops.gaussian_sample_kl.default, (mu, logvar, eps))
    torch.library.opcheck(ops.reparameterize.default, (mu, logvar, eps))
    torch.library.opcheck(ops.gaussian_kl.default, (mu, logvar))
    m, lv, e = mu.detach(), logvar.detach(), eps.detach()
    torch.library.opcheck(ops.gaussian_backward.default, (m, lv, e, torch.randn_like(m), torch.randn_like(m[:, 0])))
    torch.library.opcheck(ops.gaussian_backward.default, (m, lv, None, None, torch.randn_like(m[:, 0])))


def graph_breaks_of(fn, *args) -> tuple[int, int, object]:
    """(graph breaks, graphs, output) of ``torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)``.

    The output's ``.sum()`` is back-propagated so the backward graph is traced too.
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return breaks, graphs, out


_AOT_SCRIPT = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import importlib
module = importlib.import_module("fastfvae.kernels." + sys.argv[1])
kernel = getattr(module, sys.argv[2])
for line in sys.stdin.read().strip().splitlines():
    signature, constexprs = eval(line)
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def compile_for_sm90(module: str, kernel: str, variants: list) -> None:
    """Compile kernel variants ((signature, constexprs) pairs) to sm_90 machine code, no GPU needed.

    Catches what the interpreter does not check (non-constexpr globals, types, register and
    shared-memory limits). Runs in a subprocess without TRITON_INTERPRET.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    lines = "\n".join(repr(v) for v in variants)
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, module, kernel], input=lines, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
