"""CUDA: the whole fast iteration captured as one CUDA graph, replayed once per step.

`GraphedStep(step)` gives `FastStep.body` static inputs (batch rows, noise), runs it a few
times on a side stream (Inductor compiles, Adam creates its state, the allocator warms up),
restores the models and optimisers to their state before the warm-up (in place, so the
captured addresses stay valid), and captures one iteration: batch gather + unpack, VAE
forward/backward, the D updates and both fused, capturable Adam updates. A step is then a
few small host-to-device copies of the step's inputs and ``graph.replay()``: no host
synchronisation, metrics stay on the device (one clone per step) until the loop logs them.

Noise: ``noise="host"`` copies the reference's host-drawn eps/keys into the graph (parity
with the reference stream); ``noise="device"`` draws them inside the graph from the CUDA
default generator (graph-safe Philox; seeded from the run seed), which is the fast default.
"""

from __future__ import annotations

import torch

WARMUP_STEPS = 3


def _metric_keys() -> tuple[str, ...]:
    """The loop's metric names, imported when a graph is built: `fastfvae.train.progress` needs
    ``rich``, and importing this module (the op tests do) must not."""
    from fastfvae.train.progress import METRIC_KEYS

    return METRIC_KEYS


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


class GraphedStep:
    def __init__(self, step, noise: str = "device", warmup: int = WARMUP_STEPS) -> None:
        cfg, dev = step.cfg, step.device
        b, z = cfg.batch_size, cfg.z_dim
        self.step, self.noise = step, noise
        self.metric_keys = _metric_keys()
        self.rows = torch.zeros(b, dtype=torch.int64, device=dev)
        self.rows2 = torch.zeros(b, dtype=torch.int64, device=dev) if step.second else None
        self.eps = torch.zeros(b, z, device=dev)
        self.eps2 = torch.zeros(b, z, device=dev) if step.second else None
        self.keys = torch.zeros(cfg.d_steps, b, z, device=dev) if step.factorvae else None
        self.images = None if step._batches.kind == "device" else torch.zeros(b, 1, 64, 64, device=dev)
        self.images2 = None if self.images is None or not step.second else torch.zeros_like(self.images)

        optims = [o for o in step.state.optims if o is not None]
        params = step.vae_params + step.disc_params
        saved, rng = snapshot(params, optims), torch.cuda.get_rng_state(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()
        restore(saved, optims, params)
        torch.cuda.set_rng_state(rng, dev)

    def _run(self) -> torch.Tensor:
        """The captured iteration: static inputs -> stacked metrics [len(METRIC_KEYS)]."""
        step = self.step
        if self.noise == "device":
            for buf in (self.eps, self.eps2):
                if buf is not None:
                    buf.normal_()
            if self.keys is not None:
                self.keys.uniform_()
        if self.images is None:
            x = step._batches.gather(self.rows)
            x2 = None if self.rows2 is None else step._batches.gather(self.rows2)
        else:
            x, x2 = self.images, self.images2
        metrics = step.body(x, x2, self.eps, self.eps2, self.keys)
        zero = torch.zeros((), device=self.eps.device)
        return torch.stack([metrics.get(k, zero).float() for k in self.metric_keys])

    def _load(self, static: torch.Tensor | None, host) -> None:
        if static is not None and host is not None:
            if not isinstance(host, torch.Tensor):
                host = torch.from_numpy(host)
            static.copy_(host.pin_memory(), non_blocking=True)

    def __call__(self, inputs) -> dict:
        if self.images is None:
            self._load(self.rows, inputs.rows)
            self._load(self.rows2, inputs.rows2)
        else:
            x, x2 = self.step._batches.images(inputs)
            self.images.copy_(x)
            if x2 is not None:
                self.images2.copy_(x2)
        if self.noise == "host":
            self._load(self.eps, inputs.eps)
            self._load(self.eps2, inputs.eps2)
            self._load(self.keys, inputs.keys)
        self.graph.replay()
        values = self.out.clone()
        names = self.metric_keys if self.step.factorvae else self.metric_keys[:3]
        return {k: values[i] for i, k in enumerate(names)}
