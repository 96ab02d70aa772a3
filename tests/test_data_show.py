"""`fastfvae data show --out`: the output is checked before the data is loaded, and the path
printed is the file written (a folder gets dsprites_grid.png, a bare name gets .png)."""

import os

import numpy as np
import pytest

import fastfvae.data
from fastfvae.cli import main
from fastfvae.data import DSprites, classes_of, save_npz

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rs = np.random.RandomState(0)
    classes = classes_of(np.sort(rs.choice(737280, size=24, replace=False)))
    path = tmp_path_factory.mktemp("data") / "small.npz"
    save_npz(DSprites.from_images((rs.rand(24, 64, 64) < 0.3).astype(np.uint8), classes), path)
    return path


def show(small, out, capsys):
    code = main(["data", "show", str(small), "--allow-partial", "--out", str(out), "--columns", "4"])
    _, err = capsys.readouterr()
    return code, err.strip().splitlines()


@pytest.mark.parametrize("name, written", [
    ("grid.png", "grid.png"),
    ("grid", "grid.png"),
    ("figures", "figures/dsprites_grid.png"),
    ("grid.pdf", "grid.pdf"),
])
def test_the_path_printed_is_the_file_written(small, tmp_path, capsys, name, written):
    (tmp_path / "figures").mkdir()
    code, err = show(small, tmp_path / name, capsys)
    assert code == 0, err
    assert err[-1] == f"wrote {tmp_path / written}"
    head = (tmp_path / written).read_bytes()[:8]
    assert head == PNG if written.endswith(".png") else head.startswith(b"%PDF")
    made = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert made == {written}


@pytest.mark.parametrize("out, message", [
    ("missing/grid.png", "no such folder"),
    ("missing/", "no such folder"),
    ("/proc/fastfvae-grid.png", "cannot write in /proc"),
    ("grid.xyz", "'.xyz' is not an image format matplotlib writes"),
])
def test_bad_out_fails_before_the_data_is_loaded(small, tmp_path, capsys, monkeypatch, out, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the data before checking --out")

    monkeypatch.setattr(fastfvae.data, "load_dsprites", must_not_load)
    monkeypatch.chdir(tmp_path)
    code, err = show(small, out, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith(f"fastfvae: error: --out {out}")
    assert os.listdir(tmp_path) == []


def test_negative_seed_is_one_line_before_the_data_is_loaded(small, tmp_path, capsys, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the data before checking --seed")

    monkeypatch.setattr(fastfvae.data, "load_dsprites", must_not_load)
    code = main(["data", "show", str(small), "--out", str(tmp_path / "g.png"), "--seed", "-1"])
    _, err = capsys.readouterr()
    assert code == 2 and err == "fastfvae: error: --seed must be 0 or more (any size), got -1\n"
    assert os.listdir(tmp_path) == []
