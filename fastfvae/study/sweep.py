"""A sweep: the runs of a spec (`fastfvae.study.spec`) trained pack by pack in one folder.

    DIR/sweep.json        the resolved spec: every run's name, block, grid point and config
    DIR/sweep.lock        held by the one process working on DIR (`ExclusiveFileLock`)
    DIR/runs/<name>/      one run folder per run, the layout of a `fastfvae train` run

`plan_sweep(spec, DIR)` expands the spec, checks every run's config and matches it against
``DIR/sweep.json`` if there is one, all before anything is written. A sweep folder may grow
(new blocks, seeds or grid values: new runs) and its runs may change what a resumed run may
change (`RESUMABLE_CHANGES`: more steps, another device, the evaluation settings); a run of the
recorded sweep that the spec no longer has, or has with a different training, is refused:
its folder holds that training. A run keeps the name it was recorded with.

`run_sweep(plan)` owns DIR (the lock), writes ``sweep.json`` atomically, groups the runs by
`pack_key`, cuts each group into packs of ``pack_size`` (default `DEFAULT_PACK_SIZE` for the
device) in the record's order (spec order, runs added later after the recorded ones), and
trains the packs in order with `run_pack`, skipping finished runs; `train_pack` resumes run
folders that hold a checkpoint. Packs depend only on the record and the pack size, never on
which runs are done, so an interrupted pack resumes as the same pack (model k of a pack
equals its single run within fp32 parity, and a resumed pack equals the uninterrupted one bit
for bit). A pack trains its runs in lockstep, so a pack whose unfinished runs stand at
different steps (runs added to a grown sweep) trains as one pack per step. Ctrl-C / SIGTERM:
the pack stops after its step with checkpoints saved, or, between packs, before the next
one; the sweep then returns ``status="interrupted"`` and the next call carries on. A run that
diverges is marked (``runs/<name>/diverged.json``) and skipped from then on while the others
train on (`run_pack`); `SweepResult.diverged` names those runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastfvae.errors import FastFVAEError
from fastfvae.study.pack import pack_key, train_pack, unstackable_adversary
from fastfvae.study.spec import Spec, SweepRun, dedupe, expand, identity
from fastfvae.train.checkpoint import atomic_write_text, checkpoint_path
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import lazy_training_data
from fastfvae.train.lock import ExclusiveFileLock

SWEEP_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
RUNS_DIR = "runs"
FORMAT = "fastfvae-sweep"
VERSION = 1
#: Runs per pack when ``--pack`` is not given, by the device the pack trains on. CPU: 8 (the
#: threaded pack: each run's own fast step, one model per core; why 8 and the measurements:
#: docs/studies.md, "Packs"). CUDA: 32, unmeasured (a batch-64 step uses a sliver of a GPU;
#: bench/gpu_check.sh measures it).
DEFAULT_PACK_SIZE = {"cpu": 8, "cuda": 32}
#: The defaults of sweep folders whose record does not hold them (written before it did): the
#: pack sizes those folders were started with, so their packs, and bit-exact resume, stay.
RECORDLESS_PACK_SIZE = {"cpu": 1, "cuda": 32}


# --- the plan ---------------------------------------------------------------------------------
@dataclass
class SweepPlan:
    """A checked sweep: its folder, its runs (named, configs with ``out``) and the record it
    matched (None for a new folder)."""
    out: Path
    spec: Spec
    runs: list[SweepRun]
    recorded: dict | None = None
    steps: int | None = None         # the --steps / --device overrides it was made with
    device: str | None = None
    pack_size: int | None = None     # --pack, else the recorded one; None: pack_defaults
    #: K per device kind when ``pack_size`` is None: `DEFAULT_PACK_SIZE` for a new folder, the
    #: recorded ones for an existing folder (a new default never changes a started sweep's packs)
    pack_defaults: dict = field(default_factory=lambda: dict(DEFAULT_PACK_SIZE))

    def packs(self) -> list[list[SweepRun]]:
        return plan_packs(self.runs, self.pack_size, self.pack_defaults)

    def record(self) -> dict:
        runs = [{"name": r.name, "block": r.block, "label": r.label, "point": dict(r.point), "seed": r.seed,
                 "config": r.config.to_dict()} for r in self.runs]
        return {"format": FORMAT, "version": VERSION, "source": self.spec.source, "blocks": list(self.spec.raw),
                "pack": self.pack_size, "pack_defaults": self.pack_defaults, "runs": runs}


def read_record(out: Path) -> dict | None:
    """``out/sweep.json`` (None if absent); FastFVAEError if it is not a sweep record."""
    path = Path(out) / SWEEP_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FastFVAEError(f"cannot read {path}: {exc}; expected the record a fastfvae sweep wrote") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("runs"), list):
        raise FastFVAEError(f"{path} is not a fastfvae sweep record")
    return record


def check_folder(out: Path) -> None:
    """FastFVAEError unless ``out`` can hold a sweep: absent, empty, or a sweep folder."""
    if out.exists() and not out.is_dir():
        raise FastFVAEError(f"--out {out} is a file; expected a folder for the sweep")
    if out.is_dir() and not (out / SWEEP_FILE).exists():
        others = [p.name for p in out.iterdir() if p.name != LOCK_FILE]
        if others:
            raise FastFVAEError(f"--out {out} holds files but no {SWEEP_FILE} ({others[0]} ...): it is not a sweep "
                                "folder; choose an empty or new folder")


def plan_sweep(spec: Spec, out: str | os.PathLike, *, steps: int | None = None, device: str | None = None,
               pack_size: int | None = None) -> SweepPlan:
    """Expand and check ``spec`` for the folder ``out`` (reads only). ``pack_size`` None: the
    one the folder's record holds (the packs of an interrupted sweep stay as they were, and a
    resumed pack equals the uninterrupted one bit for bit only as the same pack)."""
    out = Path(out)
    check_folder(out)
    _check_pack_size(pack_size)
    runs = expand(spec, out / RUNS_DIR, steps=steps, device=device)
    recorded = read_record(out)
    defaults = dict(DEFAULT_PACK_SIZE)
    if recorded is not None:
        runs = match_record(runs, recorded, out)
        if pack_size is None:
            pack_size = recorded.get("pack")
            _check_pack_size(pack_size)
        defaults = recorded.get("pack_defaults", RECORDLESS_PACK_SIZE)
        if not isinstance(defaults, dict) or set(defaults) != set(DEFAULT_PACK_SIZE):
            raise FastFVAEError(f"{out / SWEEP_FILE}: pack_defaults must map {', '.join(DEFAULT_PACK_SIZE)} to pack "
                                f"sizes, got {defaults!r}")
        for k in defaults.values():
            _check_pack_size(k)
    return SweepPlan(out, spec, runs, recorded, steps, device, pack_size, dict(defaults))


def _check_pack_size(pack_size) -> None:
    if pack_size is not None and (not isinstance(pack_size, int) or isinstance(pack_size, bool) or pack_size < 1):
        raise FastFVAEError(f"--pack must be an integer >= 1, got {pack_size!r}")


def match_record(runs: list[SweepRun], recorded: dict, out: Path) -> list[SweepRun]:
    """``runs`` named as ``recorded`` names them (matched by `identity`) and in its order, then
    the new runs, in spec order, with names no recorded run has (so the packs of the recorded
    runs stay as they were). FastFVAEError for a recorded run the spec no longer trains."""
    by_identity = {}
    for entry in recorded["runs"]:
        try:
            by_identity[identity(entry["config"])] = entry["name"]
        except (KeyError, TypeError):
            raise FastFVAEError(f"{out / SWEEP_FILE} is damaged (a run without name or config)") from None
    matched = {}
    for i, run in enumerate(runs):
        name = by_identity.get(identity(run.config))
        if name is not None:
            matched[i] = name
    missing = sorted(set(by_identity.values()) - set(matched.values()))
    if missing:
        raise FastFVAEError(f"{out} holds the run {missing[0]} ({len(missing)} in all) that this spec does not train "
                            "(a sweep folder's runs may be added to, and resumed with more steps or other "
                            "device / evaluation settings, but not changed or removed); use another --out")
    new = [i for i in range(len(runs)) if i not in matched]
    fresh = dedupe([runs[i].name for i in new], taken=set(matched.values()))
    names = dict(matched) | dict(zip(new, fresh))
    position = {entry["name"]: n for n, entry in enumerate(recorded["runs"])}
    order = sorted(matched, key=lambda i: position[matched[i]]) + new
    result = []
    for i in order:
        run = runs[i]
        if names[i] != run.name:
            folder = str(out / RUNS_DIR / names[i])
            run = SweepRun(names[i], run.block, run.label, run.point, run.config.replace(out=folder))
        result.append(run)
    return result


# --- packs ------------------------------------------------------------------------------------
def device_kind(device: str) -> str:
    """"cuda" or "cpu": where ``device`` ("auto", "cpu", "cuda") trains (no error without CUDA)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def unstackable(cfg) -> str | None:
    """Why ``cfg``'s runs train one by one (None when they can share a pack): on a GPU a pack is
    stacked, one Adam over the K runs' stacked tensors, and a method whose adversary optimiser
    is not a plain torch Adam (a plug-in's SGD, AdamW...) cannot be stacked; its runs train as
    single runs there, each with its own optimiser, as `fastfvae train` trains them. On CPU each
    run of a pack keeps its own step, so any optimiser packs."""
    if device_kind(cfg.device) == "cpu":
        return None
    optimizer = unstackable_adversary(cfg)
    return None if optimizer is None else f"single runs on {device_kind(cfg.device)}: its adversary optimiser, " \
        f"{optimizer}, does not stack (a GPU pack steps one plain torch Adam for all its runs)"


def plan_packs(runs: Sequence[SweepRun], pack_size: int | None = None,
               defaults: dict | None = None) -> list[list[SweepRun]]:
    """The runs grouped by `pack_key` (groups in order of their first run), each group cut into
    packs of ``pack_size`` (None: ``defaults``, default `DEFAULT_PACK_SIZE`, for the group's
    device) in run order; a group that cannot be stacked (`unstackable`: on a GPU, an adversary
    optimiser other than a plain Adam) into packs of one, whatever ``pack_size`` says."""
    _check_pack_size(pack_size)
    defaults = DEFAULT_PACK_SIZE if defaults is None else defaults
    groups: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        groups.setdefault(pack_key(run.config), []).append(run)
    packs = []
    for members in groups.values():
        k = pack_size or defaults[device_kind(members[0].config.device)]
        if unstackable(members[0].config) is not None:
            k = 1
        packs += [members[i:i + k] for i in range(0, len(members), k)]
    return packs


def at_same_step(pack: Sequence[SweepRun], at: dict[str, int]) -> list[list[SweepRun]]:
    """The unfinished runs of ``pack`` (``at``: each run's saved step), split into the parts
    that are at the same step (a pack trains in lockstep). A pack stopped by Ctrl-C stopped as a
    whole, so it is one part; runs added to a sweep join the recorded ones only at step 0."""
    parts: dict[int, list[SweepRun]] = {}
    for run in pack:
        if at[run.name] < run.config.steps:
            parts.setdefault(at[run.name], []).append(run)
    return list(parts.values())


def saved_step(cfg: TrainConfig) -> int | None:
    """The step of ``cfg.out``'s checkpoint (None: none). Reads the step only (memory-mapped):
    a status over many runs does not load their weights."""
    path = checkpoint_path(cfg.out)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(payload["state"]["step"])
    except Exception:  # damaged: the run itself says what is wrong when the sweep reaches it
        return 0


#: A run folder's record that the run diverged: the sweep skips it from then on (delete the file
#: to train the run again, e.g. after changing what made it diverge).
DIVERGED_FILE = "diverged.json"


@dataclass(frozen=True)
class DivergedRun:
    """`run_pack`'s result for a run that diverged (its last good checkpoint is kept)."""
    out: str
    step: int | None
    message: str
    status: str = "diverged"


def diverged_record(cfg: TrainConfig) -> dict | None:
    """``cfg.out``'s `DIVERGED_FILE` (None: the run has not diverged)."""
    path = Path(cfg.out) / DIVERGED_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"step": None, "message": f"{path} is unreadable"}


def _same_folder(path) -> str:
    """``path`` in one form for comparing run folders (``d/./run/`` is ``d/run``)."""
    return os.path.realpath(path)


def run_pack(configs: Sequence[TrainConfig], *, data=None, progress: bool = True, console=None,
             callbacks_for=None) -> list:
    """Train one pack (its runs' configs) in this process: `train_pack`. The unit a scheduler
    hands out: every pack is independent of the others and resumable in its run folders.

    A run that diverges (NaN/inf) does not take the others with it: it is marked
    (`DIVERGED_FILE` in its folder: the step and the message; its last good checkpoint is kept)
    and the pack trains again without it, its other runs resumed from their last checkpoints
    (equal, within fp32 parity, to what they would have been). Returns one result per config:
    a `RunResult`, a `DivergedRun`, or None (finished before, or marked diverged before)."""
    from fastfvae.train.loop import TrainingDiverged

    configs = list(configs)
    results: dict[str, object] = {}
    todo = [cfg for cfg in configs if diverged_record(cfg) is None]
    while todo:
        try:
            trained = train_pack(todo, data=data, progress=progress, console=console, callbacks_for=callbacks_for)
        except TrainingDiverged as exc:
            bad = {_same_folder(out) for out in exc.outs}
            if not bad & {_same_folder(cfg.out) for cfg in todo}:
                raise  # not one of these runs (or unnamed): nothing to mark, retrying would loop
            for cfg in todo:
                if _same_folder(cfg.out) in bad:
                    atomic_write_text(Path(cfg.out) / DIVERGED_FILE,
                                      json.dumps({"step": exc.step, "message": str(exc)}) + "\n")
                    results[cfg.out] = DivergedRun(cfg.out, exc.step, str(exc))
            todo = [cfg for cfg in todo if _same_folder(cfg.out) not in bad]
            continue
        results.update((cfg.out, result) for cfg, result in zip(todo, trained))
        break
    return [results.get(cfg.out) for cfg in configs]


# --- running ----------------------------------------------------------------------------------
@dataclass
class SweepResult:
    status: str                          # "completed" or "interrupted"
    runs: int                            # runs in the sweep
    done: int                            # runs finished now
    trained: list[str] = field(default_factory=list)   # runs this call trained (some or all steps)
    stop_signal: int | None = None
    pack: int | None = None              # the pack (1-based) that was stopped
    seconds: float = 0.0
    diverged: list[str] = field(default_factory=list)  # runs marked diverged (now or before)


class _StopBetweenPacks:
    """Ctrl-C / SIGTERM outside a pack's training: stop before the next pack (a second one:
    KeyboardInterrupt). While a pack trains, `train_pack`'s own handler takes over (stop after
    the step, checkpoints saved) and gives ours back."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _in_use(out: Path):
    return lambda pid: (f"sweep folder {out} is in use by another fastfvae process (PID {pid}); wait for it to "
                        "finish or stop it, or choose another --out")


def sweep_lock(out: Path) -> ExclusiveFileLock:
    """The lock that makes ``out`` one process's (its folder must exist)."""
    return ExclusiveFileLock(Path(out) / LOCK_FILE, _in_use(Path(out)))


def run_sweep(plan: SweepPlan, *, progress: bool = True, console=None,
              callbacks_for: Callable | None = None, data=None, status=None) -> SweepResult:
    """Train ``plan``'s runs, pack by pack (see the module docstring).

    ``data``: the dataset for every run (default: each dataset loaded once, on first use,
    shared by the packs that train on it). ``callbacks_for(cfg, data)``: each run's per-step
    callbacks. ``status(line)``: called with one line before each pack (the sweep's progress)."""
    from fastfvae.fast.precision import check_bf16_runs
    from fastfvae.train.state import resolve_device

    # refused before anything is written: --device cuda without CUDA, bf16 where it cannot run
    for kind, precision in {(run.config.device, run.config.precision if run.config.fast else "fp32")
                            for run in plan.runs}:
        check_bf16_runs(precision, resolve_device(kind), source="the sweep's precision bf16",
                        fix='set precision = "fp32" in its blocks')
    with owned_sweep(plan) as (plan, packs):
        return _run_packs(plan, packs, progress, console, callbacks_for, data, status)


@contextlib.contextmanager
def owned_sweep(plan: SweepPlan):
    """Hold ``plan.out`` (its lock) and write its ``sweep.json``; yields the plan (made again
    if another process changed the record after it was made) and its packs. Whoever trains
    the packs (this process, or Ray tasks: `fastfvae.study.ray_backend`) does it inside."""
    from fastfvae.data.paths import make_folder, remove_empty_folders

    out = plan.out
    created = make_folder(out, "--out")
    lock = sweep_lock(out)
    try:
        lock.acquire()
    except BaseException:
        remove_empty_folders(created)
        raise
    try:
        if read_record(out) != plan.recorded:  # another process wrote it after the plan was made
            plan = plan_sweep(plan.spec, out, steps=plan.steps, device=plan.device, pack_size=plan.pack_size)
        record = json.loads(json.dumps(plan.record()))  # as it reads back (tuples as lists)
        if record != plan.recorded:
            atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=1) + "\n")
        # runs/ is the sweep's: made here, once, so no task's clean-up removes it under another
        (out / RUNS_DIR).mkdir(exist_ok=True)
        yield plan, plan.packs()
    finally:
        lock.release()


def _run_packs(plan: SweepPlan, packs, progress, console, callbacks_for, data, status) -> SweepResult:
    t0 = time.perf_counter()
    steps_of = {r.name: r.config.steps for r in plan.runs}
    at = {r.name: saved_step(r.config) or 0 for r in plan.runs}
    done = lambda: sum(at[n] >= steps_of[n] for n in at)  # noqa: E731
    diverged = [r.name for r in plan.runs if diverged_record(r.config) is not None]
    loaders: dict = {}
    trained: list[str] = []
    steps_run, train_seconds = 0, 0.0

    def result(status_, signum=None, index=None) -> SweepResult:
        return SweepResult(status_, len(plan.runs), done(), trained, signum, index, time.perf_counter() - t0,
                           diverged)

    with _StopBetweenPacks() as stop:
        for index, pack in enumerate(packs, 1):
            for part in at_same_step([r for r in pack if r.name not in diverged], at):
                remaining = sum(max(0, steps_of[n] - at[n]) for n in at if n not in diverged)
                rate = steps_run / train_seconds if train_seconds > 0 else None
                if status is not None:
                    status(pack_line(index, len(packs), part, done(), len(plan.runs), rate, remaining, len(diverged)))
                if stop.signum is not None:
                    return result("interrupted", stop.signum, index)
                configs = [r.config for r in part]
                pack_data = data if data is not None else loaders.setdefault(
                    (configs[0].data, configs[0].dataset), lazy_training_data(configs[0]))
                results = run_pack(configs, data=pack_data, progress=progress, console=console,
                                   callbacks_for=callbacks_for)
                diverged += [run.name for run, r in zip(part, results) if isinstance(r, DivergedRun)]
                ran = [(run, r) for run, r in zip(part, results) if r is not None and not isinstance(r, DivergedRun)]
                for run, r in ran:
                    trained.append(run.name)
                    at[run.name] = r.state.step
                    steps_run += r.steps_run
                train_seconds += max((r.seconds for _, r in ran), default=0.0)  # the pack's wall time
                stopped = [r for _, r in ran if r.status != "completed"]
                if stopped:
                    return result("interrupted", stopped[0].stop_signal or signal.SIGINT, index)
    return result("completed")


def describe_pack(pack: Sequence[SweepRun]) -> str:
    """``factorvae: gamma 10, 20; seeds 0-3 (8 runs, cpu)``, and why a GPU pack holds one run
    where it must (`unstackable`)."""
    first = pack[0]
    values: dict[str, list] = {}
    for run in pack:
        for key, value in run.point:
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    from fastfvae.study.spec import format_value

    parts = [f"{k} {', '.join(map(format_value, v))}" for k, v in values.items()]
    seeds = sorted({r.seed for r in pack})
    contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
    parts.append("seed " + (f"{seeds[0]}-{seeds[-1]}" if contiguous and len(seeds) > 2 else ", ".join(map(str, seeds))))
    runs = f"{len(pack)} run{'s' if len(pack) > 1 else ''}"
    why = unstackable(first.config)
    return f"{first.label}: {'; '.join(parts)} ({runs}, {device_kind(first.config.device)}{'; ' + why if why else ''})"


def pack_line(index: int, total: int, pack, done: int, runs: int, rate: float | None, remaining: int,
              diverged: int = 0) -> str:
    """The sweep's progress before a pack: runs done (and diverged), the pack, run-steps/s so far
    and the ETA."""
    speed = f"{rate:,.0f} run-steps/s" if rate else "-- run-steps/s"
    eta = _duration(remaining / rate) if rate else "--"
    bad = f", {diverged} diverged" if diverged else ""
    return f"sweep: {done}/{runs} runs done{bad}, {speed}, ETA {eta}; pack {index}/{total}: {describe_pack(pack)}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"
