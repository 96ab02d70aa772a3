"""Tests that need an optional extra (``pip install -e '.[dali]'``): skipped with a reason where
a user did not install it, a failure where the environment says it must be there.

A new user installs ``.[test]`` and must see the suite pass; CI installs every extra and sets
``FASTFVAE_REQUIRE_EXTRAS=1``, so a test that silently skipped there (an extra that failed to
install, a renamed module) fails the run instead of hiding behind a green CI.

Use ``@pytest.mark.requires_extra("dali")`` on a test or a ``pytest.param``, or call
`require_extra` inside a test; `require_folder` gates data checked out beside the repository
the same way. This module is a pytest plugin (``conftest.py`` loads it): its
hooks register the marker and apply it before each test.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import NoReturn

import pytest

#: The environment variable that turns a missing extra from a skip into a failure.
REQUIRE_ENV = "FASTFVAE_REQUIRE_EXTRAS"
#: Each extra of pyproject.toml that tests use, and the module that proves it is installed.
EXTRA_MODULES = {"dali": "nvidia.dali", "tb": "tensorboard", "ray": "ray"}


def _skip_unless_required(reason: str, promise: str) -> NoReturn:
    """Skip with ``reason``; under REQUIRE_ENV=1 (which makes ``promise``) fail instead."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 says {promise}", pytrace=False)
    pytest.skip(reason)


def require_extra(extra: str):
    """Import and return the module of ``extra``; skip (or fail, under REQUIRE_ENV=1) without it."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRA_MODULES)}")
    module = EXTRA_MODULES[extra]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _skip_unless_required(f"needs the [{extra}] extra ({module} does not import: {exc}); "
                              f"pip install -e '.[{extra}]'", "every extra is installed here")


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder; else skip naming ``what`` is missing (fail under REQUIRE_ENV=1,
    where CI has checked out every data folder the tests read)."""
    if not path.is_dir():
        _skip_unless_required(f"needs {what} at {path}, which is absent here", "it is present here")
    return path


def with_extras(values, extra_of):
    """``values`` for ``parametrize``, each marked ``requires_extra(extra_of(value))`` where that
    gives an extra's name (None: no extra needed)."""
    params = []
    for value in values:
        extra = extra_of(value)
        marks = [pytest.mark.requires_extra(extra)] if extra else []
        params.append(pytest.param(value, marks=marks))
    return params


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_extra(name): needs the optional extra NAME (tests/extras.py)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_extra"):
        require_extra(*mark.args)
