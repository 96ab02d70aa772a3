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
