"""The training loop: loss goes down, bit-exact resume (also after Ctrl-C), NaN guard, checkpoints."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import load_checkpoint, load_models, save_checkpoint
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import TrainingDiverged, run_training
from fastfvae.train.progress import read_log
from train_data import one_thread, small_config, small_dsprites  # noqa: F401 (autouse fixture)

SMALL = dict(batch_size=16, d_hidden=64, d_layers=2, log_every=2, ckpt_every=0)


def _params(result):
    return [t for m in result.state.models if m is not None for t in m.state_dict().values()]


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_30_steps_lower_the_loss(tmp_path):
    cfg = TrainConfig(steps=30, out=str(tmp_path / "run"), **{**SMALL, "log_every": 5, "batch_size": 32})
    result = run_training(cfg, data=small_dsprites(), progress=False)
    log = read_log(tmp_path / "run" / "train_log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 50, (log[0]["loss"], log[-1]["loss"])
    assert log[-1]["recon"] < log[0]["recon"]
    assert set(log[0]) >= {"step", "loss", "recon", "kl", "tc", "d_acc", "steps_per_s", "elapsed_s"}
    assert result.status == "completed" and result.state.step == 30
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == cfg
    payload = load_checkpoint(tmp_path / "run")
    assert payload["state"]["step"] == 30 and TrainConfig.from_dict(payload["config"]) == cfg
    assert set(payload["rng"]) == {"torch_cpu", "torch_cuda", "numpy", "python"}


@pytest.mark.parametrize("model", ["factorvae", "betavae"])
def test_resume_after_ctrl_c_is_bit_exact(tmp_path, model):
    data = small_dsprites()
    base = small_config(model=model, steps=6, d_steps=2, **SMALL)
    straight = run_training(base.replace(out=str(tmp_path / "a")), data=data, progress=False)

    def ctrl_c_at_3(state, metrics):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out_b = str(tmp_path / "b")
    first = run_training(base.replace(out=out_b), data=data, progress=False, callbacks=[ctrl_c_at_3])
    assert first.status == "interrupted" and first.state.step == 3
    assert load_checkpoint(out_b)["state"]["step"] == 3
    resumed = run_training(base.replace(out=out_b), data=data, progress=False, resume=out_b)
    assert resumed.status == "completed" and resumed.state.step == 6
    assert _equal(_params(straight), _params(resumed))
    assert _equal(list(straight.state.optims.vae.state_dict()["state"][0].values()),
                  list(resumed.state.optims.vae.state_dict()["state"][0].values()))
    assert [r["step"] for r in read_log(tmp_path / "b" / "train_log.jsonl")] == [2, 3, 4, 6]


def test_keyboard_interrupt_between_steps_saves(tmp_path):
    def interrupt(state, metrics):
        if state.step == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(steps=5, out=str(tmp_path / "r"), **SMALL)
    result = run_training(cfg, data=small_dsprites(), progress=False, callbacks=[interrupt])
    assert result.status == "interrupted"
    assert load_checkpoint(tmp_path / "r")["state"]["step"] == 2


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "r"
    cfg = TrainConfig(steps=8, out=str(out), debug_nan_at_step=5, **{**SMALL, "ckpt_every": 3})
    with pytest.raises(TrainingDiverged, match="step 5.*last good checkpoint"):
        run_training(cfg, data=small_dsprites(), progress=False)
    payload = load_checkpoint(out)
    assert payload["state"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in payload["state"]["vae"].values())
    vae, disc, saved_cfg = load_models(out)
    assert not vae.training and disc is not None and saved_cfg.steps == 8


def test_checkpoint_write_is_atomic(tmp_path):
    path = save_checkpoint(tmp_path, {"config": {}, "state": {"step": 1}})
    good = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, {"config": {}, "state": {"step": 2}, "junk": Unpicklable()})
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_load_checkpoint_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(FastFVAEError, match="cannot read checkpoint"):
        load_checkpoint(bogus)
    torch.save({"some": "dict"}, bogus)
    with pytest.raises(FastFVAEError, match="not a fastfvae checkpoint"):
        load_checkpoint(bogus)
    with pytest.raises(FastFVAEError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def _recording(builder, seen, *, own_noise=False, stacked=False, defers_sync=False):
    """A reference step that records its inputs; ``own_noise``: it declares ``draws_own_noise``
    and draws eps/keys from the global CPU generator (which checkpoints save, as they save the
    CUDA generator a graphed step draws from); ``stacked``: it returns `StackedMetrics`."""
    from fastfvae.train.progress import StackedMetrics

    def build(state, data):
        inner = builder(state, data)
        cfg, method = state.cfg, state.cfg.method()
        second, b, z = method.second_batch, cfg.batch_size, cfg.z_dim

        def step(inputs):
            seen.append(inputs)
            if own_noise:
                inputs = inputs._replace(eps=torch.randn(b, z), eps2=torch.randn(b, z) if second else None,
                                         keys=torch.rand(method.adversary_noise_shape(b, z)) if method.adversarial
                                         else None)
            metrics = inner(inputs)
            return StackedMetrics(torch.stack(list(metrics.values())), metrics) if stacked else metrics

        step.draws_own_noise, step.defers_sync = own_noise, defers_sync
        return step

    return build


def test_a_step_drawing_its_own_noise_gets_the_same_rows_and_no_host_noise(tmp_path):
    from fastfvae.train.reference import make_reference_step
    from fastfvae.train.state import TrainState

    data, cfg = small_dsprites(), TrainConfig(steps=4, d_steps=2, **SMALL)
    host, own = [], []
    run_training(cfg.replace(out=str(tmp_path / "host")), data=data, progress=False,
                 step_builder=_recording(make_reference_step, host))
    result = run_training(cfg.replace(out=str(tmp_path / "own")), data=data, progress=False,
                          step_builder=_recording(make_reference_step, own, own_noise=True))
    assert all(i.eps is None and i.eps2 is None and i.keys is None for i in own)
    assert all(h.eps is not None and h.eps2 is not None and h.keys is not None for h in host)
    for h, o in zip(host, own, strict=True):  # the sampler's order: the same batches
        assert np.array_equal(h.rows, o.rows) and np.array_equal(h.rows2, o.rows2)
    fresh = TrainState.create(cfg, len(data)).generator.get_state()
    assert torch.equal(result.state.generator.get_state(), fresh)  # the host generator never drew


def test_a_step_drawing_its_own_noise_resumes_bit_exact(tmp_path):
    from fastfvae.train.reference import make_reference_step

    data, base = small_dsprites(), TrainConfig(steps=6, d_steps=2, **SMALL)
    straight_seen, resumed_seen = [], []
    straight = run_training(base.replace(out=str(tmp_path / "a")), data=data, progress=False,
                            step_builder=_recording(make_reference_step, straight_seen, own_noise=True))

    def ctrl_c_at_3(state, metrics):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out_b = str(tmp_path / "b")
    first = run_training(base.replace(out=out_b), data=data, progress=False, callbacks=[ctrl_c_at_3],
                         step_builder=_recording(make_reference_step, [], own_noise=True))
    assert first.state.step == 3
    resumed = run_training(base.replace(out=out_b), data=data, progress=False, resume=out_b,
                           step_builder=_recording(make_reference_step, resumed_seen, own_noise=True))
    assert _equal(_params(straight), _params(resumed))
    for s, r in zip(straight_seen[3:], resumed_seen, strict=True):
        assert np.array_equal(s.rows, r.rows) and np.array_equal(s.rows2, r.rows2)


def _without_timing(path):
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "elapsed_s")} for r in read_log(path)]


@pytest.mark.parametrize("model", ["factorvae", "betavae"])
def test_stacked_metrics_log_the_same_lines(tmp_path, model):
    from fastfvae.train.reference import make_reference_step

    data, cfg = small_dsprites(), small_config(model=model, steps=5, **{**SMALL, "log_every": 2})
    for name, stacked in (("plain", False), ("stacked", True)):
        run_training(cfg.replace(out=str(tmp_path / name)), data=data, progress=False,
                     step_builder=_recording(make_reference_step, [], stacked=stacked))
    plain, stacked = (_without_timing(tmp_path / n / "train_log.jsonl") for n in ("plain", "stacked"))
    assert [r["step"] for r in plain] == [2, 4, 5] and plain == stacked


def test_deferred_stacked_metrics_still_stop_on_nan(tmp_path):
    """The loop's NaN injection replaces an entry of the step's StackedMetrics: the deferred
    check (over the meter's sums) must see it at the next log step."""
    from fastfvae.train.reference import make_reference_step

    cfg = TrainConfig(steps=8, out=str(tmp_path / "nan"), debug_nan_at_step=2, **{**SMALL, "log_every": 4})
    with pytest.raises(TrainingDiverged, match="at step 4"):
        run_training(cfg, data=small_dsprites(), progress=False,
                     step_builder=_recording(make_reference_step, [], stacked=True, defers_sync=True))


def test_a_deferred_nan_stops_before_an_evaluation_step_sees_the_weights(tmp_path):
    """With deferred syncs the check also runs at evaluation steps: the evaluation callbacks of
    step 4 (eval_every 4, log_every 8) never see weights that went NaN at step 3."""
    from fastfvae.train.reference import make_reference_step

    seen = []
    cfg = TrainConfig(steps=8, out=str(tmp_path / "nan"), debug_nan_at_step=3, eval_every=4,
                      **{**SMALL, "log_every": 8})
    with pytest.raises(TrainingDiverged, match="at step 4"):
        run_training(cfg, data=small_dsprites(), progress=False, callbacks=[lambda state, m: seen.append(state.step)],
                     step_builder=_recording(make_reference_step, [], stacked=True, defers_sync=True))
    assert seen == [1, 2, 3]


def test_the_api_runs_cfg_fast_on_the_fast_step_without_a_step_builder(tmp_path, monkeypatch):
    import fastfvae.fast

    built = []

    def recording_fast_step(state, data):
        built.append(1)
        return fastfvae.fast.step.make_fast_step(state, data)

    monkeypatch.setattr(fastfvae.fast, "make_fast_step", recording_fast_step)
    cfg = TrainConfig(steps=2, out=str(tmp_path / "run"), fast=True, **SMALL)
    result = run_training(cfg, data=small_dsprites(256), progress=False)
    assert result.status == "completed" and result.state.step == 2 and built == [1]


def test_progress_on_a_console_that_is_not_a_terminal_is_plain_lines_every_30_s(monkeypatch):
    """A log file or a batch job's output gets a line at most every LINE_EVERY_S seconds and one for
    the step it ends at (with the last numbers), with no control codes; a terminal gets the live bar."""
    import io

    from rich.console import Console

    import fastfvae.train.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])

    def run(terminal: bool) -> str:
        out = io.StringIO()
        clock[0] = 0.0
        with progress.TrainProgress(100, 0, True, Console(file=out, force_terminal=terminal, width=200)) as bar:
            bar.update(10, {"recon": 101.25, "kl": 2.5, "tc": None, "d_acc": None}, 5.0)  # 0 s: too soon
            for t, step in ((31.0, 20), (40.0, 30), (41.0, 100)):
                clock[0] = t
                bar.update(step)
            bar.update(100, {"recon": 99.0, "kl": 3.0, "tc": 0.125, "d_acc": 0.5}, 6.0)  # the last log line
        return out.getvalue()

    assert run(terminal=False).splitlines() == [
        "step 20/100 (20%), 5.0 it/s, ETA 0m16s  recon 101.2 KL 2.50 TC - Dacc -",
        "step 100/100 (100%), 6.0 it/s  recon 99.0 KL 3.00 TC 0.125 Dacc 0.50",  # once, at the end
    ]
    live = run(terminal=True)
    assert "\x1b[" in live and "step 20/100" not in live
