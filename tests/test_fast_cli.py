"""`fastfvae train --fast` end to end: the CLI flags, checkpoints in the reference's format
(loadable by `load_models`, resumable by either path), bit-exact resume, identical metric
scores from the same checkpoint."""

import numpy as np
import pytest
import torch

import fastfvae.train.loop as loop
from fastfvae.cli import main
from fastfvae.fast import make_fast_step
from fastfvae.metrics import evaluate_codes
from fastfvae.metrics.encode import encode_rows
from fastfvae.train.checkpoint import load_checkpoint, load_models
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import run_training
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)
from cpu_bf16 import bf16_param, needs_cpu_bf16

TINY = ["--batch-size", "8", "--no-progress", "--no-figures", "--log-every", "1"]


@pytest.fixture(autouse=True)
def small_data(monkeypatch):
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))


def _cfg(out, steps, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, d_hidden=32, d_layers=2, out=str(out), log_every=1,
                       fast=True, **kw)


def test_cli_fast_trains_and_saves_a_reference_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--fast", "--precision", "fp32", "--loader", "device", "--steps", "3",
                 "--out", str(out), "--ckpt-every", "2", *TINY]) == 0
    payload = load_checkpoint(out)
    assert payload["config"]["fast"] is True and payload["state"]["step"] == 3
    for opt in ("vae_opt", "disc_opt"):  # the reference Adam's options, not the fused one's
        assert payload["state"][opt]["param_groups"][0]["fused"] is None
    vae, disc, cfg = load_models(out)
    assert cfg.fast and disc is not None
    for k, v in vae.state_dict().items():
        assert torch.equal(v, payload["state"]["vae"][k])


@needs_cpu_bf16
def test_cli_bf16_and_bad_values(tmp_path, capsys):
    assert main(["train", "--fast", "--precision", "bf16", "--steps", "2", "--out", str(tmp_path / "a"), *TINY]) == 0
    capsys.readouterr()
    for bad in (["--precision", "fp16"], ["--loader", "nfs"]):
        assert main(["train", "--fast", "--steps", "2", "--out", str(tmp_path / "b"), *TINY, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastfvae: error:")


@pytest.mark.parametrize("precision,d_steps", [("fp32", 1), bf16_param("bf16", 2, id="bf16-2")])
def test_fast_resume_is_bit_exact(tmp_path, precision, d_steps):
    """bf16 also covers the by-hand D's bf16 weight cache: rebuilt from the checkpoint's
    parameters on resume, it must equal the cache the uninterrupted run carried over."""
    data = small_dsprites(256)
    kw = dict(precision=precision, d_steps=d_steps)
    whole = run_training(_cfg(tmp_path / "whole", 6, **kw), data=data, step_builder=make_fast_step, progress=False)
    run_training(_cfg(tmp_path / "split", 3, **kw), data=data, step_builder=make_fast_step, progress=False)
    resumed = run_training(_cfg(tmp_path / "split", 6, **kw), data=data, resume=tmp_path / "split",
                           step_builder=make_fast_step, progress=False)
    a, b = load_checkpoint(whole.checkpoint)["state"], load_checkpoint(resumed.checkpoint)["state"]
    for part in ("vae", "disc"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k, v in a["vae_opt"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["vae_opt"]["state"][k]["exp_avg_sq"])


def test_fast_checkpoint_resumes_under_the_reference_and_back(tmp_path):
    """A run may switch paths on resume: fast 3 steps + reference 3 steps == reference 6 steps
    (within fp32 round-off), since the checkpoint is the reference's."""
    data = small_dsprites(256)
    ref = run_training(_cfg(tmp_path / "ref", 6).replace(fast=False), data=data, progress=False)
    run_training(_cfg(tmp_path / "mix", 3), data=data, step_builder=make_fast_step, progress=False)
    mixed = run_training(_cfg(tmp_path / "mix", 6).replace(fast=False), data=data, resume=tmp_path / "mix",
                         progress=False)
    a, b = load_checkpoint(ref.checkpoint)["state"], load_checkpoint(mixed.checkpoint)["state"]
    for k in a["vae"]:
        torch.testing.assert_close(b["vae"][k], a["vae"][k], rtol=0, atol=2e-5)
    assert b["sampler"] == a["sampler"]


def test_same_checkpoint_same_metric_scores(tmp_path):
    """The fast run's in-memory (channels_last) encoder and `load_models` of its checkpoint
    give the same codes, hence identical scores."""
    data = small_dsprites(256)
    result = run_training(_cfg(tmp_path / "run", 4), data=data, step_builder=make_fast_step, progress=False)
    loaded, _, _ = load_models(result.checkpoint)
    rows = np.arange(48)  # a 3 x 4 x 4 factor grid's worth of images
    fast_codes = encode_rows(result.state.models.vae, data, rows)
    ref_codes = encode_rows(loaded, data, rows)
    np.testing.assert_allclose(fast_codes, ref_codes, rtol=1e-5, atol=1e-6)
    metrics = ("mig", "sap")
    assert evaluate_codes(fast_codes, (3, 4, 4), metrics) == evaluate_codes(ref_codes, (3, 4, 4), metrics)


def test_deferred_sync_still_stops_on_nan(tmp_path):
    """A step that defers host syncs (CUDA graph) is NaN-checked at the next log step."""
    from fastfvae.train.loop import TrainingDiverged

    def deferring_builder(state, data):
        step = make_fast_step(state, data)
        step.defers_sync = True
        return step

    cfg = _cfg(tmp_path / "nan", 8).replace(log_every=4, debug_nan_at_step=2)
    with pytest.raises(TrainingDiverged, match="at step 4"):
        run_training(cfg, data=small_dsprites(256), step_builder=deferring_builder, progress=False)
