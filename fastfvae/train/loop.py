"""The training loop: `run_training(cfg)` — set-up, steps, logs, checkpoints, signals, NaN guard, resume.

Per step: draw the step's randomness (`draw_step_inputs`: rows from the sampler, noise from
the run's generator, in the documented order; the rows only for a step whose
``draws_own_noise`` is true), call the step function (the reference step, or the fast path's
via ``step_builder``), check the loss is finite, log every ``log_every`` steps, checkpoint
every ``ckpt_every`` steps and at the end.

- One process per run folder: the run holds `RunFolderLock` (an flock on ``<out>/.lock``)
  from set-up to return; a second run on the same folder gets a one-line FastFVAEError
  naming the holder's PID. The owner first deletes temporary files that killed writers left.
- Set-up (data, models, resumed state, step builder) happens before anything is written to
  the folder: a run that fails there (bad input) leaves nothing behind, not even a folder it
  created. ``config.json`` is written when training starts and describes the run; a folder
  whose run stopped before its first checkpoint (killed, double Ctrl-C) holds no run: a new
  ``train --out`` may use it, and ``--resume`` starts it again from step 0 with its config.
- Ctrl-C or SIGTERM: the first asks the loop to stop after the current step; it then writes a
  consistent checkpoint and returns ``status="interrupted"`` (``stop_signal`` says which).
  One that comes before the first step (during set-up: data load, step build) raises
  `StoppedBeforeTraining` instead: a fresh run is abandoned like a failed set-up, a resumed
  run's checkpoint is left as it is.
  A second one interrupts at once (KeyboardInterrupt); a checkpoint is then written only if
  no step was half-done.
- NaN/inf guard: the loss every step (or at log time for a step that defers host syncs), and
  the weights and Adam state of both networks (what the fast step keeps of its own written
  back first, `sync_state`) at every log line and before every checkpoint, with
  one reduction per tensor. Either raises `TrainingDiverged` and nothing more is written, so
  the last checkpoint on disk is the last good state; no checkpoint holds NaN/inf.
- A checkpoint that cannot be written (disk full) stops the run with a one-line
  FastFVAEError; the previous checkpoint is intact.
- Resume: the checkpoint's models, optimisers, generator, sampler, step and global RNG
  states are restored, log lines (train and eval) past the checkpoint are dropped, and the run continues
  exactly as if it had never stopped (bit-exact on CPU). A step that draws its own noise
  (CUDA graph, noise="device") takes it from the CUDA generator, whose state the checkpoint
  holds (``rng["torch_cuda"]``); the run's host generator then stays at its seed, so a resumed
  run continues with the same rows and its device noise from the saved CUDA generator state. Such runs are not
  bit-identical to the host stream's (a different generator), with or without a resume.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastfvae.data.paths import make_folder, remove_empty_folders
from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import (
    CHECKPOINT_NAME, CONFIG_NAME, atomic_write_text, capture_rng_states, checkpoint_path, load_resume_point,
    remove_stale_temp_files, restore_rng_states, restore_state, save_checkpoint,
)
from fastfvae.train.config import TrainConfig, check_settings_apply, resume_conflicts
from fastfvae.train.lock import RunFolderLock, check_not_in_use
from fastfvae.train.progress import EVAL_LOG_NAME, LOG_NAME, IntervalMeter, MetricLog, TrainProgress
from fastfvae.train.reference import StepFn, StepShapes, draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState, resolve_device

#: Files only the folder's owner writes; their temporary files are removed by the next owner.
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME, EVAL_LOG_NAME)
#: Builds a step function for a fresh/restored state: ``builder(state, data) -> StepFn``.
StepBuilder = Callable[[TrainState, object], StepFn]
Callback = Callable[[TrainState, dict], None]


class TrainingDiverged(RuntimeError):
    """A loss, weight or optimiser state became NaN or inf; the message says at which step and
    which checkpoint is kept. ``outs``: the run folders that diverged (all of a pack's runs when
    it cannot tell), ``step``: the step at which it was found."""

    def __init__(self, message: str, outs=(), step: int | None = None) -> None:
        super().__init__(message)
        self.outs = tuple(str(out) for out in outs)
        self.step = step


class StoppedBeforeTraining(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM (``signum``) arrived before the run's first step: the run is abandoned
    like a failed set-up (a fresh run leaves nothing behind; a resumed run's checkpoint is not
    rewritten). A KeyboardInterrupt, so code that handles Ctrl-C handles this too."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunResult:
    state: TrainState
    out: Path
    status: str                      # "completed" or "interrupted"
    checkpoint: Path
    metrics: dict = field(default_factory=dict)  # the last logged interval means
    data: object = None
    stop_signal: int | None = None   # the signal that stopped an interrupted run (SIGINT, SIGTERM)
    steps_run: int = 0               # steps this call trained (a resumed run: since the resume)
    seconds: float = 0.0             # wall time of this call's steps (set-up excluded)


def load_training_data(path: str | None, dataset: str = "dsprites"):
    """The ground-truth dataset ``dataset`` from ``path`` (None: the dataset's default;
    dSprites: the cached real file, else the procedural set), via `fastfvae.data.registry`."""
    from fastfvae.data.registry import load_dataset

    return load_dataset(dataset, path)


def lazy_training_data(cfg: TrainConfig):
    """A zero-argument function loading ``cfg``'s dataset on its first call only, so a run and
    its callbacks share one copy of it (and a bad --out fails before it is loaded)."""
    return functools.cache(lambda: load_training_data(cfg.data, cfg.dataset))


def holds_run(out: Path) -> bool:
    """A folder holds a run once it has a checkpoint (before that there is nothing to keep)."""
    return (out / CHECKPOINT_NAME).exists()


def check_out(out: Path, resuming_in_place: bool) -> None:
    """FastFVAEError unless ``out`` can hold a new run (or is the run being resumed); no side effects."""
    if out.exists() and not out.is_dir():
        raise FastFVAEError(f"cannot write to --out {out}: it exists and is not a directory")
    if holds_run(out) and not resuming_in_place:
        check_not_in_use(out)  # a run still going on there is the better thing to say
        raise FastFVAEError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise FastFVAEError(f"cannot write to --out {out}: {ancestor} is not a writable directory")


def make_out_then_load(out: Path, load):
    """Create ``out`` first (an unusable --out fails before the slow load), then return ``load()``.

    If loading fails, the folders this call created (still empty) are removed again: bad input
    leaves nothing behind.
    """
    created = make_folder(out, "--out")
    try:
        return load()
    except BaseException:
        remove_empty_folders(created)
        raise


class _StopOnSignals:
    """First SIGINT or SIGTERM: remember it (``requested``); a second: raise KeyboardInterrupt.
    Installed from the main thread only (elsewhere signals cannot be handled)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _state_tensors(state: TrainState) -> dict[str, list[torch.Tensor]]:
    """The weights and the Adam moments of each network, by name (after the step's
    `sync_state`: the run's own optimisers, in the reference's format)."""
    parts = {}
    for name, model, opt in (("the VAE", state.models.vae, state.optims.vae),
                             ("D", state.models.disc, state.optims.disc)):
        if model is None:
            continue
        parts[f"{name}'s weights"] = [p.detach() for p in model.parameters()]
        parts[f"{name}'s Adam state"] = [t for s in opt.state.values() for k, t in s.items()
                                         if k != "step" and torch.is_tensor(t) and t.numel()]
    return parts


def nonfinite_state(state: TrainState) -> str | None:
    """Which part of the weights / optimiser state holds a NaN or inf, or None if all are finite.

    One sum per tensor (a NaN/inf anywhere makes its sum non-finite); only when some sum is not
    finite are the tensors looked at with min/max (a sum of large finite values may overflow).
    """
    parts = _state_tensors(state)
    tensors = [t for ts in parts.values() for t in ts]
    if bool(torch.isfinite(torch.stack([t.sum().float() for t in tensors])).all()):
        return None
    for name, ts in parts.items():
        for t in ts:
            lo, hi = torch.aminmax(t)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return name
    return None


#: The metrics whose NaN/inf stops training (a plug-in metric may be NaN/inf legitimately);
#: the pack's loop checks the same ones.
CHECKED_METRICS = ("loss", "d_loss")


def deferred_check_due(cfg: TrainConfig, step: int, stop_requested: bool, evaluating: bool) -> bool:
    """Whether a step that defers host syncs (a CUDA graph's) is checked for NaN/inf after
    ``step``: wherever the loop next reads or uses the weights (a log step, the last step, a stop,
    a checkpoint step, and an evaluation step when ``evaluating``), so that nothing is logged,
    saved, evaluated or stopped on from an interval that diverged. The single run's loop and a
    pack's (`fastfvae.study.pack`) ask the same."""
    return bool(step % cfg.log_every == 0 or step == cfg.steps or stop_requested
                or (cfg.ckpt_every and step % cfg.ckpt_every == 0) or evaluating)


def _finite(metrics: dict) -> bool:
    values = [metrics[k] for k in CHECKED_METRICS if k in metrics]
    return bool(torch.isfinite(torch.stack([v.float() for v in values])).all())


class _OwnedFolder:
    """The run folder, created (if missing) and locked; `abandon` undoes both after a failed set-up."""

    def __init__(self, out: Path) -> None:
        self.created = make_folder(out, "--out")
        self.lock = RunFolderLock(out)
        try:
            self.lock.acquire()
        except BaseException:
            remove_empty_folders(self.created)
            raise

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        self.lock.release()
        remove_empty_folders(self.created)


@dataclass(frozen=True)
class ResumePoint:
    """A run's saved state as `read_resume_point` read it: its config, its checkpoint payload
    (None: the run never checkpointed) and the checkpoint file's identity before the read (so a
    save that came later is noticed and re-read)."""
    config: TrainConfig
    payload: dict | None
    file: tuple | None


def read_resume_point(resume: str | os.PathLike) -> ResumePoint:
    """Read the run folder or checkpoint ``resume`` once (`load_resume_point`)."""
    identity = _file_identity(checkpoint_path(resume))
    saved_cfg, payload = load_resume_point(resume)
    return ResumePoint(saved_cfg, payload, identity)


def resume_point(cfg: TrainConfig, resume: str | os.PathLike, point: ResumePoint | None = None) -> ResumePoint:
    """``point`` (read now if not given), whose payload is what to continue from (None: the
    folder's run never checkpointed, it starts again from step 0); FastFVAEError if ``cfg``
    cannot continue it."""
    point = point if point is not None else read_resume_point(resume)
    saved_cfg, payload = point.config, point.payload
    conflicts = resume_conflicts(saved_cfg, cfg)
    if conflicts:
        raise FastFVAEError(f"cannot resume {checkpoint_path(resume)}: it was trained with different "
                            f"{', '.join(conflicts)}; resume with its own settings or start a new run")
    if payload is not None and int(payload["state"]["step"]) >= cfg.steps:
        raise FastFVAEError(f"the checkpoint is already at step {payload['state']['step']} of --steps "
                            f"{cfg.steps}; pass a larger --steps to train further")
    return point


def _file_identity(path: Path) -> tuple | None:
    """(inode, size, mtime) of ``path``, None if absent: every checkpoint save is a new inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def run_training(cfg: TrainConfig, *, data=None, resume: str | os.PathLike | None = None,
                 resume_from: ResumePoint | None = None,
                 step_builder: StepBuilder | None = None, callbacks: Sequence[Callback] = (),
                 progress: bool = True, console=None,
                 on_finish: Callable[["RunResult"], None] | None = None) -> RunResult:
    """Train ``cfg`` (resuming from ``resume``, a run folder or checkpoint file, if given;
    ``resume_from``: its `read_resume_point`, when the caller has read it already).

    ``data``: a `DSprites`, or a zero-argument function returning one, called once after ``out``
    is checked (default: ``load_training_data(cfg.data)``). ``step_builder``:
    the step implementation (default: `fastfvae.fast.make_fast_step` when ``cfg.fast``, else
    the reference step).
    ``callbacks``: called as ``cb(state, metrics)`` after every step (e.g. periodic evaluation).
    The VAE's weights are always current; the rest of the state (optimisers, a by-hand D's
    flat weights) is written back by the step at log, checkpoint and ``eval_every`` steps.
    ``on_finish``: called with the result while the folder is still this run's (the CLI draws
    its figures there). Bad input raises FastFVAEError before anything is written.
    """
    cfg.validate()
    check_settings_apply(cfg)
    out = Path(cfg.out)
    point = resume_point(cfg, resume, resume_from) if resume is not None else None
    payload = point.payload if point is not None else None
    in_place = resume is not None and out.resolve() == checkpoint_path(resume).parent.resolve()
    check_out(out, in_place)
    device = resolve_device(cfg.device)
    if step_builder is None:
        if cfg.fast:
            from fastfvae.fast import make_fast_step  # imported only when used: the loop stays light

            step_builder = make_fast_step
        else:
            step_builder = make_reference_step

    with _StopOnSignals() as stop:
        folder = _OwnedFolder(out)
        try:
            check_out(out, in_place)  # again, as the owner: another run may have finished here meanwhile
            if point is not None and _file_identity(checkpoint_path(resume)) != point.file:
                payload = resume_point(cfg, resume).payload  # a run that held the folder saved again meanwhile
            remove_stale_temp_files(out, RUN_FILES)
            if data is None:
                data = load_training_data(cfg.data, cfg.dataset)
            elif callable(data):
                data = data()
            state = TrainState.create(cfg, len(data), device)
            if payload is not None:
                restore_state(state, payload, checkpoint_path(resume))
                restore_rng_states(payload["rng"])
            step_fn = step_builder(state, data)
            if stop.requested:  # during set-up: nothing to save yet
                raise _stopped_before_training(stop.signum, (
                    f"{checkpoint_path(resume)} is unchanged (step {payload['state']['step']})"
                    if payload is not None else "no checkpoint was written"))
        except BaseException:
            folder.abandon()
            raise
        try:
            result = _train(cfg, out, state, step_fn, data, payload, in_place, callbacks, stop,
                            progress, console)
            if on_finish is not None:
                on_finish(result)
            return result
        finally:
            folder.release()


def _stopped_before_training(signum: int, kept: str) -> StoppedBeforeTraining:
    how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    return StoppedBeforeTraining(signum, f"{how} before the first step; {kept}")


def _train(cfg: TrainConfig, out: Path, state: TrainState, step_fn: StepFn, data, payload, in_place: bool,
           callbacks: Sequence[Callback], stop: _StopOnSignals, progress: bool, console) -> RunResult:
    """The steps of `run_training`, in the folder it owns, from the restored (or fresh) state."""
    log = MetricLog(out)
    elapsed0 = 0.0
    if payload is not None:
        elapsed0 = float(payload.get("elapsed_s", 0.0))
        log.truncate_after(state.step)
        MetricLog(out, EVAL_LOG_NAME).truncate_after(state.step)  # evaluations past the checkpoint run again
    else:  # a new run, or one started again in a folder its killed first try left
        for name in (LOG_NAME, EVAL_LOG_NAME):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / CONFIG_NAME, cfg.to_json() + "\n")

    t_start = time.perf_counter()
    step0 = state.step
    last = dict(payload.get("metrics", {})) if payload is not None else {}
    ckpt = checkpoint_path(out)
    saved_step = state.step if payload is not None and in_place else None  # the checkpoint on disk

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t_start

    def kept() -> str:
        return (f"the last good checkpoint is {ckpt} (step {saved_step})" if saved_step is not None
                else "no checkpoint was written")

    # A step that keeps parts of the state in its own form (the fast step's optimisers and flat
    # buffers) writes them back into ``state`` before the loop reads it.
    sync_state = getattr(step_fn, "sync_state", None) or (lambda: None)

    def check_state() -> None:
        sync_state()
        bad = nonfinite_state(state)
        if bad is not None:
            raise TrainingDiverged(f"{bad} became NaN/inf (found at step {state.step}; a loss weight too large "
                                   f"for float32, such as --beta/--gamma 1e30, overflows it); training stopped, "
                                   f"{kept()}", outs=(out,), step=state.step)

    def save() -> Path:
        nonlocal saved_step
        check_state()
        try:
            path = save_checkpoint(out, {"config": cfg.to_dict(), "state": state.state_dict(),
                                         "rng": capture_rng_states(), "elapsed_s": elapsed(), "metrics": last})
        except FastFVAEError as exc:
            raise FastFVAEError(f"{exc}; training stopped at step {state.step}, {kept()}") from None
        saved_step = state.step
        return path

    def flush_log() -> None:
        nonlocal last
        check_state()  # first: nothing is logged for an interval that diverged
        means, rate = meter.flush()
        last = means
        try:
            log.write({"step": state.step, **means, "steps_per_s": rate, "elapsed_s": elapsed()})
        except FastFVAEError as exc:
            raise FastFVAEError(f"{exc}; training stopped at step {state.step}, {kept()}") from None
        bar.update(state.step, means, rate)

    meter = IntervalMeter()
    # A step that draws its noise on the device (the CUDA graph's noise="device") gets the rows
    # only: the sampler advances as always (same batches), the host generator not at all.
    host_noise = not getattr(step_fn, "draws_own_noise", False)
    shapes = StepShapes.of(cfg, data=data)
    status, mid_step = "completed", False
    try:
        with TrainProgress(cfg.steps, state.step, progress, console) as bar:
            while state.step < cfg.steps:
                if stop.requested:
                    if state.step == step0:  # it came after set-up, before any step: still nothing to save
                        raise _stopped_before_training(stop.signum, kept())
                    status = "interrupted"
                    break
                mid_step = True
                metrics = step_fn(draw_step_inputs(shapes, state.sampler, state.generator, noise=host_noise))
                state.step += 1
                mid_step = False
                if cfg.debug_nan_at_step == state.step:
                    metrics["loss"] = metrics["loss"] * float("nan")
                meter.add(metrics)
                # A step that defers host syncs (the fast path's CUDA graph) is checked when the
                # loop reads back anyway (NaN/inf propagates into the interval sums), and before
                # an evaluation step's callbacks see the weights.
                deferred = getattr(step_fn, "defers_sync", False)
                evaluating = bool(callbacks and cfg.eval_every and state.step % cfg.eval_every == 0)
                due = deferred_check_due(cfg, state.step, stop.requested, evaluating)
                if (due or not deferred) and not _finite(meter.sums if deferred else metrics):
                    raise TrainingDiverged(f"loss became NaN/inf at step {state.step}; training stopped, {kept()}",
                                           outs=(out,), step=state.step)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    flush_log()
                else:
                    bar.update(state.step)
                if evaluating:
                    sync_state()  # an evaluation step: the callbacks see the whole state as it is
                for callback in callbacks:
                    callback(state, metrics)
                if cfg.ckpt_every and state.step % cfg.ckpt_every == 0 and state.step < cfg.steps:
                    save()
            if meter.count:
                flush_log()
    except KeyboardInterrupt:
        if mid_step or state.step == step0:  # half a step, or none yet: nothing to save
            raise
        status = "interrupted"
        if meter.count:
            flush_log()
    seconds = time.perf_counter() - t_start
    ckpt = save()
    stop_signal = (stop.signum or signal.SIGINT) if status == "interrupted" else None
    return RunResult(state, out, status, ckpt, last, data, stop_signal, state.step - step0, seconds)
