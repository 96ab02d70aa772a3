"""Fused ops vs eager torch vs torch.compile: `pytest bench/bench_ops.py --benchmark-only`.

One benchmark group per op and size, with one row per implementation of the same function:

* ``eager``    -- plain torch, as a model would write it;
* ``compiled`` -- ``torch.compile`` (Inductor, static shapes) of that same function;
* ``fastfvae`` -- the `fastfvae.ops` op: the Triton kernels on CUDA; on CPU the native library
  where it is loaded (`fastfvae.ops.native`), else the torch reference.

The ``native vs reference`` groups (CPU, skipped without the native library) time the same
public op twice: ``reference`` with ``FASTFVAE_NO_NATIVE=1`` and ``native``; their rows carry
``speedup_vs_reference``. The ``native vs torch`` groups time one FactorVAE update's
discriminator work (forward, TC input gradient, parameter gradients, Adam) of
`fastfvae.ops.native_mlp.NativeDiscriminator` and of the fast path's torch D in alternating
rounds of one benchmark; ``extra_info`` holds both minima and their ``ratio``. The ``native vs
torch, interleaved`` groups time each native op (B = 64, 128 and one large size) and the fast
step with and without ``FastOptions(native_d=True)`` the same way, at the thread count torch
runs (``OMP_NUM_THREADS``), with each side's CPU time / wall time (> 1: it ran threaded).

Each row's ``extra_info`` holds ``speedup_vs_eager`` and ``speedup_vs_compiled`` (min time per
call of that row / this row: the min, because shared CI machines are noisy); pytest-benchmark's
own table shows each row's ratio to the fastest in its group. On CUDA every call ends with a
synchronize. Sizes: the FactorVAE step (B = 64..512, z = 10, discriminator 6 x 1000) and one
large size per op (larger on CUDA).
"""

import time

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import skip_unless_bf16_runs, timing
from fastfvae.models.discriminator import Discriminator
from fastfvae.ops import FusedDiscriminator, gaussian_sample_kl, linear_leaky_relu, native, permute_dims

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
IMPLS = ["eager", "compiled", "fastfvae"]
_BEST: dict = {}  # (group, impl) -> min seconds per call


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _measure(benchmark, group: str, impl: str, fn) -> None:
    """Warm up (compiles, autotunes), size rounds to ~0.4 s, record the speedups."""
    fn()
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - t0, 1e-6)
    iterations = max(1, int(2e-3 / once))
    rounds = max(3, min(30, int(0.4 / (once * iterations))))

    def run():
        for _ in range(iterations):
            fn()
        _sync()

    benchmark.group = group
    benchmark.extra_info.update(impl=impl, device=DEVICE.type)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = timing(benchmark)
    if stats is None:  # --benchmark-disable
        return
    best = stats.min / iterations
    _BEST[(group, impl)] = best
    benchmark.extra_info["min_per_call_s"] = best
    for base in ("eager", "compiled", "reference"):
        if (group, base) in _BEST:
            benchmark.extra_info[f"speedup_vs_{base}"] = _BEST[(group, base)] / best


def _pick(impl: str, eager, fused):
    if impl == "eager":
        return eager
    if impl == "compiled":
        torch._dynamo.reset()
        return torch.compile(eager, dynamic=False)
    return fused


# --- permute_dims: forward, keys drawn in the timed call (the op's use in FactorVAE) ---------

def _permute_eager(z):
    return z.gather(0, torch.rand_like(z).argsort(dim=0))


def _permute_fused(z):
    return permute_dims(z, torch.rand_like(z))


PERMUTE_SIZES = [(64, 10), (512, 10), (8192, 1024) if ON_CUDA else (4096, 256)]


@pytest.mark.parametrize("impl", IMPLS + ["eager_randperm"])
@pytest.mark.parametrize("B, D", PERMUTE_SIZES, ids=lambda v: str(v))
def test_permute_dims(benchmark, B, D, impl):
    z = torch.randn(B, D, device=DEVICE)
    if impl == "eager_randperm":  # the paper code's loop: one randperm + index per dimension
        def fn():
            return torch.stack([z[torch.randperm(B, device=DEVICE), j] for j in range(D)], 1)
        if D > 64:
            pytest.skip("the per-dimension loop is for small D")
    else:
        step = _pick(impl, _permute_eager, _permute_fused)

        def fn():
            return step(z)
    _measure(benchmark, f"permute_dims fwd B={B} D={D}", impl, fn)


# --- reparameterised sample + KL, forward and backward ----------------------------------------

def _gaussian_eager(mu, logvar, eps):
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar).sum(-1)
    return z, kl


GAUSSIAN_SIZES = [(64, 10), (512, 10), (1 << 20, 32) if ON_CUDA else (65536, 32)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, D", GAUSSIAN_SIZES, ids=lambda v: str(v))
def test_gaussian_sample_kl(benchmark, B, D, impl):
    mu, logvar, eps = (torch.randn(B, D, device=DEVICE) for _ in range(3))
    mu.requires_grad_()
    logvar.requires_grad_()
    gz, gkl = torch.randn(B, D, device=DEVICE), torch.randn(B, device=DEVICE)
    step = _pick(impl, _gaussian_eager, gaussian_sample_kl)

    def fn():
        z, kl = step(mu, logvar, eps)
        return torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    _measure(benchmark, f"gaussian_sample_kl fwd+bwd B={B} D={D}", impl, fn)


# --- the discriminator MLP, forward and backward ----------------------------------------------

DISC_BATCHES = [64, 128, 512] + ([4096] if ON_CUDA else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", DISC_BATCHES)
def test_discriminator(benchmark, B, impl):
    torch.manual_seed(0)
    model = (FusedDiscriminator() if impl == "fastfvae" else Discriminator()).to(DEVICE)
    params = list(model.parameters())
    step = model if impl != "compiled" else _pick(impl, model, None)
    z = torch.randn(B, 10, device=DEVICE)
    target = torch.randint(0, 2, (B,), device=DEVICE)

    def fn():
        return torch.autograd.grad(F.cross_entropy(step(z), target), params)
    _measure(benchmark, f"discriminator 6x1000 fwd+bwd B={B}", impl, fn)


def _layer_eager(x, w, b):
    return F.leaky_relu(F.linear(x, w, b), 0.2)


def _layer_fused(x, w, b):
    return linear_leaky_relu(x, w, b, 0.2)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_leaky_relu_large(benchmark, impl):
    M = 8192 if ON_CUDA else 1024
    x = torch.randn(M, 1000, device=DEVICE, requires_grad=True)
    w = (torch.randn(1000, 1000, device=DEVICE) / 1000**0.5).requires_grad_()
    b = torch.randn(1000, device=DEVICE, requires_grad=True)
    g = torch.randn(M, 1000, device=DEVICE)
    step = _pick(impl, _layer_eager, _layer_fused)

    def fn():
        return torch.autograd.grad(step(x, w, b), (x, w, b), g)
    _measure(benchmark, f"linear_leaky_relu fwd+bwd {M}x1000x1000", impl, fn)


# --- native CPU library vs the torch reference, side by side ----------------------------------

NATIVE_IMPLS = ["reference", "native"]


def _native_or_skip(monkeypatch, impl: str) -> None:
    """Skip without the library; the reference row runs the same op with FASTFVAE_NO_NATIVE=1."""
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.delenv("FASTFVAE_TRITON_ON_CPU", raising=False)
    runs_native, why = native.status()
    if not runs_native:
        pytest.skip(f"native vs reference: {why}")
    if impl == "reference":
        monkeypatch.setenv(native.DISABLE_ENV, "1")


@pytest.mark.parametrize("impl", NATIVE_IMPLS)
@pytest.mark.parametrize("B", [64, 1024])
def test_native_permute_dims(benchmark, monkeypatch, B, impl):
    _native_or_skip(monkeypatch, impl)
    z, keys = torch.randn(B, 10), torch.rand(B, 10)
    _measure(benchmark, f"native vs reference (CPU): permute_dims fwd (keys given) B={B} D=10", impl,
             lambda: permute_dims(z, keys))


@pytest.mark.parametrize("impl", NATIVE_IMPLS)
@pytest.mark.parametrize("B", [64, 1024])
def test_native_gaussian_sample_kl(benchmark, monkeypatch, B, impl):
    _native_or_skip(monkeypatch, impl)
    mu, logvar, eps = (torch.randn(B, 10) for _ in range(3))
    mu.requires_grad_()
    logvar.requires_grad_()
    gz, gkl = torch.randn(B, 10), torch.randn(B)

    def fn():
        z, kl = gaussian_sample_kl(mu, logvar, eps)
        return torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    _measure(benchmark, f"native vs reference (CPU): gaussian_sample_kl fwd+bwd B={B} D=10", impl, fn)


@pytest.mark.parametrize("impl", NATIVE_IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_native_linear_leaky_relu(benchmark, monkeypatch, dtype, impl):
    """One 1000 x 1000 layer of D at 2B = 128 rows, forward + both backward ops (the public op:
    the weight is packed at every call, as any GEMM library must for a weight it sees once)."""
    _native_or_skip(monkeypatch, impl)
    skip_unless_bf16_runs(dtype)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = torch.randn(128, 1000).to(dt).requires_grad_()
    w = (torch.randn(1000, 1000) / 1000**0.5).to(dt).requires_grad_()
    b = torch.randn(1000).to(dt).requires_grad_()
    g = torch.randn(128, 1000).to(dt)
    _measure(benchmark, f"native vs reference (CPU): linear_leaky_relu fwd+bwd 128x1000x1000 {dtype}", impl,
             lambda: torch.autograd.grad(linear_leaky_relu(x, w, b, 0.2), (x, w, b), g))


# --- the whole discriminator update: native vs the fast path's torch D, interleaved -----------

def _torch_d_update(dtype: torch.dtype, batch: int):
    """The fast CPU step's D (fastfvae.fast: D written out by hand, and in bf16 FlatAdam's one
    compiled kernel over flat buffers; in fp32 torch's fused Adam): one update's D work."""
    from fastfvae.fast.disc_by_hand import DiscriminatorByHand
    from fastfvae.fast.flat_adam import FlatAdam

    torch.manual_seed(0)
    disc = Discriminator()
    params = list(disc.parameters())
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9), fused=True)
    d = DiscriminatorByHand(disc, 2 * batch, dtype)
    flat = None
    if dtype == torch.bfloat16:
        flat = FlatAdam(opt, params, dtype)
        d.use_flat(flat)

    def update(z, g_tc, g_d):
        d.forward(z)
        d.input_grad(g_tc)
        d.param_grads(g_d)
        if flat is not None:
            flat.step()
            d.weights_written()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            d.parameters_changed()
    return update


def _native_d_update(dtype: torch.dtype, batch: int):
    from fastfvae.ops.native_mlp import NativeDiscriminator

    torch.manual_seed(0)
    disc = Discriminator()
    opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    d = NativeDiscriminator(disc, 2 * batch, dtype, opt)

    def update(z, g_tc, g_d):
        d.forward(z)
        d.input_grad(g_tc)
        d.update(g_d)
    update.discriminator = d  # for its last_shared_rows
    return update


def _factorvae_logit_grads(batch: int, gen: torch.Generator, gamma: float = 35.0):
    """The two logit gradients of a FactorVAE step (Kim & Mnih 2018) on random logits: the TC
    term's, gamma/B * (1, -1) on the codes' rows, and D's two-class cross-entropy's on both
    halves (codes class 0, permuted codes class 1), as autograd forms them."""
    logits = torch.randn(2 * batch, 2, generator=gen).requires_grad_()
    labels = torch.cat([torch.zeros(batch), torch.ones(batch)]).long()
    tc = gamma * (logits[:batch, 0] - logits[:batch, 1]).mean()
    g_tc, = torch.autograd.grad(tc, logits)
    d_loss = 0.5 * (torch.nn.functional.cross_entropy(logits[:batch], labels[:batch])
                    + torch.nn.functional.cross_entropy(logits[batch:], labels[batch:]))
    g_d, = torch.autograd.grad(d_loss, logits)
    return g_tc[:batch].contiguous(), g_d


@pytest.mark.parametrize("B", [64, 128])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_native_discriminator_vs_torch(benchmark, monkeypatch, dtype, B):
    """D's work in one FactorVAE update at the paper's sizes (Kim & Mnih 2018: 6 x 1000,
    B = 64): forward of both halves (2B = 128 rows), the TC half's input gradient, the
    parameter gradients of both halves and Adam -- the native D (`NativeDiscriminator`:
    forward, input_grad, update) against the fast path's torch D, in alternating rounds of one
    run (the machine is shared), ``ratio`` = min torch time / min native time."""
    from fastfvae.fast.allocator import keep_freed_memory

    _native_or_skip(monkeypatch, "native")
    skip_unless_bf16_runs(dtype)
    keep_freed_memory()  # as the fast CPU step does, for both
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2 * B, 10, generator=gen)
    g_tc, g_d = _factorvae_logit_grads(B, gen)
    impls = {"torch": _torch_d_update(dt, B), "native": _native_d_update(dt, B)}
    for fn in impls.values():  # warm up (FlatAdam compiles its kernel)
        fn(z, g_tc, g_d)
        fn(z, g_tc, g_d)
    best = {name: float("inf") for name in impls}
    cpu = {name: 0.0 for name in impls}
    wall = {name: 0.0 for name in impls}

    def one_round():
        for name, fn in impls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(z, g_tc, g_d)
            dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            cpu[name] += time.process_time() - c0
            wall[name] += dt

    benchmark.group = f"native vs torch (CPU): discriminator update 6x1000 2B={2 * B} {dtype}"
    benchmark.extra_info.update(impl="torch+native rounds", device="cpu", threads=torch.get_num_threads())
    benchmark.pedantic(one_round, rounds=15, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(torch_min_s=best["torch"], native_min_s=best["native"],
                                ratio=best["torch"] / best["native"],
                                native_shared_rows=impls["native"].discriminator.last_shared_rows,
                                **{f"{n}_cpu_per_wall": cpu[n] / wall[n] for n in impls})
    print(f"\n{benchmark.group} [{torch.get_num_threads()} threads]: torch {best['torch'] * 1e3:.2f} ms "
          f"(cpu/wall {cpu['torch'] / wall['torch']:.2f}), native {best['native'] * 1e3:.2f} ms "
          f"(cpu/wall {cpu['native'] / wall['native']:.2f}), ratio {best['torch'] / best['native']:.2f}, "
          f"shared rows {impls['native'].discriminator.last_shared_rows}")


# --- each native op and the fast step's native_d, interleaved, at the set thread count --------

def _interleaved(benchmark, group: str, impls: dict, rounds: int = 15, calls: int | None = None) -> None:
    """Alternating rounds of ``impls`` (name -> (set_up, fn)); per name the min time per call
    and the CPU time / wall time over all rounds; ``ratio`` = reference (first) min / native
    (second) min. ``set_up`` switches the implementation in (outside the timed calls)."""
    names = list(impls)
    for set_up, fn in impls.values():  # warm up
        set_up()
        fn()
        fn()
    if calls is None:
        set_up, fn = impls[names[0]]
        set_up()
        t0 = time.perf_counter()
        fn()
        calls = max(1, min(200, int(5e-3 / max(time.perf_counter() - t0, 1e-7))))
    best = {n: float("inf") for n in names}
    wall = {n: 0.0 for n in names}
    cpu = {n: 0.0 for n in names}
    count = [0]

    def one_round():
        order = names if count[0] % 2 == 0 else names[::-1]
        count[0] += 1
        for n in order:
            set_up, fn = impls[n]
            set_up()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            dt = time.perf_counter() - t0
            cpu[n] += time.process_time() - c0
            wall[n] += dt
            best[n] = min(best[n], dt / calls)

    benchmark.group = group
    benchmark.extra_info.update(impl=" + ".join(names), device="cpu", threads=torch.get_num_threads())
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    ref, nat = names
    benchmark.extra_info.update({f"{n}_min_s": best[n] for n in names})
    benchmark.extra_info.update({f"{n}_cpu_per_wall": cpu[n] / wall[n] for n in names})
    benchmark.extra_info["ratio"] = best[ref] / best[nat]
    print(f"\n{group} [{torch.get_num_threads()} threads]: " + ", ".join(
        f"{n} {best[n] * 1e3:.3f} ms (cpu/wall {cpu[n] / wall[n]:.2f})" for n in names)
        + f", ratio {best[ref] / best[nat]:.2f}")


def _switch(monkeypatch, reference: bool):
    return lambda: (monkeypatch.setenv(native.DISABLE_ENV, "1") if reference
                    else monkeypatch.delenv(native.DISABLE_ENV, raising=False))


def _op_case(op: str, B: int):
    """The timed call of one public op at batch B (its native dispatch decided per call)."""
    gen = torch.Generator().manual_seed(B)
    if op == "permute_dims":
        z, keys = torch.randn(B, 10, generator=gen), torch.rand(B, 10, generator=gen)
        leaf = z.requires_grad_()
        g = torch.randn(B, 10, generator=gen)
        return lambda: torch.autograd.grad(permute_dims(leaf, keys), leaf, g)
    if op == "gaussian":
        mu, logvar, eps = (torch.randn(B, 10, generator=gen).requires_grad_() for _ in range(3))
        gz, gkl = torch.randn(B, 10, generator=gen), torch.randn(B, generator=gen)

        def fn():
            z, kl = gaussian_sample_kl(mu, logvar, eps)
            return torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
        return fn
    dt = torch.bfloat16 if op.endswith("bf16") else torch.float32
    x = torch.randn(B, 1000, generator=gen).to(dt).requires_grad_()
    w = (torch.randn(1000, 1000, generator=gen) / 1000**0.5).to(dt).requires_grad_()
    b = torch.randn(1000, generator=gen).to(dt).requires_grad_()
    g = torch.randn(B, 1000, generator=gen).to(dt)
    return lambda: torch.autograd.grad(linear_leaky_relu(x, w, b, 0.2), (x, w, b), g)


LARGE = {"permute_dims": 131072, "gaussian": 131072, "linear_leaky_relu fp32": 1024, "linear_leaky_relu bf16": 1024}


@pytest.mark.parametrize("B", [64, 128, "large"])
@pytest.mark.parametrize("op", list(LARGE))
def test_native_op_interleaved(benchmark, monkeypatch, op, B):
    """The public op with the native library against the torch reference (FASTFVAE_NO_NATIVE=1)
    in alternating rounds: permute_dims fwd+bwd [B, 10] (keys given), gaussian_sample_kl fwd+bwd
    [B, 10], linear_leaky_relu fwd+bwd B x 1000 x 1000 (bf16 on the native kernel, which the
    public op leaves to the reference by default)."""
    import fastfvae.ops.mlp as mlp_module

    _native_or_skip(monkeypatch, "native")
    monkeypatch.setattr(mlp_module, "NATIVE_MLP_DTYPES", mlp_module.NATIVE_KERNEL_DTYPES)
    rows = LARGE[op] if B == "large" else B
    fn = _op_case(op, rows)
    _interleaved(benchmark, f"native vs torch, interleaved (CPU): {op} fwd+bwd B={rows}",
                 {"reference": (_switch(monkeypatch, True), fn), "native": (_switch(monkeypatch, False), fn)})


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fast_step_native_d_interleaved(benchmark, monkeypatch, precision):
    """The fast CPU step (dSprites-sized random bits, batch 64, the paper's D) with
    FastOptions(native_d=True) against the default torch D, two steppers on identical states,
    the same step inputs, alternating rounds of 4 steps (the times printed are per 4 steps)."""
    from bench.conftest import random_bits_dsprites
    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.train.config import TrainConfig
    from fastfvae.train.reference import draw_step_inputs
    from fastfvae.train.state import TrainState

    _native_or_skip(monkeypatch, "native")
    skip_unless_bf16_runs(precision)
    data = random_bits_dsprites(4096)
    cfg = TrainConfig(batch_size=64, d_steps=1)
    steppers = {}
    for name, native_d in (("torch_d", False), ("native_d", True)):
        torch.manual_seed(0)
        state = TrainState.create(cfg, len(data), torch.device("cpu"))
        steppers[name] = FastStep(state, data, FastOptions(precision=precision, native_d=native_d))
    state = TrainState.create(cfg, len(data), torch.device("cpu"))
    inputs = [draw_step_inputs(cfg, state.sampler, state.generator) for _ in range(4)]

    def steps(stepper):
        def fn():
            for inp in inputs:
                stepper(inp)
        return fn

    _interleaved(benchmark, f"native vs torch, interleaved (CPU): fast step B=64 {precision}, native_d",
                 {name: (lambda: None, steps(st)) for name, st in steppers.items()}, rounds=8, calls=1)
