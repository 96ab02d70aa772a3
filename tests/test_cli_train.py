"""`fastfvae train` / `fastfvae traverse` through the CLI: end to end on the default data, resume,
and every bad input -> exit 2, one line on stderr, no traceback, nothing overwritten."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from cpu_bf16 import needs_cpu_bf16

import fastfvae.fast.precision as precision
from fastfvae.cli import main
from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import load_checkpoint
from fastfvae.train.config import TrainConfig, preset
from fastfvae.train.loop import run_training
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

TINY = ["--batch-size", "8", "--no-progress", "--no-figures"]
FIGURES = ("reconstructions.png", "traversals.png", "traversals.gif", "loss_curves.png")


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished small run (API, small data) that bad commands must leave untouched."""
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = TrainConfig(steps=2, batch_size=8, d_hidden=32, d_layers=2, out=str(out), log_every=1)
    run_training(cfg, data=small_dsprites(256), progress=False)
    return out


@pytest.fixture
def bf16_machine(monkeypatch):
    """Config-level checks as on a CPU with bfloat16 instructions, whatever this one has (what
    other CPUs do: tests/test_precision_support.py)."""
    monkeypatch.setattr(precision, "bf16_support", lambda device: (precision.BF16_NATIVE, "simulated"))


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _files(tmp: Path) -> dict:
    (tmp / "garbage.npz").write_bytes(b"this is not dSprites")
    (tmp / "a_file").write_text("x")
    return {"garbage": str(tmp / "garbage.npz"), "file": str(tmp / "a_file"), "new": str(tmp / "new")}


#: bad command lines (f: scratch files, r: an existing run); --out defaults to a fresh folder
BAD = {
    "unknown preset": lambda f, r: ["--preset", "nope"],
    "negative gamma": lambda f, r: ["--gamma", "-1"],
    "negative beta": lambda f, r: ["--model", "betavae", "--beta", "-0.5"],
    "batch < 2": lambda f, r: ["--batch-size", "1"],
    "z-dim < 1": lambda f, r: ["--z-dim", "0"],
    "unknown model": lambda f, r: ["--model", "vea"],
    "unknown perm-batch": lambda f, r: ["--perm-batch", "both"],
    "unreadable data": lambda f, r: ["--data", f["garbage"]],
    "missing data": lambda f, r: ["--data", f["new"] + ".npz"],
    "out is a file": lambda f, r: ["--out", f["file"]],
    "out under a file": lambda f, r: ["--out", f["file"] + "/sub"],
    "out holds a run": lambda f, r: ["--out", r],
    "resume other model": lambda f, r: ["--resume", r, "--model", "betavae", "--steps", "4"],
    "resume other config": lambda f, r: ["--resume", r, "--gamma", "3", "--steps", "4"],
    "resume not a checkpoint": lambda f, r: ["--resume", f["garbage"]],
    "resume finished run": lambda f, r: ["--resume", r],
    "negative seed": lambda f, r: ["--seed", "-1"],
    "seed past 2**63": lambda f, r: ["--seed", str(2**70)],
    "bf16 with the reference": lambda f, r: ["--reference", "--precision", "bf16"],
    "dali with the reference": lambda f, r: ["--no-fast", "--loader", "dali"],
    "torch loader with the reference": lambda f, r: ["--reference", "--loader", "torch"],
    "device loader with the reference": lambda f, r: ["--reference", "--loader", "device"],
    "beta with factorvae": lambda f, r: ["--model", "factorvae", "--beta", "2"],
    "gamma with betavae": lambda f, r: ["--model", "betavae", "--gamma", "10"],
    "d-steps with betavae": lambda f, r: ["--model", "betavae", "--d-steps", "5"],
    "perm-batch with betavae": lambda f, r: ["--model", "betavae", "--perm-batch", "same"],
    "factorvae preset with betavae": lambda f, r: ["--preset", "paper", "--model", "betavae"],
    "factorvae preset with annealedvae": lambda f, r: ["--preset", "dlib", "--model", "annealedvae"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, existing_run, capsys):
    before = _digest(existing_run)
    files = _files(tmp_path)
    argv = BAD[case](files, str(existing_run))
    defaults = [] if "--resume" in argv else ["--out", files["new"], "--steps", "2"]  # resume: in place
    assert main(["train", *TINY, *defaults, *argv]) == 2  # later flags win: the bad one comes last
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastfvae: error: "), err
    assert _digest(existing_run) == before
    assert not (tmp_path / "new").exists()  # not even an empty folder is left behind


@pytest.mark.parametrize("argv,expected", [
    (["--reference", "--precision", "bf16"],
     "--precision bf16 only applies to the fast path, and this run uses the reference step; "
     "drop --precision or train with --fast"),
    (["--model", "betavae", "--gamma", "10"],
     "--gamma only applies to --model annealedvae / factorvae, and this run trains betavae; drop --gamma or pass "
     "--model annealedvae"),
    (["--model", "factorvae", "--beta", "10"],
     "--beta only applies to --model betavae / betatcvae, and this run trains factorvae; drop --beta or pass "
     "--model betavae"),
])
def test_a_flag_that_would_do_nothing_is_refused_with_its_reason(tmp_path, capsys, argv, expected):
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--steps", "2", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"fastfvae: error: {expected}"


def test_new_runs_use_the_fast_step_and_resumed_runs_keep_theirs(existing_run, tmp_path, bf16_machine):
    """--fast is the default for a new run (CPU too); --reference / --no-fast choose the reference
    loop; a resumed run keeps the step its config names (existing_run: the reference) unless a
    flag says otherwise."""
    from fastfvae.cli import build_parser
    from fastfvae.cli.train import config_from_args

    def fast(*argv):
        return config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "new"), *argv])).fast

    assert fast() is True and fast("--fast") is True
    assert fast("--reference") is False and fast("--no-fast") is False
    assert load_checkpoint(existing_run)["config"]["fast"] is False
    assert fast("--resume", str(existing_run)) is False
    assert fast("--resume", str(existing_run), "--fast") is True
    with pytest.raises(FastFVAEError, match="--precision bf16 only applies to the fast path"):
        fast("--resume", str(existing_run), "--precision", "bf16")  # still the reference step
    assert fast("--resume", str(existing_run), "--precision", "bf16", "--fast") is True


def test_reference_overrides_a_fast_preset_or_runs_precision_and_loader(tmp_path, capsys, monkeypatch):
    """--reference on the bf16 quickstart preset, or on a resumed bf16 run, trains the reference
    step (fp32, its own batches); only an explicit --precision / --loader is refused, and a fast-only
    value from a config (not a flag) is named by where it came from."""
    from fastfvae.cli import build_parser
    from fastfvae.cli.train import config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "new"), *argv]))

    quick = cfg("--preset", "quickstart", "--reference")
    assert (quick.fast, quick.precision, quick.loader, quick.gamma) == (False, "fp32", "device", 50.0)
    with pytest.raises(FastFVAEError, match="^--precision bf16 only applies to the fast path"):
        cfg("--preset", "quickstart", "--reference", "--precision", "bf16")
    with pytest.raises(FastFVAEError, match="^the config sets precision bf16, which only applies to the fast path.*"
                                            "pass --precision fp32$"):
        run_training(TrainConfig(fast=False, precision="bf16", out=str(tmp_path / "api")), progress=False)
    assert not (tmp_path / "api").exists()


@needs_cpu_bf16
def test_reference_resumes_a_bf16_run_in_fp32_and_back(tmp_path, capsys, monkeypatch):
    import fastfvae.train.loop as loop

    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))
    out = tmp_path / "bf16"
    run_training(TrainConfig(steps=2, batch_size=8, d_hidden=32, d_layers=2, out=str(out), fast=True,
                             precision="bf16"), data=small_dsprites(256), progress=False)
    assert main(["train", "--resume", str(out), "--reference", "--steps", "4", *TINY]) == 0, capsys.readouterr().err
    resumed = load_checkpoint(out)
    assert resumed["state"]["step"] == 4
    assert (resumed["config"]["fast"], resumed["config"]["precision"]) == (False, "fp32")
    assert main(["train", "--resume", str(out), "--fast", "--steps", "6", *TINY]) == 0  # and back to the fast step


@pytest.mark.parametrize("argv,expected", [
    (["--preset", "paper", "--model", "betavae"],
     "--preset paper is a factorvae preset and its factorvae settings (gamma 35.0, d_steps 5, perm_batch second) do "
     "not apply to --model betavae; pass --model factorvae, or drop --preset (its other settings are the defaults)"),
    (["--preset", "dlib", "--model", "annealedvae"],  # annealedvae declares a gamma too: not FactorVAE's
     "--preset dlib is a factorvae preset and its factorvae settings (d_steps 1, perm_batch same) do not apply to "
     "--model annealedvae; pass --model factorvae, or drop --preset and give its other settings as flags "
     "(--fc-dim 256)"),
    (["--preset", "quickstart", "--model", "vae"],
     "--preset quickstart is a factorvae preset and its factorvae settings (gamma 50.0, d_steps 1, perm_batch same, "
     "d_lr 0.001) do not apply to --model vae; pass --model factorvae, or drop --preset and give its other settings "
     "as flags (--steps 5000 --vae-lr 0.0003 --precision bf16 --ckpt-every 1000)"),
], ids=["paper-betavae", "dlib-annealedvae", "quickstart-vae"])
def test_a_factorvae_preset_with_another_model_is_refused_naming_what_would_not_apply(tmp_path, capsys, argv,
                                                                                       expected, bf16_machine):
    """A preset's hyperparameters are FactorVAE's: with another --model they would be dropped (or,
    for AnnealedVAE's gamma, carried into another meaning), so the run is refused with the
    flags that give the preset's other settings; the preset's own model still takes it."""
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--steps", "2", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"fastfvae: error: {expected}"
    assert not (tmp_path / "r").exists()
    from fastfvae.cli import build_parser
    from fastfvae.cli.train import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--preset", "paper",
                                                      "--model", "factorvae"]))
    assert (cfg.model, cfg.d_steps, cfg.preset) == ("factorvae", 5, "paper")
    flags = expected.split("(")[-1].rstrip(")")
    if flags.startswith("--"):  # the flags named give the preset's other settings, with that model
        model = argv[argv.index("--model") + 1]
        other = config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "r"), "--model", model,
                                                            *flags.split()]))
        base = preset(argv[argv.index("--preset") + 1])
        for name in ("steps", "fc_dim", "vae_lr", "precision", "ckpt_every", "batch_size", "z_dim"):
            assert getattr(other, name) == getattr(base, name), name


@pytest.mark.parametrize("argv", [["--model", "nope", "--help"], ["--model=nope", "-h"]])
def test_help_for_an_unknown_model_is_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == ["fastfvae: error: unknown model 'nope'; expected one of: vae, betavae, "
                                        "annealedvae, factorvae, dipvae, betatcvae"]


def test_the_train_flags_that_are_no_config_field_are_the_names_a_hyperparameter_may_not_take():
    """`check_hparam_names` refuses a hyperparameter named like one of the train command's own
    flags; this keeps its list (`CLI_ONLY_NAMES`) in step with the parser."""
    import argparse

    from fastfvae.cli.train import add_arguments, hparam_flags
    from fastfvae.train.config import CLI_ONLY_NAMES

    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    names = {s.lstrip("-").replace("-", "_") for a in p._actions for s in a.option_strings if s.startswith("--")}
    fields = set(TrainConfig.__dataclass_fields__) | set(hparam_flags())
    assert names - fields == set(CLI_ONLY_NAMES)


def test_bad_input_through_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastfvae", "train", "--gamma", "-2", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fastfvae: error: gamma must be a finite number >= 0, got -2.0"]
    assert not (tmp_path / "x").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--gamma", "--beta", "--steps", "--batch-size", "--z-dim", "--d-steps", "--perm-batch",
                 "--seed", "--data", "--device", "--out", "--ckpt-every", "--log-every", "--resume", "--preset"):
        assert flag in text


def test_train_resume_traverse_end_to_end(tmp_path, capsys):
    """The README commands on the default data path (procedural dSprites when no file is cached)."""
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2",
                 "--out", str(out), "--no-progress"]) == 0
    for name in ("config.json", "train_log.jsonl", "checkpoint.pt", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    assert main(["train", "--resume", str(out), "--steps", "5", "--no-progress", "--no-figures"]) == 0
    assert load_checkpoint(out)["state"]["step"] == 5
    figs = tmp_path / "figs"
    assert main(["traverse", str(out), "--out", str(figs)]) == 0
    assert sorted(p.name for p in figs.iterdir()) == sorted(FIGURES)


def test_a_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    import torch

    import fastfvae.train.loop as loop

    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--steps", "2", *TINY]) == 0
    real_load, reads = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or real_load(*a, **kw))
    assert main(["train", "--resume", str(out), "--steps", "3", *TINY]) == 0
    assert reads == [out / "checkpoint.pt"] and load_checkpoint(out)["state"]["step"] == 3


def test_diverged_run_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    import fastfvae.cli.train as cli_train
    from fastfvae.train.loop import TrainingDiverged

    def diverge(cfg, **kw):
        raise TrainingDiverged("loss became NaN/inf at step 5; training stopped, no checkpoint was written")

    monkeypatch.setattr(cli_train, "run_training", diverge)
    assert main(["train", "--out", str(tmp_path / "r"), *TINY]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastfvae: error: loss became NaN/inf at step 5; training stopped, no checkpoint was written"]


def test_traverse_bad_checkpoint_exits_2(tmp_path, capsys):
    assert main(["traverse", str(tmp_path / "nothing"), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastfvae: error: no checkpoint")
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize("count", ["0", "-1"])
def test_traverse_images_below_one_exits_2(tmp_path, capsys, count):
    assert main(["traverse", str(tmp_path / "nothing"), "--images", count]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastfvae: error: --images must be >= 1, got {count}"


def _fake_evaluation(models, data, metrics, **kw):
    """`evaluate_models`' records, without the work (a 256-row set is no full factor grid)."""
    return [{"factor_vae": 0.5, "details": {"factor_vae": {"eval_accuracy": 0.5}},
             "seconds": {"encode": 0.0, "metrics": 0.0}} for _ in models]


def test_train_eval_every_loads_the_data_once(tmp_path, monkeypatch):
    """The periodic metric scores the run's own dataset: it is loaded once, not again for the callback."""
    import fastfvae.train.loop as loop

    loads = []

    def load(path, *_):
        loads.append(path)
        return small_dsprites(256)

    monkeypatch.setattr(loop, "load_training_data", load)
    monkeypatch.setattr("fastfvae.metrics.periodic.evaluate_models", _fake_evaluation)
    args = ["train", "--out", str(tmp_path / "r"), "--steps", "2", "--eval-every", "1", "--device", "cpu",
            "--z-dim", "2", *TINY]
    assert main(args) == 0
    assert loads == [None]
    assert (tmp_path / "r" / "eval_log.jsonl").read_text().count('"step"') == 2


def test_a_resume_drops_the_evaluations_past_its_checkpoint_and_a_failed_write_is_one_line(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import fastfvae.train.loop as loop
    from fastfvae.metrics.periodic import periodic_factor_vae

    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))
    monkeypatch.setattr("fastfvae.metrics.periodic.evaluate_models", _fake_evaluation)
    monkeypatch.setattr("fastfvae.metrics.periodic.factor_vae_score_of_model",
                        lambda model, data, **kw: {"eval_accuracy": 0.5, "train_accuracy": 0.5})
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--steps", "2", "--eval-every", "1", "--z-dim", "2", *TINY]) == 0
    eval_log = out / "eval_log.jsonl"
    with open(eval_log, "a") as f:  # what a run killed after evaluating step 3, before its checkpoint, leaves
        f.write(json.dumps({"step": 3, "factor_vae": {}, "seconds": 0.0}) + "\n")
    assert main(["train", "--resume", str(out), "--steps", "4", *TINY]) == 0
    assert [json.loads(line)["step"] for line in eval_log.read_text().splitlines()] == [1, 2, 3, 4]

    blocked = tmp_path / "blocked"
    (blocked / "eval_log.jsonl").mkdir(parents=True)  # appending to it fails with an OSError
    callback = periodic_factor_vae(1, small_dsprites(256), out_dir=blocked)
    with pytest.raises(FastFVAEError, match=r"^cannot write .*eval_log.jsonl: Is a directory$"):
        callback(SimpleNamespace(models=SimpleNamespace(vae=None), step=1))


def test_traverse_checks_out_before_loading_data_and_leaves_nothing(existing_run, tmp_path, capsys, monkeypatch):
    import fastfvae.train.loop as loop

    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: pytest.fail("loaded data before checking --out"))
    assert main(["traverse", str(existing_run), "--out", str(tmp_path / "a_file" / "figs")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"fastfvae: error: --out {tmp_path / 'a_file' / 'figs'}: cannot create")
    monkeypatch.undo()
    (tmp_path / "garbage.npz").write_bytes(b"not dSprites")
    assert main(["traverse", str(existing_run), "--data", str(tmp_path / "garbage.npz"),
                 "--out", str(tmp_path / "figs")]) == 2
    assert "not a dSprites file" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()  # the folder made for the figures is removed again


def test_quickstart_preset_trains_on_the_fast_step_and_says_what_to_open(tmp_path, capsys):
    """The README's first command, shortened: the preset's settings reach the run (config.json),
    and the summary names the figures and the time taken."""
    import json

    out = tmp_path / "first"
    assert main(["train", "--preset", "quickstart", "--steps", "2", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    # bf16 where the CPU has bfloat16 instructions, else fp32 (tests/test_precision_support.py)
    bf16 = precision.bf16_support("cpu")[0] == precision.BF16_NATIVE
    assert (saved["preset"], saved["fast"], saved["precision"], saved["vae_lr"], saved["hparams"]["d_lr"]) == (
        "quickstart", True, "bf16" if bf16 else "fp32", 3e-4, 1e-3)
    err = capsys.readouterr().err
    assert "steps/s" in err and str(out / "traversals.png") in err
