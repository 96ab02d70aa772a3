"""A pack of K runs trained as one step equals the K single runs.

The stacked mechanism (the GPU's: one vectorised step): model k of a pack against the single
reference run with the same seed and hyperparameters (fp32), for every method and K = 1, 3, 8:
losses at every step and parameters at the end, with the fast path's parity tolerances
(tests/test_fast_step.py's `assert_parity`). The threaded mechanism (the CPU's: each run's own
single step on worker threads): the same comparison, and, for fast runs in fp32 and bf16, model
k bit for bit equal to its single fast run (same kernels, same intra-op thread count). The
pack's float hyperparameters differ between its models, so a test also fails if they were mixed up.
"""

from __future__ import annotations

import threading

import pytest
from cpu_bf16 import bf16_param
import torch

from fastfvae import methods
from fastfvae.fast import make_fast_step
from fastfvae.study.pack import StackedPackStep, ThreadedPackStep, check_pack, make_pack_step, stacked_method
from fastfvae.train.reference import StepShapes, draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState
from test_fast_step import assert_parity, params_of, small_cfg
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

STEPS = 12
#: Per-model hyperparameters (model k takes entry k % 4): values that differ, so a mix-up shows.
HPARAMS = {
    "vae": [{}] * 4,
    "betavae": [dict(beta=b) for b in (1.0, 4.0, 8.0, 2.0)],
    "annealedvae": [dict(c_max=c, iteration_threshold=8, gamma=10.0) for c in (5.0, 10.0, 1.0, 2.0)],
    "factorvae": [dict(gamma=g, d_steps=2) for g in (10.0, 35.0, 50.0, 20.0)],
    "dipvae": [dict(lambda_od=v, lambda_d_factor=1.0, dip_type="ii") for v in (1.0, 2.0, 0.5, 1.5)],
    "betatcvae": [dict(beta=b) for b in (2.0, 6.0, 4.0, 1.0)],
}


def _configs(name: str, k: int):
    return [small_cfg(model=name, seed=s, **HPARAMS[name][s % 4]) for s in range(k)]


def _single(cfg, data, steps):
    """The single run of ``cfg``: the reference step, or the fast step for a fast config."""
    state = TrainState.create(cfg, len(data))
    step = make_fast_step(state, data) if cfg.fast else make_reference_step(state, data)
    shapes = StepShapes.of(cfg, data=data)
    metrics = []
    for _ in range(steps):
        metrics.append(step(draw_step_inputs(shapes, state.sampler, state.generator)))
        state.step += 1
    getattr(step, "sync_state", lambda: None)()  # the fast step's own state (bf16: D's flat weights)
    return state, metrics


def _pack(cfgs, data, steps, mechanism="stacked"):
    """``mechanism``: stacked, or threads on two workers (the tests run one intra-op thread)."""
    states = [TrainState.create(cfg, len(data)) for cfg in cfgs]
    pack = make_pack_step(states, data, mechanism, workers=2 if mechanism == "threads" else None)
    shapes = [StepShapes.of(cfg, data=data) for cfg in cfgs]
    metrics = []
    for _ in range(steps):
        metrics.append(pack([draw_step_inputs(s, st.sampler, st.generator) for s, st in zip(shapes, states)]))
        for state in states:
            state.step += 1
    pack.sync_state()
    pack.close()
    return states, metrics


@pytest.mark.parametrize("mechanism", ["stacked", "threads"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("name", methods.BUILTIN)
def test_model_k_of_a_pack_equals_its_single_run(name, k, mechanism, monkeypatch):
    """beta-TC-VAE: its minibatch TC (a difference of two large logsumexps) leaves more of the
    encoder's gradient elements at round-off level than the other methods' losses (measured: the
    gradients agree to 6e-7 of their largest element, yet ~1 % of the FC weights' Adam steps
    take their direction from round-off in 12 steps), so its parameters are held to 2 % of a
    tensor past 2e-5 and none past three steps of lr; its losses to the same 1e-4 as all."""
    import test_fast_step

    if name == "betatcvae":
        monkeypatch.setattr(test_fast_step, "ROUND_OFF_SHARE", 2e-2)
        monkeypatch.setattr(test_fast_step, "ROUND_OFF_STEP", 3e-4)
    if k == 8 and name not in ("factorvae", "betavae"):
        pytest.skip("K = 8 for one method with and one without an adversary keeps the default run short")
    if mechanism == "threads" and k != 3:
        pytest.skip("the threaded mechanism at K = 3 (two workers, one with two models)")
    data = small_dsprites(512)
    cfgs = _configs(name, k)
    states, pack_metrics = _pack(cfgs, data, STEPS, mechanism)
    for i, cfg in enumerate(cfgs):
        single_state, single_metrics = _single(cfg, data, STEPS)
        model_metrics = [{key: value[i] for key, value in m.items()} for m in pack_metrics]
        assert_parity(single_state, states[i], single_metrics, model_metrics, "fp32")


def _bit_equal(single_state, pack_state, single_metrics, model_metrics):
    for step, (a, b) in enumerate(zip(single_metrics, model_metrics)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"step {step + 1} {key}: {a[key]} != {b[key]}"
    ours, theirs = params_of(pack_state), params_of(single_state)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for part in ("vae", "disc"):
        a, b = getattr(single_state.optims, part), getattr(pack_state.optims, part)
        if a is None:
            continue
        for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values()):
            assert all(torch.equal(sa[m], sb[m]) for m in ("exp_avg", "exp_avg_sq")), part


@pytest.mark.parametrize("precision", ["fp32", bf16_param("bf16", id="bf16")])
@pytest.mark.parametrize("name", ["factorvae", "betavae"])
def test_threaded_pack_runs_each_model_as_its_single_fast_run(name, precision):
    """Fast runs (by-hand convolutions and D; bf16: space-to-depth layers and D's flat Adam) in a
    threaded pack of 3 on 2 workers: model k's losses at every step, its parameters and its
    optimiser state are its single fast run's, bit for bit."""
    data = small_dsprites(512)
    cfgs = [cfg.replace(fast=True, precision=precision) for cfg in _configs(name, 3)]
    states, pack_metrics = _pack(cfgs, data, STEPS, "threads")
    for i, cfg in enumerate(cfgs):
        single_state, single_metrics = _single(cfg, data, STEPS)
        _bit_equal(single_state, states[i], single_metrics, [{k: v[i] for k, v in m.items()} for m in pack_metrics])


def test_make_pack_step_picks_and_checks_the_mechanism():
    from fastfvae.errors import FastFVAEError

    data = small_dsprites(256)
    states = [TrainState.create(cfg, len(data)) for cfg in _configs("betavae", 2)]
    step = make_pack_step(states, data)  # CPU: threads; one intra-op thread here, so one worker
    assert isinstance(step, ThreadedPackStep) and step.workers == 1 and step.threads_per_model == 1
    torch.set_num_threads(2)
    try:
        two = make_pack_step(states, data, "threads", workers=4)  # at most one worker per model
        assert two.workers == 2 and two.threads_per_model == 1
        two([draw_step_inputs(StepShapes.of(s.cfg, data=data), s.sampler, s.generator) for s in states])
        two.close()
        seen = []  # a thread started after the pack gets the process's count, not a worker's
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start(), worker.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(1)
    from fastfvae.study.pack import pack_mechanism

    with pytest.raises(FastFVAEError, match="the threaded pack is the CPU's"):
        pack_mechanism(torch.device("cuda"), "threads")
    assert isinstance(make_pack_step(states, data, "stacked"), StackedPackStep)
    with pytest.raises(FastFVAEError, match="mechanism must be one of graph, stacked, threads, got 'vmap'"):
        make_pack_step(states, data, "vmap")
    with pytest.raises(FastFVAEError, match="workers >= 1"):
        make_pack_step(states, data, "threads", workers=0)
    with pytest.raises(FastFVAEError, match="not of the stacked one"):
        make_pack_step(states, data, "stacked", workers=2)
    with pytest.raises(FastFVAEError, match="takes 2 step inputs, got 1"):
        step([draw_step_inputs(StepShapes.of(states[0].cfg, data=data), states[0].sampler, states[0].generator)])


@pytest.mark.parametrize("mechanism", ["stacked", "threads"])
def test_a_pack_is_not_its_runs_in_another_order(mechanism):
    """Not vacuous: model 0 of a pack is not run 1's single run."""
    data = small_dsprites(512)
    cfgs = _configs("factorvae", 2)
    states, metrics = _pack(cfgs, data, 3, mechanism)
    other, other_metrics = _single(cfgs[1], data, 3)
    with pytest.raises(AssertionError):
        assert_parity(other, states[0], other_metrics, [{k: v[0] for k, v in m.items()} for m in metrics], "fp32")


def test_stacked_hyperparameters_and_what_a_pack_refuses():
    from fastfvae.errors import FastFVAEError

    cfgs = [cfg.replace(out=f"runs/r{i}") for i, cfg in enumerate(_configs("factorvae", 3))]
    method = stacked_method(cfgs, "cpu")
    assert torch.equal(method.hparams.gamma, torch.tensor([10.0, 35.0, 50.0]))
    assert method.hparams.d_steps == 2 and method.hparams.d_lr == 1e-4  # shared: plain values
    with pytest.raises(FastFVAEError, match="differ only in seed and gamma"):
        check_pack([cfgs[0], cfgs[1].replace(d_lr=3e-4)])  # an optimiser setting: one Adam per pack
    with pytest.raises(FastFVAEError, match="differ only in seed"):
        check_pack([cfgs[0], cfgs[1].replace(z_dim=3)])
    with pytest.raises(FastFVAEError, match="share a run folder"):
        check_pack([cfgs[0], cfgs[1].replace(out=cfgs[0].out)])


def _run_configs(tmp_path, steps=6):
    from train_data import small_config

    return [small_config(model="factorvae", batch_size=8, d_hidden=32, d_layers=2, z_dim=3, log_every=2,
                         ckpt_every=0, steps=steps, seed=s, gamma=g, out=str(tmp_path / f"r{s}"))
            for s, g in ((0, 10.0), (1, 40.0), (2, 20.0))]


def test_train_pack_writes_single_run_folders_and_resumes_bit_exactly(tmp_path):
    """Each run of a pack gets a single run's folder; a pack stopped by Ctrl-C resumes to the
    same checkpoints as an uninterrupted one; a finished pack is skipped; a pack run resumes
    on its own with the single-run loop."""
    import os
    import signal

    from fastfvae.study.pack import train_pack
    from fastfvae.train.checkpoint import load_checkpoint
    from fastfvae.train.loop import run_training
    from fastfvae.train.progress import read_log

    data = small_dsprites(256)
    straight = _run_configs(tmp_path / "a")
    results = train_pack(straight, data=data, progress=False)
    assert [r.status for r in results] == ["completed"] * 3
    for cfg in straight:
        out = tmp_path / "a" / os.path.basename(cfg.out)
        assert {"config.json", "checkpoint.pt", "train_log.jsonl"} <= set(os.listdir(out))
        assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [2, 4, 6]

    def ctrl_c_at_3(state, metrics):
        if state.step == 3 and state.cfg.seed == 0:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = _run_configs(tmp_path / "b")
    first = train_pack(stopped, data=data, progress=False, callbacks_for=lambda cfg, data: [ctrl_c_at_3])
    assert {r.status for r in first} == {"interrupted"} and {r.state.step for r in first} == {3}
    again = train_pack(stopped, data=data, progress=False)
    assert {r.status for r in again} == {"completed"}
    for a, b in zip(straight, stopped):
        sa, sb = load_checkpoint(a.out)["state"], load_checkpoint(b.out)["state"]
        for part in ("vae", "disc"):
            assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), (a.out, part)
        assert all(torch.equal(x["exp_avg"], y["exp_avg"])
                   for x, y in zip(sa["vae_opt"]["state"].values(), sb["vae_opt"]["state"].values()))
        assert [r["step"] for r in read_log(f"{b.out}/train_log.jsonl")] == [2, 3, 4, 6]  # 3: the stop
    mtimes = [os.stat(checkpoint_file(c)).st_mtime_ns for c in stopped]
    assert train_pack(stopped, data=data, progress=False) == [None, None, None]
    assert mtimes == [os.stat(checkpoint_file(c)).st_mtime_ns for c in stopped]
    longer = stopped[1].replace(steps=8)
    resumed = run_training(longer, data=data, progress=False, resume=longer.out)
    assert resumed.status == "completed" and resumed.state.step == 8


def checkpoint_file(cfg):
    from fastfvae.train.checkpoint import checkpoint_path

    return checkpoint_path(cfg.out)


@pytest.mark.parametrize("when", ["set-up", "first step"])
def test_a_pack_stopped_before_its_first_step_leaves_nothing(tmp_path, monkeypatch, when):
    """Ctrl-C while a fresh pack sets up (or after, before its first step) is a stop before
    training, as for a single run: no step-0 checkpoints; during set-up the run folders it made
    are removed again."""
    import os
    import signal

    import fastfvae.study.pack as pack_module
    from fastfvae.study.pack import train_pack
    from fastfvae.train.loop import StoppedBeforeTraining

    data = small_dsprites(256)
    cfgs = _run_configs(tmp_path)

    def ctrl_c_in_set_up(cfg, data):  # called during set-up, once per run
        if cfg.seed == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return []

    class CtrlCAsTheLoopStarts(pack_module.TrainProgress):
        def __enter__(self):
            os.kill(os.getpid(), signal.SIGINT)
            return super().__enter__()

    if when == "first step":
        monkeypatch.setattr(pack_module, "TrainProgress", CtrlCAsTheLoopStarts)
    with pytest.raises(StoppedBeforeTraining, match="before the first step; no checkpoint was written"):
        train_pack(cfgs, data=data, progress=False, callbacks_for=ctrl_c_in_set_up if when == "set-up" else None)
    for cfg in cfgs:
        assert not os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))
        if when == "set-up":
            assert not os.path.exists(cfg.out)


def test_a_stacked_pack_refuses_an_optimiser_it_would_replace_by_adam():
    from fastfvae.errors import FastFVAEError

    data = small_dsprites(256)
    cfgs = [cfg.replace(out=f"runs/r{i}") for i, cfg in enumerate(_configs("factorvae", 2))]
    states = [TrainState.create(cfg, len(data)) for cfg in cfgs]
    states[1].optims = states[1].optims._replace(disc=torch.optim.SGD(states[1].models.disc.parameters(), lr=1e-2))
    with pytest.raises(FastFVAEError, match="plain torch Adam only, and these runs use SGD"):
        StackedPackStep(states, data)


@pytest.mark.parametrize("make", [ThreadedPackStep, StackedPackStep])
def test_a_pack_stops_when_d_loss_becomes_nan_as_a_single_run_does(tmp_path, monkeypatch, make):
    """Every step's check covers the metrics a single run's covers (`CHECKED_METRICS`: the loss
    and D's loss), naming the run; another metric's NaN/inf does not stop it."""
    from fastfvae.study import pack as pack_module
    from fastfvae.study.pack import train_pack
    from fastfvae.train.loop import TrainingDiverged

    def poisoned_step(name, step_index):
        def build(states, data, *a, cuda_rng_states=None, **kw):
            step = make(states, data)
            real_call = step.__call__

            def call(inputs):
                metrics = dict(real_call(inputs))
                if states[0].step == step_index:
                    metrics[name] = metrics[name].clone()
                    metrics[name][1] = float("nan")
                return metrics

            step.__call__ = call
            return _Calling(step)
        return build

    monkeypatch.setattr(pack_module, "make_pack_step", poisoned_step("d_loss", 2))
    cfgs = _run_configs(tmp_path / "d_loss")
    with pytest.raises(TrainingDiverged, match="at step 3 in") as info:
        train_pack(cfgs, data=small_dsprites(256), progress=False, evaluate=False)
    assert info.value.outs == (cfgs[1].out,)
    monkeypatch.setattr(pack_module, "make_pack_step", poisoned_step("d_acc", 2))
    results = train_pack(_run_configs(tmp_path / "d_acc"), data=small_dsprites(256), progress=False, evaluate=False)
    assert [r.status for r in results] == ["completed"] * 3


class _Calling:
    """A step whose instance ``__call__`` is the one called (Python looks ``__call__`` up on the
    type); every other attribute is the wrapped step's."""

    def __init__(self, step) -> None:
        self._step = step

    def __call__(self, inputs):
        return self._step.__call__(inputs)

    def __getattr__(self, name):
        return getattr(self._step, name)
