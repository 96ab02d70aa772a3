"""`fastfvae eval` argument shapes and outputs checked before any work.

* CKPT may follow ``--metrics a b`` (argparse's greedy ``nargs="+"`` would swallow it) and
  the names may be comma-separated.
* ``--json`` must be writable before the model is loaded or any image encoded, and the
  check leaves nothing behind.
"""

import json
import os

import numpy as np
import pytest
from cpu_bf16 import needs_cpu_bf16

from fastfvae.cli import main
from metrics_helpers import DATA, expected, tiny_dsprites

TABLE = DATA / "entangled.npz"
FACTOR_VAE = '{"factor_vae": {"num_train": 100, "num_eval": 50}}'


def _cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _scores(capsys, tmp_path, *argv):
    out_json = tmp_path / "scores.json"
    code, _, err = _cli(capsys, *argv, "--config", FACTOR_VAE, "--json", out_json)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    out_json.unlink()
    return report["scores"]


def test_checkpoint_after_the_metric_names_is_the_checkpoint(tmp_path, capsys):
    before = _scores(capsys, tmp_path, TABLE, "--metrics", "mig", "factor_vae")
    assert before["mig"] == expected()["entangled"]["mig"]
    assert _scores(capsys, tmp_path, "--metrics", "mig", "factor_vae", TABLE) == before
    assert _scores(capsys, tmp_path, "--metrics", "mig,factor_vae", TABLE) == before
    assert _scores(capsys, tmp_path, TABLE, "--metrics", "mig,factor_vae") == before


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A run folder with an untrained VAE's checkpoint; eval's data is the tiny test set."""
    import torch

    import fastfvae.cli.eval as eval_cli
    from fastfvae.models.vae import VAE
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, {"config": TrainConfig(model="betavae", z_dim=4).to_dict(),
                          "state": {"step": 0, "vae": VAE(z_dim=4).state_dict(), "disc": None}})
    data = tiny_dsprites()
    monkeypatch.setattr(eval_cli, "_load_data", lambda dataset, path: data)
    return run


def test_model_checkpoint_after_metrics(run_folder, tmp_path, capsys):
    argv = ("--device", "cpu", "--config", '{"mig": {"num_train": 200}}')
    code, out, err = _cli(capsys, "--metrics", "mig", run_folder, *argv)
    assert code == 0, err
    assert "discrete_mig" in out


@pytest.mark.parametrize("argv, message", [
    ((), "no CKPT given; expected a run folder, checkpoint.pt or .npz code table"),
    (("--metrics", "mig"), "no CKPT given"),
    (("--metrics", str(TABLE)), f"--metrics is followed by '{TABLE}' only; expected metric names"),
    ((str(TABLE), "--metrics", "mig", str(TABLE)), f"--metrics got '{TABLE}', which is a path, not a metric"),
    ((str(TABLE), "--metrics", "mig,nope"), "unknown metric 'nope'"),
    # a mistyped name where CKPT would be: an unknown metric, not a missing file
    (("--metrics", "mig", "facter_vae"), "unknown metric 'facter_vae'; expected one of factor_vae, beta_vae"),
    (("--metrics", "mig,facter_vae"), "unknown metric 'facter_vae'; expected one of"),
    (("--metrics", "mig", "runs/missing"), "no such file or folder: runs/missing"),
    (("--metrics", "mig", "missing.npz"), "no such file or folder: missing.npz"),
])
def test_bad_argument_shapes_are_one_line(argv, message, capsys):
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"fastfvae: error: {message}")
    assert "Traceback" not in err and out == ""


# --- outputs checked before any work ---------------------------------------------------------
def bad_json_path(kind, tmp_path):
    if kind == "proc":
        return "/proc/fastfvae-scores.json", "cannot write in /proc"
    if kind == "missing folder":
        return tmp_path / "no" / "such" / "s.json", "no such folder"
    if kind == "folder":
        (tmp_path / "out").mkdir()
        return tmp_path / "out", "is a folder; expected a file name"
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "s.json", "is not a folder"


@pytest.mark.parametrize("kind", ["proc", "missing folder", "folder", "under a file"])
def test_unwritable_json_fails_before_the_model_is_loaded(kind, run_folder, tmp_path, capsys, monkeypatch):
    import fastfvae.cli.eval as eval_cli

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking --json")

    monkeypatch.setattr(eval_cli, "_load_checkpoint", must_not_load)
    path, message = bad_json_path(kind, tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, _, err = _cli(capsys, run_folder, "--metrics", "mig", "--device", "cpu", "--json", path)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith(f"fastfvae: error: --json {path}")
    assert sorted(os.listdir(tmp_path)) == before  # the probe left nothing behind
    assert not os.path.exists("/proc/fastfvae-scores.json")


def test_json_probe_leaves_nothing_when_the_run_fails_later(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    table = tmp_path / "t.npz"
    np.savez(table, z=np.zeros(3))  # not a code table: fails after the --json check
    code, _, err = _cli(capsys, table, "--metrics", "mig", "--json", out / "s.json")
    assert code == 2 and "expected a code table" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_randomstate_range_is_one_line(seed, tmp_path, capsys):
    code, out, err = _cli(capsys, TABLE, "--metrics", "mig", "--seed", seed, "--json", tmp_path / "s.json")
    assert code == 2 and out == ""
    assert err == f"fastfvae: error: --seed must be in [0, 2**32) (numpy RandomState seeds), got {seed}\n"
    assert list(tmp_path.iterdir()) == []


def test_largest_randomstate_seed_is_accepted(tmp_path, capsys):
    assert _scores(capsys, tmp_path, TABLE, "--metrics", "mig", "--seed", 2**32 - 1)["mig"]


def test_a_bad_precision_is_one_line_before_the_checkpoint_loads(run_folder, capsys, monkeypatch):
    import fastfvae.cli.eval as eval_cli

    def no_checkpoint(*a):
        pytest.fail("loaded the checkpoint before checking --precision")

    with monkeypatch.context() as m:
        m.setattr(eval_cli, "_load_checkpoint", no_checkpoint)
        code, _, err = _cli(capsys, run_folder, "--metrics", "mig", "--precision", "fp16")
    assert code == 2 and err.strip() == "fastfvae: error: unknown encoder precision 'fp16'; expected one of fp32, bf16"


@needs_cpu_bf16
def test_precision_and_channels_last_reach_the_encoder(run_folder, tmp_path, capsys, monkeypatch):
    import fastfvae.cli.eval as eval_cli

    asked = []
    real = eval_cli.evaluate_model
    monkeypatch.setattr(eval_cli, "evaluate_model", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    out = tmp_path / "s.json"
    code, _, err = _cli(capsys, run_folder, "--metrics", "mig", "--precision", "bf16", "--channels-last",
                        "--json", out, "--device", "cpu")
    assert code == 0, err
    assert asked[0]["precision"] == "bf16" and asked[0]["channels_last"] is True
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["channels_last"] is True
