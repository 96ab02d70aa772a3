"""Bad input to the metrics and to `fastfvae eval`: one-line FastFVAEError, CLI exit code 2."""

import json

import numpy as np
import pytest

from fastfvae.cli import main
from fastfvae.errors import FastFVAEError
from fastfvae.metrics import evaluate_codes, evaluate_model
from metrics_helpers import DATA, expected, tiny_dsprites

SIZES = (2, 3, 4)


def _codes(rows=24, dims=3):
    return np.random.default_rng(0).standard_normal((rows, dims)).astype(np.float32)


@pytest.mark.parametrize("codes, sizes, metrics, config, match", [
    (_codes(23), SIZES, ("mig",), None, "23 rows but the factor sizes give 24"),
    (np.where(np.arange(72).reshape(24, 3) == 7, np.nan, _codes()), SIZES, ("mig",), None, "NaN"),
    (_codes()[:, 0], SIZES, ("mig",), None, "2-D array"),
    (_codes(), SIZES, ("mig", "modularity"), None, "unknown metric 'modularity'"),
    (_codes(), SIZES, (), None, "no metrics"),
    (_codes(), SIZES, ("reconstruction",), None, "needs a model"),
    (_codes(), SIZES, ("mig",), {"mig": {"num_bins": 20, "bins": 3}}, r"unknown setting\(s\) \['bins'\]"),
    (_codes(), SIZES, ("mig",), {"mgi": {}}, "unknown metric 'mgi'"),
    (_codes(), (2, 0, 4), ("mig",), None, "factor sizes must be positive"),
])
def test_bad_codes_input(codes, sizes, metrics, config, match):
    with pytest.raises(FastFVAEError, match=match) as info:
        evaluate_codes(codes, sizes, metrics, config=config)
    assert "\n" not in str(info.value)


def test_evaluate_model_rejects_non_grid_data_and_non_models():
    data = tiny_dsprites()
    data.latents_classes[[0, 1]] = data.latents_classes[[1, 0]]
    model = type("M", (), {"encode": None})()
    with pytest.raises(FastFVAEError, match="not a full row-major factor grid"):
        evaluate_model(model, data, ("mig",))
    with pytest.raises(FastFVAEError, match="neither a checkpoint path nor a model"):
        evaluate_model(object(), data, ("mig",))


def _cli(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_scores_a_code_table(tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    code, out, err = _cli(capsys, DATA / "entangled.npz", "--metrics", "mig", "factor_vae",
                          "--config", '{"factor_vae": {"num_train": 100, "num_eval": 50}}', "--json", out_json)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["scores"]["mig"] == expected()["entangled"]["mig"]
    assert set(report["seconds"]) == {"mig", "factor_vae"}
    assert "discrete_mig" in out and "seconds" in out


def test_cli_fast_dci_replaces_dci(tmp_path, capsys):
    out_json = tmp_path / "s.json"
    small = tmp_path / "small.npz"
    np.savez(small, codes=_codes(), factor_sizes=np.array(SIZES))
    code, _, err = _cli(capsys, small, "--metrics", "dci", "--fast-dci", "--json", out_json,
                        "--config", '{"dci_fast": {"num_train": 60, "num_test": 30}}')
    assert code == 0, err
    assert list(json.loads(out_json.read_text())["scores"]) == ["dci_fast"]


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"not a checkpoint"), "not a torch checkpoint file"),
    (lambda p: None, "no such file"),
])
def test_cli_rejects_foreign_checkpoints(tmp_path, capsys, make, match):
    path = tmp_path / "model.pt"
    make(path)
    code, _, err = _cli(capsys, path)
    assert code == 2
    assert err.startswith("fastfvae: error: ") and match in err
    assert err.count("\n") == 1


def test_cli_rejects_bad_tables_metrics_and_config(tmp_path, capsys):
    table = tmp_path / "t.npz"
    np.savez(table, z=_codes())
    assert _cli(capsys, table)[0] == 2
    np.savez(table, codes=_codes(), factor_sizes=np.array(SIZES))
    code, _, err = _cli(capsys, table, "--metrics", "nope")
    assert code == 2 and "unknown metric 'nope'" in err
    code, _, err = _cli(capsys, table, "--metrics", "mig", "--config", "{bad")
    assert code == 2 and "--config is not valid JSON" in err


def test_cli_checks_metric_names_before_loading_model_or_data(tmp_path, capsys, monkeypatch):
    import fastfvae.metrics.evaluate as evaluate

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the metric names")

    monkeypatch.setattr(evaluate, "load_model", must_not_load)
    run = tmp_path / "run"
    run.mkdir()
    code, _, err = _cli(capsys, run, "--metrics", "factor_vae", "bogus")
    assert code == 2
    assert err.splitlines() == ["fastfvae: error: unknown metric 'bogus'; expected one of factor_vae, beta_vae, "
                                "mig, sap, dci, dci_fast, gaussian_tc, reconstruction"]


def test_cli_rejects_a_single_array_under_an_npz_name(tmp_path, capsys):
    table = tmp_path / "t.npz"
    with open(table, "wb") as f:
        np.save(f, _codes())
    code, _, err = _cli(capsys, table)
    assert code == 2 and "holds a single array" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, match", [
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--json", "/no/such/folder/scores.json"), "no such folder"),
])
def test_cli_rejects_bad_batch_size_and_json_folder_before_work(tmp_path, capsys, argv, match):
    table = tmp_path / "t.npz"
    np.savez(table, codes=_codes(), factor_sizes=np.array(SIZES))
    code, out, err = _cli(capsys, table, "--metrics", "mig", *argv)
    assert code == 2 and match in err and err.count("\n") == 1
    assert "discrete_mig" not in out
