"""CUDA: the whole fast iteration captured as one CUDA graph, replayed once per step.

`GraphedStep(step)` gives `FastStep.body` static inputs (batch rows, noise), runs it a few
times on a side stream (Inductor compiles, Adam creates its state, the allocator warms up),
restores the models and optimisers to their state before the warm-up (in place, so the
captured addresses stay valid), and captures one iteration: batch gather + unpack, VAE
forward/backward, the D updates and both fused, capturable Adam updates. A step is then a
few small host-to-device copies of the step's inputs and ``graph.replay()``: no host
synchronisation, metrics stay on the device (one clone per step) until the loop logs them.

Host work per step: the batch rows (and with ``noise="host"`` the noise) reach the graph's
static inputs through `StagedInputs`, one host-to-device copy per dtype from reusable pinned
buffers; the metrics come back as one `StackedMetrics` vector, which the loop's meter adds
in one operation. With ``noise="device"`` the step says ``draws_own_noise`` and the loop draws
no host noise for it.

Noise: ``noise="host"`` copies the reference's host-drawn eps/keys into the graph (parity
with the reference stream); ``noise="device"`` draws them inside the graph from the CUDA
default generator (graph-safe Philox; seeded from the run seed), which is the fast default.

Shared with the graphed stacked pack (`fastfvae.study.pack.GraphedPackStep`): `StagedInputs`,
`draw_noise` (the noise's order, from a given generator: a pack draws each run's from its own)
and `warm_up_and_capture` (warm-up, capture, the warm-up undone, extra generators registered).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

WARMUP_STEPS = 3
#: Pinned staging slots per input group (see `StagedInputs`).
STAGING_DEPTH = 4


def _metric_api():
    """The loop's metric names and `StackedMetrics`, imported when a graph is built:
    `fastfvae.train.progress` needs ``rich``, and importing this module (the op tests do)
    must not."""
    from fastfvae.train.progress import METRIC_KEYS, StackedMetrics

    return METRIC_KEYS, StackedMetrics


def _copy_non_blocking(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


class StagedInputs:
    """Static device tensors of one dtype, filled each step from host values with one copy.

    The tensors (`views`) are views of one flat device buffer, so a load is one host-to-device
    copy whatever their number: the host values are written into a pinned host buffer of the
    same layout (numpy assignments, no torch dispatch), then the whole buffer is copied with
    ``non_blocking=True``. Pinned buffers are allocated once, ``depth`` of them, and reused in
    turn (``Tensor.pin_memory()`` per input per step allocated a pinned block and copied into it
    for every input of every step).

    The hazard: a non-blocking copy reads its pinned source when the stream reaches it, which
    may be several steps after `load` returned (the host queues replays ahead of the GPU).
    Writing new values into that buffer before then would change what the queued copy
    delivers. So each load records an event after its copy, and a buffer is written again
    only after its event has completed (``event.synchronize()``). Why a ring of several
    buffers rather than one buffer synchronised before each reuse: with one, step n waits for
    step n-1's copy, which runs only after the GPU finished replay n-2, so the host can never
    queue more than one replay ahead and any pause of the host (a log line, garbage
    collection) idles the GPU. With ``depth`` buffers step n waits for replay n-depth-1 and
    ``depth`` replays stay queued; a deeper ring costs only its few kilobytes of pinned memory.

    ``pin``, ``new_event`` and ``copy`` default to the CUDA behaviour for a CUDA ``device``
    (on CPU copies are synchronous: no pinning, no events); tests pass fakes for them.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device, depth: int = STAGING_DEPTH,
                 pin: bool | None = None, new_event: Callable[[], object] | None = None,
                 copy: Callable[[torch.Tensor, torch.Tensor], None] = _copy_non_blocking) -> None:
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.spans = [(sum(sizes[:i]), n) for i, n in enumerate(sizes)]
        self.dtype, self.depth = dtype, depth
        self.flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        self.views = [self.flat[o:o + n].view(shape) for (o, n), shape in zip(self.spans, self.shapes)]
        self._pin = cuda if pin is None else pin
        self._new_event = (torch.cuda.Event if cuda else None) if new_event is None else new_event
        self._copy = copy
        self._buffers: list[torch.Tensor | None] = [None] * depth  # pinned host buffers, made on first use
        self._parts: list[list[np.ndarray] | None] = [None] * depth  # numpy views of each, one per input
        self._events: list[object | None] = [None] * depth  # recorded after the copy out of each
        self._next = 0

    def _slot(self, i: int) -> list[np.ndarray]:
        if self._buffers[i] is None:
            buf = torch.empty(self.flat.numel(), dtype=self.dtype, pin_memory=self._pin)
            flat = buf.numpy()
            self._buffers[i] = buf
            self._parts[i] = [flat[o:o + n].reshape(shape) for (o, n), shape in zip(self.spans, self.shapes)]
        elif self._events[i] is not None:
            self._events[i].synchronize()  # the copy that last read this buffer has run
        return self._parts[i]

    def load(self, values: Sequence) -> None:
        """Copy ``values`` (numpy arrays or CPU tensors, one per view, in order) to the views."""
        if len(values) != len(self.shapes):
            raise ValueError(f"{len(values)} values for {len(self.shapes)} staged inputs")
        i = self._next
        self._next = (i + 1) % self.depth
        for part, value in zip(self._slot(i), values):
            value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if value.shape != part.shape:
                raise ValueError(f"a staged input of shape {part.shape} got shape {value.shape}")
            part[...] = value
        self._copy(self.flat, self._buffers[i])
        if self._new_event is not None:
            if self._events[i] is None:
                self._events[i] = self._new_event()
            self._events[i].record()


def snapshot(params, optimizers) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(tensor, saved copy or None) for every parameter and optimiser-state tensor; None = the
    state did not exist yet (restored as zeros: Adam's initial state)."""
    saved = [(p, p.detach().clone()) for p in params]
    for opt in optimizers:
        for p in params:
            state = opt.state.get(p)
            if state is not None:
                saved += [(v, v.clone()) for v in state.values() if isinstance(v, torch.Tensor)]
    return saved


def restore(saved, optimizers, params) -> None:
    """Put back what `snapshot` saved, in place; state created since is zeroed (fresh Adam)."""
    kept = {id(t) for t, _ in saved}
    with torch.no_grad():
        for tensor, copy in saved:
            tensor.copy_(copy)
        for opt in optimizers:
            for p in params:
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and id(v) not in kept:
                        v.zero_()


def bind_static_inputs(target, shapes, device, runs: int | None = None) -> None:
    """A graph's static inputs as attributes of ``target``: ``row_inputs`` (one int64
    `StagedInputs`: ``rows``, ``rows2`` and the ``step_count`` the regulariser sees) and
    ``noise_inputs`` (one float32 one: ``eps``, ``eps2``, ``keys``, ``obs``, ``obs2``; None
    where the step has none), shaped by ``shapes`` (`StepShapes`), each with a leading
    ``runs`` dimension for a pack of that many runs."""
    lead = () if runs is None else (runs,)
    b, z, second = shapes.batch_size, shapes.z_dim, shapes.second_batch
    target.row_inputs = StagedInputs([(*lead, b)] * (2 if second else 1) + [()], torch.int64, device)
    views = iter(target.row_inputs.views)
    target.rows = next(views)
    target.rows2 = next(views) if second else None
    target.step_count = next(views)
    noise_shapes = [(*lead, b, z)] * (2 if second else 1)
    noise_shapes += [(*lead, *shapes.keys)] if shapes.keys is not None else []
    noise_shapes += [(*lead, *shapes.obs)] * (2 if second else 1) if shapes.obs is not None else []
    target.noise_inputs = StagedInputs(noise_shapes, torch.float32, device)
    views = iter(target.noise_inputs.views)
    target.eps = next(views)
    target.eps2 = next(views) if second else None
    target.keys = next(views) if shapes.keys is not None else None
    target.obs = next(views) if shapes.obs is not None else None
    target.obs2 = next(views) if shapes.obs is not None and second else None


def draw_noise(normal, uniform, generator: torch.Generator | None = None) -> None:
    """A step's device noise in its documented order: the Gaussian buffers (eps, eps2), then the
    uniform ones (permutation keys, observation noise); None entries are skipped. ``generator``
    None: the device's default generator (the single graphed run's); a pack passes each run's own."""
    for buf in normal:
        if buf is not None:
            buf.normal_(generator=generator)
    for buf in uniform:
        if buf is not None:
            buf.uniform_(generator=generator)


def warm_up_and_capture(run: Callable[[], torch.Tensor], params, optimizers, device, warmup: int,
                        generators: Sequence[torch.Generator] = ()):
    """(graph, its output) of ``run`` captured after ``warmup`` calls, the warm-up undone.

    The warm-up lets Inductor compile, Adam create its state and the allocator settle; then the
    parameters and optimiser state are put back in place (`snapshot` / `restore`: the captured
    addresses stay valid) and so are the generators: the device's default one and each of
    ``generators`` (a pack's per-run noise generators, registered with the graph so that each
    replay advances them as an eager step would). The warm-up thus leaves no trace. On a CPU
    ``device`` (the tests) the warm-up runs and is undone the same way, and nothing is
    captured: (None, None).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and warmup < 1:
        # what the first call creates (Adam's state, zero-filled) would be created in the capture,
        # and its zero fill replayed every step: the moments and step count reset each step
        raise ValueError(f"a CUDA graph capture needs at least one warm-up call before it, got warmup={warmup}")
    saved = snapshot(params, optimizers)
    rng = [g.get_state() for g in generators]
    default = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    graph = out = None
    if cuda:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device):
            for g in generators:
                graph.register_generator_state(g)
        out = _capture_graph(graph, run)
    else:
        for _ in range(warmup):
            run()
    restore(saved, optimizers, params)
    for g, state in zip(generators, rng):
        g.set_state(state)
    if cuda:
        torch.cuda.set_rng_state(default, device)
    else:
        torch.set_rng_state(default)
    return graph, out


def _capture_graph(graph, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()`` captured into ``graph``. When an op inside fails (one that synchronises with the
    host or is otherwise not capturable), leaving the capture fails too (the capture was
    invalidated), and that second error is the one Python raises; so the error raised here names
    the op's own, first error (an out-of-memory error stays itself: callers stop at it)."""
    first: list[BaseException] = []
    try:
        with torch.cuda.graph(graph):
            try:
                return run()
            except BaseException as exc:
                first.append(exc)
                raise
    except Exception as exc:
        cause = first[0] if first else exc
        if isinstance(cause, torch.OutOfMemoryError) or not isinstance(cause, Exception):
            raise cause
        line = (str(cause).strip().splitlines() or [""])[0]
        raise RuntimeError(f"CUDA graph capture of the step failed: {type(cause).__name__}: {line}") from cause


class GraphedStep:
    def __init__(self, step, noise: str = "device", warmup: int = WARMUP_STEPS) -> None:
        self._bind(step, noise)
        self._capture(warmup)

    def _bind(self, step, noise: str) -> None:
        """The static inputs on the step's device (no CUDA needed: the tests bind on CPU)."""
        shapes, dev = step.shapes, step.device
        b = shapes.batch_size
        self.step, self.noise = step, noise
        metric_keys, self._stacked = _metric_api()
        self.metric_keys = tuple(metric_keys[:3]) + tuple(step.method.metric_names)
        bind_static_inputs(self, shapes, dev)
        channels = getattr(step.data, "base_channels", 1)
        self.images = None if step._batches.kind == "device" else torch.zeros(b, channels, 64, 64, device=dev)
        self.images2 = None if self.images is None or not shapes.second_batch else torch.zeros_like(self.images)

    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream, capture one iteration, undo the warm-up's updates."""
        step = self.step
        optims = [o for o in step.optims if o is not None]
        self.graph, self.out = warm_up_and_capture(self._run, step.vae_params + step.disc_params, optims,
                                                   step.device, warmup)

    def _draw_noise(self) -> None:
        """The step's noise into its static inputs, from the device's default generator."""
        draw_noise((self.eps, self.eps2), (self.keys, self.obs, self.obs2))

    def _run(self) -> torch.Tensor:
        """The captured iteration: static inputs -> stacked metrics [len(metric_keys)]."""
        step = self.step
        if self.noise == "device":
            self._draw_noise()
        if self.images is None:
            x = step._batches.gather(self.rows)
            x2 = None if self.rows2 is None else step._batches.gather(self.rows2)
        else:
            x, x2 = self.images, self.images2
        x, x2 = step.observe(x, self.obs), None if x2 is None else step.observe(x2, self.obs2)
        metrics = step.body(x, x2, self.eps, self.eps2, self.keys, self.step_count)
        return torch.stack([metrics[k].float() for k in self.metric_keys])

    def __call__(self, inputs) -> dict:
        step = self.step
        count = np.int64(step.state.step)
        if self.images is None:
            self.row_inputs.load([inputs.rows] + ([inputs.rows2] if self.rows2 is not None else []) + [count])
        else:
            self.row_inputs.load([np.zeros(r.shape, np.int64) for r in self.row_inputs.views[:-1]] + [count])
            x, x2 = step._batches.images(inputs)
            self.images.copy_(x)
            if x2 is not None:
                self.images2.copy_(x2)
        if self.noise == "host":
            values = [inputs.eps] + ([inputs.eps2] if self.eps2 is not None else [])
            values += [inputs.keys] if self.keys is not None else []
            values += [inputs.obs] if self.obs is not None else []
            values += [inputs.obs2] if self.obs2 is not None else []
            self.noise_inputs.load(values)
        self.graph.replay()
        return self._stacked(self.out.clone(), self.metric_keys)
