"""The training loop: loss goes down, bit-exact resume (also after Ctrl-C), NaN guard, checkpoints."""

import json
import os
import signal

import pytest
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.train.checkpoint import load_checkpoint, load_models, save_checkpoint
from fastfvae.train.config import TrainConfig
from fastfvae.train.loop import TrainingDiverged, run_training
from fastfvae.train.progress import read_log
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

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
    base = TrainConfig(model=model, steps=6, d_steps=2, **SMALL)
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
