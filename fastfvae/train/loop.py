"""The training loop: `run_training(cfg)` — set-up, steps, logs, checkpoints, Ctrl-C, NaN guard, resume.

Per step: draw the step's randomness (`draw_step_inputs`: rows from the sampler, noise from
the run's generator, in the documented order), call the step function (the reference step,
or the fast path's via ``step_builder``), check the loss is finite, log every
``log_every`` steps, checkpoint every ``ckpt_every`` steps and at the end.

- Ctrl-C: the first SIGINT asks the loop to stop after the current step; it then writes a
  consistent checkpoint and returns ``status="interrupted"``. A second Ctrl-C interrupts at
  once (KeyboardInterrupt); a checkpoint is then written only if no step was half-done.
- NaN/inf in the VAE or D loss: `TrainingDiverged`, nothing written, so the last checkpoint
  on disk is the last good state.
- Resume: the checkpoint's models, optimisers, generator, sampler, step and global RNG
  states are restored, log lines past the checkpoint are dropped, and the run continues
  exactly as if it had never stopped (bit-exact on CPU).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import (
    CHECKPOINT_NAME, atomic_write_text, capture_rng_states, checkpoint_path, config_of, load_checkpoint,
    restore_rng_states, save_checkpoint,
)
from fastfvae.train.config import TrainConfig, resume_conflicts
from fastfvae.train.progress import IntervalMeter, MetricLog, TrainProgress
from fastfvae.train.reference import StepFn, draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState, resolve_device

CONFIG_NAME = "config.json"
#: Builds a step function for a fresh/restored state: ``builder(state, data) -> StepFn``.
StepBuilder = Callable[[TrainState, object], StepFn]
Callback = Callable[[TrainState, dict], None]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf; the message says at which step and which checkpoint is kept."""


@dataclass
class RunResult:
    state: TrainState
    out: Path
    status: str                      # "completed" or "interrupted"
    checkpoint: Path
    metrics: dict = field(default_factory=dict)  # the last logged interval means
    data: object = None


def load_training_data(path: str | None):
    """The dataset for ``cfg.data`` via `fastfvae.data.load_dsprites` (procedural when there is no file)."""
    from fastfvae.data import load_dsprites

    return load_dsprites(path)


def holds_run(out: Path) -> bool:
    return (out / CONFIG_NAME).exists() or (out / CHECKPOINT_NAME).exists()


def check_out(out: Path, resuming_in_place: bool) -> None:
    """FastFVAEError unless ``out`` can hold a new run (or is the run being resumed); no side effects."""
    if out.exists() and not out.is_dir():
        raise FastFVAEError(f"cannot write to --out {out}: it exists and is not a directory")
    if holds_run(out) and not resuming_in_place:
        raise FastFVAEError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FastFVAEError(f"cannot write to --out {out}: {ancestor} is not a writable directory")


def make_out(out: Path) -> None:
    """Create ``out`` and prove it is writable (FastFVAEError otherwise)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise FastFVAEError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def make_out_then_load(out: Path, load):
    """Create ``out`` first (an unusable --out fails before the slow load), then return ``load()``.

    If loading fails, a folder this call created (still empty) is removed again: bad input
    leaves nothing behind.
    """
    created = not out.exists()
    make_out(out)
    try:
        return load()
    except BaseException:
        if created:
            out.rmdir()
        raise


class _StopOnSigint:
    """First SIGINT: set ``requested``; second: raise KeyboardInterrupt. Main thread only."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSigint":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _finite(metrics: dict) -> bool:
    values = [metrics[k] for k in ("loss", "d_loss") if k in metrics]
    return bool(torch.isfinite(torch.stack([v.float() for v in values])).all())


def run_training(cfg: TrainConfig, *, data=None, resume: str | os.PathLike | None = None,
                 step_builder: StepBuilder | None = None, callbacks: Sequence[Callback] = (),
                 progress: bool = True, console=None) -> RunResult:
    """Train ``cfg`` (resuming from ``resume``, a run folder or checkpoint file, if given).

    ``data``: a `DSprites`, or a zero-argument function returning one, called once after ``out``
    is checked (default: ``load_training_data(cfg.data)``). ``step_builder``:
    the step implementation (default: the reference step; the fast path passes its own).
    ``callbacks``: called as ``cb(state, metrics)`` after every step (e.g. periodic evaluation).
    Bad input raises FastFVAEError before anything is written.
    """
    cfg.validate()
    out = Path(cfg.out)
    payload = None
    if resume is not None:
        payload = load_checkpoint(resume)
        conflicts = resume_conflicts(config_of(payload), cfg)
        if conflicts:
            raise FastFVAEError(f"cannot resume {checkpoint_path(resume)}: it was trained with different "
                                f"{', '.join(conflicts)}; resume with its own settings or start a new run")
        done = int(payload["state"]["step"])
        if done >= cfg.steps:
            raise FastFVAEError(f"the checkpoint is already at step {done} of --steps {cfg.steps}; "
                                f"pass a larger --steps to train further")
    in_place = resume is not None and out.resolve() == checkpoint_path(resume).parent.resolve()
    check_out(out, in_place)
    device = resolve_device(cfg.device)
    if step_builder is None:
        if cfg.fast:
            raise FastFVAEError("cfg.fast needs the fast path's step_builder (the CLI passes it)")
        step_builder = make_reference_step
    if data is None or callable(data):
        data = make_out_then_load(out, (lambda: load_training_data(cfg.data)) if data is None else data)
    else:
        make_out(out)

    state = TrainState.create(cfg, len(data), device)
    log = MetricLog(out)
    elapsed0 = 0.0
    if payload is not None:
        state.load_state_dict(payload["state"])
        restore_rng_states(payload["rng"])
        elapsed0 = float(payload.get("elapsed_s", 0.0))
        log.truncate_after(state.step)
    elif log.path.exists():
        log.path.unlink()
    atomic_write_text(out / CONFIG_NAME, cfg.to_json() + "\n")
    step_fn = step_builder(state, data)

    t_start = time.perf_counter()
    last = dict(payload.get("metrics", {})) if payload is not None else {}

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t_start

    def save() -> Path:
        return save_checkpoint(out, {"config": cfg.to_dict(), "state": state.state_dict(),
                                     "rng": capture_rng_states(), "elapsed_s": elapsed(), "metrics": last})

    def flush_log() -> None:
        nonlocal last
        means, rate = meter.flush()
        last = means
        log.write({"step": state.step, **means, "steps_per_s": rate, "elapsed_s": elapsed()})
        bar.update(state.step, means, rate)

    meter = IntervalMeter()
    status, mid_step = "completed", False
    ckpt = checkpoint_path(out)
    try:
        with _StopOnSigint() as stop, TrainProgress(cfg.steps, state.step, progress, console) as bar:
            while state.step < cfg.steps:
                if stop.requested:
                    status = "interrupted"
                    break
                mid_step = True
                metrics = step_fn(draw_step_inputs(cfg, state.sampler, state.generator))
                state.step += 1
                mid_step = False
                if cfg.debug_nan_at_step == state.step:
                    metrics["loss"] = metrics["loss"] * float("nan")
                meter.add(metrics)
                # A step that defers host syncs (the fast path's CUDA graph) is checked when the
                # loop reads back anyway: NaN/inf propagates into the interval sums.
                deferred = getattr(step_fn, "defers_sync", False)
                due = (state.step % cfg.log_every == 0 or state.step == cfg.steps or stop.requested
                       or (cfg.ckpt_every and state.step % cfg.ckpt_every == 0))
                if (due or not deferred) and not _finite(meter.sums if deferred else metrics):
                    kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
                    raise TrainingDiverged(f"loss became NaN/inf at step {state.step}; training stopped, {kept}")
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    flush_log()
                else:
                    bar.update(state.step)
                for callback in callbacks:
                    callback(state, metrics)
                if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.step < cfg.steps:
                    save()
            if meter.count:
                flush_log()
    except KeyboardInterrupt:
        if mid_step:
            raise
        status = "interrupted"
        if meter.count:
            flush_log()
    ckpt = save()
    return RunResult(state, out, status, ckpt, last, data)
