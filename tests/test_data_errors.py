"""Paths to dSprites files that cannot be read, and subsets where the full set is needed.

Each case is one line (exit 2 from the CLI) saying what the path is and what was expected,
given before any model is built or any data is read.
"""

import builtins
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fastfvae.cli import main
from fastfvae.data import DSprites, classes_of, load_dsprites, save_npz
from fastfvae.data.files import PartialSetError
from fastfvae.errors import FastFVAEError

N = 48


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 48-row file in the canonical NPZ format."""
    rs = np.random.RandomState(0)
    classes = classes_of(np.sort(rs.choice(737280, size=N, replace=False)))
    path = tmp_path_factory.mktemp("data") / "small.npz"
    save_npz(DSprites.from_images((rs.rand(N, 64, 64) < 0.3).astype(np.uint8), classes), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder holding the checkpoint of an untrained VAE."""
    import torch

    from fastfvae.models.vae import VAE
    from fastfvae.train.checkpoint import save_checkpoint
    from fastfvae.train.config import TrainConfig

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, {"config": TrainConfig(model="betavae", z_dim=4).to_dict(),
                          "state": {"step": 0, "vae": VAE(z_dim=4).state_dict(), "disc": None}})
    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """`fastfvae eval` must reject its --data before it loads the model."""
    import fastfvae.metrics.evaluate as evaluate

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking --data")

    monkeypatch.setattr(evaluate, "load_model", must_not_load)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("fastfvae: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def commands(path, checkpoint):
    """The commands that read a dSprites file, each given ``path``."""
    return {
        "data info": ["data", "info", str(path), "--allow-partial"],
        "data show": ["data", "show", str(path), "--allow-partial", "--out", str(path) + ".png"],
        "eval": ["eval", str(checkpoint), "--data", str(path), "--metrics", "mig", "--device", "cpu"],
    }


# --- unreadable files ------------------------------------------------------------------------
@pytest.fixture
def unreadable(small, monkeypatch):
    """``small`` as a file without read permission: opening it raises PermissionError.

    Tests run as root, for whom ``chmod 000`` does not stop reads, so `open` itself is made to
    fail for this one path exactly as the kernel would for another user.
    """
    real_open = builtins.open

    def open_denied(file, *args, **kwargs):
        if not isinstance(file, int) and os.path.abspath(os.fspath(file)) == str(small):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denied)
    return small


#: What each command says it expected: ``eval`` checks --data before it knows the run's dataset.
EXPECTED = {"data info": "a dSprites .npz or .hdf5 file", "data show": "a dSprites .npz or .hdf5 file",
            "eval": "the run's dataset file (dSprites .npz/.hdf5, 3dshapes.h5)"}


@pytest.mark.parametrize("command", ["data info", "data show", "eval"])
def test_unreadable_file_is_one_line(unreadable, checkpoint, no_model_load, command, capsys):
    assert main(commands(unreadable, checkpoint)[command]) == 2
    line = one_error_line(capsys)
    assert line == (f"fastfvae: error: {unreadable}: permission denied (the file is not readable); "
                    f"expected {EXPECTED[command]}")
    assert not os.path.exists(str(unreadable) + ".png")


def test_unreadable_file_through_the_python_api(unreadable):
    with pytest.raises(FastFVAEError, match="permission denied") as info:
        load_dsprites(unreadable, require_full=False)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_file_in_a_real_process(small, tmp_path):
    locked = tmp_path / "locked.npz"
    locked.write_bytes(small.read_bytes())
    locked.chmod(0)
    result = subprocess.run([sys.executable, "-m", "fastfvae", "data", "info", str(locked), "--allow-partial"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "permission denied" in result.stderr
    assert "Traceback" not in result.stderr


# --- paths that are not files ----------------------------------------------------------------
def not_a_file(kind, tmp_path):
    if kind == "directory":
        path = tmp_path / "folder.npz"
        path.mkdir()
        return path, "is a directory"
    if kind == "symlink loop":
        path, other = tmp_path / "a.npz", tmp_path / "b.npz"
        path.symlink_to(other)
        other.symlink_to(path)
        return path, "is a symlink loop"
    if kind == "dangling symlink":
        path = tmp_path / "link.npz"
        path.symlink_to(tmp_path / "gone.npz")
        return path, f"is a dangling symlink (to {tmp_path / 'gone.npz'}, which does not exist)"
    if kind == "fifo":
        path = tmp_path / "pipe.npz"
        os.mkfifo(path)
        return path, "is a FIFO"
    return tmp_path / "missing.npz", "no such file"


@pytest.mark.parametrize("kind", ["directory", "symlink loop", "dangling symlink", "fifo", "missing"])
@pytest.mark.parametrize("command", ["data info", "eval"])
def test_path_that_is_not_a_file_says_what_it_is(kind, command, tmp_path, checkpoint, no_model_load, capsys):
    path, what = not_a_file(kind, tmp_path)
    assert main(commands(path, checkpoint)[command]) == 2
    assert one_error_line(capsys) == f"fastfvae: error: {path}: {what}; expected {EXPECTED[command]}"


# --- a subset where the full set is needed ---------------------------------------------------
def options_in_help(command: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-m", "fastfvae", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z][a-z-]*", result.stdout))


def test_partial_file_names_only_options_of_the_command_that_failed(small, checkpoint, tmp_path, capsys):
    runs = {
        ("data", "info"): ["data", "info", str(small)],
        ("eval",): ["eval", str(checkpoint), "--data", str(small), "--metrics", "mig", "--device", "cpu"],
        ("train",): ["train", "--data", str(small), "--out", str(tmp_path / "run"), "--steps", "1",
                     "--device", "cpu", "--no-progress", "--no-figures"],
    }
    lines = {}
    for command, argv in runs.items():
        assert main(argv) == 2, command
        lines[command] = one_error_line(capsys)
        assert f"{small}: holds {N} images, expected 737280" in lines[command]
        suggested = set(re.findall(r"--[a-z][a-z-]*", lines[command]))
        assert suggested <= options_in_help(list(command)), (command, lines[command])
    assert "--allow-partial" in lines[("data", "info")]
    assert "fastfvae data download" in lines[("train",)] and "fastfvae data download" in lines[("eval",)]


def test_partial_set_error_is_a_fastfvae_error(small):
    with pytest.raises(PartialSetError) as info:
        load_dsprites(small)
    assert isinstance(info.value, FastFVAEError) and info.value.rows == N
    assert "--allow-partial" not in str(info.value)
    assert "--allow-partial" in str(info.value.with_option("--allow-partial"))


def test_make_folder_tolerates_another_process_creating_the_same_parents(tmp_path, monkeypatch):
    """Tasks of one sweep create ``runs/<name>`` at once: a parent made by someone else between
    the existence check and ``mkdir`` is used, and not removed by the loser's clean-up."""
    from fastfvae.data import paths

    shared = tmp_path / "runs"
    real_mkdir = type(tmp_path).mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self == shared and not shared.exists():
            real_mkdir(self)  # the other task wins the race
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", racing_mkdir)
    created = paths.make_folder(shared / "factorvae-seed1", "--out")
    assert created == [shared / "factorvae-seed1"]
    paths.remove_empty_folders(created)
    assert shared.is_dir() and not (shared / "factorvae-seed1").exists()


def test_make_folder_still_refuses_a_file_made_in_its_place(tmp_path, monkeypatch):
    from fastfvae.data import paths

    shared = tmp_path / "runs"
    real_mkdir = type(tmp_path).mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self == shared and not shared.exists():
            shared.write_text("")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "mkdir", racing_mkdir)
    with pytest.raises(FastFVAEError, match="cannot create or write in this folder"):
        paths.make_folder(shared / "x", "--out")
