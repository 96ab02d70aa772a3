"""The fast step's default discriminator on CPU: the native one (`fastfvae.ops.native_mlp`)
where the library is loaded with a GEMM variant it measured faster on (`DEFAULT_GEMM_ISAS`) and
D and its optimiser fit it, else the torch by-hand D, quietly;
``native_d=True`` asks for it and says why it cannot, ``native_d=False`` keeps the torch D.
The library comes from tests/test_ops_native.py's fixtures (these tests skip without a compiler)."""

import pytest
from cpu_bf16 import bf16_param
import torch
from test_fast_step import small_cfg
from test_methods_registry import _factorvae_with, registry  # noqa: F401  (fixture)
from test_ops_native import native_lib, native_on  # noqa: F401  (fixtures)
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

from fastfvae import methods
from fastfvae.errors import FastFVAEError
from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.disc_by_hand import DiscriminatorByHand
from fastfvae.ops import native
from fastfvae.ops import native_mlp
from fastfvae.ops.native_mlp import NativeDiscriminator
from fastfvae.train.reference import draw_step_inputs
from fastfvae.train.state import TrainState


@pytest.fixture(autouse=True)
def native_d_default_on_this_gemm(monkeypatch):
    """The native D as the default on whatever GEMM variant this CPU runs (the AVX2 and scalar
    ones compute the same sums, slower), so these tests cover the choice on any machine; what
    the default is per variant: `test_the_native_d_is_the_default_only_on_the_gemm_variants_it_beats_torch_on`."""
    monkeypatch.setattr(native_mlp, "DEFAULT_GEMM_ISAS", (*native_mlp.DEFAULT_GEMM_ISAS, native.gemm_isa()))


def _step(cfg, **options) -> FastStep:
    return FastStep(TrainState.create(cfg, 512), small_dsprites(512), FastOptions(**options))


@pytest.mark.parametrize("precision", ["fp32", bf16_param("bf16", id="bf16")])
def test_the_native_discriminator_is_the_cpu_default_where_the_library_is_loaded(native_on, precision):
    step = _step(small_cfg(), precision=precision)
    assert step.options.native_d is True
    assert isinstance(step._d_by_hand, NativeDiscriminator)
    step(draw_step_inputs(step.cfg, step.state.sampler, step.state.generator))
    assert "mlp_update" in native_on.called  # D's update ran natively


@pytest.mark.parametrize("isa,default", [("avx512_bf16", True), ("avx512", True), ("avx2", False), ("scalar", False)])
def test_the_native_d_is_the_default_only_on_the_gemm_variants_it_beats_torch_on(native_on, monkeypatch, isa,
                                                                                  default):
    monkeypatch.setattr(native_mlp, "DEFAULT_GEMM_ISAS", ("avx512_bf16", "avx512"))
    monkeypatch.setattr(native, "gemm_isa", lambda: isa)
    assert native_mlp.default_here() is default
    step = _step(small_cfg())
    assert step.options.native_d is default
    assert isinstance(step._d_by_hand, NativeDiscriminator if default else DiscriminatorByHand)
    asked = _step(small_cfg(), native_d=True)  # asked for, it runs on any variant
    assert asked.options.native_d is True and isinstance(asked._d_by_hand, NativeDiscriminator)


def test_native_d_false_keeps_the_torch_discriminator(native_on):
    step = _step(small_cfg(), native_d=False)
    assert step.options.native_d is False and isinstance(step._d_by_hand, DiscriminatorByHand)


def test_without_the_library_the_default_is_the_torch_discriminator(native_on, monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    step = _step(small_cfg())
    assert step.options.native_d is False and isinstance(step._d_by_hand, DiscriminatorByHand)


def test_an_optimiser_the_native_adam_cannot_run_falls_back_unless_asked_for(native_on, registry):  # noqa: F811
    """A plug-in adversary optimiser (SGD) runs as the method built it: by default the step keeps
    the torch D for it; asking for the native D is one line naming what it needs."""
    methods.register(_factorvae_with("sgd"))
    cfg = small_cfg(model="fvae_sgd")
    step = _step(cfg)
    assert step.options.native_d is False and isinstance(step._d_by_hand, DiscriminatorByHand)
    with pytest.raises(FastFVAEError, match="plain torch Adam"):
        _step(cfg, native_d=True)


def test_a_method_without_an_adversary_has_no_native_discriminator(native_on):
    step = _step(small_cfg(model="betavae"))
    assert step.options.native_d is False and step._d_by_hand is None


def test_the_gpu_and_compiled_steps_resolve_native_d_off():
    """The native D is the by-hand CPU step's: elsewhere the default resolves to off, and asking is refused."""
    opts = FastOptions(compile="model").resolved(torch.device("cpu"))
    assert opts.native_d is False
    with pytest.raises(FastFVAEError, match="native_d needs the by-hand CPU step"):
        FastOptions(native_d=True, compile="model").resolved(torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", bf16_param("bf16", id="bf16")])
def test_d_update_reuses_the_tc_backward_in_the_step(native_on, precision):
    """In the fast step D's update takes the codes' rows from the TC term's backward (the two
    upstream gradients are parallel on those rows: tests/test_ops_mlp_native_shared.py); with
    d_steps = 2 the second update has fresh logits and runs the whole backward."""
    for d_steps, shared in ((1, small_cfg().batch_size), (2, 0)):
        step = _step(small_cfg(d_steps=d_steps), precision=precision)
        step(draw_step_inputs(step.cfg, step.state.sampler, step.state.generator))
        assert step._d_by_hand.last_shared_rows == shared
