"""The graphed stacked pack (`GraphedPackStep`: a pack's whole iteration as one CUDA graph).

On CPU the step binds its static inputs and per-run generators as on CUDA, runs its warm-up and
undoes it, then runs the iteration eagerly: what is device-independent is tested here (the
static inputs' layout, warm-up then restore leaving no trace, each run's noise generator seeded
and drawn as its single graphed run's default generator, each run's checkpoint carrying its own
generator state, bit-exact resume, the mechanism choice). The CUDA cases (bench/gpu_check.sh
runs them) are parity tests: model k of a graphed pack against the single graphed run with its
seed (fp32, TF32 off, the GPU's fp32 tolerances), for K = 1, 3, FactorVAE and beta-VAE, and
resume bit for bit; each failure names the stage it failed in (capture, replay, parity, resume).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.study import pack as pack_module
from fastfvae.study.pack import (
    GraphedPackStep, PackMetrics, StackedPackStep, graph_applies, make_pack_step, pack_mechanism,
    pack_noise_generator,
)
from fastfvae.train.reference import StepShapes, draw_step_inputs
from fastfvae.train.state import TrainState, noise_seed
from test_fast_step import assert_parity, params_of
from test_study_pack import _configs
from train_data import one_thread, small_dsprites  # noqa: F401 (autouse fixture)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")


def _steps(step, states, data, n, noise=True):
    shapes = [StepShapes.of(s.cfg, data=data) for s in states]
    metrics = []
    for _ in range(n):
        metrics.append(step([draw_step_inputs(sh, st.sampler, st.generator, noise=noise)
                             for sh, st in zip(shapes, states)]))
        for st in states:
            st.step += 1
    step.sync_state()
    return metrics


def _adam_states(states):
    out = []
    for s in states:
        for opt in (s.optims.vae, s.optims.disc):
            if opt is not None:
                for entry in opt.state_dict()["state"].values():
                    out += [entry["step"], entry["exp_avg"], entry["exp_avg_sq"]]
    return out


def test_static_inputs_hold_every_runs_rows_in_one_int64_copy():
    data = small_dsprites(256)
    cfgs = _configs("factorvae", 3)  # FactorVAE's permuted codes come from a second batch
    states = [TrainState.create(c, len(data)) for c in cfgs]
    step = GraphedPackStep(states, data, warmup=0)
    k, b, z = 3, cfgs[0].batch_size, cfgs[0].z_dim
    assert step.draws_own_noise and step.defers_sync and step.mechanism == "graph"
    assert step.rows.shape == (k, b) and step.rows2.shape == (k, b) and step.step_count.shape == ()
    flat = step.row_inputs.flat.untyped_storage().data_ptr()  # one buffer: one host-to-device copy a step
    assert all(v.dtype == torch.int64 and v.untyped_storage().data_ptr() == flat
               for v in (step.rows, step.rows2, step.step_count))
    assert step.eps.shape == (k, b, z) and step.eps2.shape == (k, b, z) and step.keys.shape[0] == k
    states[0].step = states[1].step = states[2].step = 5
    shapes = [StepShapes.of(c, data=data) for c in cfgs]
    inputs = [draw_step_inputs(sh, st.sampler, st.generator, noise=False) for sh, st in zip(shapes, states)]
    metrics = step(inputs)
    for i, one in enumerate(inputs):
        assert step.rows[i].tolist() == one.rows.tolist() and step.rows2[i].tolist() == one.rows2.tolist()
    assert int(step.step_count) == 5
    assert isinstance(metrics, PackMetrics) and metrics.matrix.shape == (len(step.metric_keys), k)
    assert list(metrics) == ["loss", "recon", "kl", "tc", "d_loss", "d_acc"]


@pytest.mark.parametrize("name", ["factorvae", "betavae"])
def test_with_host_noise_it_is_the_stacked_pack(name):
    """Same host noise copied into the static inputs: the eager iteration on CPU is the stacked
    pack's, bit for bit (losses every step, weights and Adam state at the end)."""
    data = small_dsprites(512)
    cfgs = _configs(name, 3)
    runs = []
    for make in (lambda st: StackedPackStep(st, data), lambda st: GraphedPackStep(st, data, noise="host")):
        states = [TrainState.create(c, len(data)) for c in cfgs]
        runs.append((states, _steps(make(states), states, data, 4)))
    (a, ma), (b, mb) = runs
    for x, y in zip(ma, mb):
        assert all(torch.equal(x[key], y[key]) for key in x)
    for sa, sb in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(params_of(sa).values(), params_of(sb).values()))
    assert all(torch.equal(p, q) for p, q in zip(_adam_states(a), _adam_states(b)))


@pytest.mark.parametrize("prior_steps", [0, 2])
def test_warmup_then_restore_is_invisible(prior_steps):
    """Weights, Adam state and each run's generator after the warm-up are as before it, in the
    same tensors (the captured addresses), and training then goes on as if it never ran."""
    data = small_dsprites(256)
    cfgs = _configs("factorvae", 2)
    runs = []
    for warmup in (0, 3):
        states = [TrainState.create(c, len(data)) for c in cfgs]
        step = GraphedPackStep(states, data, warmup=0)
        _steps(step, states, data, prior_steps, noise=False)
        if warmup:
            optims = [step.vae_opt, step.disc_opt]
            params = step.vae_params + step.disc_params
            ids = [id(p) for p in params]
            before = [g.get_state() for g in step.generators]
            from fastfvae.fast.graph import warm_up_and_capture

            assert warm_up_and_capture(step._run, params, optims, "cpu", warmup, step.generators) == (None, None)
            assert [id(p) for p in step.vae_params + step.disc_params] == ids
            assert all(torch.equal(g.get_state(), s) for g, s in zip(step.generators, before))
        metrics = _steps(step, states, data, 3, noise=False)
        runs.append((states, metrics, [g.get_state() for g in step.generators]))
    (a, ma, ga), (b, mb, gb) = runs
    for x, y in zip(ma, mb):
        assert all(torch.equal(x[key], y[key]) for key in x)
    for sa, sb in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(params_of(sa).values(), params_of(sb).values()))
    assert all(torch.equal(p, q) for p, q in zip(_adam_states(a), _adam_states(b)))
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_each_run_draws_its_single_graphed_runs_noise():
    """Run k's generator is seeded as its single graphed run seeds the device's default generator
    (``noise_seed(seed)``), and the pack's draw into row k is the single step's own draw
    (`GraphedStep._draw_noise`, here with the CPU's default generator so seeded)."""
    from fastfvae.fast import FastOptions, FastStep
    from fastfvae.fast.graph import GraphedStep

    data = small_dsprites(256)
    cfgs = _configs("factorvae", 3)
    states = [TrainState.create(c, len(data)) for c in cfgs]
    step = GraphedPackStep(states, data, warmup=0)
    step._draw_noise()
    for i, cfg in enumerate(cfgs):
        single = GraphedStep.__new__(GraphedStep)
        single._bind(FastStep(TrainState.create(cfg, len(data)), data, FastOptions()), "device")
        torch.manual_seed(noise_seed(cfg.seed))
        single._draw_noise()
        for mine, theirs in ((step.eps, single.eps), (step.eps2, single.eps2), (step.keys, single.keys)):
            assert torch.equal(mine[i], theirs)
    assert not torch.equal(step.eps[0], step.eps[1])  # each run its own stream


@pytest.mark.parametrize("name,dataset", [("factorvae", "dsprites"), ("betavae", "dsprites"),
                                          ("factorvae", "color_dsprites")])
def test_with_its_own_noise_model_k_is_its_single_run(name, dataset):
    """The whole step with each run's noise drawn by the step from its own generator (the
    graph's way; on CPU a CPU generator, whose draws equal the host stream's of the same seed):
    model k equals its single reference run within fp32 parity, losses every step and weights
    at the end; colour dSprites: with observation noise drawn and rendered in the step. A
    generator shared by the runs, or noise drawn out of order, fails it."""
    from fastfvae.data.variants import ColorDSprites
    from test_study_pack import _single

    data = small_dsprites(512) if dataset == "dsprites" else ColorDSprites(small_dsprites(512))
    cfgs = [c.replace(dataset=dataset) for c in _configs(name, 3)]
    states = [TrainState.create(c, len(data)) for c in cfgs]
    metrics = _steps(GraphedPackStep(states, data), states, data, 12, noise=False)
    for i, cfg in enumerate(cfgs):
        single_state, single_metrics = _single(cfg, data, 12)
        assert_parity(single_state, states[i], single_metrics, [{n: v[i] for n, v in m.items()} for m in metrics],
                      "fp32")


def test_a_runs_generator_resumes_from_its_checkpoint_entry():
    cfg = _configs("betavae", 1)[0]
    fresh = pack_noise_generator(cfg, "cpu")
    assert torch.equal(fresh.get_state(), torch.Generator().manual_seed(noise_seed(cfg.seed)).get_state())
    torch.randn(5, generator=fresh)
    saved = [fresh.get_state()]  # rng["torch_cuda"]: one state per device, this device's first
    again = pack_noise_generator(cfg, "cpu", saved, step=3)
    assert torch.equal(torch.randn(5, generator=again), torch.randn(5, generator=fresh))


def test_resumed_without_a_device_generator_state_it_continues_as_the_single_run():
    """A checkpoint without the device's generator state (a CPU run's, resumed on CUDA) at step
    > 0: the single fast step seeds the device generator at step 0 only, so it draws from where
    `build_models`' ``torch.manual_seed(seed)`` left it; the pack's run seeds its own generator
    with ``seed`` too (not ``noise_seed(seed)``, a fresh run's)."""
    from fastfvae.study.pack import pack_noise_seed

    data = small_dsprites(256)
    cfg = _configs("betavae", 1)[0]
    assert pack_noise_seed(cfg, "cpu", [], step=4) == cfg.seed != noise_seed(cfg.seed)
    assert pack_noise_seed(cfg, "cpu", None, step=4) == cfg.seed
    assert pack_noise_seed(cfg, "cpu", [], step=0) == noise_seed(cfg.seed)
    assert pack_noise_seed(cfg, "cpu", [torch.Generator().get_state()], step=4) is None  # the saved state
    # torch.manual_seed(seed) seeds each CUDA device's default generator with seed, offset 0
    assert torch.equal(pack_noise_generator(cfg, "cpu", [], step=4).get_state(),
                       torch.Generator().manual_seed(cfg.seed).get_state())
    states = [TrainState.create(c, len(data)) for c in _configs("betavae", 2)]
    for s in states:
        s.step = 4
    step = GraphedPackStep(states, data, warmup=0, cuda_rng_states=[[], []])
    for s, generator in zip(states, step.generators):
        assert generator.initial_seed() == s.cfg.seed


def test_checkpoints_carry_each_runs_generator_and_resume_bit_exactly(tmp_path, monkeypatch):
    """train_pack with the graphed pack (its CPU form): each run's checkpoint holds its own
    generator's state where a single run holds the device's (``rng["torch_cuda"]``), and a pack
    stopped after 3 steps and resumed ends where the uninterrupted one does, bit for bit."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.checkpoint import load_checkpoint
    from test_study_pack import _run_configs

    built = []

    def graphed(states, data, mechanism=None, workers=None, cuda_rng_states=None):
        built.append(GraphedPackStep(states, data, warmup=2, cuda_rng_states=cuda_rng_states))
        return built[-1]

    monkeypatch.setattr(pack_module, "make_pack_step", graphed)
    data = small_dsprites(256)
    whole = _run_configs(tmp_path / "whole")
    train_pack(whole, data=data, progress=False, evaluate=False)
    halves = _run_configs(tmp_path / "halves")
    train_pack([c.replace(steps=3) for c in halves], data=data, progress=False, evaluate=False)
    mid = [load_checkpoint(c.out)["rng"]["torch_cuda"][0] for c in halves]
    train_pack(halves, data=data, progress=False, evaluate=False)
    assert len(built) == 3 and all(b.mechanism == "graph" for b in built)
    for i, cfg in enumerate(halves):  # the resumed pack's generators started from each run's own entry
        assert torch.equal(built[2].generators[i].get_state(), load_checkpoint(cfg.out)["rng"]["torch_cuda"][0])
    assert not torch.equal(mid[0], mid[1])
    for a, b in zip(whole, halves):
        pa, pb = load_checkpoint(a.out), load_checkpoint(b.out)
        assert pa["state"]["step"] == pb["state"]["step"] == 6
        for part in ("vae", "disc"):
            assert all(torch.equal(pa["state"][part][n], pb["state"][part][n]) for n in pa["state"][part])
        assert torch.equal(pa["rng"]["torch_cuda"][0], pb["rng"]["torch_cuda"][0])
        assert torch.equal(pa["rng"]["torch_cuda"][0], built[0].generators[whole.index(a)].get_state())
        with open(f"{a.out}/train_log.jsonl") as log:
            assert len(log.readlines()) == 3  # log_every 2: steps 2, 4 and 6, from the pack's one meter


def test_a_graphed_pack_finds_nan_when_it_logs_and_names_the_run(tmp_path, monkeypatch):
    """No host read per step (``defers_sync``): a NaN in run 1's loss at step 3 is found at the
    next log step (4, log_every 2) from the interval's sums, naming run 1 only, nothing logged
    for that interval."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.loop import TrainingDiverged
    from test_study_pack import _run_configs

    real_call = GraphedPackStep.__call__

    def poisoned(self, inputs):
        metrics = real_call(self, inputs)
        if self.states[0].step == 2:  # the third step
            metrics.matrix[0, 1] = float("nan")
        return metrics

    monkeypatch.setattr(GraphedPackStep, "__call__", poisoned)
    monkeypatch.setattr(pack_module, "make_pack_step",
                        lambda states, data, *a, cuda_rng_states=None, **kw: GraphedPackStep(states, data, warmup=0))
    cfgs = _run_configs(tmp_path)
    with pytest.raises(TrainingDiverged, match="by step 4 in") as info:
        train_pack(cfgs, data=small_dsprites(256), progress=False, evaluate=False)
    assert info.value.outs == (cfgs[1].out,) and info.value.step == 4
    with open(f"{cfgs[0].out}/train_log.jsonl") as log:
        assert [line.count('"step": 2') for line in log] == [1]  # step 2's line only


def test_the_graph_is_the_cuda_default_where_the_single_run_is_graphed():
    cfg = _configs("factorvae", 1)[0].replace(fast=True)
    cuda_dev, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_applies(cfg, cuda_dev) and not graph_applies(cfg, cpu)
    assert pack_mechanism(cuda_dev, None, cfg) == "graph"
    assert pack_mechanism(cpu, None, cfg) == "threads"
    assert pack_mechanism(cuda_dev, None, cfg.replace(cuda_graph=False)) == "stacked"  # --no-cuda-graph
    assert pack_mechanism(cuda_dev, None, cfg.replace(fast=False)) == "stacked"  # the reference: no graph
    assert pack_mechanism(cuda_dev, "stacked", cfg) == "stacked"
    with pytest.raises(FastFVAEError, match="graphed pack is one CUDA graph and needs a CUDA device"):
        pack_mechanism(cpu, "graph", cfg)
    data = small_dsprites(256)
    states = [TrainState.create(c, len(data)) for c in _configs("betavae", 2)]
    with pytest.raises(FastFVAEError, match="needs a CUDA device"):
        make_pack_step(states, data, "graph")


def test_a_resumed_stacked_adam_keeps_its_step_on_the_parameters_device():
    """Fused Adam (capturable or not) reads each step count from the parameter's device: a
    stacked pack resumed from the runs' optimiser state puts it there, as torch's own fused Adam
    does on ``load_state_dict``. On the meta device, so that a CPU step shows on a CPU machine."""
    from fastfvae.study.pack import _stacked_adam

    params = [torch.nn.Parameter(torch.zeros(3, 2, device="meta")) for _ in range(2)]
    optims = []
    for p in params:  # each run's Adam after 4 steps (a non-fused Adam hosts its step on the CPU)
        optim = torch.optim.Adam([p], lr=1e-3)
        optim.state[p] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        optims.append(optim)
    stacked = [torch.nn.Parameter(torch.zeros(2, 3, 2, device="meta"))]
    for capturable in (False, True):
        adam = _stacked_adam(optims, stacked, capturable)
        reference = torch.optim.Adam(stacked, lr=1e-3, fused=True, capturable=capturable)
        reference.load_state_dict(adam.state_dict())
        step = adam.state[stacked[0]]["step"]
        assert step.device == reference.state[stacked[0]]["step"].device == stacked[0].device
        assert step.dtype == torch.float32 and adam.state[stacked[0]]["exp_avg"].shape == (2, 3, 2)


def test_a_stacked_adam_refuses_runs_of_which_one_has_no_optimiser_state():
    from fastfvae.study.pack import _stacked_adam

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    optims = [torch.optim.Adam([p], lr=1e-3) for p in params]
    optims[0].state[params[0]] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    with pytest.raises(FastFVAEError, match="must resume from the same step"):
        _stacked_adam(optims, [torch.nn.Parameter(torch.zeros(2, 2))])


# --- CUDA: parity with the single graphed run -------------------------------------------------
def _cuda_cfgs(name, k):
    return [c.replace(device="cuda", fast=True) for c in _configs(name, k)]


@contextlib.contextmanager
def _stage(name):
    """A CUDA case's failure under the name of the stage it failed in (capture, replay, parity,
    resume): the GPU check's report shows the first line of each failure's message."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (re-raised as the test's failure, chained)
        first = (str(exc).strip().splitlines() or [""])[0]
        pytest.fail(f"{name}: {type(exc).__name__}: {first}")


def _single_graphed(cfg, data, steps):
    """The single graphed run of ``cfg`` (device noise from the default CUDA generator, seeded
    by the step; networks eager and torch's ops, as the pack's: what differs is the stacking)."""
    from fastfvae.fast import FastOptions, FastStep

    state = TrainState.create(cfg, len(data), "cuda")
    step = FastStep(state, data, FastOptions(compile="none", fused_ops=False))
    assert step._graph is not None and step.draws_own_noise
    shapes = StepShapes.of(cfg, data=data)
    metrics = []
    for _ in range(steps):
        metrics.append({k: v.clone() for k, v in step(draw_step_inputs(shapes, state.sampler, state.generator,
                                                                         noise=False)).items()})
        state.step += 1
    step.sync_state()
    return state, metrics


#: How far model k's displacement from the initial weights may be from its single run's, as a
#: share of the single run's (per tensor, in norm). A model that never updated is off by all of
#: it (1); round-off that decides some Adam directions (near-zero gradients: on CPU at most 2 %
#: of a tensor's elements, each by a few steps of lr) stays below a tenth.
DISPLACEMENT_RTOL = 0.1


def _assert_moved_alike(initial: dict, ref: dict, mine: dict, atol: float) -> None:
    """``mine`` moved from ``initial`` as ``ref`` did: each element's displacement within
    ``atol`` of ``ref``'s (a bound that weights left at ``initial`` also meet, since Adam moves
    each by at most about lr a step), and each tensor's displacement within `DISPLACEMENT_RTOL`
    of ``ref``'s in norm (which they fail); ``ref`` must have moved."""
    assert ref.keys() == mine.keys() == initial.keys()
    moved = 0.0
    for k in ref:
        d_ref, d_mine = (ref[k] - initial[k]).double(), (mine[k] - initial[k]).double()
        torch.testing.assert_close(d_mine, d_ref, rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
        off, size = float((d_mine - d_ref).norm()), float(d_ref.norm())
        assert off <= DISPLACEMENT_RTOL * size, (
            f"{k}: displacement from the initial weights off by {off:.3g}, "
            f"{off / size if size else float('inf'):.3g} of the single run's ({size:.3g})")
        moved += size
    assert moved > 0, "the single run's weights did not move"


def _assert_gpu_parity(initial, single_state, pack_state, single_metrics, pack_metrics, lr: float) -> None:
    """Model k against its single graphed run on one GPU, with the GPU's fp32 tolerances (docs/gpu.md,
    the parity phase's table: cuDNN/cuBLAS pick other algorithms for a grouped convolution and a
    batched GEMM than for one model's): losses within 1e-3; parameters: each one's displacement
    from ``initial`` (both start there) within steps x lr of the single run's, and each tensor's
    within a tenth of it in norm (`_assert_moved_alike`: a pack that never updated fails it).
    Other noise, another generator or a wrong step count moves the losses by far more.
    ``d_acc`` (a fraction of 2B decisions) is not compared."""
    for step, (a, b) in enumerate(zip(single_metrics, pack_metrics)):
        assert a.keys() == b.keys()
        for k in a:
            if k != "d_acc":
                torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-3,
                                           msg=lambda m: f"step {step + 1} {k}: {m}")
    _assert_moved_alike(initial, params_of(single_state), params_of(pack_state), len(single_metrics) * lr)


def test_the_gpu_parity_check_fails_a_pack_that_never_updated():
    """The CUDA cases' parameter check on CPU: a single reference run passes it against itself
    and fails it with the initial weights, by the displacement's norm alone (an element bound
    of about steps x lr is one that the initial weights meet, or nearly: Adam's early steps can
    move an element slightly past lr)."""
    from test_study_pack import _single

    data = small_dsprites(256)
    cfg = _configs("factorvae", 1)[0]
    initial = {k: v.clone() for k, v in params_of(TrainState.create(cfg, len(data))).items()}
    state, metrics = _single(cfg, data, 4)
    lr = max(cfg.vae_lr, float(cfg.method().hparams.d_lr))
    _assert_gpu_parity(initial, state, state, metrics, metrics, lr)
    never_updated = TrainState.create(cfg, len(data))
    with pytest.raises(AssertionError):
        _assert_gpu_parity(initial, state, never_updated, metrics, metrics, lr)
    with pytest.raises(AssertionError, match="displacement from the initial weights off by .*, 1 of the single"):
        _assert_moved_alike(initial, params_of(state), params_of(never_updated), atol=float("inf"))


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@cuda
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", ["factorvae", "betavae"])
def test_cuda_model_k_of_a_graphed_pack_is_its_single_graphed_run(name, k, no_tf32):
    data = small_dsprites(512)
    cfgs = _cuda_cfgs(name, k)
    states = [TrainState.create(c, len(data), "cuda") for c in cfgs]
    initial = [{n: v.clone() for n, v in params_of(s).items()} for s in states]
    with _stage("capture (graphed pack)"):
        step = make_pack_step(states, data)
    assert isinstance(step, GraphedPackStep) and step.graph is not None
    with _stage("replay (graphed pack)"):
        metrics = _steps(step, states, data, 10, noise=False)
        torch.cuda.synchronize()
    for i, cfg in enumerate(cfgs):
        with _stage("single graphed run"):
            single_state, single_metrics = _single_graphed(cfg, data, 10)
        lr = max(cfg.vae_lr, float(getattr(cfg.method().hparams, "d_lr", 0.0)))
        with _stage(f"parity of model {i} with its single graphed run"):
            _assert_gpu_parity(initial[i], single_state, states[i], single_metrics,
                               [{n: v[i] for n, v in m.items()} for m in metrics], lr)


@cuda
def test_cuda_graphed_pack_resumes_bit_exactly_and_as_single_runs(tmp_path, no_tf32, monkeypatch):
    """Stopped after 3 steps and resumed, a graphed pack ends bit for bit where the
    uninterrupted one does (cuDNN's deterministic algorithms: the nondeterministic ones would
    differ between any two runs); a pack run's checkpoint resumes as a single graphed run (its
    own generator state in the device's entry) to the pack's own result within the GPU's fp32
    parity."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.checkpoint import load_checkpoint
    from fastfvae.train.loop import run_training
    from test_study_pack import _run_configs

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    data = small_dsprites(256)

    def cfgs(where, steps=6):
        # compile="none", fused_ops=False: the single run resumed below captures its eager
        # networks and torch's ops (no Inductor compilation in the GPU check's time budget), as
        # the pack runs them
        return [c.replace(device="cuda", fast=True, steps=steps, compile="none", fused_ops=False)
                for c in _run_configs(tmp_path / where)]

    whole, halves, single = cfgs("whole"), cfgs("halves"), cfgs("single")
    idx = torch.cuda.current_device()
    with _stage("pack training"):
        train_pack(whole, data=data, progress=False, evaluate=False)
    with _stage("pack resume"):
        train_pack([c.replace(steps=3) for c in halves], data=data, progress=False, evaluate=False)
        train_pack(halves, data=data, progress=False, evaluate=False)
        for a, b in zip(whole, halves):
            pa, pb = load_checkpoint(a.out), load_checkpoint(b.out)
            for part in ("vae", "disc"):
                different = [n for n, v in pa["state"][part].items() if not torch.equal(v, pb["state"][part][n])]
                assert not different, f"{b.out}: {part} weights {different[:3]} differ from the uninterrupted pack's"
            assert torch.equal(pa["rng"]["torch_cuda"][idx], pb["rng"]["torch_cuda"][idx]), "generator states differ"
    with _stage("resume as a single graphed run"):
        train_pack([c.replace(steps=3) for c in single], data=data, progress=False, evaluate=False)
        a, c = whole[0], single[0]
        mid = load_checkpoint(c.out)["state"]["vae"]  # step 3, where both continue from
        run_training(c, data=data, resume=c.out, progress=False)
        pa, pc = load_checkpoint(a.out), load_checkpoint(c.out)
        # the single run drew its noise from the pack run's own generator state, advanced as the pack does
        assert torch.equal(pc["rng"]["torch_cuda"][idx], pa["rng"]["torch_cuda"][idx]), "generator states differ"
        logs = [{line["step"]: line["loss"] for line in map(json.loads, open(f"{out}/train_log.jsonl"))}
                for out in (a.out, c.out)]
        # log_every 2: the stopped pack logged steps 2 and 3, the single run 4 (step 4 only) and 6
        assert list(logs[0]) == [2, 4, 6] and list(logs[1]) == [2, 3, 4, 6], logs
        # step 6's line: the mean of steps 5 and 6 in both
        torch.testing.assert_close(torch.tensor(logs[1][6]), torch.tensor(logs[0][6]), rtol=1e-3, atol=1e-3)
        # steps 4 to 6 moved the single run's VAE from the step-3 weights as they moved the pack's
        _assert_moved_alike(mid, pa["state"]["vae"], pc["state"]["vae"], atol=3 * c.vae_lr)


def _graphed_pack(monkeypatch, poison):
    """train_pack with the graphed pack's CPU form; ``poison(step, metrics)`` edits the metric
    matrix of the step from pack step ``step`` (0 the first)."""
    real_call = GraphedPackStep.__call__

    def poisoned(self, inputs):
        metrics = real_call(self, inputs)
        poison(self.states[0].step, metrics)
        return metrics

    monkeypatch.setattr(GraphedPackStep, "__call__", poisoned)
    monkeypatch.setattr(pack_module, "make_pack_step",
                        lambda states, data, *a, cuda_rng_states=None, **kw: GraphedPackStep(states, data, warmup=0))


def test_a_graphed_pack_checks_the_metrics_a_single_run_checks_only(tmp_path, monkeypatch):
    """A metric other than the loss and D's loss (a plug-in's, say) NaN/inf does not stop the
    graphed pack, as it does not stop a single run (`CHECKED_METRICS`); D's loss NaN does."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.loop import CHECKED_METRICS, TrainingDiverged
    from test_study_pack import _run_configs

    names = []

    def other_metrics(step, metrics):
        names[:] = metrics.names
        for i, name in enumerate(metrics.names):
            if name not in CHECKED_METRICS:
                metrics.matrix[i, 1] = float("inf") if i % 2 else float("nan")

    _graphed_pack(monkeypatch, other_metrics)
    cfgs = _run_configs(tmp_path / "other")
    results = train_pack(cfgs, data=small_dsprites(256), progress=False, evaluate=False)
    assert [r.status for r in results] == ["completed"] * 3 and len(names) > len(CHECKED_METRICS)

    def d_loss(step, metrics):
        if step == 2:
            metrics.matrix[metrics.names.index("d_loss"), 2] = float("nan")

    _graphed_pack(monkeypatch, d_loss)
    cfgs = _run_configs(tmp_path / "d_loss")
    with pytest.raises(TrainingDiverged, match="by step 4 in") as info:
        train_pack(cfgs, data=small_dsprites(256), progress=False, evaluate=False)
    assert info.value.outs == (cfgs[2].out,)


def test_a_graphed_pack_checks_before_it_evaluates(tmp_path, monkeypatch):
    """A NaN between log steps is found at the next evaluation step (``eval_every``), before the
    evaluation and the callbacks see the diverged weights, as a single run checks them."""
    from fastfvae.study.pack import train_pack
    from fastfvae.train.loop import TrainingDiverged
    from test_study_pack import _run_configs

    def loss(step, metrics):
        if step == 2:  # the third step
            metrics.matrix[metrics.names.index("loss"), 0] = float("nan")

    _graphed_pack(monkeypatch, loss)
    cfgs = [c.replace(log_every=6, eval_every=4) for c in _run_configs(tmp_path)]
    seen = []
    with pytest.raises(TrainingDiverged, match="by step 4 in") as info:
        train_pack(cfgs, data=small_dsprites(256), progress=False, evaluate=False,
                   callbacks_for=lambda cfg, data: [lambda state, metrics: seen.append((cfg.out, state.step))])
    assert info.value.outs == (cfgs[0].out,) and info.value.step == 4
    assert sorted({step for _, step in seen}) == [1, 2, 3]  # none at step 4, the evaluation step
