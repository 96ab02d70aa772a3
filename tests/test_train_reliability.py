"""What a training run guarantees when things go wrong: one process per run folder, nothing
left behind by a run that fails at set-up, no dead-end folders after a kill, SIGTERM like
Ctrl-C, NaN/inf caught in the weights and optimiser state (never checkpointed), one-line
errors for a full disk and for checkpoints that do not match their config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cpu_bf16 import bf16_param
import torch

import fastfvae.train.loop as loop
from fastfvae.cli import main
from fastfvae.errors import FastFVAEError
from fastfvae.fast import make_fast_step
from fastfvae.train.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from fastfvae.train.config import TrainConfig
from fastfvae.train.lock import LOCK_NAME, RunFolderLock
from fastfvae.train.loop import TrainingDiverged, run_training
from fastfvae.train.progress import read_log
from train_data import one_thread, small_config, small_dsprites  # noqa: F401 (autouse fixture)

TESTS = Path(__file__).resolve().parent
TINY = ["--batch-size", "8", "--no-progress", "--no-figures", "--log-every", "1"]
SMALL = dict(batch_size=8, d_hidden=32, d_layers=2, log_every=1, ckpt_every=0)

#: `fastfvae` in a child process, on the 256-row test subset (argv: the command line).
CHILD = """
import sys
sys.path.insert(0, {tests!r})
import fastfvae.train.loop as loop
from train_data import small_dsprites
loop.load_training_data = lambda path, *_: small_dsprites(256)
{extra}
from fastfvae.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child(args, extra: str = "", **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), extra=extra), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture
def small_data(monkeypatch):
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfvae: error: ") and "Traceback" not in err, err
    return lines[0]


def _tensors(state: dict) -> dict:
    flat = {}
    for part in ("vae", "disc"):
        flat.update({f"{part}.{k}": v for k, v in (state[part] or {}).items()})
    for part in ("vae_opt", "disc_opt"):
        for i, s in (state[part] or {"state": {}})["state"].items():
            flat.update({f"{part}.{i}.{k}": v for k, v in s.items()})
    return flat


def _same_run(a: Path, b: Path) -> None:
    """Run folders ``a`` and ``b`` hold the same training (tensors bit-equal, same config and log)."""
    pa, pb = load_checkpoint(a), load_checkpoint(b)
    ta, tb = _tensors(pa["state"]), _tensors(pb["state"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert pa["state"]["sampler"] == pb["state"]["sampler"]
    strip = lambda cfg: {k: v for k, v in cfg.items() if k != "out"}  # noqa: E731
    assert strip(pa["config"]) == strip(pb["config"])
    assert strip(json.loads((a / "config.json").read_text())) == strip(json.loads((b / "config.json").read_text()))
    losses = lambda d: [(r["step"], r["loss"]) for r in read_log(d / "train_log.jsonl")]  # noqa: E731
    assert losses(a) == losses(b)


# --- one process per run folder ----------------------------------------------------------------
def test_a_folder_held_by_another_process_is_refused_with_its_pid(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunFolderLock(out):
        proc = child(["train", "--out", out, "--steps", "2", *TINY])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2
        line = _one_error_line(err)
        assert f"in use by another fastfvae process (PID {os.getpid()})" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # it wrote nothing
    assert list(out.iterdir()) == []  # released: the lock file goes with the lock


def test_two_runs_on_one_folder_one_refused_the_other_entirely_its_own(tmp_path, small_data, capsys):
    """The issue's repro: two `train` on one --out at once. One must be refused with one line
    and the checkpoint, config and log must be exactly those of a solo run of the other."""
    out = tmp_path / "shared"
    args = ["--steps", "20", "--ckpt-every", "0", "--reference", *TINY]
    procs = {seed: child(["train", *args, "--seed", seed, "--out", out]) for seed in (0, 1)}
    results = {seed: (p.communicate(timeout=300), p.returncode) for seed, p in procs.items()}
    codes = sorted(rc for _, rc in results.values())
    assert codes == [0, 2], results
    winner = next(seed for seed, (_, rc) in results.items() if rc == 0)
    loser_err = next(err for (_, err), rc in results.values() if rc == 2)
    line = _one_error_line(loser_err)
    assert "in use by another fastfvae process (PID" in line or "already holds a run" in line
    assert main(["train", *args, "--seed", str(winner), "--out", str(tmp_path / "solo")]) == 0
    _same_run(out, tmp_path / "solo")
    assert not (out / LOCK_NAME).exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_a_second_run_started_during_a_run_is_refused_and_changes_nothing(tmp_path, small_data, capsys):
    data = small_dsprites(256)
    cfg = TrainConfig(steps=4, seed=0, **{**SMALL, "ckpt_every": 2})
    run_training(cfg.replace(out=str(tmp_path / "solo")), data=data, progress=False)
    out = tmp_path / "run"
    codes = []

    def start_another(state, metrics):
        if state.step in (1, 3):  # before and after the first checkpoint
            codes.append(main(["train", "--out", str(out), "--seed", "1", "--steps", "4", *TINY]))

    run_training(cfg.replace(out=str(out)), data=data, progress=False, callbacks=[start_another])
    assert codes == [2, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"(PID {os.getpid()})" in line for line in err), err
    _same_run(out, tmp_path / "solo")


def test_a_resume_continues_from_the_checkpoint_saved_while_it_waited(tmp_path, monkeypatch):
    """A resume reads the checkpoint before it owns the folder; if the run that owned it saved
    again in between (and finished), the resume continues from that newer checkpoint, not the
    one it read first (which would throw the newer steps away)."""
    data, out = small_dsprites(256), tmp_path / "run"
    cfg = TrainConfig(steps=2, out=str(out), **SMALL)
    run_training(cfg, data=data, progress=False)
    claim = loop._OwnedFolder

    def the_other_run_finishes_first(folder):
        monkeypatch.setattr(loop, "_OwnedFolder", claim)
        run_training(cfg.replace(steps=4), data=data, progress=False, resume=out)  # saves step 4
        return claim(folder)

    monkeypatch.setattr(loop, "_OwnedFolder", the_other_run_finishes_first)
    resumed = run_training(cfg.replace(steps=6), data=data, progress=False, resume=out)
    assert resumed.steps_run == 2 and resumed.state.step == 6
    straight = run_training(cfg.replace(steps=6, out=str(tmp_path / "straight")), data=data, progress=False)
    _same_run(out, straight.out)


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    """A writer that starts while another is writing must not truncate or rename the other's file."""
    path = tmp_path / "checkpoint.pt"

    def outer(f):
        f.write(b"A" * 500)
        atomic_write_bytes(path, lambda g: g.write(b"B" * 10))  # a second writer, mid-write
        f.write(b"A" * 500)

    atomic_write_bytes(path, outer)
    assert path.read_bytes() == b"A" * 1000
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


# --- nothing left behind; no dead-end folders --------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_a_run_failing_at_set_up_leaves_nothing_behind(tmp_path, small_data, monkeypatch, capsys, existing):
    """The fast path's loader failing (e.g. --loader dali without DALI) comes after the folder
    is claimed: the folder is removed again if the run created it, left empty if it was there."""
    import fastfvae.data.loaders as loaders

    def no_dali(kind, *a, **kw):
        raise FastFVAEError("--loader dali needs NVIDIA DALI; install it or use --loader device")

    monkeypatch.setattr(loaders, "make_loader", no_dali)
    out = tmp_path / "new" / "run"
    if existing:
        out.mkdir(parents=True)
    assert main(["train", "--fast", "--loader", "dali", "--out", str(out), "--steps", "2", *TINY]) == 2
    assert "needs NVIDIA DALI" in _one_error_line(capsys.readouterr().err)
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not (tmp_path / "new").exists()


def _kill_during_first_checkpoint(out: Path) -> None:
    """A child run SIGKILLed while its first checkpoint is being written (at the rename)."""
    extra = ("import os, signal\n"
             "def replace(src, dst):\n"
             "    if str(dst).endswith('checkpoint.pt'):\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    os.rename(src, dst)\n"
             "import fastfvae.train.checkpoint as c\n"
             "c.os.replace = replace\n")
    proc = child(["train", "--out", out, "--steps", "3", "--reference", *TINY], extra=extra)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists()
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the killed writer's temporary file is still there


@pytest.mark.parametrize("again", ["train --out", "train --resume"])
def test_a_run_killed_before_its_first_checkpoint_can_be_trained_or_resumed(tmp_path, small_data, capsys, again):
    out = tmp_path / "run"
    _kill_during_first_checkpoint(out)
    (out / "checkpoint.pt.tmp").write_bytes(b"x" * 1000)  # what earlier versions left (fixed name)
    if again == "train --out":
        argv = ["train", "--out", str(out), "--steps", "3", "--reference", *TINY]
    else:  # its config.json (steps 3, the reference step) is all there is to resume from
        argv = ["train", "--resume", str(out), "--no-progress", "--no-figures"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    if again == "train --resume":
        assert "has no checkpoint" in err and "starting it again from step 0" in err
    assert load_checkpoint(out)["state"]["step"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "train_log.jsonl"]
    assert main(["train", "--reference", "--out", str(tmp_path / "solo"), "--steps", "3", *TINY]) == 0
    _same_run(out, tmp_path / "solo")


def test_double_ctrl_c_before_the_first_checkpoint_leaves_a_reusable_folder(tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(steps=4, out=str(out), **SMALL)

    def interrupted_mid_step(state, data):
        step = loop.make_reference_step(state, data)

        def run(inputs):
            if state.step == 1:
                raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of step 2
            return step(inputs)
        return run

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, data=small_dsprites(256), progress=False, step_builder=interrupted_mid_step)
    assert not (out / "checkpoint.pt").exists() and not (out / LOCK_NAME).exists()
    result = run_training(cfg, data=small_dsprites(256), progress=False)  # the same --out again
    assert result.status == "completed" and result.state.step == 4


@pytest.mark.parametrize("signum,said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_in_a_real_process_stops_after_the_step_and_saves(tmp_path, small_data, signum, said):
    out = tmp_path / "run"
    proc = child(["train", "--out", out, "--steps", "100000", "--reference", *TINY])
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and f"{said} at step" in err.strip().splitlines()[-1]
    step = load_checkpoint(out)["state"]["step"]
    assert step >= 1 and read_log(log)[-1]["step"] == step
    assert main(["train", "--resume", str(out), "--steps", str(step + 2), "--no-progress", "--no-figures"]) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("resumed", [False, True])
def test_a_stop_during_set_up_abandons_the_run_and_keeps_a_resumed_checkpoint(tmp_path, small_data, monkeypatch,
                                                                               capsys, signum, resumed):
    """Ctrl-C / SIGTERM while the step is being built: no step-0 checkpoint, exit 130 / 143 with
    one line; a fresh run leaves no folder, a resumed run's files are as they were."""
    import hashlib

    import fastfvae.cli.train as cli_train

    out = tmp_path / "run"
    if resumed:
        assert main(["train", "--reference", "--out", str(out), "--steps", "2", *TINY]) == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} if resumed else None

    def slow_builder(state, data):  # the signal arrives while the step is compiled
        os.kill(os.getpid(), signum)
        return loop.make_reference_step(state, data)

    monkeypatch.setattr(cli_train, "step_builder_for", lambda cfg: slow_builder)
    capsys.readouterr()
    # Whatever this process had (a background job inherits SIGINT ignored), the run puts back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    argv = ["--resume", str(out), "--steps", "4"] if resumed else ["--out", str(out), "--steps", "4"]
    assert main(["train", "--reference", *argv, *TINY]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    kept = "checkpoint.pt is unchanged (step 2)" if resumed else "no checkpoint was written"
    assert len(err) == 1 and err[0].startswith(f"fastfvae: {how} before the first step;") and kept in err[0], err
    if resumed:
        assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the run's handlers are gone


# --- NaN/inf in the weights and optimiser state ------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("model,weight", [("betavae", "beta"), ("factorvae", "gamma")])
def test_an_overflowing_optimiser_state_stops_the_run_unsaved(tmp_path, fast, model, weight):
    """beta or gamma 1e30: every loss stays finite, but Adam's second moment overflows to inf."""
    cfg = small_config(model=model, steps=6, out=str(tmp_path / "r"), fast=fast, **{**SMALL, weight: 1e30})
    with pytest.raises(TrainingDiverged, match=r"the VAE's Adam state became NaN/inf \(found at step 1.*"
                                               r"no checkpoint was written"):
        run_training(cfg, data=small_dsprites(256), progress=False, step_builder=make_fast_step if fast else None)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    assert not (tmp_path / "r" / "train_log.jsonl").exists()  # no line for the diverged step either


def test_cli_beta_1e30_exits_1_with_one_line(tmp_path, small_data, capsys):
    assert main(["train", "--model", "betavae", "--beta", "1e30", "--out", str(tmp_path / "r"), "--steps", "20",
                 *TINY]) == 1
    assert "Adam state became NaN/inf" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("native_d", [None, False], ids=["default-d", "torch-d"])
@pytest.mark.parametrize("precision", ["fp32", bf16_param("bf16", id="bf16")])
def test_the_guard_sees_the_fast_steps_own_optimiser_buffers(tmp_path, precision, native_d):
    """The bf16 CPU step with the torch D keeps D's Adam moments in flat buffers of its own
    (`FlatAdam`), the native D the optimiser's own: an inf written there (not through the
    optimiser's step) is caught, and the step-2 checkpoint is kept."""
    built = {}

    def builder(state, data):
        from dataclasses import replace

        from fastfvae.fast.step import options_of

        built["step"] = make_fast_step(state, data, replace(options_of(state.cfg), native_d=native_d))
        return built["step"]

    def overflow_at_3(state, metrics):
        if state.step == 3:
            flat = built["step"]._flat_adam
            moments = flat.flat_exp_avg_sq if flat is not None else state.optims.disc.state[
                state.optims.disc.param_groups[0]["params"][0]]["exp_avg_sq"]
            moments.view(-1)[7] = float("inf")

    out = tmp_path / "r"
    cfg = TrainConfig(steps=6, out=str(out), fast=True, precision=precision, **{**SMALL, "ckpt_every": 2})
    with pytest.raises(TrainingDiverged, match=r"D's Adam state became NaN/inf \(found at step 4.*"
                                               r"last good checkpoint is .* \(step 2\)"):
        run_training(cfg, data=small_dsprites(256), progress=False, step_builder=builder,
                     callbacks=[overflow_at_3])
    # the flat buffers are the torch D's in bf16; the native D (the default where the library is
    # loaded) updates the optimiser's own moments, which the inf above went into
    step = built["step"]
    assert (step._flat_adam is not None) == (precision == "bf16" and not step.options.native_d)
    payload = load_checkpoint(out)
    assert payload["state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in _tensors(payload["state"]).values())


# --- one line instead of a traceback ------------------------------------------------------------
#: A child that trains 2 steps (one checkpoint), then resumes with files capped at 64 KiB
#: (RLIMIT_FSIZE: a write past it fails with EFBIG, as a full disk fails with ENOSPC), so the
#: next checkpoint's real write fails.
FILE_SIZE_CAPPED = """
import resource, signal
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import run_training
run_training(TrainConfig(steps=2, out=sys.argv[3], batch_size=8, d_hidden=32, d_layers=2), progress=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""


def test_a_checkpoint_write_that_really_fails_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "r"
    proc = child(["train", "--resume", out, "--steps", "4", *TINY], extra=FILE_SIZE_CAPPED)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = _one_error_line(err)
    assert "File too large" in line and "training stopped at step 4" in line and "(step 2)" in line, line
    assert load_checkpoint(out)["state"]["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "train_log.jsonl"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    run_training(TrainConfig(steps=2, out=str(out), **SMALL), data=small_dsprites(256), progress=False)
    return out


def _broken(good_run: Path, tmp: Path, change) -> Path:
    payload = load_checkpoint(good_run)
    change(payload)
    (tmp / "broken").mkdir()
    save_checkpoint(tmp / "broken", payload)
    return tmp / "broken"


BROKEN = {
    "weights of another z_dim": (lambda p: p["config"].update(z_dim=3), "do not match its config"),
    "weights of another D": (lambda p: p["config"]["hparams"].update(d_hidden=64), "disc.net.0.weight has shape"),
    "a missing weight": (lambda p: p["state"]["vae"].pop("decoder.fc.0.bias"), "vae.decoder.fc.0.bias is missing"),
    "no config": (lambda p: p.pop("config"), "has no usable config"),
    "a config value of the wrong type": (lambda p: p["config"].update(z_dim="ten"), "has a bad config"),
    "a config value out of range": (lambda p: p["config"].update(seed=-1), "has a bad config: seed must be"),
    "betas that are not a pair": (lambda p: p["config"].update(vae_betas=5), "has a bad config"),
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", ["eval", "traverse", "resume"])
def test_a_checkpoint_that_does_not_match_its_config_is_one_line(good_run, tmp_path, small_data, monkeypatch,
                                                                 capsys, case, command):
    import fastfvae.cli.eval as eval_cli

    change, expected = BROKEN[case]
    broken = _broken(good_run, tmp_path, change)
    monkeypatch.setattr(eval_cli, "_load_data", lambda path, *_: small_dsprites(256), raising=False)
    argv = {"eval": ["eval", str(broken), "--metrics", "mig", "--device", "cpu"],
            "traverse": ["traverse", str(broken), "--out", str(tmp_path / "figs")],
            "resume": ["train", "--resume", str(broken), "--steps", "4", *TINY]}[command]
    before = (broken / "checkpoint.pt").read_bytes()
    assert main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err)
    assert (broken / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "figs").exists()


def test_an_optimiser_state_that_does_not_fit_is_one_line_on_resume(good_run, tmp_path, small_data, capsys):
    broken = _broken(good_run, tmp_path, lambda p: p["state"]["vae_opt"]["param_groups"][0]["params"].pop())
    assert main(["train", "--resume", str(broken), "--steps", "4", *TINY]) == 2
    assert "its training state does not fit its config" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("seed", [str(2**63 - 1), "0"])
def test_seeds_at_the_ends_of_the_range_train(tmp_path, small_data, seed):
    assert main(["train", "--seed", seed, "--out", str(tmp_path / "r"), "--steps", "1", *TINY]) == 0


# --- the end of a run ----------------------------------------------------------------------------
def test_a_finished_run_says_what_to_open_and_how_long_it_took(tmp_path, small_data, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--steps", "3", "--batch-size", "8", "--no-progress"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    summary, ckpt, figures = lines
    assert summary.startswith("trained factorvae for 3 steps in ") and "steps/s" in summary
    assert ckpt == f"checkpoint: {out / 'checkpoint.pt'}"
    paths = [Path(p) for p in figures.removeprefix("figures: ").split(", ")]
    assert {p.name for p in paths} == {"reconstructions.png", "traversals.png", "traversals.gif", "loss_curves.png"}
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
