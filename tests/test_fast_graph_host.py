"""The CUDA-graph step's host work per step, on CPU: reusable staging buffers (and their
in-flight hazard, with a simulated stream), no host noise for in-graph noise, metrics as one
stacked vector. `GraphedStep` is bound to CPU tensors and its replay run eagerly."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastfvae.fast import FastOptions, FastStep
from fastfvae.fast.graph import GraphedStep, StagedInputs
from fastfvae.train.config import TrainConfig
from fastfvae.train.progress import METRIC_KEYS, IntervalMeter, StackedMetrics
from fastfvae.train.reference import draw_step_inputs
from fastfvae.train.state import TrainState
from train_data import small_config, one_thread, small_dsprites  # noqa: F401 (autouse fixture)


class FakeStream:
    """A stream that runs queued work only when an event recorded after it is synchronised
    (what a GPU behind the host does): a copy reads its source then, not when it is queued."""

    def __init__(self) -> None:
        self.queue, self.done = [], 0

    def copy(self, dst, src) -> None:
        self.queue.append(lambda: dst.copy_(src))

    def run(self, upto: int | None = None) -> None:
        upto = len(self.queue) if upto is None else upto
        while self.done < upto:
            self.queue[self.done]()
            self.done += 1

    def event(self) -> "FakeEvent":
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream, self.mark = stream, None

    def record(self) -> None:
        self.mark = len(self.stream.queue)

    def synchronize(self) -> None:
        self.stream.run(self.mark)


def _staged(stream, depth=2):
    return StagedInputs([(4,), (2, 3)], torch.float32, "cpu", depth=depth, new_event=stream.event, copy=stream.copy)


def _values(step):
    return [np.full(4, step, np.float32), torch.full((2, 3), -step, dtype=torch.float32)]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_staged_copies_deliver_each_steps_values_while_in_flight(depth):
    """Each step's queued copy delivers that step's values even when it runs steps later: a
    pinned buffer is rewritten only after the copy out of it ran."""
    stream, seen = FakeStream(), []
    staged = _staged(stream, depth)
    for step in range(3 * depth + 2):
        staged.load(_values(step))
        stream.queue.append(lambda: seen.append([v.clone() for v in staged.views]))  # the replay reads them
    stream.run()
    for step, (a, b) in enumerate(seen):
        assert torch.equal(a, torch.full((4,), float(step))) and torch.equal(b, torch.full((2, 3), float(-step)))


def test_staging_lets_the_host_run_depth_steps_ahead_and_reuses_its_buffers():
    stream = FakeStream()
    staged = _staged(stream, depth=3)
    for step in range(3):
        staged.load(_values(step))
        stream.queue.append(lambda: None)
    assert stream.done == 0  # three loads queued, none waited for
    buffers = [b.data_ptr() for b in staged._buffers]
    staged.load(_values(3))  # reuses the first buffer: waits for the first copy only
    assert stream.done == 1
    for step in range(4, 20):
        staged.load(_values(step))
    assert [b.data_ptr() for b in staged._buffers] == buffers and len(set(buffers)) == 3


def test_staged_inputs_are_views_of_one_buffer_and_check_shapes():
    staged = StagedInputs([(3,), (3,)], torch.int64, "cpu")
    assert all(v.data_ptr() >= staged.flat.data_ptr() for v in staged.views)
    staged.load([np.array([1, 2, 3]), np.array([4, 5, 6])])
    assert staged.flat.tolist() == [1, 2, 3, 4, 5, 6] and staged.views[1].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="shape"):
        staged.load([np.arange(2), np.arange(3)])  # would broadcast silently otherwise
    with pytest.raises(ValueError, match="2 staged inputs"):
        staged.load([np.arange(3)])


class EagerReplay:
    """Stands in for the captured graph: a replay runs the iteration on the static inputs."""

    def __init__(self, graphed: GraphedStep) -> None:
        self.graphed = graphed

    def replay(self) -> None:
        self.graphed.out = self.graphed._run()


def _cpu_graphed(cfg, data, noise):
    state = TrainState.create(cfg, len(data))
    step = FastStep(state, data, FastOptions())
    graphed = GraphedStep.__new__(GraphedStep)
    graphed._bind(step, noise)
    graphed.graph = EagerReplay(graphed)
    return state, step, graphed


@pytest.mark.parametrize("model,colour", [("factorvae", False), ("betavae", False), ("annealedvae", False),
                                          ("factorvae", True)])
def test_bound_graph_step_with_host_noise_matches_the_eager_step(model, colour, monkeypatch):
    """Rows, the step count and noise (colour dSprites: its colours too) through the staging
    buffers, metrics as one stacked vector: the same values as the eager fast step fed the same
    inputs, step after step (annealedvae reads the staged step count), and no per-step pinning."""
    from fastfvae.data.variants import ColorDSprites
    from fastfvae.train.step import StepShapes

    extra = {"iteration_threshold": 4, "c_max": 5.0, "gamma": 10.0} if model == "annealedvae" else {}
    cfg = small_config(model=model, batch_size=8, d_hidden=32, d_layers=2, d_steps=2,
                       dataset="color_dsprites" if colour else "dsprites", **extra)
    data = ColorDSprites(small_dsprites(128)) if colour else small_dsprites(128)
    shapes = StepShapes.of(cfg, data=data)
    eager_state, eager_step, _ = _cpu_graphed(cfg, data, "host")
    state, _, graphed = _cpu_graphed(cfg, data, "host")
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("pinned memory allocated per step"))
    for _ in range(6):
        expected = eager_step(draw_step_inputs(shapes, eager_state.sampler, eager_state.generator))
        got = graphed(draw_step_inputs(shapes, state.sampler, state.generator))
        assert isinstance(got, StackedMetrics) and list(got) == list(expected)
        assert torch.equal(got.values, torch.stack([expected[k] for k in got]))
        eager_state.step += 1
        state.step += 1
    for p, q in zip(eager_state.models.vae.parameters(), state.models.vae.parameters()):
        assert torch.equal(p, q)


def test_bound_graph_step_with_device_noise_takes_rows_only():
    cfg = TrainConfig(batch_size=8, d_hidden=32, d_layers=2)
    data = small_dsprites(128)
    state, _, graphed = _cpu_graphed(cfg, data, "device")
    before = state.generator.get_state()
    inputs = draw_step_inputs(cfg, state.sampler, state.generator, noise=False)
    assert inputs.eps is None and inputs.keys is None
    metrics = graphed(inputs)
    assert torch.isfinite(metrics.values).all() and torch.equal(state.generator.get_state(), before)
    assert torch.equal(graphed.rows.cpu(), torch.from_numpy(inputs.rows))


def test_draws_own_noise_with_the_in_graph_noise_only():
    cuda = torch.device("cuda")
    assert FastOptions().resolved(cuda).draws_own_noise
    assert not FastOptions(noise="host").resolved(cuda).draws_own_noise
    assert not FastOptions(cuda_graph=False).resolved(cuda).draws_own_noise
    assert not FastOptions().resolved(torch.device("cpu")).draws_own_noise
    cfg = TrainConfig(batch_size=8, d_hidden=32, d_layers=2)
    data = small_dsprites(128)
    assert FastStep(TrainState.create(cfg, len(data)), data).draws_own_noise is False


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that compute (views and detach do not launch anything)."""

    FREE = {"detach", "select", "slice", "view", "alias", "_to_copy"}

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in self.FREE:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _steps(n, names):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(len(names), generator=g) * 100 for _ in range(n)]


@pytest.mark.parametrize("names", [METRIC_KEYS, METRIC_KEYS[:3]])
def test_meter_adds_a_stacked_vector_in_one_op_with_the_same_means(names):
    plain, stacked = IntervalMeter(), IntervalMeter()
    for step, values in enumerate(_steps(5, names)):
        entries = {k: values[i].clone() for i, k in enumerate(names)}
        per_entry, one = _CountOps(), _CountOps()
        with per_entry:
            plain.add(entries)
        with one:
            stacked.add(StackedMetrics(values, names))
        assert per_entry.ops == ([] if step == 0 else ["add.Tensor"] * len(names))  # the counter counts
        assert one.ops == ([] if step == 0 else ["add.Tensor"])  # the first add keeps the vector
    assert {k: float(v) for k, v in stacked.sums.items()} == {k: float(v) for k, v in plain.sums.items()}
    assert stacked.flush()[0] == plain.flush()[0]
    assert stacked.count == 0 and stacked.sums == {}


def test_meter_with_a_replaced_stacked_entry_adds_the_replacement():
    """The loop's NaN injection assigns metrics["loss"]: the meter must see the NaN."""
    meter = IntervalMeter()
    meter.add(StackedMetrics(torch.ones(6), METRIC_KEYS))
    poisoned = StackedMetrics(torch.ones(6), METRIC_KEYS)
    poisoned["loss"] = poisoned["loss"] * float("nan")
    meter.add(poisoned)
    meter.add(StackedMetrics(torch.ones(6), METRIC_KEYS))
    sums = meter.sums
    assert torch.isnan(sums["loss"]) and float(sums["recon"]) == 3.0 and float(sums["d_acc"]) == 3.0
    means, _ = meter.flush()
    assert np.isnan(means["loss"]) and means["kl"] == 1.0


def test_meter_never_writes_into_a_steps_metrics():
    first = torch.ones(6)
    meter = IntervalMeter()
    meter.add(StackedMetrics(first, METRIC_KEYS))
    meter.add(StackedMetrics(torch.ones(6), METRIC_KEYS))
    assert torch.equal(first, torch.ones(6)) and float(meter.sums["loss"]) == 2.0


def test_stacked_metrics_check_their_length():
    with pytest.raises(ValueError, match="3 names"):
        StackedMetrics(torch.zeros(6), METRIC_KEYS[:3])


class FakeCuda:
    """The torch.cuda pieces `warm_up_and_capture` calls on a CUDA device, on CPU tensors: each
    call recorded in order (streams, generator registration, capture begin/end, RNG states)."""

    def __init__(self, monkeypatch, fail_in_capture: BaseException | None = None) -> None:
        import contextlib

        self.calls: list[str] = []
        self.capturing = False
        calls, fake = self.calls, self

        class Stream:
            def __init__(self, name="side"):
                self.name = name

            def wait_stream(self, other):
                calls.append(f"{self.name} waits for {other.name}")

        current = Stream("current")

        class Graph:
            def register_generator_state(self, generator):
                assert not fake.capturing, "a generator is registered before the capture begins"
                calls.append("register generator")

        @contextlib.contextmanager
        def stream(s):
            calls.append(f"enter {s.name} stream")
            yield
            calls.append(f"leave {s.name} stream")

        @contextlib.contextmanager
        def graph(g):
            calls.append("capture begins")
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False
                if fail_in_capture is not None:  # leaving an invalidated capture fails too
                    calls.append("capture invalidated")
                    raise RuntimeError("operation failed due to a previous error during capture")
                calls.append("capture ends")

        for name, value in [("Stream", lambda device=None: Stream()), ("current_stream", lambda device=None: current),
                            ("stream", stream), ("graph", graph), ("CUDAGraph", Graph),
                            ("device", lambda device: contextlib.nullcontext()),
                            ("get_rng_state", lambda device=None: calls.append("save default rng") or torch.zeros(1)),
                            ("set_rng_state", lambda state, device=None: calls.append("restore default rng"))]:
            monkeypatch.setattr(torch.cuda, name, value)


def test_cuda_warm_up_runs_on_a_side_stream_then_capture_then_undoes_the_warm_up_in_place(monkeypatch):
    """The CUDA branch (torch.cuda faked, CPU tensors): the warm-up on a side stream that waits
    for the current one (and the current one for it after), the generators registered before the
    capture begins, one call captured, then the parameters, Adam state and every generator put
    back in the same tensors, after the capture."""
    from fastfvae.fast.graph import warm_up_and_capture

    fake = FakeCuda(monkeypatch)
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([w], lr=0.1)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    before = [g.get_state() for g in gens]
    where = []

    def run():
        where.append("capture" if fake.capturing else "warm-up")
        fake.calls.append("run")
        adam.zero_grad(set_to_none=True)
        (w * torch.randn(3, generator=gens[0])).sum().backward()
        adam.step()
        return w.detach().sum()

    graph, out = warm_up_and_capture(run, [w], [adam], "cuda", 2, gens)
    assert graph is not None and out is not None and where == ["warm-up", "warm-up", "capture"]
    assert fake.calls == ["save default rng", "side waits for current", "enter side stream", "run", "run",
                          "leave side stream", "current waits for side", "register generator", "register generator",
                          "capture begins", "run", "capture ends", "restore default rng"]
    assert torch.equal(w.detach(), torch.ones(3)) and adam.state[w]["step"] == 0  # restored, same tensors
    assert not adam.state[w]["exp_avg"].any() and all(torch.equal(g.get_state(), s) for g, s in zip(gens, before))


@pytest.mark.parametrize("first", [RuntimeError("operation not permitted when stream is capturing"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_a_failed_capture_names_the_op_that_failed_not_the_invalidated_capture(monkeypatch, first):
    """An op that cannot be captured fails, and then so does leaving the capture; the error is
    the op's own (the GPU check's report shows one line of it); out of memory stays itself."""
    from fastfvae.fast.graph import warm_up_and_capture

    fake = FakeCuda(monkeypatch, fail_in_capture=first)

    def run():
        if fake.capturing:
            raise first
        return torch.zeros(())

    expected = type(first) if isinstance(first, torch.OutOfMemoryError) else RuntimeError
    with pytest.raises(expected) as info:
        warm_up_and_capture(run, [], [], "cuda", 1)
    assert "capture invalidated" in fake.calls
    message = str(info.value)
    assert str(first) in message and "previous error during capture" not in message
    if expected is RuntimeError:
        assert message.startswith("CUDA graph capture of the step failed: RuntimeError: operation not permitted")


def test_a_cuda_capture_needs_a_warm_up_call(monkeypatch):
    """Without one, Adam would create its state (a zero fill) inside the capture, and every replay
    would zero the moments and the step count again."""
    from fastfvae.fast.graph import warm_up_and_capture

    fake = FakeCuda(monkeypatch)
    with pytest.raises(ValueError, match="at least one warm-up call"):
        warm_up_and_capture(lambda: torch.zeros(()), [], [], "cuda", 0)
    assert "capture begins" not in fake.calls
    assert warm_up_and_capture(lambda: torch.zeros(()), [], [], "cpu", 0) == (None, None)  # the CPU form: no capture
