"""TrainConfig: paper defaults, presets, validation, JSON round trip, what a resume may change."""

import json

import pytest

from fastfvae.errors import FastFVAEError
from fastfvae.train.config import PRESETS, TrainConfig, preset, resume_conflicts


def test_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.model, c.gamma, c.z_dim, c.batch_size, c.steps) == ("factorvae", 35.0, 10, 64, 300_000)
    assert (c.vae_lr, c.vae_betas, c.d_lr, c.d_betas) == (1e-4, (0.9, 0.999), 1e-4, (0.5, 0.9))
    assert (c.d_hidden, c.d_layers, c.d_slope, c.d_steps, c.perm_batch) == (1000, 6, 0.2, 1, "second")


def test_presets():
    assert set(PRESETS) == {"paper", "dlib", "quickstart"}
    paper, dlib = preset("paper"), preset("dlib")
    assert paper.d_steps == 5 and paper.perm_batch == "second" and paper.gamma == 35.0
    assert dlib.perm_batch == "same" and dlib.fc_dim == 256 and dlib.batch_size == 64 and dlib.steps == 300_000
    with pytest.raises(FastFVAEError, match="unknown preset 'x'"):
        preset("x")


def test_quickstart_is_the_papers_model_with_its_documented_changes():
    """Only the fields docs/training.md lists differ from the paper's defaults."""
    quick, paper = preset("quickstart").validate(), TrainConfig()
    def flat(cfg):
        d = cfg.to_dict()
        hparams = d.pop("hparams")
        return {**d, **hparams}

    changed = {k for k, v in flat(quick).items() if v != flat(paper)[k]}
    assert changed == {"gamma", "steps", "perm_batch", "vae_lr", "d_lr", "fast", "precision", "ckpt_every", "preset"}
    assert (quick.gamma, quick.steps, quick.vae_lr, quick.d_lr, quick.precision) == (50.0, 5000, 3e-4, 1e-3, "bf16")
    assert (quick.model, quick.batch_size, quick.z_dim, quick.d_steps) == ("factorvae", 64, 10, 1)


@pytest.mark.parametrize("change,match", [
    ({"gamma": -1.0}, "gamma"), ({"beta": float("nan")}, "beta"), ({"batch_size": 1}, "batch-size"),
    ({"z_dim": 0}, "z-dim"), ({"d_steps": 0}, "d-steps"), ({"model": "vea"}, "model"),
    ({"perm_batch": "x"}, "perm-batch"), ({"device": "tpu"}, "device"), ({"vae_lr": 0.0}, "vae-lr"),
    ({"steps": -1}, "steps"), ({"log_every": 0}, "log-every"),
])
def test_validation_is_one_line(change, match):
    with pytest.raises(FastFVAEError, match=match) as info:
        TrainConfig(**change).validate()
    assert "\n" not in str(info.value)


def test_json_round_trip():
    c = preset("dlib").replace(gamma=10.0, data="x.npz")
    assert TrainConfig.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(FastFVAEError, match="unknown config field"):
        TrainConfig.from_dict({"gama": 1})


def test_resume_conflicts():
    saved = TrainConfig(steps=100)
    assert resume_conflicts(saved, saved.replace(steps=200, out="elsewhere", device="cpu", log_every=7)) == []
    assert resume_conflicts(saved, saved.replace(z_dim=3, model="betavae")) == ["model", "z_dim"]
    assert resume_conflicts(saved, saved.replace(gamma=3.0, d_steps=2)) == ["d_steps", "gamma"]


def test_a_config_written_before_methods_declared_their_hyperparameters_still_loads():
    """config.json / checkpoints of earlier versions hold gamma, beta, d_steps ... as top-level
    fields, those of the other model too: they load into the method's hyperparameters."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "hparams"}
    old.update(model="factorvae", gamma=20.0, beta=4.0, d_steps=3, perm_batch="same", d_lr=2e-4,
               d_betas=[0.5, 0.9], d_hidden=100, d_layers=2, d_slope=0.2)
    cfg = TrainConfig.from_dict(old)
    assert (cfg.gamma, cfg.d_steps, cfg.perm_batch, cfg.d_lr, cfg.d_betas, cfg.d_hidden) == (
        20.0, 3, "same", 2e-4, (0.5, 0.9), 100)
    assert "beta" not in cfg.hparams
    old.update(model="betavae")
    assert TrainConfig.from_dict(old).hparams == {"beta": 4.0}


def test_hyperparameters_are_the_methods_and_round_trip():
    cfg = TrainConfig(model="dipvae", lambda_od=5.0, dip_type="ii")
    assert cfg.hparams["lambda_od"] == 5.0 and cfg.dip_type == "ii" and "lambda_d_factor" in cfg.hparams
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(FastFVAEError, match="--gamma is not a hyperparameter of dipvae"):
        TrainConfig(model="dipvae", gamma=3.0)
    with pytest.raises(FastFVAEError, match="dip-type must be"):
        TrainConfig(model="dipvae", dip_type="iii").validate()
    # a new model keeps only what it declares too
    assert cfg.replace(model="betavae").hparams == {"beta": 4.0}
    with pytest.raises(AttributeError, match="gamma"):
        cfg.gamma


def test_preset_settings_are_what_each_preset_writes():
    """The fields and hyperparameters a preset sets itself (the CLI names the latter when the
    preset meets another model); every preset's config is built from exactly these."""
    from fastfvae.train.config import preset_settings

    fields, hparams = preset_settings("paper")
    assert fields["model"] == "factorvae" and hparams == {"gamma": 35.0, "d_steps": 5, "perm_batch": "second"}
    assert preset_settings("dlib")[0]["fc_dim"] == 256 and preset_settings("dlib")[1] == {"d_steps": 1,
                                                                                           "perm_batch": "same"}
    for name in PRESETS:
        fields, hparams = preset_settings(name)
        cfg = preset(name)
        assert cfg.model == fields["model"] and cfg.preset == name
        assert all(getattr(cfg, k) == v for k, v in {**fields, **hparams}.items())
        assert set(hparams) <= set(cfg.hparams)
    with pytest.raises(FastFVAEError, match="unknown preset 'x'"):
        preset_settings("x")
