"""`fastfvae sweep --ray`: a sweep's packs as tasks on a real local Ray cluster (separate GCS,
raylet and worker processes, shut down at the end); a worker killed mid-pack is retried and the
retry resumes from the checkpoints, ending tensor for tensor where a local sweep ends.

The default run keeps one cluster test of each kind cheap (~20 s with the cluster's start):
the kill-and-retry sweep with a pack of 2, a CLI --ray call, the one-line errors. `-m slow`
adds a pack of 1, the sweep without retries (which must fail) and Ctrl-C in the driver."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import fastfvae.train.loop as loop
from fastfvae.cli import main
from fastfvae.errors import FastFVAEError
from fastfvae.study.spec import load_spec
from fastfvae.study.sweep import LOCK_FILE, plan_sweep, run_sweep
from fastfvae.train.checkpoint import load_checkpoint
from test_sweep import _tensors, one_error_line, write_spec
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

#: Two FactorVAE runs (one pack with --pack 2) and one beta-VAE run, checkpoints every step.
SPEC = """
[[block]]
model = "factorvae"
steps = 5
d_hidden = 32
d_layers = 2
batch_size = 8
z_dim = 2
log_every = 1
ckpt_every = 1
device = "cpu"
seeds = [0, 1]

[[block]]
model = "betavae"
steps = 4
beta = 2
batch_size = 8
z_dim = 2
log_every = 1
ckpt_every = 1
device = "cpu"
"""
NAMES = ("factorvae-seed0", "factorvae-seed1", "betavae-seed0")


def _swept_locally(tmp_path, monkeypatch, pack: int):
    """The test sweep trained locally without Ray (the result a Ray sweep must equal): (its
    spec, the local folder, the folder for the Ray sweep, the dataset every run loads)."""
    data = small_dsprites(256)
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: data)
    spec = load_spec(write_spec(tmp_path, SPEC))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert run_sweep(plan_sweep(spec, local, pack_size=pack), progress=False).status == "completed"
    return spec, local, on_ray, data


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of its own processes (a 2-CPU head node) and its address. Everything
    Ray writes stays in a temporary folder (RAY_TMPDIR: also the address file that `ray start`
    would write to /tmp/ray); every process the cluster started is gone afterwards."""
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tasks get this module's callbacks by value
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    (Path(temp) / "ray").mkdir()
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = Cluster(shutdown_at_exit=False)
    try:
        cluster.add_node(num_cpus=2, include_dashboard=False)
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir
        left = _processes_of(temp)
        for _ in range(20):
            if not left:
                break
            time.sleep(0.5)
            left = _processes_of(temp)
        for pid in left:  # this cluster's own processes only (their command lines name its folder)
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"the Ray cluster left processes behind: {left}"


def _processes_of(folder: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", folder], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def kill_worker_once(marker: Path, seed: int, at_step: int):
    """Per-run callbacks that SIGKILL the task's worker process when run ``seed`` reaches
    ``at_step``, the first time only (``marker`` remembers it across processes)."""
    def callbacks_for(cfg, data):
        def callback(state, metrics):
            if cfg.seed == seed and state.step == at_step and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return [callback] if cfg.model == "factorvae" else []
    return callbacks_for


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """Every run's training state (weights, Adam moments, step, sampler and noise generators)
    and torch's global RNG equal tensor for tensor. NumPy's and Python's global RNG states are
    left out: training never draws from them, so they hold whatever else the process did
    (the pytest process here, a Ray worker there)."""
    import torch

    for name in NAMES:
        x, y = _tensors(load_checkpoint(a / "runs" / name)), _tensors(load_checkpoint(b / "runs" / name))
        assert x.keys() == y.keys()
        compared = [k for k in x if not k.startswith((".rng.numpy", ".rng.python"))]
        assert len(compared) > 100  # the weights and moments are there
        for key in compared:
            same = torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]
            assert same, (name, key)


@pytest.mark.requires_extra("ray")
@pytest.mark.parametrize("pack", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_a_worker_killed_mid_pack_is_retried_and_resumes_bit_exactly(tmp_path, ray_cluster, monkeypatch, pack):
    from fastfvae.study.ray_backend import run_sweep_on_ray

    spec, local, on_ray, data = _swept_locally(tmp_path, monkeypatch, pack=pack)

    marker = tmp_path / "killed"
    lines = []
    result = run_sweep_on_ray(plan_sweep(spec, on_ray, pack_size=pack), ray_cluster, data=data,
                              callbacks_for=kill_worker_once(marker, seed=1, at_step=3), status=lines.append)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker process died, not this one
    assert (result.status, result.done, sorted(result.trained)) == ("completed", 3, sorted(NAMES))
    assert lines[0].startswith(f"sweep: 0/3 runs done; {2 if pack == 2 else 3} of ") and "packs submitted" in lines[0]
    assert not (on_ray / LOCK_FILE).exists()
    for name, steps in zip(NAMES, (5, 5, 4)):
        assert load_checkpoint(on_ray / "runs" / name)["state"]["step"] == steps
    assert_same_checkpoints(local, on_ray)


@pytest.mark.slow
@pytest.mark.requires_extra("ray")
def test_without_retries_a_killed_worker_fails_the_sweep_and_the_same_sweep_resumes(tmp_path, ray_cluster,
                                                                                     monkeypatch):
    from fastfvae.study.ray_backend import run_sweep_on_ray

    spec, local, on_ray, data = _swept_locally(tmp_path, monkeypatch, pack=2)
    kill = kill_worker_once(tmp_path / "killed", seed=1, at_step=3)
    with pytest.raises(FastFVAEError, match=r"pack 1: its Ray worker died and the retries ran out"):
        run_sweep_on_ray(plan_sweep(spec, on_ray, pack_size=2), ray_cluster, data=data, callbacks_for=kill,
                         max_retries=0)
    assert load_checkpoint(on_ray / "runs" / "factorvae-seed1")["state"]["step"] == 2  # the last saved step
    assert not (on_ray / LOCK_FILE).exists()
    result = run_sweep_on_ray(plan_sweep(spec, on_ray), ray_cluster, data=data, callbacks_for=kill, max_retries=0)
    assert result.status == "completed"
    assert_same_checkpoints(local, on_ray)


@pytest.mark.requires_extra("ray")
def test_cli_ray_on_a_finished_sweep_connects_and_trains_nothing(tmp_path, ray_cluster, monkeypatch, capsys):
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))
    spec, out = write_spec(tmp_path, SPEC), tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a relative --out: the driver hands the tasks its absolute path
    assert main(["sweep", str(spec), "--out", "sweep", "--steps", "1", "--no-progress", "--ray", ray_cluster]) == 0
    assert "3/3 runs done (0 trained now" in capsys.readouterr().err
    # --device cuda on a cluster without GPUs: one line before anything is written
    fresh = tmp_path / "fresh"
    assert main(["sweep", str(spec), "--out", str(fresh), "--device", "cuda", "--ray", ray_cluster]) == 2
    assert "trains on cuda, but the Ray cluster at " in one_error_line(capsys.readouterr().err)
    assert not fresh.exists()


def test_ray_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "sweep"
    assert main(["sweep", str(write_spec(tmp_path, SPEC)), "--out", str(out), "--ray", "auto"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--ray needs Ray" in err and "pip install 'fastfvae[ray]'" in err
    assert not out.exists()


@pytest.mark.requires_extra("ray")
@pytest.mark.parametrize("address,problem", [
    ("127.0.0.1:1", "--ray 127.0.0.1:1: cannot reach a Ray head node there"),
    ("nonsense", "expected auto or HOST:PORT"),
])
def test_an_unreachable_address_is_one_line_and_writes_nothing(tmp_path, capsys, address, problem):
    out = tmp_path / "sweep"
    assert main(["sweep", str(write_spec(tmp_path, SPEC)), "--out", str(out), "--ray", address]) == 2
    assert problem in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.requires_extra("ray")
def test_ctrl_c_in_the_driver_cancels_the_tasks_and_the_same_sweep_resumes_bit_exactly(tmp_path, ray_cluster,
                                                                                        monkeypatch):
    from fastfvae.study.ray_backend import run_sweep_on_ray

    spec, local, on_ray, data = _swept_locally(tmp_path, monkeypatch, pack=2)
    started = tmp_path / "started"

    def mark_step_2(cfg, data):
        return [lambda state, metrics: started.touch() if state.step == 2 else None]

    def ctrl_c_once_training(line):
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    result = run_sweep_on_ray(plan_sweep(spec, on_ray, pack_size=2), ray_cluster, data=data,
                              callbacks_for=mark_step_2, status=ctrl_c_once_training)
    assert started.exists()
    assert (result.status, result.stop_signal, result.pack) == ("interrupted", signal.SIGINT, None)
    assert result.done < 3 and not (on_ray / LOCK_FILE).exists()
    result = run_sweep_on_ray(plan_sweep(spec, on_ray), ray_cluster, data=data)
    assert (result.status, result.done) == ("completed", 3)
    assert_same_checkpoints(local, on_ray)


@pytest.mark.requires_extra("ray")
def test_a_run_diverging_in_a_ray_task_is_marked_and_its_pack_mate_finishes(tmp_path, ray_cluster, monkeypatch):
    from fastfvae.study.ray_backend import run_sweep_on_ray
    from fastfvae.study.sweep import DIVERGED_FILE
    from test_sweep import DIVERGING

    data = small_dsprites(256)
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: data)
    spec = load_spec(write_spec(tmp_path, DIVERGING))
    result = run_sweep_on_ray(plan_sweep(spec, tmp_path / "ray", pack_size=2, device="cpu"), ray_cluster, data=data)
    assert (result.status, result.done, result.diverged) == ("completed", 1, ["betavae-beta1e+38-seed0"])
    assert (tmp_path / "ray" / "runs" / "betavae-beta1e+38-seed0" / DIVERGED_FILE).is_file()
    assert load_checkpoint(tmp_path / "ray" / "runs" / "betavae-beta2-seed0")["state"]["step"] == 4
    again = run_sweep_on_ray(plan_sweep(spec, tmp_path / "ray", device="cpu"), ray_cluster, data=data)
    assert (again.done, again.diverged, again.trained) == (1, ["betavae-beta1e+38-seed0"], [])
