"""`fastfvae sweep`: spec checks (one line, nothing written), run names, packs, presets, skip and
resume (bit-exact after Ctrl-C), a sweep folder that grows but never changes, its lock."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastfvae.cli.train as cli_train
import fastfvae.train.loop as loop
from fastfvae.cli import main
from fastfvae.errors import FastFVAEError
from fastfvae.study.spec import expand, load_spec, parse_spec, preset_spec
from fastfvae.study.sweep import (
    DEFAULT_PACK_SIZE, LOCK_FILE, SWEEP_FILE, plan_packs, plan_sweep, run_sweep,
)
from fastfvae.train.checkpoint import load_checkpoint
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

TINY = """
batch_size = 8
z_dim = 2
log_every = 1
ckpt_every = 0
"""
#: Two FactorVAE runs (one pack of 2) and one beta-VAE run: 3 runs, 2 packs.
SPEC = f"""
[[block]]
model = "factorvae"
steps = 4
d_hidden = 32
d_layers = 2
{TINY}
seeds = [0, 1]

[[block]]
model = "betavae"
steps = 3
beta = 2
{TINY}
"""


@pytest.fixture
def small_data(monkeypatch):
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))


def write_spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastfvae: error: ") and "Traceback" not in err, err
    return lines[0]


# --- the spec ---------------------------------------------------------------------------------
BAD_SPECS = [
    ("gama = 10.0", "block 1 (factorvae)", "unknown key 'gama'", "did you mean 'gamma'"),
    ("beta = 4.0", "block 1 (factorvae)", "'beta' is not a hyperparameter of factorvae", "betavae"),
    ("gamma = \"big\"", "block 1 (factorvae)", "gamma must be a number", "'big'"),
    ("z_dim = 2.5", "block 1 (factorvae)", "z_dim must be an integer", "2.5"),
    ("grid = { gamma = [10.0, -1.0] }", "grid gamma=-1", "gamma must be a finite number >= 0", "-1.0"),
    ("grid = { gamma = [] }", "block 1 (factorvae)", "grid.gamma must be a non-empty list", "[]"),
    ("grid = { model = [\"vae\"] }", "block 1 (factorvae)", "grid.model", "one block per value"),
    ("eval = { every = 10, metric = [\"mig\"] }", "block 1 (factorvae)", "unknown key eval.metric", "every, metrics or budget"),
    ("eval = { every = 10, metrics = [\"migg\"] }", "block 1 (factorvae)", "unknown metric 'migg'", "mig"),
    ("seeds = [0, 0]", "block 1 (factorvae)", "seeds lists 0 twice", ""),
    ("seeds = [-1]", "seed -1", "seed must be an integer in [0, 2**63)", ""),
    ("out = \"x\"", "block 1 (factorvae)", "out is set by the sweep", ""),
    ("batch_size = 1", "block 1 (factorvae)", "batch-size must be >= 2", ""),
    ("fast = false\nprecision = \"bf16\"", "block 1 (factorvae)", "only applies to the fast path", "precision"),
    ("dataset = \"mnist\"", "block 1 (factorvae)", "dataset must be one of", "mnist"),
]


@pytest.mark.parametrize("line,where,problem,detail", BAD_SPECS, ids=[b[2][:24] for b in BAD_SPECS])
def test_a_bad_block_is_one_line_naming_block_and_key_and_writes_nothing(tmp_path, capsys, line, where, problem,
                                                                         detail):
    spec = write_spec(tmp_path, f'[[block]]\nmodel = "factorvae"\nsteps = 4\n{line}\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert str(spec) in err and where in err and problem in err and detail in err, err
    assert not out.exists()


@pytest.mark.parametrize("text,problem", [
    ("[[block]]\nmodel = ", "is not valid TOML"),
    ("[sweep]\nx = 1\n", "unknown top-level key 'sweep'"),
    ("", "expected one or more [[block]] tables"),
    ('[[block]]\nmodel = "nope"\n', "block 1: model must be one of"),
    ('[[block]]\nmodel = "betavae"\nbeta = 4.0\n[[block]]\nmodel = "betavae"\nbeta = 4.0\neval_every = 5\n',
     "trains the same as a run of block 1"),
    ('[[block]]\nmodel = "betavae"\neval = { every = 5, budget = "tiny" }\n', "eval-budget must be dlib, training"),
])
def test_a_bad_spec_file_is_one_line(tmp_path, capsys, text, problem):
    spec = write_spec(tmp_path, text)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--dry-run"]) == 2
    assert problem in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "sweep").exists()


def test_spec_or_preset_exactly_one(tmp_path, capsys):
    spec = write_spec(tmp_path, SPEC)
    assert main(["sweep", str(spec), "--preset", "seed-fig3", "--out", str(tmp_path / "s")]) == 2
    assert "exactly one" in one_error_line(capsys.readouterr().err)
    assert main(["sweep", "--out", str(tmp_path / "s")]) == 2
    assert "exactly one" in one_error_line(capsys.readouterr().err)
    assert main(["sweep", "--preset", "fig9", "--out", str(tmp_path / "s")]) == 2
    assert "unknown sweep preset 'fig9'" in one_error_line(capsys.readouterr().err)
    assert main(["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "s")]) == 2
    assert "cannot read spec" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_block_settings_reach_every_run_config(tmp_path):
    spec = parse_spec({"block": [{
        "model": "factorvae", "dataset": "color_dsprites", "steps": 300, "fc_dim": 64, "d_steps": 3,
        "hparams": {"d_lr": 1e-3}, "seeds": [4, 5], "grid": {"gamma": [10, 20.5], "vae_lr": [1e-4, 3e-4]},
        "eval": {"every": 100, "metrics": ["mig", "sap"], "budget": "training"}}]}, "test")
    runs = expand(spec, tmp_path / "runs")
    assert len(runs) == 2 * 2 * 2
    seen = {(r.config.gamma, r.config.vae_lr, r.config.seed) for r in runs}
    assert seen == {(g, lr, s) for g in (10.0, 20.5) for lr in (1e-4, 3e-4) for s in (4, 5)}
    for run in runs:
        c = run.config
        assert isinstance(c.gamma, float)  # TOML's 10 is 10.0: it packs with 20.5
        assert (c.dataset, c.steps, c.fc_dim, c.d_steps, c.d_lr) == ("color_dsprites", 300, 64, 3, 1e-3)
        assert (c.eval_every, tuple(c.eval_metrics), c.eval_budget, c.fast) == (100, ("mig", "sap"), "training", True)
        assert Path(c.out) == tmp_path / "runs" / run.name
    assert runs[0].name == "factorvae-gamma10-vae_lr0.0001-seed4"


def test_run_names_are_readable_and_collisions_across_blocks_get_the_differing_settings(tmp_path):
    spec = parse_spec({"block": [
        {"model": "dipvae", "dip_type": "i", "seeds": [0], "grid": {"lambda_od": [1.0, 2.5]}},
        {"model": "dipvae", "dip_type": "ii", "lambda_d_factor": 1.0, "seeds": [0], "grid": {"lambda_od": [1.0]}},
        {"model": "betavae", "name": "bvae", "seeds": [3], "grid": {"beta": [1e-5]}},
        {"model": "vae", "seeds": [0, 1]},
    ]}, "test")
    names = [r.name for r in expand(spec, tmp_path)]
    assert names == [
        "dipvae-dip_type_i-lambda_d_factor10-lambda_od1-seed0",
        "dipvae-lambda_od2.5-seed0",  # no other block has this name
        "dipvae-dip_type_ii-lambda_d_factor1-lambda_od1-seed0",
        "bvae-beta1e-05-seed3", "vae-seed0", "vae-seed1",
    ]
    assert names == [r.name for r in expand(spec, tmp_path)]  # the same spec, the same names


def test_packs_group_by_what_runs_share_and_cut_to_the_pack_size(tmp_path):
    spec = parse_spec({"block": [
        {"model": "factorvae", "seeds": [0, 1, 2], "grid": {"gamma": [10.0, 20.0]}},  # 6 runs: one group
        {"model": "factorvae", "d_steps": 5, "seeds": [0], "grid": {"gamma": [10.0]}},  # an int differs: its own
        {"model": "betavae", "device": "cpu", "seeds": list(range(10))},
    ]}, "test")
    runs = expand(spec, tmp_path)
    packs = plan_packs(runs, 4)
    assert [[r.name for r in p] for p in packs] == [
        [r.name for r in runs[0:4]], [r.name for r in runs[4:6]], [runs[6].name],
        [r.name for r in runs[7:11]], [r.name for r in runs[11:15]], [r.name for r in runs[15:17]]]
    default = plan_packs(runs)
    k = DEFAULT_PACK_SIZE["cpu"]
    last_group = [len(p) for p in default if p[0].config.model == "betavae"]
    assert last_group == [k] * (10 // k) + ([10 % k] if 10 % k else [])
    with pytest.raises(FastFVAEError, match="--pack must be an integer >= 1"):
        plan_packs(runs, 0)


# --- presets ----------------------------------------------------------------------------------
def test_preset_seed_fig3_is_kim_and_mnih_figure_3(tmp_path, capsys):
    out = tmp_path / "fig3"
    assert main(["sweep", "--preset", "seed-fig3", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith(f"sweep {out}: 120 runs in ")
    assert sum(line.startswith("  ") for line in printed.splitlines()) == 120
    assert not out.exists()
    runs = expand(preset_spec("seed-fig3"), tmp_path)
    beta = sorted({r.config.beta for r in runs if r.config.model == "betavae"})
    gamma = sorted({r.config.gamma for r in runs if r.config.model == "factorvae"})
    assert beta == [1.0, 2.0, 4.0, 6.0, 8.0, 16.0] and gamma == [10.0, 20.0, 30.0, 40.0, 50.0, 100.0]
    assert {r.seed for r in runs} == set(range(10)) and len({r.name for r in runs}) == 120
    for r in runs:
        c = r.config
        assert (c.steps, c.eval_every, c.dataset) == (300_000, 10_000, "dsprites")
        assert tuple(c.eval_metrics) == ("factor_vae", "beta_vae", "mig", "sap", "recon")
        if c.model == "factorvae":  # the paper's Section 6 settings
            assert (c.d_steps, c.perm_batch, c.d_hidden, c.d_layers) == (5, "second", 1000, 6)


def test_preset_dlib_dsprites_is_unsupervised_study_v1(tmp_path, capsys):
    out = tmp_path / "dlib"
    assert main(["sweep", "--preset", "dlib-dsprites", "--out", str(out), "--dry-run", "--steps", "1000"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"sweep {out}: 1800 runs in ")
    assert sum(line.startswith("  ") and "steps=1000 " in line for line in printed) == 1800
    assert not out.exists()
    runs = expand(preset_spec("dlib-dsprites"), tmp_path)
    assert len(runs) == 1800 and len({r.name for r in runs}) == 1800
    grids = {}
    for r in runs:
        (key, value), = r.point
        grids.setdefault((r.label, key), set()).add(value)
    assert grids == {
        ("betavae", "beta"): {1.0, 2.0, 4.0, 6.0, 8.0, 16.0},
        ("factorvae", "gamma"): {10.0, 20.0, 30.0, 40.0, 50.0, 100.0},
        ("dipvae_i", "lambda_od"): {1.0, 2.0, 5.0, 10.0, 20.0, 50.0},
        ("dipvae_ii", "lambda_od"): {1.0, 2.0, 5.0, 10.0, 20.0, 50.0},
        ("betatcvae", "beta"): {1.0, 2.0, 4.0, 6.0, 8.0, 10.0},
        ("annealedvae", "c_max"): {5.0, 10.0, 25.0, 50.0, 75.0, 100.0},
    }
    assert {r.seed for r in runs} == set(range(50))
    for r in runs:
        c = r.config
        assert (c.steps, c.batch_size, c.z_dim, c.fc_dim, c.vae_lr) == (300_000, 64, 10, 256, 1e-4)
        if r.label.startswith("dipvae"):
            assert (c.dip_type, c.lambda_d_factor) == (("i", 10.0) if r.label == "dipvae_i" else ("ii", 1.0))
        if c.model == "annealedvae":
            assert (c.gamma, c.iteration_threshold) == (1000.0, 100_000)
        if c.model == "factorvae":
            assert (c.d_steps, c.perm_batch) == (1, "same")


# --- running ----------------------------------------------------------------------------------
def run_files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*"))
            if p.is_file()}


def test_a_sweep_trains_every_run_and_a_second_call_trains_nothing(tmp_path, small_data, capsys):
    spec, out = write_spec(tmp_path, SPEC), tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--pack", "2", "--no-progress"]) == 0
    names = ["factorvae-seed0", "factorvae-seed1", "betavae-seed0"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    for name, steps in zip(names, (4, 4, 3)):
        folder = out / "runs" / name
        assert {"config.json", "checkpoint.pt", "train_log.jsonl"} <= {p.name for p in folder.iterdir()}
        assert load_checkpoint(folder)["state"]["step"] == steps
        assert json.loads((folder / "config.json").read_text())["out"] == str(folder)
    record = json.loads((out / SWEEP_FILE).read_text())
    assert [r["name"] for r in record["runs"]] == names and record["runs"][2]["config"]["hparams"]["beta"] == 2.0
    assert not (out / LOCK_FILE).exists()
    err = capsys.readouterr().err
    assert "pack 1/2: factorvae: seed 0, 1 (2 runs, cpu)" in err and "3/3 runs done (3 trained now" in err

    # the folder keeps its pack size: without --pack the same packs again
    assert record["pack"] == 2 and plan_sweep(load_spec(spec), out).pack_size == 2
    assert [len(p) for p in plan_sweep(load_spec(spec), out, pack_size=1).packs()] == [1, 1, 1]
    before, record_before = run_files(out), (out / SWEEP_FILE).stat().st_mtime_ns
    assert main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "3/3 runs done (0 trained now" in capsys.readouterr().err
    assert run_files(out) == before and (out / SWEEP_FILE).stat().st_mtime_ns == record_before


def _tensors(payload) -> dict:
    flat = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value
    walk("", {"state": payload["state"], "rng": payload["rng"]})
    return flat


def test_ctrl_c_stops_the_sweep_and_the_same_command_resumes_it_bit_exactly(tmp_path, small_data, monkeypatch,
                                                                             capsys):
    spec = write_spec(tmp_path, SPEC)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    argv = ["sweep", str(spec), "--pack", "2", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(whole)]) == 0

    def ctrl_c_at_step_2_of_seed_1(cfg, args, data=None, evaluation=True):
        def callback(state, metrics):
            if cfg.seed == 1 and state.step == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return [callback]

    monkeypatch.setattr(cli_train, "callbacks_for", ctrl_c_at_step_2_of_seed_1)
    capsys.readouterr()
    assert main([*argv, "--out", str(stopped)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastfvae: sweep interrupted in pack 1; checkpoints saved, 0/3 runs done"), err
    for name in ("factorvae-seed0", "factorvae-seed1"):  # the pack stops as a whole
        assert load_checkpoint(stopped / "runs" / name)["state"]["step"] == 2
    assert not (stopped / "runs" / "betavae-seed0").exists()  # the next pack never started
    monkeypatch.undo()
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))

    assert main([*argv, "--out", str(stopped)]) == 0
    for name in ("factorvae-seed0", "factorvae-seed1", "betavae-seed0"):
        a, b = _tensors(load_checkpoint(whole / "runs" / name)), _tensors(load_checkpoint(stopped / "runs" / name))
        assert a.keys() == b.keys()
        for key in a:
            same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
            assert same, (name, key)


def test_a_signal_between_packs_stops_before_the_next_pack(tmp_path, small_data):
    plan = plan_sweep(load_spec(write_spec(tmp_path, SPEC)), tmp_path / "sweep", pack_size=2)
    lines = []

    def status(line):
        lines.append(line)
        if len(lines) == 2:  # before pack 2
            os.kill(os.getpid(), signal.SIGTERM)

    result = run_sweep(plan, progress=False, status=status)
    assert (result.status, result.stop_signal, result.pack, result.done) == ("interrupted", signal.SIGTERM, 2, 2)
    assert not (tmp_path / "sweep" / "runs" / "betavae-seed0").exists()
    assert lines[1].startswith("sweep: 2/3 runs done, ")


def test_a_sweep_folder_grows_and_resumes_with_more_steps_but_refuses_changed_runs(tmp_path, small_data, capsys):
    out = tmp_path / "sweep"
    spec = write_spec(tmp_path, SPEC)
    assert main(["sweep", str(spec), "--out", str(out), "--steps", "2", "--pack", "8", "--no-progress"]) == 0
    assert load_checkpoint(out / "runs" / "betavae-seed0")["state"]["step"] == 2
    # more seeds: new runs; the recorded ones keep their names and continue to the spec's steps
    grown = write_spec(tmp_path, SPEC.replace("seeds = [0, 1]", "seeds = [0, 1, 7]"), "grown.toml")
    capsys.readouterr()
    assert main(["sweep", str(grown), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "factorvae-seed0  seed=0  steps=4  at step 2 of 4" in printed
    assert "factorvae-seed7  seed=7  steps=4  new" in printed
    assert main(["sweep", str(grown), "--out", str(out), "--no-progress"]) == 0
    assert load_checkpoint(out / "runs" / "factorvae-seed7")["state"]["step"] == 4
    assert load_checkpoint(out / "runs" / "betavae-seed0")["state"]["step"] == 3
    assert "pack 1/2: factorvae: seed 7 (1 run, cpu)" in capsys.readouterr().err  # step 0: apart from seeds 0, 1
    # a run changed (beta 2 -> 3) or dropped: refused, nothing touched
    before = run_files(out)
    for text in (SPEC.replace("beta = 2", "beta = 3"), SPEC):
        changed = write_spec(tmp_path, text, "changed.toml")
        assert main(["sweep", str(changed), "--out", str(out), "--no-progress"]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert "that this spec does not train" in err and "use another --out" in err
    assert run_files(out) == before


def test_out_must_be_a_sweep_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert main(["sweep", str(write_spec(tmp_path, SPEC)), "--out", str(tmp_path / "run")]) == 2
    assert "is not a sweep folder" in one_error_line(capsys.readouterr().err)


def test_the_sweep_folder_belongs_to_one_process(tmp_path, small_data, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fastfvae.train.lock import ExclusiveFileLock as L; "
         f"l = L({str(out / LOCK_FILE)!r}, str).acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["sweep", str(write_spec(tmp_path, SPEC)), "--out", str(out), "--no-progress"]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert f"in use by another fastfvae process (PID {holder.pid})" in err
        assert not (out / SWEEP_FILE).exists() and not (out / "runs").exists()
    finally:
        holder.communicate("", timeout=30)


DIVERGING = f"""
[[block]]
model = "betavae"
steps = 4
{TINY}
grid = {{ beta = [2.0, 1e38] }}
"""


@pytest.mark.parametrize("pack", [1, 2])
def test_a_diverged_run_is_marked_and_the_others_train_on(tmp_path, small_data, capsys, pack):
    """beta = 1e38 overflows float32: that run is marked diverged (its folder says where), the
    pack goes on without it, the sweep ends with exit 1 naming it, and the same command later
    skips it. The good run equals the same run swept alone."""
    from fastfvae.study.sweep import DIVERGED_FILE

    spec = write_spec(tmp_path, DIVERGING)
    out = tmp_path / "sweep"
    argv = ["sweep", str(spec), "--out", str(out), "--pack", str(pack), "--no-progress", "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastfvae: error: 1 run(s) diverged (NaN/inf): betavae-beta1e+38-seed0;"), err
    assert "fastfvae: sweep " in err[-2] and "1/2 runs done" in err[-2]
    record = json.loads((out / "runs" / "betavae-beta1e+38-seed0" / DIVERGED_FILE).read_text())
    assert record["step"] >= 1 and "NaN/inf" in record["message"]
    good = load_checkpoint(out / "runs" / "betavae-beta2-seed0")
    assert good["state"]["step"] == 4

    alone = write_spec(tmp_path, DIVERGING.replace("[2.0, 1e38]", "[2.0]"), "alone.toml")
    assert main(["sweep", str(alone), "--out", str(tmp_path / "alone"), "--no-progress", "--device", "cpu"]) == 0
    a, b = _tensors(good), _tensors(load_checkpoint(tmp_path / "alone" / "runs" / "betavae-beta2-seed0"))
    assert a.keys() == b.keys()
    for key in a:  # diverged before any checkpoint: the good run trained afresh, alone
        same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        assert same, key

    capsys.readouterr()
    assert main(argv) == 1  # nothing to train; the diverged run is still reported
    err = capsys.readouterr().err.strip().splitlines()
    assert "0 trained now" in err[-2] and "betavae-beta1e+38-seed0" in err[-1]
    assert main([*argv, "--dry-run"]) == 0
    assert "diverged at step" in capsys.readouterr().out


def test_a_block_on_another_methods_preset_is_refused_as_train_refuses_it(tmp_path):
    """A preset is its model's config (`fastfvae train --preset dlib --model annealedvae` is
    refused): its hyperparameters would be dropped or, under a shared name, change meaning
    (FactorVAE's gamma is no AnnealedVAE gamma). The line names them and the settings to give."""
    with pytest.raises(FastFVAEError, match=r"^test, block 1: preset dlib is a factorvae preset and "
                       r"its factorvae settings \(d_steps 1, perm_batch same\) do not apply to model annealedvae; "
                       r"use model = \"factorvae\", or drop preset and set its other settings \(fc_dim = 256\)$"):
        parse_spec({"block": [{"model": "annealedvae", "preset": "dlib"}]}, "test")
    factor = parse_spec({"block": [{"model": "factorvae", "preset": "dlib"}]}, "test")
    (run,) = expand(factor, tmp_path / "runs")
    assert (run.config.fc_dim, run.config.d_steps, run.config.preset) == (256, 1, "dlib")


def test_run_pack_marks_a_diverged_run_named_in_another_form_and_never_loops(tmp_path, monkeypatch):
    """A run folder given as ``d/./run/`` is the folder the loop names ``d/run``: marked once;
    a divergence naming no run of the pack is raised, not retried."""
    from fastfvae.study.sweep import DIVERGED_FILE, DivergedRun, run_pack
    from fastfvae.train.config import TrainConfig
    from fastfvae.train.loop import TrainingDiverged
    import fastfvae.study.sweep as sweep_module

    cfg = TrainConfig(model="betavae", z_dim=2, batch_size=8, steps=3, log_every=1, ckpt_every=0, device="cpu",
                      out=f"{tmp_path}/./run/", debug_nan_at_step=2)
    (result,) = run_pack([cfg], data=small_dsprites(256), progress=False)
    assert isinstance(result, DivergedRun) and result.step == 2
    assert (tmp_path / "run" / DIVERGED_FILE).is_file()

    calls = []

    def elsewhere(todo, **kwargs):
        calls.append(todo)
        raise TrainingDiverged("somewhere else", outs=(str(tmp_path / "other"),), step=1)

    monkeypatch.setattr(sweep_module, "train_pack", elsewhere)
    with pytest.raises(TrainingDiverged, match="somewhere else"):
        run_pack([cfg.replace(out=str(tmp_path / "fresh"))], progress=False)
    assert len(calls) == 1


def test_a_started_sweep_keeps_the_pack_sizes_it_was_started_with(tmp_path):
    """A new folder records the per-device default K; a folder whose record predates that
    keeps the packs it was started with (one run per pack on CPU), whatever the default is now."""
    from fastfvae.study.sweep import RECORDLESS_PACK_SIZE, RUNS_DIR, owned_sweep

    spec = parse_spec({"block": [{"model": "betavae", "device": "cpu", "steps": 3, "seeds": list(range(3))}]}, "t")
    plan = plan_sweep(spec, tmp_path / "s")
    assert plan.pack_defaults == DEFAULT_PACK_SIZE
    with owned_sweep(plan) as (_, packs):
        assert (tmp_path / "s" / RUNS_DIR).is_dir()
    record = json.loads((tmp_path / "s" / SWEEP_FILE).read_text())
    assert record["pack_defaults"] == DEFAULT_PACK_SIZE and record["pack"] is None
    del record["pack_defaults"]
    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps(record))
    old = plan_sweep(spec, tmp_path / "s")
    assert old.pack_defaults == RECORDLESS_PACK_SIZE and [len(p) for p in old.packs()] == [1, 1, 1]
    assert [len(p) for p in plan_sweep(spec, tmp_path / "s", pack_size=3).packs()] == [3]
    record["pack_defaults"] = {"cpu": 0}
    (tmp_path / "s" / SWEEP_FILE).write_text(json.dumps(record))
    with pytest.raises(FastFVAEError, match="pack_defaults must map cpu, cuda to pack sizes"):
        plan_sweep(spec, tmp_path / "s")


def test_a_gpu_sweep_plans_runs_it_cannot_stack_as_single_runs_and_says_so(tmp_path, monkeypatch):
    """A plug-in method whose adversary optimiser is not a plain Adam (here SGD) cannot share a
    stacked GPU pack (one Adam for all its runs): planned for CUDA, without CUDA and before any
    training, its runs are packs of one (as ``--pack 1`` would make them, even with ``--pack 8``)
    and the plan says why; the other blocks pack as before, and on CPU (each run's own step) it packs."""
    from fastfvae import methods
    from fastfvae.cli.sweep import dry_run_lines
    from test_methods_registry import _factorvae_with

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.names()
    methods.register(_factorvae_with("sgd"))
    spec = parse_spec({"block": [{"model": "fvae_sgd", "seeds": [0, 1, 2]},
                                 {"model": "betavae", "seeds": [0, 1]}]}, "test")
    for pack_size in (None, 8):
        plan = plan_sweep(spec, tmp_path / "gpu", device="cuda", pack_size=pack_size)
        sizes = [(p[0].config.model, len(p)) for p in plan.packs()]
        assert sizes == [("fvae_sgd", 1)] * 3 + [("betavae", 2)]
    lines = dry_run_lines(plan, plan.packs())
    assert "3 runs" not in lines[1] and "(1 run, cuda; single runs on cuda: its adversary optimiser, SGD, does not " \
        "stack" in lines[1]
    assert "does not stack" not in [line for line in lines if line.startswith("pack 4/4")][0]
    cpu = plan_sweep(spec, tmp_path / "cpu", device="cpu")
    assert [len(p) for p in cpu.packs()] == [3, 2]
    assert not (tmp_path / "gpu").exists()
