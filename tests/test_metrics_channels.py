"""Metrics on any registered dataset: the encoding is of what the model sees.

* 3-channel uint8 data (`rgb_data.TinyRGB`) is encoded as images / 255, NCHW, and scored
  end to end (a model reading the factor regions disentangles it; shuffled codes do not);
* colour / noisy dSprites rows are encoded as observations, their noise one fixed draw per
  row (``np.random.default_rng([OBSERVATION_NOISE_SEED, row])``), so a row's code does not
  depend on the batch it is encoded in;
* ``fastfvae eval`` scores a run on the dataset its config names.
"""

import json

import numpy as np
import pytest
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.metrics import CachedEncoder, PerBatchEncoder, encode_dataset, evaluate_codes, evaluate_model
from fastfvae.metrics.encode import OBSERVATION_NOISE_SEED, encode_rows
from fastfvae.metrics.evaluate import factor_vae_score_of_model, grid_of_data
from metrics_helpers import tiny_dsprites
from rgb_data import ChannelMeans, RegionMeans, TinyRGB

SMALL = {
    "factor_vae": {"num_train": 200, "num_eval": 100, "num_variance_estimate": 200, "batch_size": 16},
    "mig": {"num_train": 500},
}


@pytest.fixture(scope="module")
def rgb():
    return TinyRGB()


@pytest.fixture(scope="module")
def colour():
    from fastfvae.data.variants import ColorDSprites

    return ColorDSprites(tiny_dsprites())


@pytest.fixture(scope="module")
def noisy():
    from fastfvae.data.variants import NoisyDSprites

    return NoisyDSprites(tiny_dsprites())


def test_a_3_channel_vae_encodes_the_uint8_images_divided_by_255(rgb):
    from fastfvae.models import VAE

    torch.manual_seed(0)
    vae = VAE(5, 32, channels=3).eval()
    rows = np.array([31, 0, 7, 7, 12])
    codes = encode_rows(vae, rgb, rows, batch_size=2)
    images = torch.from_numpy(rgb.packed[rows].astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = vae.encode(images)[0].numpy()
    assert codes.shape == (5, 5) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-6)


def test_metrics_run_end_to_end_on_3_channel_data(rgb):
    grid = grid_of_data(rgb)
    assert grid.sizes == (4, 4, 2)
    scores = evaluate_model(RegionMeans(), rgb, ("factor_vae", "mig"), config=SMALL)
    assert scores["factor_vae"]["eval_accuracy"] == 1.0
    assert scores["mig"]["discrete_mig"] > 0.9
    # the same codes with their rows shuffled carry no factor: the scores collapse
    codes = encode_dataset(RegionMeans(), rgb)
    shuffled = evaluate_codes(codes[np.random.RandomState(0).permutation(len(codes))], grid.sizes,
                              ("factor_vae", "mig"), config=SMALL)
    assert shuffled["factor_vae"]["eval_accuracy"] < 0.8 and shuffled["mig"]["discrete_mig"] < 0.5


def test_a_3_channel_vae_is_scored_and_reconstructed(rgb):
    from fastfvae.models import VAE

    torch.manual_seed(0)
    vae = VAE(4, 32, channels=3)
    config = {**SMALL, "reconstruction": {"num_samples": 20, "batch_size": 8}}
    scores = evaluate_model(vae, rgb, ("mig", "reconstruction"), config=config)
    rows = np.random.RandomState(0).randint(len(rgb), size=20)
    x = torch.from_numpy(rgb.packed[rows].astype(np.float32) / 255).permute(0, 3, 1, 2)
    with torch.no_grad():
        bce = torch.nn.functional.binary_cross_entropy_with_logits(vae(x), x, reduction="sum") / 20
    assert scores["reconstruction"]["reconstruction_bce"] == pytest.approx(bce.item(), rel=1e-5)
    assert 0 <= scores["mig"]["discrete_mig"] <= 1
    during_training = factor_vae_score_of_model(vae, rgb, config=SMALL["factor_vae"])
    assert set(during_training) >= {"train_accuracy", "eval_accuracy"}


def test_a_model_of_other_channels_is_one_line_before_encoding(rgb):
    from fastfvae.models import VAE

    with pytest.raises(FastFVAEError, match=r"^the model takes 1-channel images but tiny_rgb's observations "
                                            r"have 3; expected the dataset the model was trained on$"):
        encode_rows(VAE(3, 16), rgb, np.arange(4))
    with pytest.raises(FastFVAEError, match="the model takes 1-channel images"):
        evaluate_model(VAE(3, 16), rgb, ("reconstruction",))


def test_colour_dsprites_rows_are_encoded_with_their_own_fixed_colour(colour):
    rows = np.array([5, 150, 5, 77])
    codes = encode_rows(ChannelMeans(), colour, rows, batch_size=3)
    sprite = colour.float_batch(rows).mean((1, 2, 3)).numpy()  # the base image's share of white
    for code, row, share in zip(codes, rows, sprite):
        u = np.random.default_rng([OBSERVATION_NOISE_SEED, row]).random(3, dtype=np.float32)
        np.testing.assert_allclose(code, share * (0.5 + 0.5 * u), rtol=1e-5)
    np.testing.assert_array_equal(codes[0], codes[2])  # the same row: the same colour


def test_reconstruction_of_colour_dsprites_is_against_the_coloured_observations(colour):
    from fastfvae.metrics import reconstruction_of_model

    model = ChannelMeans()
    scores = reconstruction_of_model(model, colour, seed=3, num_samples=12, batch_size=5)
    rows = np.random.RandomState(3).randint(len(colour), size=12)
    u = np.stack([np.random.default_rng([OBSERVATION_NOISE_SEED, r]).random(3, dtype=np.float32) for r in rows])
    x = colour.float_batch(rows) * torch.from_numpy(0.5 + 0.5 * u)[:, :, None, None]
    logits = model.decode(model.encode(x)[0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 12
    assert scores["reconstruction_bce"] == pytest.approx(bce.item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["colour", "noisy"])
def test_noisy_observation_codes_do_not_depend_on_the_batch(variant, request):
    data = request.getfixturevalue(variant)
    model = ChannelMeans()
    table = encode_dataset(model, data, batch_size=37)
    rows = np.random.RandomState(1).randint(len(data), size=120)
    np.testing.assert_array_equal(PerBatchEncoder(model, data, batch_size=64)(rows), table[rows])
    cached = CachedEncoder(model, data, batch_size=5)
    np.testing.assert_array_equal(cached(rows[:30]), table[rows[:30]])
    np.testing.assert_array_equal(cached(rows), table[rows])


def test_noisy_dsprites_rows_are_encoded_over_uniform_noise(noisy):
    codes = encode_rows(ChannelMeans(), noisy, np.arange(40))
    # the background is U[0, 1) per pixel and channel, the sprite white: means just above 1/2
    assert codes.shape == (40, 3)
    assert np.all((codes > 0.49) & (codes < 0.56)), codes.min()
    assert len(np.unique(codes[:, 0])) == 40  # every row its own noise


def test_eval_scores_a_run_on_the_dataset_its_config_names(colour, tmp_path, monkeypatch, capsys):
    import fastfvae.cli.eval as eval_cli
    from fastfvae.cli import main
    from fastfvae.models import VAE
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    torch.manual_seed(0)
    vae = VAE(4, 32, channels=3)
    cfg = TrainConfig(model="betavae", z_dim=4, fc_dim=32, dataset="color_dsprites", data="/runs/had/this.npz")
    save_checkpoint(tmp_path, {"config": cfg.to_dict(), "state": {"step": 0, "vae": vae.state_dict(), "disc": None}})
    asked = []
    monkeypatch.setattr(eval_cli, "_load_data", lambda dataset, path: asked.append((dataset, path)) or colour)
    out = tmp_path / "scores.json"
    argv = ["eval", str(tmp_path), "--metrics", "mig", "--device", "cpu", "--config", json.dumps(SMALL),
            "--json", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert asked == [("color_dsprites", "/runs/had/this.npz")]
    assert report["dataset"] == "color_dsprites"
    assert report["scores"] == evaluate_model(vae, colour, ("mig",), config=SMALL)
    given = tmp_path / "other.npz"
    given.write_bytes(b"x")
    assert main([*argv, "--data", str(given)]) == 0
    assert asked[-1] == ("color_dsprites", str(given))


def test_eval_of_a_config_without_a_dataset_uses_dsprites(tmp_path, monkeypatch, capsys):
    import fastfvae.cli.eval as eval_cli
    from fastfvae.cli import main
    from fastfvae.models import VAE
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    config = TrainConfig(model="betavae", z_dim=4).to_dict()
    del config["dataset"]  # a run saved before datasets had names
    save_checkpoint(tmp_path, {"config": config, "state": {"step": 0, "vae": VAE(4).state_dict(), "disc": None}})
    asked = []
    data = tiny_dsprites()
    monkeypatch.setattr(eval_cli, "_load_data", lambda dataset, path: asked.append((dataset, path)) or data)
    assert main(["eval", str(tmp_path), "--metrics", "mig", "--device", "cpu", "--config", json.dumps(SMALL)]) == 0
    assert asked == [("dsprites", None)]
    capsys.readouterr()
