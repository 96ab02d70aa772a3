"""The CLI dispatcher: bad input is one line on stderr and exit code 2, never a traceback."""

import subprocess
import sys

import pytest

from fastfvae import __version__
from fastfvae.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastfvae", *args], capture_output=True, text=True)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_unknown_command_is_usage_error():
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice" in result.stderr


def test_fastfvae_error_becomes_exit_2(monkeypatch, capsys):
    from fastfvae import cli
    from fastfvae.errors import FastFVAEError

    def failing(args):
        raise FastFVAEError("something was wrong, expected something else")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.add_parser("boom").set_defaults(func=failing)
    assert main(["boom"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastfvae: error: something was wrong, expected something else"]


@pytest.mark.parametrize("command", ["train", "eval", "data"])
def test_each_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout
