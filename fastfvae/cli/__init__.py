"""`fastfvae` command line: one argparse parser, one module per sub-command.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code). Errors of type
`FastFVAEError` become a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastfvae import __version__
from fastfvae.errors import FastFVAEError

# Sub-command modules, in the order `--help` lists them. A module that is missing (a
# feature not built yet) is skipped rather than breaking the whole CLI.
SUBCOMMAND_MODULES = ("train", "eval", "traverse", "data", "sweep", "report", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfvae", description="Train and evaluate disentangled VAEs (FactorVAE, beta-VAE and disentanglement_lib's other methods) fast.")
    parser.add_argument("--version", action="version", version=f"fastfvae {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"fastfvae.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fastfvae.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastFVAEError as exc:
        print(f"fastfvae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastfvae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
