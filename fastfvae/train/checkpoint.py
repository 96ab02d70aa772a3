"""Checkpoints: written atomically, loaded safely, enough to continue a run bit-exactly.

A checkpoint is one ``torch.save`` file (``<run>/checkpoint.pt``, replaced at every save):

    {"format": "fastfvae-checkpoint", "version": 1,
     "config": TrainConfig.to_dict(),
     "state": TrainState.state_dict()   (models, optimisers, step-noise generator, sampler, step),
     "rng": global RNG states (torch CPU, torch CUDA per device, numpy, python `random`),
     "elapsed_s": training wall time so far, "metrics": the last logged metrics}

Only tensors and plain Python values are stored, so `load_checkpoint` uses
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.
`load_checkpoint` also checks that the file's config is a valid `TrainConfig` and that its
model weights have the names and shapes that config builds, so ``eval``, ``traverse`` and
``--resume`` all refuse a mismatched or damaged checkpoint with one line (`FastFVAEError`).

Saving writes a temporary file unique to the writer (``.<name>.<pid>.<random>.tmp`` beside
the target), fsyncs it and renames it over ``<path>`` (``os.replace``), so a crash or a full
disk mid-write leaves the previous checkpoint intact, and two writers never share a
temporary file. The payload is serialised in memory before it is written, so a write that fails
is the file system's ``OSError`` (e.g. ENOSPC, EFBIG); it removes its temporary file and
raises `FastFVAEError`; a writer killed mid-write leaves its temporary file behind, which
`remove_stale_temp_files` deletes (the next owner of a run folder calls it).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import secrets
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
#: The run's resolved config, written when the run starts (the same config is in every checkpoint).
CONFIG_NAME = "config.json"


def checkpoint_path(path_or_dir: str | os.PathLike) -> Path:
    """``DIR`` -> ``DIR/checkpoint.pt``; a file path is returned unchanged."""
    path = Path(path_or_dir)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def temp_path_for(path: Path) -> Path:
    """A temporary file name beside ``path``, unique to this writer (pid + random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temp_files(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files `atomic_write_bytes` left for ``names`` in ``folder`` (a writer
    killed mid-write leaves one; only call this while owning the folder); returns them."""
    removed = []
    for name in names:
        for stale in [*Path(folder).glob(f".{name}.*.tmp"), Path(folder) / f"{name}.tmp"]:  # + the old fixed name
            try:
                stale.unlink()
                removed.append(stale)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(file)`` on a temporary file of this writer's own, fsync, then rename it over
    ``path``. An OSError (disk full, permissions) becomes a one-line FastFVAEError; ``path`` is
    then unchanged and the temporary file removed."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise FastFVAEError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (format/version added) atomically to ``path`` (a file or a run folder)."""
    path = checkpoint_path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    # Serialised in memory first: torch.save writing to the file itself reports a failed write
    # (ENOSPC, EFBIG) as a RuntimeError from its zip writer, not as the OSError it is.
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, lambda f: f.write(buf.getbuffer()))
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
    check_weights(payload, path)
    return payload


def parse_config(config: Any, source: str | os.PathLike) -> TrainConfig:
    """A validated TrainConfig from a saved config dict; FastFVAEError naming ``source`` if it is
    missing, malformed or out of range. Fields a config lacks take their defaults (older runs)."""
    if not isinstance(config, dict):
        raise FastFVAEError(f"{source} has no usable config (got {type(config).__name__}); "
                            f"expected a checkpoint or config.json written by fastfvae train")
    try:
        return TrainConfig.from_dict(config).validate()
    except FastFVAEError as exc:
        raise FastFVAEError(f"{source} has a bad config: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FastFVAEError(f"{source} has a bad config ({exc}); expected fields of TrainConfig") from None


def config_of(payload: dict[str, Any], source: str | os.PathLike = "the checkpoint") -> TrainConfig:
    """The validated config of a loaded checkpoint (FastFVAEError if it is missing or bad)."""
    return parse_config(payload.get("config"), source)


def _expected_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _weights_mismatch(part: str, saved: Any, expected: dict[str, tuple]) -> str | None:
    """What is wrong with ``saved`` (a state dict) against ``expected`` shapes, or None."""
    if not isinstance(saved, dict):
        return f"{part} weights are missing"
    for key, shape in expected.items():
        if key not in saved or not torch.is_tensor(saved[key]):
            return f"{part}.{key} is missing"
        if tuple(saved[key].shape) != shape:
            return f"{part}.{key} has shape {list(saved[key].shape)}, the config builds {list(shape)}"
    extra = sorted(set(saved) - set(expected))
    return f"unexpected {part}.{extra[0]}" if extra else None


def check_weights(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """FastFVAEError (one line) unless the checkpoint's config is valid and its VAE (and, for
    FactorVAE, D) weights have exactly the names and shapes that config builds."""
    from fastfvae.models import VAE
    from fastfvae.train.state import dataset_channels

    cfg = config_of(payload, path)
    state = payload.get("state")
    if not isinstance(state, dict):
        raise FastFVAEError(f"{path} has no training state; expected a checkpoint.pt written by fastfvae train")
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        parts = {"vae": VAE(cfg.z_dim, cfg.fc_dim, channels=dataset_channels(cfg))}
        method = cfg.method()
        if method.adversarial:
            parts["disc"] = method.build_adversary(cfg.z_dim)
    for part, module in parts.items():
        problem = _weights_mismatch(part, state.get(part), _expected_shapes(module))
        if problem:
            raise FastFVAEError(f"{path}: its weights do not match its config ({problem}); "
                                f"expected a checkpoint.pt written by fastfvae train")


def restore_state(state, payload: dict[str, Any], path: str | os.PathLike) -> None:
    """``state.load_state_dict(payload["state"])``; FastFVAEError (one line) if the optimiser or
    sampler state does not fit the run (the weights were checked by `load_checkpoint`)."""
    try:
        state.load_state_dict(payload["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastFVAEError(f"cannot resume {path}: its training state does not fit its config ({reason})") from None


def load_resume_point(path: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(config, checkpoint payload) to continue the run at ``path`` (a run folder or checkpoint file).

    A run folder that holds a ``config.json`` but no checkpoint (its run was stopped before the
    first checkpoint: killed, or a second Ctrl-C) gives ``(its config, None)``: the run is
    started again from step 0. Anything else without a checkpoint is a FastFVAEError.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name == CHECKPOINT_NAME else None
    if folder is not None and not (folder / CHECKPOINT_NAME).exists() and (folder / CONFIG_NAME).is_file():
        config_file = folder / CONFIG_NAME
        try:
            saved = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FastFVAEError(f"cannot read {config_file}: {getattr(exc, 'strerror', None) or exc}; "
                                f"expected the config.json written by fastfvae train") from None
        return parse_config(saved, config_file), None
    payload = load_checkpoint(path)
    return config_of(payload, checkpoint_path(path)), payload


def load_models(path_or_dir: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """(vae, discriminator or None, config) from a checkpoint, in eval mode on ``map_location``."""
    payload = load_checkpoint(path_or_dir, map_location)
    cfg = config_of(payload, checkpoint_path(path_or_dir))
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
