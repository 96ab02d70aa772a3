"""evaluate_model: the encode-once code-table path == dlib's per-batch encoding path.

dlib encodes the images of every sampled batch; evaluate_model encodes each dataset row
once and looks codes up. On a small VAE and a small dSprites-like grid both give the same
scores for every metric; checkpoints load through fastfvae.train.checkpoint.
"""

import numpy as np
import pytest
import torch

from fastfvae.metrics import (
    CachedEncoder, PerBatchEncoder, encode_dataset, evaluate_codes, evaluate_model, factor_vae_score_of_model,
)
from fastfvae.metrics.evaluate import grid_of_data, run_metrics
from metrics_helpers import tiny_dsprites

CONFIG = {
    "factor_vae": {"num_train": 150, "num_eval": 100, "num_variance_estimate": 500, "prune_threshold": 0.0,
                   "batch_size": 16},
    "beta_vae": {"num_train": 100, "num_eval": 60, "batch_size": 16},
    "mig": {"num_train": 500},
    "sap": {"num_train": 300, "num_test": 150},
    "dci": {"num_train": 100, "num_test": 50},
    "gaussian_tc": {"num_train": 500},
    "reconstruction": {"num_samples": 64, "batch_size": 32},
}
CODE_METRICS = ("factor_vae", "beta_vae", "mig", "sap", "dci", "gaussian_tc")


@pytest.fixture(scope="module")
def data():
    return tiny_dsprites()


@pytest.fixture(scope="module")
def vae():
    from fastfvae.models.vae import VAE

    torch.manual_seed(0)
    return VAE(z_dim=6)


def test_code_table_path_equals_per_batch_path(vae, data):
    timings = {}
    table = evaluate_model(vae, data, CODE_METRICS, seed=0, batch_size=50, config=CONFIG, timings=timings)
    grid = grid_of_data(data)
    assert grid.sizes == (3, 4, 4, 4)
    per_batch = run_metrics(grid, PerBatchEncoder(vae, data, batch_size=64), CODE_METRICS, 0, CONFIG)
    assert table == per_batch
    assert set(timings) == {"encode", *CODE_METRICS}
    assert table["factor_vae"]["train_accuracy"] > 0.3  # a real score, not the no-active-dims exit


def test_codes_do_not_depend_on_batch_composition(vae, data):
    codes = encode_dataset(vae, data, batch_size=37)
    rows = np.random.RandomState(1).randint(len(data), size=300)
    per_batch = PerBatchEncoder(vae, data, batch_size=64)(rows)
    assert codes.dtype == np.float32 and codes.shape == (len(data), 6)
    np.testing.assert_allclose(per_batch, codes[rows], rtol=0, atol=1e-6)


def test_encoding_uses_eval_mode_and_restores_training_flag(vae, data):
    vae.train()
    codes = encode_dataset(vae, data, batch_size=64)
    assert vae.training
    with torch.no_grad():
        vae.eval()
        mu, _ = vae.encode(data.float_batch(np.arange(64)))  # same batch: same bits
    assert np.array_equal(codes[:64], mu.numpy())


def test_channels_last_encoding_leaves_the_model_as_it_was(vae, data):
    """Opt-in channels_last encodes with a channels_last copy: codes within float rounding of
    the model's own, and the caller's weights keep their layout and training flag."""
    vae.train()
    weight = vae.encoder.net[2].weight  # [32, 32, 4, 4]: its layouts differ
    codes = encode_dataset(vae, data, batch_size=64, channels_last=True)
    assert vae.training and weight.is_contiguous() and vae.encoder.net[2].weight is weight
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    plain = encode_dataset(vae, data, batch_size=64)
    assert not np.array_equal(codes, plain)  # really the other layout's kernels
    np.testing.assert_allclose(codes, plain, rtol=0, atol=1e-6)


def test_factor_vae_score_of_model_for_training(vae, data):
    cached = CachedEncoder(vae, data, batch_size=64)
    settings = CONFIG["factor_vae"]
    score = factor_vae_score_of_model(vae, data, seed=0, config=settings)
    full = evaluate_model(vae, data, ("factor_vae",), config={"factor_vae": settings})["factor_vae"]
    assert score == full
    cached(np.array([3, 3, 5]))
    assert cached.num_encoded == 2


def test_reconstruction_of_model(vae, data):
    scores = evaluate_model(vae, data, ("reconstruction",), config=CONFIG)["reconstruction"]
    rows = np.random.RandomState(0).randint(len(data), size=64)
    x = data.float_batch(rows)
    with torch.no_grad():
        vae.eval()
        logits = vae.decode(vae.encode(x)[0])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="sum") / 64
    assert scores["reconstruction_bce"] == pytest.approx(ref.item(), rel=1e-9)


def test_checkpoint_path_loads_and_scores_the_same(vae, data, tmp_path):
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    cfg = TrainConfig(model="betavae", z_dim=6)
    path = save_checkpoint(tmp_path, {"config": cfg.to_dict(), "state": {"vae": vae.state_dict(), "disc": None}})
    config = {"mig": CONFIG["mig"]}
    assert evaluate_model(str(path), data, ("mig",), config=config) == evaluate_model(vae, data, ("mig",), config=config)
    assert evaluate_model(str(tmp_path), data, ("mig",), config=config) == evaluate_model(vae, data, ("mig",), config=config)


def test_cli_eval_of_a_checkpoint(vae, data, tmp_path, monkeypatch, capsys):
    import json

    import fastfvae.cli.eval as eval_cli
    from fastfvae.cli import main
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    cfg = TrainConfig(model="betavae", z_dim=6)
    save_checkpoint(tmp_path, {"config": cfg.to_dict(), "state": {"vae": vae.state_dict(), "disc": None}})
    monkeypatch.setattr(eval_cli, "_load_data", lambda path, *_: data)
    config = {"mig": CONFIG["mig"], "reconstruction": CONFIG["reconstruction"]}
    out = tmp_path / "scores.json"
    code = main(["eval", str(tmp_path), "--metrics", "mig", "reconstruction", "--device", "cpu",
                 "--config", json.dumps(config), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert report["scores"] == evaluate_model(vae, data, ("mig", "reconstruction"), config=config)
    assert {"encode", "mig", "reconstruction"} <= set(report["seconds"])
    assert "reconstruction_bce" in printed and "encode dataset" in printed


def test_periodic_factor_vae_callback(vae, data, tmp_path):
    import io
    import json
    from types import SimpleNamespace

    from fastfvae.metrics import periodic_factor_vae

    settings = CONFIG["factor_vae"]
    stream = io.StringIO()
    callback = periodic_factor_vae(2, lambda: data, out_dir=tmp_path, config=settings, stream=stream)
    state = SimpleNamespace(models=SimpleNamespace(vae=vae), step=0)
    for step in (1, 2, 3, 4):
        state.step = step
        callback(state, {})
    lines = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert lines[0]["factor_vae"] == factor_vae_score_of_model(vae, data, config=settings)
    assert stream.getvalue().count("FactorVAE metric") == 2


def test_train_cli_eval_every_wires_the_callback(vae, data, tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import fastfvae.train.loop as loop
    from fastfvae.cli import build_parser
    from fastfvae.cli.train import callbacks_for, config_from_args

    args = build_parser().parse_args(["train", "--eval-every", "3", "--out", str(tmp_path)])
    cfg = config_from_args(args)
    assert cfg.eval_every == 3
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: data)
    (callback,) = callbacks_for(cfg, args)
    callback(SimpleNamespace(models=SimpleNamespace(vae=vae), step=3), {})
    (line,) = (tmp_path / "eval_log.jsonl").read_text().splitlines()
    assert json.loads(line)["step"] == 3 and list(json.loads(line)["details"]) == ["factor_vae"]
    assert callbacks_for(config_from_args(build_parser().parse_args(["train"])), args) == []


def test_encoding_progress_bar_does_not_change_the_codes(vae, data, capsys):
    rows = np.arange(len(data))
    quiet = encode_dataset(vae, data, batch_size=7)
    shown = encode_dataset(vae, data, batch_size=7, progress=True)
    assert np.array_equal(quiet, shown)
    assert capsys.readouterr().out == ""  # the bar goes to stderr, never into piped results
    assert shown.shape[0] == rows.shape[0]


def test_evaluate_model_with_default_settings(vae, data):
    """No config at all (the CLI's default): once failed after encoding with 'no metrics asked for'."""
    grid = grid_of_data(data, None)
    codes = encode_dataset(vae, data)
    want = evaluate_codes(codes, grid.sizes, ("mig",), seed=0)
    assert evaluate_model(vae, data, ("mig",)) == want
    assert evaluate_model(vae, data, ("mig",), config={}) == want
