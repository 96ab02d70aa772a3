"""The method registry: the built-ins in order, one-line errors for bad names and values, and a
method registered from outside fastfvae (here, from this file) used like a built-in."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from fastfvae import methods
from fastfvae.errors import FastFVAEError
from fastfvae.methods.base import Hyperparameters, Method, at_least, hparam
from cpu_bf16 import bf16_param

BUILTINS = ("vae", "betavae", "annealedvae", "factorvae", "dipvae", "betatcvae")


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test, so a method it registers does not outlive it."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.names()  # built-ins loaded into the copy (a no-op once imported)
    return methods._REGISTRY


def one_line_error(call, *parts: str) -> str:
    with pytest.raises(FastFVAEError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)
    return message


def test_names_lists_the_six_builtins_in_order():
    assert methods.names()[:6] == BUILTINS
    assert methods.BUILTIN == BUILTINS
    for name in BUILTINS:
        cls = methods.get(name)
        assert cls.name == name and issubclass(cls, Method) and cls.summary and cls.citation


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_builds_with_its_defaults_and_documents_them(name):
    method = methods.make(name)
    assert method.name == name
    fields = dataclasses.fields(method.hparams)
    for f in fields:
        assert f.metadata["help"] and f.metadata["source"], (name, f.name)
        assert f.metadata["check"] is not None, (name, f.name)
        assert getattr(method, f.name) == f.default  # hyperparameters read as attributes
    for f in fields:  # frozen: a run's hyperparameters are fixed once validated
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(method.hparams, f.name, f.default)


def test_dlib_hyperparameter_names():
    """disentanglement_lib's gin names, so a dlib config reads across (vae.beta, annealed_vae.*,
    dip_vae.*, beta_tc_vae.beta)."""
    declared = {n: {f.name for f in dataclasses.fields(methods.get(n).Hparams)} for n in BUILTINS}
    assert declared["vae"] == set()
    assert declared["betavae"] == {"beta"}
    assert declared["annealedvae"] == {"gamma", "c_max", "iteration_threshold"}
    assert declared["dipvae"] == {"lambda_od", "lambda_d_factor", "dip_type"}
    assert declared["betatcvae"] == {"beta"}
    assert "gamma" in declared["factorvae"]
    # the values dlib's unsupervised_study_v1 sweep holds fixed
    assert methods.make("annealedvae").gamma == 1000.0
    assert methods.make("annealedvae").iteration_threshold == 100_000
    assert methods.make("dipvae").dip_type == "i"  # dlib's DIPVAE default


def test_unknown_name():
    message = one_line_error(lambda: methods.make("betavea"), "'betavea'")
    for name in BUILTINS:
        assert name in message
    one_line_error(lambda: methods.get(""), "unknown model")


@pytest.mark.parametrize("name,hparams,flag", [
    ("betavae", {"gamma": 2.0}, "--gamma"),
    ("vae", {"beta": 4.0}, "--beta"),
    ("dipvae", {"lambda_d": 5.0}, "--lambda-d"),
    ("annealedvae", {"c_max": 5.0, "capacity": 5.0}, "--capacity"),
])
def test_unknown_hyperparameter(name, hparams, flag):
    one_line_error(lambda: methods.make(name, **hparams), flag, name)


@pytest.mark.parametrize("name,hparams,field", [
    ("betavae", {"beta": -1.0}, "beta"),
    ("betavae", {"beta": math.nan}, "beta"),
    ("betavae", {"beta": "4"}, "beta"),
    ("betatcvae", {"beta": -0.5}, "beta"),
    ("betatcvae", {"beta": math.inf}, "beta"),
    ("dipvae", {"dip_type": "iii"}, "dip-type"),
    ("dipvae", {"dip_type": "I"}, "dip-type"),
    ("dipvae", {"lambda_od": -1.0}, "lambda-od"),
    ("dipvae", {"lambda_d_factor": -2.0}, "lambda-d-factor"),
    ("annealedvae", {"iteration_threshold": 0}, "iteration-threshold"),
    ("annealedvae", {"iteration_threshold": True}, "iteration-threshold"),
    ("annealedvae", {"iteration_threshold": 2.5}, "iteration-threshold"),
    ("annealedvae", {"iteration_threshold": -10}, "iteration-threshold"),
    ("annealedvae", {"c_max": -1.0}, "c-max"),
    ("annealedvae", {"gamma": -1000.0}, "gamma"),
    ("factorvae", {"gamma": -1.0}, "gamma"),
])
def test_bad_value(name, hparams, field):
    (value,) = hparams.values()
    message = one_line_error(lambda: methods.make(name, **hparams), f"{field} must be", repr(value))
    assert message.startswith(field), message


def test_good_edge_values_pass():
    assert methods.make("annealedvae", iteration_threshold=1, c_max=0.0, gamma=0.0).iteration_threshold == 1
    assert methods.make("betavae", beta=0).beta == 0
    assert methods.make("dipvae", dip_type="ii").dip_type == "ii"


@dataclass(frozen=True)
class HalfKLHparams(Hyperparameters):
    weight: float = hparam(0.5, "KL weight, >= 0", at_least(0.0), "this test")


class HalfKL(Method):
    """A method from outside fastfvae: ``weight * kl``."""
    name = "halfkl"
    summary = "weight * KL"
    citation = "this test"
    Hparams = HalfKLHparams

    def regularizer(self, kl, mu, logvar, z, step):
        return self.hparams.weight * kl


def test_a_registered_method_is_listed_and_built(registry):
    assert "halfkl" not in methods.names()
    assert methods.register(HalfKL) is HalfKL
    assert methods.names() == BUILTINS + ("halfkl",)
    method = methods.make("halfkl", weight=3.0)
    assert isinstance(method, HalfKL) and method.weight == 3.0
    x = torch.zeros(2, 3)
    assert method.regularizer(torch.tensor(2.0), x, x, x, 0).item() == 6.0
    assert methods.make("halfkl").weight == 0.5
    one_line_error(lambda: methods.make("halfkl", weight=-1.0), "weight must be")
    one_line_error(lambda: methods.make("halfkl", beta=1.0), "--beta", "halfkl")
    # registering the same class again (a module imported twice) is harmless
    methods.register(HalfKL)
    assert methods.names().count("halfkl") == 1


def test_a_taken_name_cannot_be_registered_again(registry):
    class AnotherBetaVAE(Method):
        name = "betavae"
        Hparams = HalfKLHparams

        def regularizer(self, kl, mu, logvar, z, step):
            return kl

    with pytest.raises(ValueError, match="'betavae' is taken"):
        methods.register(AnotherBetaVAE)
    assert methods.get("betavae").__name__ == "BetaVAE"  # the built-in is left in place

    methods.register(HalfKL)

    class OtherHalfKL(HalfKL):
        pass

    with pytest.raises(ValueError, match="'halfkl' is taken"):
        methods.register(OtherHalfKL)
    assert methods.get("halfkl") is HalfKL


def test_a_method_needs_a_name(registry):
    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="no name"):
        methods.register(Nameless)
    assert "" not in methods.names()


# --- a hyperparameter named like a run setting ------------------------------------------------
def _clashing_method(field: str) -> type[Method]:
    """A method whose one hyperparameter is called ``field``."""
    hparams = dataclasses.make_dataclass(
        "ClashHparams", [(field, int, hparam(3, "a clashing name", at_least(0, integer=True), "this test"))],
        bases=(Hyperparameters,), frozen=True)

    class Clash(HalfKL):
        name = "clash"
        Hparams = hparams

        def regularizer(self, kl, mu, logvar, z, step):
            return kl

    return Clash


@pytest.mark.parametrize("field", ["steps", "batch_size", "z_dim", "model", "hparams", "seed"])
def test_a_hyperparameter_named_like_a_config_field_is_refused_when_registered(registry, field):
    """TrainConfig routes a keyword that is a field to the field, and the CLI's flag of that name
    is the field's: the hyperparameter could never be set, so registering the method fails."""
    one_line_error(lambda: methods.register(_clashing_method(field)), "'clash'", f"hyperparameter {field!r}",
                   f"TrainConfig field {field!r}")
    assert "clash" not in methods.names()


@pytest.mark.parametrize("flag", ["resume", "no_progress", "reference", "no_fast"])
def test_a_hyperparameter_named_like_a_train_flag_is_refused_when_registered(registry, flag):
    one_line_error(lambda: methods.register(_clashing_method(flag)), "'clash'", f"hyperparameter {flag!r}",
                   "--" + flag.replace("_", "-"))


def test_a_clashing_method_put_in_the_registry_by_hand_cannot_build_a_config(registry):
    from fastfvae.train.config import TrainConfig

    registry["clash"] = _clashing_method("batch_size")  # past `register`'s check
    one_line_error(lambda: TrainConfig(model="clash", batch_size=8), "'clash'", "hyperparameter 'batch_size'",
                   "TrainConfig field 'batch_size'")


# --- an adversary whose optimiser is not plain Adam ---------------------------------------------
class ClippedAdam(torch.optim.Adam):
    """An Adam variant of a method's own: gradients clipped elementwise before Adam's update."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.clamp_(-1e-4, 1e-4)
        return super().step(closure)


#: Optimisers the fast step's own Adam cannot stand in for: not an Adam at all (SGD), one with
#: Adam's betas and eps but another update (NAdam, Adamax), an Adam subclass with its own step,
#: and Adam options the flat bf16 Adam does not compute (weight decay, AdamW's decoupled decay).
ADVERSARY_OPTIMISERS = {
    "sgd": lambda params, eps: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    "nadam": lambda params, eps: torch.optim.NAdam(params, lr=1e-4, betas=(0.5, 0.9), eps=eps),
    "adamax": lambda params, eps: torch.optim.Adamax(params, lr=1e-4, betas=(0.5, 0.9), eps=eps),
    "clipped_adam": lambda params, eps: ClippedAdam(params, lr=1e-4, betas=(0.5, 0.9), eps=eps),
    "adamw": lambda params, eps: torch.optim.AdamW(params, lr=1e-4, betas=(0.5, 0.9), eps=eps, weight_decay=0.5),
    "adam_weight_decay": lambda params, eps: torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9), eps=eps,
                                                              weight_decay=0.5),
}


def _factorvae_with(kind: str):
    """FactorVAE (a plug-in subclass) whose discriminator trains with ``ADVERSARY_OPTIMISERS[kind]``."""
    from fastfvae.methods.factorvae import FactorVAE

    class OtherOptimiserFactorVAE(FactorVAE):
        name = f"fvae_{kind}"

        def adversary_optimizer(self, params, adam_eps, fused=None):
            return ADVERSARY_OPTIMISERS[kind](params, adam_eps)

    return OtherOptimiserFactorVAE


@pytest.mark.parametrize("kind,precision", [
    ("sgd", "fp32"), ("nadam", "fp32"), ("adamax", "fp32"), ("clipped_adam", "fp32"),
    *(bf16_param(kind, "bf16", id=f"{kind}-bf16") for kind in ("sgd", "adamw", "adam_weight_decay")),
])
def test_the_fast_step_runs_an_adversary_optimiser_it_cannot_replace_as_built(registry, kind, precision):
    """The fast step's own Adam (fused; in bf16 on CPU the flat one) is built from an Adam's lr,
    betas and eps; for any other optimiser the fast step steps the method's own, as the reference
    step does, so it trains what the reference trains (within the precision's parity tolerance)."""
    from test_fast_step import assert_parity, run_both, small_cfg

    from fastfvae.fast import FastOptions

    methods.register(_factorvae_with(kind))
    cfg = small_cfg(model=f"fvae_{kind}", perm_batch="same", d_steps=2)
    ref_state, fast_state, ref_metrics, fast_metrics = run_both(cfg, 12, FastOptions(precision=precision))
    assert_parity(ref_state, fast_state, ref_metrics, fast_metrics, precision)


def test_a_cuda_graph_with_an_adversary_optimiser_it_cannot_capture_is_refused(registry):
    """The CUDA graph captures the fast step's own fused Adam: another optimiser is one line
    before anything runs (``cuda_graph=True``: the check comes before the device's)."""
    from train_data import small_dsprites

    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.train.state import TrainState
    from test_fast_step import small_cfg

    methods.register(_factorvae_with("sgd"))
    state = TrainState.create(small_cfg(model="fvae_sgd"), 512)
    one_line_error(lambda: FastStep(state, small_dsprites(512), FastOptions(cuda_graph=True)),
                   "fvae_sgd", "SGD", "--no-cuda-graph")
