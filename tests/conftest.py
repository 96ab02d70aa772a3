"""Shared test set-up.

On a machine without CUDA, Triton kernels run under Triton's interpreter: the variable
must be set before any kernel module is imported, so it is set here, first.
"""

import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The ``requires_extra`` marker: optional extras skip for users, fail in CI (tests/extras.py).
pytest_plugins = ["extras"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The calibration and parity data checked out beside the repository: a skip with a reason
    where a user does not have it, a failure under FASTFVAE_REQUIRE_EXTRAS=1 (CI checks it out)."""
    from extras import require_folder

    return require_folder(SHARED, "the calibration and parity data checked out beside the repository")
