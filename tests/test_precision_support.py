"""bf16 on machines that cannot run it (`fastfvae.fast.precision.bf16_support`): oneDNN refuses
bf16 convolutions on an AVX2-only CPU, and bf16 is slower than fp32 without bfloat16 dot products.
An explicit or resumed bf16 is refused with one line before any work; a preset's bf16 gives way to
fp32 with a notice. Every level is simulated, so each case runs on any machine."""

import json

import pytest
import torch

import fastfvae.fast.precision as precision
from fastfvae.cli import build_parser, main
from fastfvae.errors import FastFVAEError
from fastfvae.train.config import TrainConfig
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

TINY = ["--batch-size", "8", "--no-progress", "--no-figures"]
LEVELS = (precision.BF16_NATIVE, precision.BF16_EMULATED, precision.BF16_UNSUPPORTED)


@pytest.fixture
def simulate(monkeypatch):
    """simulate(level): `bf16_support` answers ``level`` for every device."""
    def set_level(level):
        monkeypatch.setattr(precision, "bf16_support", lambda device: (level, f"simulated {level}"))
    return set_level


def _mkldnn_bf16_conv_runs() -> bool:
    x, w = torch.randn(2, 1, 8, 8).bfloat16(), torch.randn(4, 1, 3, 3).bfloat16()
    try:
        torch.mkldnn_convolution(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    except RuntimeError:
        return False
    return True


def test_the_cpu_level_says_whether_onednn_runs_bf16_here():
    """The real machine: `BF16_UNSUPPORTED` exactly where oneDNN's bf16 convolution raises, and
    `BF16_NATIVE` only with bfloat16 dot products (AVX-512 BF16 or AMX)."""
    level, why = precision.bf16_support("cpu")
    assert level in LEVELS and why
    assert (level == precision.BF16_UNSUPPORTED) == (not _mkldnn_bf16_conv_runs())
    has_dot = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (level == precision.BF16_NATIVE) == has_dot


@pytest.mark.parametrize("amx,avx512_bf16,mkldnn,expected", [
    (True, False, True, precision.BF16_NATIVE),
    (False, True, True, precision.BF16_NATIVE),
    (False, False, True, precision.BF16_EMULATED),
    (False, False, False, precision.BF16_UNSUPPORTED),
])
def test_the_cpu_level_follows_the_instructions_found(monkeypatch, amx, avx512_bf16, mkldnn, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn)
    level, why = precision.bf16_support(torch.device("cpu"))
    assert level == expected
    assert ("AVX-NE-CONVERT" in why) == (expected == precision.BF16_UNSUPPORTED)


def test_check_bf16_runs_refuses_only_bf16_where_it_cannot_run(simulate):
    simulate(precision.BF16_UNSUPPORTED)
    precision.check_bf16_runs("fp32", "cpu")
    with pytest.raises(FastFVAEError, match=r"^--precision bf16 cannot run on this machine: simulated "
                                            r"unsupported; use --precision fp32$"):
        precision.check_bf16_runs("bf16", "cpu")
    simulate(precision.BF16_EMULATED)
    precision.check_bf16_runs("bf16", "cpu")


def _config(tmp_path, *argv):
    from fastfvae.cli.train import config_from_args

    return config_from_args(build_parser().parse_args(["train", "--out", str(tmp_path / "new"), *argv]))


@pytest.mark.parametrize("level,expected", [
    (precision.BF16_NATIVE, ("bf16", None)),
    (precision.BF16_EMULATED, ("fp32", "--preset quickstart trains in fp32: its bf16 would be slower than fp32 here "
                                       "(simulated emulated)")),
    (precision.BF16_UNSUPPORTED, ("fp32", "--preset quickstart trains in fp32: its bf16 cannot run here "
                                          "(simulated unsupported)")),
])
def test_the_quickstart_presets_bf16_gives_way_to_fp32_where_it_is_not_native(tmp_path, capsys, simulate, level,
                                                                               expected):
    simulate(level)
    cfg = _config(tmp_path, "--preset", "quickstart")
    err = capsys.readouterr().err.strip()
    assert (cfg.precision, err.removeprefix("fastfvae: ") or None) == expected
    assert (cfg.preset, cfg.gamma, cfg.fast) == ("quickstart", 50.0, True)  # the rest of the preset stays


def test_an_explicit_bf16_is_refused_where_it_cannot_run_and_kept_with_a_notice_where_emulated(
        tmp_path, capsys, simulate):
    simulate(precision.BF16_UNSUPPORTED)
    for argv in (["--precision", "bf16"], ["--preset", "quickstart", "--precision", "bf16"]):
        with pytest.raises(FastFVAEError, match="^--precision bf16 cannot run on this machine.*--precision fp32$"):
            _config(tmp_path, *argv)
    assert _config(tmp_path, "--preset", "quickstart", "--precision", "fp32").precision == "fp32"
    simulate(precision.BF16_EMULATED)
    assert _config(tmp_path, "--precision", "bf16").precision == "bf16"
    assert "runs emulated here (simulated emulated): expect it slower" in capsys.readouterr().err


def test_the_cli_refuses_bf16_before_anything_is_written(tmp_path, capsys, simulate):
    simulate(precision.BF16_UNSUPPORTED)
    out = tmp_path / "run"
    assert main(["train", "--precision", "bf16", "--steps", "2", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastfvae: error: --precision bf16 cannot run on this machine")
    assert not out.exists()


def test_a_resumed_bf16_run_is_refused_where_it_cannot_run_and_resumes_in_fp32_when_asked(tmp_path, capsys,
                                                                                          simulate, monkeypatch):
    import fastfvae.train.loop as loop
    from fastfvae.train.loop import run_training

    monkeypatch.setattr(loop, "load_training_data", lambda path, *_: small_dsprites(256))
    out = tmp_path / "run"
    run_training(TrainConfig(steps=2, batch_size=8, d_hidden=32, d_layers=2, out=str(out), fast=True),
                 data=small_dsprites(256), progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["precision"] = "bf16"  # as if trained in bf16 on another machine
    (out / "config.json").write_text(json.dumps(saved))
    import fastfvae.train.checkpoint as checkpoint

    payload = checkpoint.load_checkpoint(out)
    payload["config"]["precision"] = "bf16"
    torch.save(payload, checkpoint.checkpoint_path(out))
    before = checkpoint.checkpoint_path(out).read_bytes()

    simulate(precision.BF16_UNSUPPORTED)
    assert main(["train", "--resume", str(out), "--steps", "4", *TINY]) == 2
    err = capsys.readouterr().err
    assert "bf16 from the resumed run's config" in err and "use --precision fp32" in err
    assert checkpoint.checkpoint_path(out).read_bytes() == before
    assert main(["train", "--resume", str(out), "--steps", "4", "--precision", "fp32", *TINY]) == 0
    assert checkpoint.load_checkpoint(out)["state"]["step"] == 4


def test_the_fast_step_refuses_bf16_where_it_cannot_run(simulate):
    """The library path (`run_training` with a bf16 config): one line, not oneDNN's RuntimeError at the
    first step."""
    from fastfvae.fast.step import FastOptions

    simulate(precision.BF16_UNSUPPORTED)
    with pytest.raises(FastFVAEError, match="^precision bf16 cannot run on this machine"):
        FastOptions(precision="bf16").resolved(torch.device("cpu"))
    assert FastOptions(precision="fp32").resolved(torch.device("cpu")).precision == "fp32"


def test_eval_refuses_bf16_encoding_where_it_cannot_run(tmp_path, capsys, simulate):
    from fastfvae.train.loop import run_training

    out = tmp_path / "run"
    run_training(TrainConfig(steps=1, batch_size=8, d_hidden=32, d_layers=2, out=str(out)), data=small_dsprites(256),
                 progress=False)
    simulate(precision.BF16_UNSUPPORTED)
    assert main(["eval", str(out), "--precision", "bf16", "--metrics", "mig"]) == 2
    assert "--precision bf16 cannot run on this machine" in capsys.readouterr().err


def test_a_bf16_sweep_is_refused_before_anything_is_written(tmp_path, capsys, simulate):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[block]]\nmodel = "betavae"\nsteps = 2\nbatch_size = 8\nprecision = "bf16"\nseeds = [0, 1]\n')
    simulate(precision.BF16_UNSUPPORTED)
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 2
    assert ("the sweep's precision bf16 cannot run on this machine: simulated unsupported; "
            'set precision = "fp32" in its blocks') in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
