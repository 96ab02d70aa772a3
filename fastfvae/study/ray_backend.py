"""A sweep's packs as tasks on a Ray cluster: ``fastfvae sweep SPEC --out DIR --ray ADDRESS``.

The driver (the ``fastfvae sweep`` process) plans the sweep, holds ``DIR/sweep.lock`` and
writes ``DIR/sweep.json`` exactly as a local sweep does (`fastfvae.study.sweep.owned_sweep`),
then submits one Ray task per pack and waits for them. A task trains its pack with `run_pack`
on the node Ray gives it, writing the pack's run folders itself: DIR must lie on a filesystem
every node shares, under the same absolute path, and fastfvae must be installed on every node.
The run folders keep their own locks (`fastfvae.train.lock.RunFolderLock`, flock-based, so
they hold across processes and nodes that share the filesystem with working flock).

A worker process that dies mid-pack (killed, out of memory, a lost node) is retried by Ray
(``max_retries``); the retried task starts the same pack again and `train_pack` resumes each
run from its last checkpoint, bit-exactly (a resumed pack equals the uninterrupted one while
it trains as the same pack: its runs checkpoint at the same steps, so they resume at one
step). Exceptions a task raises (a diverged run, a bad run folder) are not retried: they are
the sweep's answer, raised in the driver. Ctrl-C / SIGTERM in the driver cancels the
outstanding tasks (a running one stops like a Ctrl-C'd pack) and the sweep returns
``status="interrupted"``; the same command resumes it.

``--device cuda`` is checked against the cluster (its nodes hold the GPUs), not against the
driver's machine: refused, before anything is written, when the cluster has no GPU.

Resources per task: a GPU (``num_gpus=1``) for a pack on CUDA (``--device cuda``, or ``auto``
on a cluster that has GPUs), else `CPUS_PER_PACK` CPUs (Ray sets the task's
``OMP_NUM_THREADS`` to that, so a node with N CPUs trains N / CPUS_PER_PACK CPU packs at
once, each on that many intra-op threads).
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

from fastfvae.errors import FastFVAEError
from fastfvae.study.sweep import (
    SweepPlan, SweepResult, _StopBetweenPacks, device_kind, diverged_record, owned_sweep, saved_step,
)

#: CPUs a CPU pack's task asks Ray for: one, since D's GEMMs at batch 64 gain little from more
#: intra-op threads and a node is better used by one pack per core (docs/studies.md, "Ray").
CPUS_PER_PACK = 1
#: Times Ray starts a pack's task again after its worker process died (each retry resumes the
#: pack from its checkpoints); a task's own exceptions are never retried.
MAX_RETRIES = 3
#: Seconds the driver waits, after Ctrl-C, for cancelled tasks to stop before it disconnects.
CANCEL_GRACE_S = 30.0
INSTALL_HINT = "pip install 'fastfvae[ray]'"


def import_ray():
    """The ``ray`` module; FastFVAEError (one line) when it is not installed."""
    try:
        import ray
    except ImportError:
        raise FastFVAEError(f"--ray needs Ray, which is not installed here; {INSTALL_HINT}") from None
    return ray


def _check_reachable(address: str) -> None:
    """FastFVAEError unless ``HOST:PORT`` accepts a TCP connection (Ray itself would retry for
    minutes before saying so)."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    if not sep or not host or not port.isdigit():
        raise FastFVAEError(f"--ray {address!r}: expected auto or HOST:PORT (the head node's GCS address, "
                            "e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise FastFVAEError(f"--ray {address}: cannot reach a Ray head node there ({exc}); start one with "
                            "`ray start --head` or check the address") from None


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` ("auto": the one started on this
    machine). Returns whether this call connected (False: already connected)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address == "auto":
            raise FastFVAEError("--ray auto: no Ray cluster runs on this machine; start one with `ray start --head`, "
                                "or give --ray HOST:PORT (its head node)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FastFVAEError(f"--ray {address}: cannot connect to a Ray cluster ({first})") from None
    return True


def _train_pack_task(configs: list[dict], data, callbacks_for) -> list[dict]:
    """The Ray task: train one pack's unfinished runs (resuming from their checkpoints), the
    parts at different steps one after another as a local sweep trains them; returns one
    summary per run it trained."""
    from fastfvae.study.sweep import DivergedRun, diverged_record, run_pack
    from fastfvae.train import loop
    from fastfvae.train.config import TrainConfig

    configs = [TrainConfig.from_dict(c) for c in configs]
    if data is None:
        data = loop.lazy_training_data(configs[0])  # once, on first use
    parts: dict[int, list] = {}
    for cfg in configs:
        step = saved_step(cfg) or 0
        if step < cfg.steps and diverged_record(cfg) is None:
            parts.setdefault(step, []).append(cfg)
    summaries = []
    for part in parts.values():
        results = run_pack(part, data=data, progress=False, callbacks_for=callbacks_for)
        for cfg, result in zip(part, results):
            if isinstance(result, DivergedRun):
                summaries.append({"out": cfg.out, "status": result.status, "step": saved_step(cfg) or 0})
            elif result is not None:
                summaries.append({"out": cfg.out, "status": result.status, "step": int(result.state.step),
                                  "steps_run": int(result.steps_run), "seconds": float(result.seconds),
                                  "stop_signal": result.stop_signal})
        if any(s["status"] not in ("completed", "diverged") for s in summaries):
            break
    return summaries


def task_resources(device: str, cluster_gpus: float, cpus_per_pack: int = CPUS_PER_PACK) -> dict:
    """Ray's resource request for a pack trained on ``device``."""
    cuda = device_kind(device) == "cuda" if device != "auto" else cluster_gpus > 0
    return {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": cpus_per_pack}


def run_sweep_on_ray(plan: SweepPlan, address: str, *, data=None, callbacks_for: Callable | None = None,
                     status: Callable | None = None, max_retries: int = MAX_RETRIES,
                     cpus_per_pack: int = CPUS_PER_PACK) -> SweepResult:
    """Train ``plan``'s packs as Ray tasks on the cluster at ``address`` (see the module
    docstring). ``data``: the dataset for every run, put once into Ray's object store
    (default: each task loads its pack's dataset). ``callbacks_for(cfg, data)``: each run's
    per-step callbacks, shipped to the tasks (it must pickle). ``status(line)``: one line when
    the packs are submitted and one as each pack finishes."""
    if not Path(plan.out).is_absolute():
        raise FastFVAEError(f"--out {plan.out}: a Ray sweep needs the folder's absolute path (on a filesystem every "
                            "node shares)")
    ray = import_ray()
    connected = connect(address)
    try:
        if ray.cluster_resources().get("GPU", 0) == 0:
            cuda = [r for r in plan.runs if r.config.device != "auto" and device_kind(r.config.device) == "cuda"]
            if cuda:
                raise FastFVAEError(f"run {cuda[0].name} trains on {cuda[0].config.device}, but the Ray cluster at "
                                    f"{address} has no GPU; add GPU nodes or use --device cpu")
        with owned_sweep(plan) as (plan, packs):
            return _run_tasks(ray, plan, packs, data, callbacks_for, status, max_retries, cpus_per_pack)
    finally:
        if connected:
            ray.shutdown()


def _run_tasks(ray, plan, packs: Sequence, data, callbacks_for, status, max_retries, cpus_per_pack) -> SweepResult:
    t0 = time.perf_counter()
    at = {r.config.out: saved_step(r.config) or 0 for r in plan.runs}
    steps_of = {r.config.out: r.config.steps for r in plan.runs}
    done = lambda: sum(at[o] >= steps_of[o] for o in at)  # noqa: E731
    diverged = [r.name for r in plan.runs if diverged_record(r.config) is not None]
    todo = [(i, pack) for i, pack in enumerate(packs, 1)
            if any(at[r.config.out] < r.config.steps and r.name not in diverged for r in pack)]
    trained: list[str] = []

    def result(status_, signum=None, index=None) -> SweepResult:
        return SweepResult(status_, len(plan.runs), done(), trained, signum, index, time.perf_counter() - t0,
                           diverged)

    if not todo:
        return result("completed")
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(max_retries=max_retries, retry_exceptions=False)(_train_pack_task)
    data_ref = ray.put(data) if data is not None else None
    name_of = {r.config.out: r.name for r in plan.runs}
    with _StopBetweenPacks() as stop:
        pending = {}
        for index, pack in todo:
            options = task_resources(pack[0].config.device, gpus, cpus_per_pack)
            ref = task.options(**options).remote([r.config.to_dict() for r in pack], data_ref, callbacks_for)
            pending[ref] = (index, pack)
        if status is not None:
            status(f"sweep: {done()}/{len(plan.runs)} runs done; {len(todo)} of {len(packs)} packs submitted to Ray "
                   f"({ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs)")
        stopped = None
        try:
            while pending and stop.signum is None:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    index, pack = pending.pop(ref)
                    summaries = _result(ray, ref, index)
                    for s in summaries:
                        at[s["out"]] = s["step"]
                        if s["status"] == "diverged":
                            diverged.append(name_of[s["out"]])
                            continue
                        trained.append(name_of[s["out"]])
                        if s["status"] != "completed" and stopped is None:
                            stopped = (s["stop_signal"] or signal.SIGINT, index)
                    if status is not None:
                        status(f"sweep: {done()}/{len(plan.runs)} runs done; pack {index}/{len(packs)} finished")
        except BaseException:
            _cancel(ray, pending)
            raise
        if stop.signum is not None or stopped is not None:
            _cancel(ray, pending)
            signum, index = (stop.signum, None) if stop.signum is not None else stopped
            return result("interrupted", signum, index)
    return result("completed")


def _result(ray, ref, index: int) -> list[dict]:
    """A finished task's summaries; its exception (the cause, not Ray's wrapper) if it raised;
    FastFVAEError if its worker died more often than it was retried."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise (cause if isinstance(cause, BaseException) else exc) from None
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FastFVAEError(f"pack {index}: its Ray worker died and the retries ran out ({first}); checkpoints are "
                            "saved, the same command resumes it") from None


def _cancel(ray, pending: dict) -> None:
    """Cancel the tasks still out and wait (at most `CANCEL_GRACE_S`) until they have stopped,
    so no task writes a run folder after the driver gave up the sweep folder."""
    refs = list(pending)
    for ref in refs:
        ray.cancel(ref)
    deadline = time.monotonic() + CANCEL_GRACE_S
    while refs and time.monotonic() < deadline:
        ready, refs = ray.wait(refs, num_returns=len(refs), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
