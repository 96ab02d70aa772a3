"""The fast step against the reference step: parity (fp32 within round-off, bf16 within its
documented tolerance), every branch (second/same batch, several D updates, beta-VAE, fused
ops, loaders), and the optimiser's checkpoint format.

Tolerances (`fastfvae.fast.precision.PARITY_RTOL`; docs/fast-path.md, "Parity"): fp32 fast and reference
compute the same sums in different orders (fused Adam, channels_last convolutions, one
concatenated D GEMM), so they agree to float32 round-off amplified over 50 Adam steps:
losses to rtol 1e-4 and parameters to atol 2e-5 (Adam moves a parameter by at most ~lr =
1e-4 a step, so a round-off difference in a gradient changes it by a fraction of that).
The exception is an element whose gradient is itself at round-off level (e.g. the weights of
a decoder unit that is almost never active): Adam divides it by its own tiny second moment,
so round-off decides the direction of a step of up to lr. Such elements are rare (a few in
10^5, and which ones depends on the CPU's kernels: AVX-512 vs AMX order the sums
differently), so fp32 allows at most 1 in 10^3 elements of a tensor past 2e-5, none past one
step's lr. A wrong gradient moves far more elements, by several steps.
Which run such an element's round-off sends the "wrong" way depends on the CPU's kernels, and
it can be the reference's own: on an AVX2-only CPU (Zen 3) the fp32 reference loop leaves the
float64 trajectory by up to 5e-4 in 50 steps while the fast step stays within 1e-6 of it; in
other configurations it is the fast step's fused Adam (torch's fused kernel, whose updates differ
from the for-loop Adam's in the last bit of a few elements) that sends one the other way. So where
the two fp32 runs disagree past the tolerance, two more runs of the reference algorithm decide
(`REFEREES`): the same loop on float64 copies of the same initial weights and inputs, and the same
loop with torch's fused Adam. The fast step passes if it is within the same tolerance of either;
a wrong algorithm is far from all three.
Some runs part from all three whatever the fast step's kernels: an adversarial run (FactorVAE with
2 D updates, beta-TC-VAE) amplifies a ReLU input that lies within round-off of zero landing on the
other side (a decoder pre-activation of -1.7e-9 in the float64 run, on a layer whose values are
~5e-2: the native kernels' rounding gives +8.8e-9, the reference's -1.9e-9), until after 50 steps
the runs are 1e-2 apart. So the last check is step by step (`every_step_is_a_reference_step`,
on a rerun of the fast run that must reproduce it bit for bit): from each state of the fast run,
one reference step on the same inputs must reach the fast step's next state within the same
tolerances, each tensor's update and each Adam moment must match the reference's to
`STEP_UPDATE_RTOL` of its norm (a systematic error of a few per cent fails in one step), and the
steps' parameter differences, summed over the run, must stay within the 50-step tolerance (an
error too small for one step adds up there, as it would along the trajectory).
bf16 rounds every GEMM/conv operand to 8 mantissa bits: losses agree to rtol 5e-2 and
parameters to atol 50 steps x lr = 5e-3 (each step can move a parameter by ~lr either way).
"""

import copy
import functools

import numpy as np
import pytest
from cpu_bf16 import bf16_param, needs_cpu_bf16
import torch

from fastfvae.fast import PARITY_RTOL, FastOptions, FastStep
from fastfvae.fast.conv import fp32_routes, native_fp32_convolutions
from fastfvae.fast.impl import fused_ops_available
from fastfvae.fast.optim import FastAdam, fast_optimizers
from fastfvae.train.config import TrainConfig
from fastfvae.train.reference import StepShapes, draw_step_inputs, make_reference_step
from fastfvae.train.state import TrainState, build_optimizers
from train_data import one_thread, small_config, small_dsprites  # noqa: F401 (autouse fixture)

STEPS = 50
PARAM_ATOL = {"fp32": 2e-5, "bf16": STEPS * 1e-4}
#: fp32: the share of a tensor's elements that may pass PARAM_ATOL (near-zero gradients whose
#: Adam direction round-off decides), and the bound for those: one Adam step of lr 1e-4.
ROUND_OFF_SHARE, ROUND_OFF_STEP = 1e-3, 1e-4


def small_cfg(**kw) -> TrainConfig:
    return small_config(**{"batch_size": 16, "d_hidden": 64, "d_layers": 3, **kw})


class _Float64Data:
    """A dataset whose float batches (and rendered observations) come out in float64."""

    def __init__(self, data) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name):
        return getattr(self._data, name)

    def float_batch(self, *args, **kwargs):
        return self._data.float_batch(*args, **kwargs).double()


def _reference_run(state: TrainState, steps: int, data, cast=None):
    """(state, per-step metrics) of the reference loop from ``state`` for ``steps`` steps, its
    inputs passed through ``cast`` (default: as drawn)."""
    step = make_reference_step(state, data)
    shapes = StepShapes.of(state.cfg, data=data)
    metrics = []
    for _ in range(steps):
        inputs = draw_step_inputs(shapes, state.sampler, state.generator)
        metrics.append(step(inputs if cast is None else cast(inputs)))
        state.step += 1
    return state, metrics


def float64_reference(cfg: TrainConfig, steps: int, data):
    """The reference loop run in float64 from the fp32 runs' initial weights, batches and noise
    (each cast exactly to float64): the trajectory both fp32 runs approximate."""
    state = TrainState.create(cfg, len(data))
    for model in state.models:
        if model is not None:
            model.double()  # in place: the optimisers keep their parameters

    def cast(inputs):
        return inputs._replace(**{k: v.double() for k, v in inputs._asdict().items()
                                  if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return _reference_run(state, steps, _Float64Data(data), cast)


def fused_adam_reference(cfg: TrainConfig, steps: int, data):
    """The reference loop with torch's fused Adam kernel in place of its for-loop Adam: the same
    algorithm, whose float32 updates differ from the for-loop's in the last bit of a few elements
    a step (`test_fused_adam_differs_from_the_reference_adam_by_round_off_only`)."""
    state = TrainState.create(cfg, len(data))
    state.optims = fast_optimizers(state.optims)
    return _reference_run(state, steps, data)


#: where the fast fp32 run and the fp32 reference disagree past the tolerances, the other runs of
#: the reference algorithm that decide (see the module docstring), in order
REFEREES = {"the float64 reference": float64_reference, "the reference with fused Adam": fused_adam_reference}


#: one step from the same state: the largest relative difference of a tensor's update (the norm
#: of the two runs' difference over the norm of the reference's update). Round-off gives ~1e-5,
#: and up to 1.5e-3 where a ReLU input within round-off of zero lands on the other side (measured:
#: docs/fast-path.md); an update off by a few per cent (a wrong lr, a missing term) is past it
STEP_UPDATE_RTOL = 1e-2


def _assert_within_norm(name: str, gap: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    """||gap|| <= STEP_UPDATE_RTOL ||scale|| + 1e-8 per element (a round-off-sized floor)."""
    gap_norm, scale_norm = float(gap.double().norm()), float(scale.double().norm())
    floor = 1e-8 * gap.numel() ** 0.5
    assert gap_norm <= STEP_UPDATE_RTOL * scale_norm + floor, (
        f"{name}: {what} differs from the reference's by {gap_norm / max(scale_norm, 1e-30):.2e} of its norm, "
        f"past {STEP_UPDATE_RTOL:g} (+ {floor:.1e})")


def _assert_same_optimiser_states(ref_state, fast_state) -> None:
    """Each Adam's step counts equal, its moments within `STEP_UPDATE_RTOL` of their norm."""
    for which, ref_opt, fast_opt in zip(("vae", "disc"), ref_state.optims, fast_state.optims):
        if ref_opt is None:
            continue
        ref_sd, fast_sd = ref_opt.state_dict()["state"], fast_opt.state_dict()["state"]
        assert ref_sd.keys() == fast_sd.keys(), f"{which} optimiser: states for other parameters"
        for i, ref_s in ref_sd.items():
            assert float(fast_sd[i]["step"]) == float(ref_s["step"]), f"{which} optimiser, parameter {i}: step count"
            for key in ("exp_avg", "exp_avg_sq"):
                _assert_within_norm(f"{which} optimiser, parameter {i}", fast_sd[i][key] - ref_s[key], ref_s[key], key)


def every_step_is_a_reference_step(cfg: TrainConfig, steps: int, data, options: FastOptions, routes: dict,
                                   compared=None) -> None:
    """The fast run checked one step at a time. Before each of its steps its state (the step's own
    optimiser state and flat buffers written back) is copied into a fresh reference loop, which
    takes one step on the same inputs. That step's metrics and parameters must be within the fp32
    tolerances of the fast step's, each tensor's update and each Adam moment within
    `STEP_UPDATE_RTOL` of its norm and the Adam step counts equal; and the sum over the steps of
    the two steps' parameter differences (what the fast step's own error adds up to, without the
    trajectory's amplification) within the 50-step tolerance. The fast step runs on, free, as in
    training (its packed weights and buffers carried across steps). ``routes``: the fp32
    native-convolution flags the run was made with (`fp32_routes`); ``compared``: (fast state,
    per-step fast metrics) of the run under judgment, which this rerun must reproduce bit for bit."""
    with torch.random.fork_rng():  # building a state seeds the global generator
        state = TrainState.create(cfg, len(data))
    drift: dict = {}
    with native_fp32_convolutions(routes):
        fast, shapes = FastStep(state, data, options), StepShapes.of(cfg, data=data)
        for step in range(steps):
            fast.sync_state()
            before = copy.deepcopy(state.state_dict())
            inputs = draw_step_inputs(shapes, state.sampler, state.generator)
            fast_metrics = fast(inputs)
            state.step += 1
            fast.sync_state()
            if compared is not None and step < len(compared[1]):
                assert all(torch.equal(fast_metrics[k], compared[1][step][k]) for k in fast_metrics), (
                    f"the step-by-step rerun is not the run compared: its metrics differ at step {step + 1}")
            with torch.random.fork_rng():
                ref = TrainState.create(cfg, len(data))
            ref.load_state_dict(before)
            start = {k: v.clone() for k, v in params_of(ref).items()}
            ref_metrics = make_reference_step(ref, data)(inputs)
            ref_p, fast_p = params_of(ref), params_of(state)
            try:
                _assert_close_runs(ref, state, [ref_metrics], [fast_metrics], "fp32")
                for k, p in start.items():
                    _assert_within_norm(k, fast_p[k] - ref_p[k], ref_p[k] - p, "its update")
                _assert_same_optimiser_states(ref, state)
            except AssertionError as exc:
                raise AssertionError(f"step {step + 1} from the fast run's state: {str(exc).splitlines()[0]}") from None
            for k in ref_p:
                drift[k] = drift.get(k, 0) + (fast_p[k].double() - ref_p[k].double())
        if compared is not None:
            final = params_of(compared[0])
            assert all(torch.equal(final[k], v) for k, v in params_of(state).items()), (
                "the step-by-step rerun is not the run compared: its final parameters differ")
        for k, d in drift.items():
            past = int((d.abs() > PARAM_ATOL["fp32"]).sum())
            assert past <= ROUND_OFF_SHARE * d.numel() and float(d.abs().max()) <= ROUND_OFF_STEP, (
                f"{k}: the fast steps' differences from the reference steps add up to {float(d.abs().max()):.2e} "
                f"over {steps} steps ({past} of {d.numel()} elements past {PARAM_ATOL['fp32']:g})")


def run_both(cfg: TrainConfig, steps: int, options: FastOptions, data=None):
    """(reference state, fast state, per-step reference metrics, per-step fast metrics). The
    reference state carries ``referees``: the `REFEREES` runs of the same steps, each made only if
    `assert_parity` needs it."""
    data = small_dsprites(512) if data is None else data
    ref_state, fast_state = TrainState.create(cfg, len(data)), TrainState.create(cfg, len(data))
    ref_state.referees = {name: functools.partial(run, cfg, steps, data) for name, run in REFEREES.items()}
    ref_state.stepwise = functools.partial(every_step_is_a_reference_step, cfg, steps, data, options, fp32_routes())
    ref, fast = make_reference_step(ref_state, data), FastStep(fast_state, data, options)
    ref_metrics, fast_metrics = [], []
    shapes = StepShapes.of(cfg, data=data)
    for _ in range(steps):
        ref_metrics.append(ref(draw_step_inputs(shapes, ref_state.sampler, ref_state.generator)))
        fast_metrics.append(fast(draw_step_inputs(shapes, fast_state.sampler, fast_state.generator)))
        ref_state.step += 1
        fast_state.step += 1
    fast.sync_state()
    return ref_state, fast_state, ref_metrics, fast_metrics


def params_of(state) -> dict:
    vae, disc = state.models
    out = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    if disc is not None:
        out.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
    return out


def assert_parity(ref_state, fast_state, ref_metrics, fast_metrics, precision: str) -> None:
    """The fast run within ``precision``'s tolerance of the reference run; in fp32, where it is
    not and ``ref_state`` carries ``referees`` (`run_both`), within the same tolerance of one of
    them instead (see the module docstring)."""
    try:
        _assert_close_runs(ref_state, fast_state, ref_metrics, fast_metrics, precision)
        return
    except AssertionError as exc:
        if precision != "fp32" or not getattr(ref_state, "referees", None):
            raise
        failures = [f"against the fp32 reference: {str(exc).splitlines()[0]}"]
    for name, rerun in ref_state.referees.items():
        state, metrics = rerun()
        try:
            _assert_close_runs(state, fast_state, metrics[:len(ref_metrics)], fast_metrics, precision)
            return
        except AssertionError as exc:
            failures.append(f"against {name}: {str(exc).splitlines()[0]}")
    stepwise = getattr(ref_state, "stepwise", None)
    if stepwise is not None:
        try:
            stepwise(compared=(fast_state, fast_metrics))
            return
        except AssertionError as exc:
            failures.append(f"step by step: {str(exc).splitlines()[0]}")
    raise AssertionError("; ".join(failures))


def _assert_close_runs(ref_state, fast_state, ref_metrics, fast_metrics, precision: str) -> None:
    rtol = PARITY_RTOL[precision]
    for step, (a, b) in enumerate(zip(ref_metrics, fast_metrics)):
        assert a.keys() == b.keys()
        for k in a:
            if k == "d_acc" and precision == "bf16":
                continue  # a fraction of 2B decisions; one flipped logit sign moves it by 1/(2B)
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=rtol, atol=rtol,
                                       msg=lambda m: f"step {step + 1} {k}: {m}")
    ref_p, fast_p = params_of(ref_state), params_of(fast_state)
    ref_p = {k: v.to(fast_p[k].dtype) if k in fast_p else v for k, v in ref_p.items()}  # a float64 reference
    assert ref_p.keys() == fast_p.keys()
    for k in ref_p:
        if precision == "fp32":
            diff = (fast_p[k] - ref_p[k]).abs()
            past = int((diff > PARAM_ATOL["fp32"]).sum())
            assert past <= ROUND_OFF_SHARE * diff.numel(), (
                f"{k}: {past} of {diff.numel()} elements differ by more than {PARAM_ATOL['fp32']:g}")
            torch.testing.assert_close(fast_p[k], ref_p[k], rtol=0, atol=ROUND_OFF_STEP, msg=lambda m: f"{k}: {m}")
        else:
            torch.testing.assert_close(fast_p[k], ref_p[k], rtol=0, atol=PARAM_ATOL[precision],
                                       msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("model,perm_batch,d_steps", [
    ("factorvae", "second", 1),   # the paper config's structure
    ("factorvae", "same", 2),     # dlib's same-batch codes; D updates k >= 1 on one 2B forward
    ("betavae", "second", 1),
])
def test_fp32_matches_reference_after_50_steps(model, perm_batch, d_steps):
    cfg = small_cfg(model=model, perm_batch=perm_batch, d_steps=d_steps)
    assert_parity(*run_both(cfg, STEPS, FastOptions()), "fp32")


def test_fp32_parity_is_not_vacuous():
    """The same comparison fails for a different seed's batches (the tolerance is tight)."""
    cfg = small_cfg()
    data = small_dsprites(512)
    ref_state, fast_state = TrainState.create(cfg, len(data)), TrainState.create(cfg, len(data))
    ref, fast = make_reference_step(ref_state, data), FastStep(fast_state, data, FastOptions())
    for _ in range(5):
        ref(draw_step_inputs(cfg, ref_state.sampler, ref_state.generator))
        inputs = draw_step_inputs(cfg, fast_state.sampler, fast_state.generator)
        fast(inputs._replace(eps=torch.randn_like(inputs.eps)))
    with pytest.raises(AssertionError):
        _assert_close_runs(ref_state, fast_state, [], [], "fp32")
    # nor do the referees accept it, nor the step-by-step check (whose rerun of the fast step, on
    # the right noise, is not this run)
    ref_state.referees = {name: functools.partial(run, cfg, 5, data) for name, run in REFEREES.items()}
    ref_state.stepwise = functools.partial(every_step_is_a_reference_step, cfg, 5, data, FastOptions(),
                                           fp32_routes())
    with pytest.raises(AssertionError, match="against the fp32 reference: .*; against the float64 reference: .*; "
                                             "against the reference with fused Adam: .*; step by step: "
                                             "the step-by-step rerun is not the run compared"):
        assert_parity(ref_state, fast_state, [], [], "fp32")


def test_every_fast_step_is_a_reference_step_from_its_own_state():
    """The step-by-step comparison (`every_step_is_a_reference_step`) passes a correct fast step,
    FactorVAE with 2 D updates (D's packed weights and buffers carried across the steps)."""
    cfg = small_cfg(model="factorvae", perm_batch="second", d_steps=2)
    every_step_is_a_reference_step(cfg, 10, small_dsprites(512), FastOptions(), fp32_routes())


def _adam_steps_too_long(monkeypatch, factor: float) -> None:
    """The fast step's Adam steps ``factor`` times too long (its lr as the state records it)."""
    real = FastAdam.step

    def long_step(self, *args, **kwargs):
        lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] *= factor
        try:
            return real(self, *args, **kwargs)
        finally:
            for group, lr in zip(self.param_groups, lrs):
                group["lr"] = lr

    monkeypatch.setattr(FastAdam, "step", long_step)


def test_the_step_by_step_comparison_rejects_an_update_two_per_cent_too_long(monkeypatch):
    """An Adam step 2% too long moves each parameter by ~2e-6 more a step, well inside the
    elementwise tolerance, so it is the updates' norms that reject it, at the first step
    (beta-VAE: no discriminator, whose near-zero gradients the changed codes could flip)."""
    _adam_steps_too_long(monkeypatch, 1.02)
    with pytest.raises(AssertionError, match=r"step 1 from the fast run's state: .*its update differs"):
        every_step_is_a_reference_step(small_cfg(model="betavae"), 3, small_dsprites(512), FastOptions(),
                                       fp32_routes())


def test_the_step_by_step_comparison_adds_up_an_error_too_small_for_one_step(monkeypatch):
    """0.5% too long passes each step's norm check (5e-3 of 1e-2); the steps' differences add up
    over 50 steps past the 50-step tolerance, as the free-running comparison's would."""
    _adam_steps_too_long(monkeypatch, 1.005)
    with pytest.raises(AssertionError, match="differences from the reference steps add up to"):
        every_step_is_a_reference_step(small_cfg(model="betavae"), STEPS, small_dsprites(512), FastOptions(),
                                       fp32_routes())


def test_the_step_by_step_comparison_rejects_an_adam_whose_step_count_stands_still(monkeypatch):
    """A reference loop started from such a state makes the same update as the fast step (both
    read the same count), so it is the optimiser states' comparison that rejects it."""
    real = FastAdam.step

    def stuck(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        for state in self.state.values():
            state["step"] -= 1
        return out

    monkeypatch.setattr(FastAdam, "step", stuck)
    with pytest.raises(AssertionError, match=r"step 1 from the fast run's state: vae optimiser, parameter 0: step count"):
        every_step_is_a_reference_step(small_cfg(model="betavae"), 3, small_dsprites(512), FastOptions(),
                                       fp32_routes())


def test_the_step_by_step_comparison_rejects_a_transposed_convolution_without_its_bias(monkeypatch):
    from torch import nn

    import fastfvae.fast.conv as by_hand

    real = by_hand.layer_split

    def without_bias(x, layer, dtype, relu=False):
        if isinstance(layer, nn.ConvTranspose2d):
            return by_hand.conv_split(x, layer.weight, None, layer.stride, layer.padding, True, dtype, relu)
        return real(x, layer, dtype, relu)

    monkeypatch.setattr(by_hand, "layer_split", without_bias)
    with pytest.raises(AssertionError, match=r"step 1 from the fast run's state: "):
        every_step_is_a_reference_step(small_cfg(), 5, small_dsprites(512), FastOptions(), fp32_routes())


def test_fused_adam_differs_from_the_reference_adam_by_round_off_only():
    """What makes the fused-Adam reference a fair referee: from the same state and gradient, one
    step of torch's fused Adam and of the reference's for-loop Adam agree to a few float32 ulps
    (gradients over 12 decades, as near-dead units produce), step after step."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20000))
    loop = torch.optim.Adam([p], lr=1e-4)
    differing = 0
    for _ in range(10):
        p.grad = torch.randn(20000) * 10 ** torch.empty(20000).uniform_(-12, 0)
        start, state = p.detach().clone(), copy.deepcopy(loop.state_dict())  # the moments, not views
        fused = torch.optim.Adam([p], lr=1e-4, fused=True)
        fused.load_state_dict(state)
        fused.step()
        by_fused = p.detach().clone()
        with torch.no_grad():
            p.copy_(start)
        loop.step()
        torch.testing.assert_close(by_fused, p.detach(), rtol=2**-21, atol=0)
        differing += int((by_fused != p.detach()).sum())
    assert differing < 20000  # a few elements a step, not a different update


def test_the_float64_reference_decides_when_the_fp32_runs_disagree():
    """A reference that left the trajectory (here: one weight moved by 1e-3, far past the tolerance)
    fails the fast run against it, and the float64 run, which the fast run follows, passes it."""
    cfg = small_cfg()
    ref_state, fast_state, ref_m, fast_m = run_both(cfg, 10, FastOptions())
    state64, metrics64 = ref_state.referees["the float64 reference"]()
    assert next(state64.models[0].parameters()).dtype == torch.float64 and len(metrics64) == 10
    _assert_close_runs(ref_state, state64, ref_m, metrics64, "fp32")  # the float64 run is the same trajectory
    with torch.no_grad():
        next(ref_state.models[0].parameters()).add_(1e-3)
    assert_parity(ref_state, fast_state, ref_m, fast_m, "fp32")
    with pytest.raises(AssertionError, match="differ by more than"):
        _assert_close_runs(ref_state, fast_state, ref_m, fast_m, "fp32")


@needs_cpu_bf16
def test_bf16_within_documented_tolerance():
    cfg = small_cfg()
    ref_state, fast_state, ref_m, fast_m = run_both(cfg, STEPS, FastOptions(precision="bf16"))
    assert_parity(ref_state, fast_state, ref_m, fast_m, "bf16")
    # ...and it is really bf16 arithmetic: not bit-identical to fp32
    assert any(float(a["loss"]) != float(b["loss"]) for a, b in zip(ref_m, fast_m))


def test_each_lever_alone_keeps_parity():
    """Plain layout / unfused Adam / autograd instead of the by-hand D and convolutions: the
    same algorithm, within fp32 round-off."""
    cfg = small_cfg()
    assert_parity(*run_both(cfg, 20, FastOptions(channels_last=False, fused_adam=False)), "fp32")
    assert_parity(*run_both(small_cfg(d_steps=2), 20, FastOptions(by_hand=False)), "fp32")


@pytest.mark.parametrize("precision", ["fp32", bf16_param("bf16", id="bf16")])
def test_by_hand_is_the_cpu_default_and_matches_autograd(precision):
    """`by_hand` resolves on for an eager CPU step; the by-hand and autograd fast steps agree
    (fp32: round-off; bf16: both within the bf16 tolerance of each other), on 2 D updates."""
    assert FastOptions().resolved(torch.device("cpu")).by_hand is True
    assert FastOptions(compile="model").resolved(torch.device("cpu")).by_hand is False
    cfg = small_cfg(d_steps=2)
    data = small_dsprites(512)
    states = [TrainState.create(cfg, len(data)) for _ in range(2)]
    steps = [FastStep(states[0], data, FastOptions(precision=precision, by_hand=True)),
             FastStep(states[1], data, FastOptions(precision=precision, by_hand=False))]
    metrics = [[], []]
    for _ in range(15):
        for i in range(2):
            metrics[i].append(steps[i](draw_step_inputs(cfg, states[i].sampler, states[i].generator)))
    assert steps[0]._d_by_hand is not None and steps[1]._d_by_hand is None
    assert_parity(states[1], states[0], metrics[1], metrics[0], precision)


@pytest.mark.skipif(not fused_ops_available(), reason="fastfvae.ops not built")
def test_fused_ops_keep_parity():
    cfg = small_cfg(d_steps=2)
    assert_parity(*run_both(cfg, 20, FastOptions(fused_ops=True)), "fp32")


@pytest.mark.parametrize("loader,precision", [("torch", "fp32"),
                                              pytest.param("dali", "fp32", marks=pytest.mark.requires_extra("dali")),
                                              bf16_param("torch", "bf16", id="torch-bf16")])
def test_other_loaders_give_the_device_loaders_batches(loader, precision):
    """Bit-identical runs whatever the loader; bf16 on CPU also checks the space-to-depth input
    (the device loader unpacks straight into it, the others are rearranged)."""
    cfg = small_cfg()
    data = small_dsprites(64)  # 4 batches an epoch: 4 steps x 2 batches cross an epoch boundary
    states = [TrainState.create(cfg, len(data)) for _ in range(2)]
    steps = [FastStep(states[0], data, FastOptions(loader="device", precision=precision)),
             FastStep(states[1], data, FastOptions(loader=loader, precision=precision))]
    for _ in range(4):
        out = [step(draw_step_inputs(cfg, s.sampler, s.generator)) for step, s in zip(steps, states)]
        assert float(out[0]["loss"]) == float(out[1]["loss"])
    for a, b in zip(params_of(states[0]).values(), params_of(states[1]).values()):
        assert torch.equal(a, b)
    for step in steps:
        step._batches.loader.close()


def test_fast_adam_writes_the_reference_format_and_resumes_it():
    cfg = small_cfg()
    state = TrainState.create(cfg, 512)
    reference_groups = state.optims.vae.state_dict()["param_groups"]
    fast = FastAdam(state.optims.vae)
    assert fast.param_groups[0]["fused"] is True
    assert fast.state_dict()["param_groups"] == reference_groups
    # a reference optimiser restored from the fast one's state stays the reference implementation
    again = build_optimizers(cfg, state.models).vae
    again.load_state_dict(fast.state_dict())
    assert again.param_groups[0]["fused"] is None


@needs_cpu_bf16
def test_bf16_checkpoint_state_owns_its_tensors():
    """The bf16 CPU step keeps D's weights and moments in flat buffers of its own (FlatAdam), and
    writes them back into the run's state when asked (`sync_state`): the saved state holds
    tensors of their own (a view would save, and load back as, the whole buffer) with the
    step's values."""
    cfg = small_cfg()
    data = small_dsprites(512)
    state = TrainState.create(cfg, len(data))
    step = FastStep(state, data, FastOptions(precision="bf16", native_d=False))  # the torch D's flat Adam
    assert step._flat_adam is not None
    before = [p.detach().clone() for p in state.models.disc.parameters()]
    step(draw_step_inputs(cfg, state.sampler, state.generator))
    assert all(torch.equal(p, b) for p, b in zip(state.models.disc.parameters(), before))  # not the step's
    assert state.optims.disc is not step.optims.disc
    step.sync_state()
    flat = step._flat_adam.flat_param
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in state.models.disc.parameters()]), flat)
    saved = state.state_dict()
    tensors = list(saved["disc"].values()) + [t for s in saved["disc_opt"]["state"].values()
                                              for t in s.values() if torch.is_tensor(t)]
    assert tensors and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    for (name, p), t in zip(state.models.disc.named_parameters(), saved["disc"].values()):
        assert torch.equal(p.detach(), t), name


def test_bad_options_are_one_line_errors():
    from fastfvae.errors import FastFVAEError

    state = TrainState.create(small_cfg(), 512)
    for bad in (dict(precision="fp16"), dict(loader="nfs"), dict(compile="max"), dict(cuda_graph=True),
                dict(compile="model", by_hand=True)):
        with pytest.raises(FastFVAEError):
            FastStep(state, small_dsprites(512), FastOptions(**bad))


def test_no_host_sync_metrics_are_device_tensors():
    """The step returns 0-dim tensors (read back by the loop only when it logs)."""
    cfg = small_cfg()
    _, _, _, fast_m = run_both(cfg, 1, FastOptions())
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in fast_m[0].values())
    assert np.isfinite([float(v) for v in fast_m[0].values()]).all()


@pytest.mark.slow
@pytest.mark.parametrize("d_steps", [1, 2])
def test_compiled_networks_keep_parity(d_steps):
    """compile="model" (Inductor, AOTAutograd backward; the CUDA default) with fused ops:
    the retained D graph is back-propagated twice through a compiled backward. ~1-2 min of
    compilation on CPU, hence slow."""
    opts = FastOptions(compile="model", fused_ops=fused_ops_available())
    assert_parity(*run_both(small_cfg(d_steps=d_steps), 6, opts), "fp32")
