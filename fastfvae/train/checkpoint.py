"""Checkpoints: written atomically, loaded safely, enough to continue a run bit-exactly.

A checkpoint is one ``torch.save`` file (``<run>/checkpoint.pt``, replaced at every save):

    {"format": "fastfvae-checkpoint", "version": 1,
     "config": TrainConfig.to_dict(),
     "state": TrainState.state_dict()   (models, optimisers, step-noise generator, sampler, step),
     "rng": global RNG states (torch CPU, torch CUDA per device, numpy, python `random`),
     "elapsed_s": training wall time so far, "metrics": the last logged metrics}

Only tensors and plain Python values are stored, so `load_checkpoint` uses
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.
Saving writes ``<path>.tmp``, fsyncs it and renames it over ``<path>`` (``os.replace``), so
a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.train.config import TrainConfig
from fastfvae.train.state import build_models

FORMAT = "fastfvae-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(path_or_dir: str | os.PathLike) -> Path:
    """``DIR`` -> ``DIR/checkpoint.pt``; a file path is returned unchanged."""
    path = Path(path_or_dir)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on ``<path>.tmp``, fsync, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (format/version added) atomically to ``path`` (a file or a run folder)."""
    path = checkpoint_path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a file, or a run folder holding ``checkpoint.pt``).

    Raises FastFVAEError when it is missing, unreadable or not a fastfvae checkpoint.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise FastFVAEError(f"no checkpoint at {path}; expected a run folder or a checkpoint.pt file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip or permission errors all mean "not usable"
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
        elif isinstance(exc, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            reason = "it holds objects a fastfvae checkpoint never does"  # torch's weights-only refusal
        else:
            reason = "not a torch checkpoint file"
        raise FastFVAEError(f"cannot read checkpoint {path}: {reason}; expected a checkpoint.pt "
                            f"written by fastfvae train") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FastFVAEError(f"{path} is not a fastfvae checkpoint")
    if payload.get("version") != VERSION:
        raise FastFVAEError(f"{path} has checkpoint version {payload.get('version')}, expected {VERSION}")
    return payload


def config_of(payload: dict[str, Any]) -> TrainConfig:
    return TrainConfig.from_dict(payload["config"])


def load_models(path_or_dir: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """(vae, discriminator or None, config) from a checkpoint, in eval mode on ``map_location``."""
    payload = load_checkpoint(path_or_dir, map_location)
    cfg = config_of(payload)
    vae, disc = build_models(cfg, map_location)
    vae.load_state_dict(payload["state"]["vae"])
    vae.eval()
    if disc is not None:
        disc.load_state_dict(payload["state"]["disc"])
        disc.eval()
    return vae, disc, cfg


# --- global RNG states ------------------------------------------------------------------------
def capture_rng_states() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain values (safe for weights_only loading)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if states["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
