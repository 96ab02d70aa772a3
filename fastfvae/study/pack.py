"""A pack: K runs of one method, architecture and dataset trained together, one step for all K.

`train_pack(configs)` trains every config to its ``steps``, each in its own run folder
(``cfg.out``) with exactly the layout of a single `fastfvae train` run (``config.json``,
``checkpoint.pt``, ``train_log.jsonl``, ``eval_log.jsonl``), so ``fastfvae eval``,
``traverse`` and ``train --resume`` work on every run of it. A run folder that already holds a
checkpoint is resumed from it; a finished run is left as it is.

How K runs become one step. Each run keeps what makes it itself: its initial weights (built
from its seed exactly as a single run builds them), its batch order (its own `EpochSampler`),
its noise (its own generator, drawn in the documented order) and its hyperparameter values.
What they share is the computation: the K encoders, decoders and discriminators are stacked
(``torch.func.stack_module_state``) and run through ``torch.func.vmap`` (batched convolutions
and GEMMs instead of K small ones), and the algorithm is `fastfvae.train.step.train_step`
itself, run once on tensors with a leading model dimension ([K, B, ...]): the objectives and
the methods' regularisers treat leading dimensions as independent models (one loss per
model), a method's float hyperparameters become [K] tensors, and the mechanism back-propagates
the sum of the K losses. Model k's parameters enter only model k's loss, so their gradient is
exactly the single run's; Adam is elementwise, so one Adam over the stacked tensors (same lr,
betas and eps: they are part of `pack_key`) makes each model's update the single run's. What
differs from a single run is only the summation order inside the batched kernels, so model k
of a pack equals the single run within the fast path's fp32 parity tolerance.

That is the *stacked* mechanism (`StackedPackStep`), the one for a GPU, where one batch-64
step leaves the chip idle. On CUDA, where the runs' single run would be one CUDA graph, the
stacked step is captured as one CUDA graph too (`GraphedPackStep`, the *graph* mechanism: each
run's noise drawn in the graph from its own device generator, seeded and checkpointed as its
single graphed run's; ``cuda_graph=False`` turns it off). On CPU the pack's step is the
*threaded* mechanism (`ThreadedPackStep`): each run keeps its own single step (the fast step with all its CPU
mechanisms, or the reference step for ``fast=False``), and the K steps run concurrently on
worker threads, one model per thread with its own intra-op threads (the process's threads split
between the workers). Each model's step is then exactly its single run's at that thread count,
and the cores work on independent models instead of meeting at a barrier after every small
convolution and GEMM. `make_pack_step` picks the mechanism for the device; docs/studies.md
("Packs") has the measurements behind the choice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from fastfvae.errors import FastFVAEError
from fastfvae.fast.precision import check_bf16_runs
from fastfvae.objectives import gaussian_kl, permute_dims, recon_loss, reparameterize
from fastfvae.train import loop as single
from fastfvae.train.checkpoint import (
    atomic_write_text, capture_rng_states, checkpoint_path, load_checkpoint, remove_stale_temp_files,
    restore_state, save_checkpoint,
)
from fastfvae.train.config import TrainConfig
from fastfvae.train.progress import EVAL_LOG_NAME, LOG_NAME, IntervalMeter, MetricLog, TrainProgress
from fastfvae.train.step import StepShapes, draw_step_inputs, train_step
from fastfvae.train.state import TrainState, resolve_device


def stacked_hparam_names(cfg: TrainConfig) -> set[str]:
    """The hyperparameters that may differ between the runs of a pack: the method's float
    hyperparameters that are not an optimiser's setting (those would need one Adam per value)."""
    method = cfg.method()
    names = {k for k, v in cfg.hparams.items() if isinstance(v, float) and not isinstance(v, bool)}
    return names - set(method.pack_fixed)


def pack_key(cfg: TrainConfig) -> tuple:
    """What the runs of one pack must share: everything but the seed, the run folder, the
    preset and the stackable hyperparameters (`stacked_hparam_names`)."""
    d = cfg.to_dict()
    for name in ("seed", "out", "preset"):
        d.pop(name)
    hparams = d.pop("hparams")
    stacked = stacked_hparam_names(cfg)
    fixed = tuple(sorted((k, str(v)) for k, v in hparams.items() if k not in stacked))
    return tuple(sorted((k, str(v)) for k, v in d.items())) + fixed


def check_pack(configs: Sequence[TrainConfig]) -> None:
    """FastFVAEError (one line) unless ``configs`` can train as one pack."""
    if not configs:
        raise FastFVAEError("a pack needs at least one run")
    outs = [Path(c.out).resolve() for c in configs]
    if len(set(outs)) != len(outs):
        raise FastFVAEError("two runs of a pack share a run folder; each run needs its own --out")
    key = pack_key(configs[0])
    for cfg in configs[1:]:
        if pack_key(cfg) != key:
            raise FastFVAEError(f"{cfg.out} cannot join a pack with {configs[0].out}: the runs of a pack differ "
                                f"only in seed and {', '.join(sorted(stacked_hparam_names(cfg))) or 'nothing else'}")


def finished(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a checkpoint at (or past) ``cfg.steps``."""
    if not checkpoint_path(cfg.out).exists():
        return False
    return int(load_checkpoint(cfg.out)["state"]["step"]) >= cfg.steps


def stacked_method(configs: Sequence[TrainConfig], device):
    """One method object for the pack: its float hyperparameters that differ between runs as
    [K] tensors (each value was validated by its run's config), the others as they are."""
    methods = [cfg.method() for cfg in configs]
    first = methods[0]
    values = {}
    for f in dataclasses.fields(first.hparams):
        per_run = [getattr(m.hparams, f.name) for m in methods]
        same = all(v == per_run[0] for v in per_run)
        values[f.name] = per_run[0] if same else torch.tensor(per_run, dtype=torch.float32, device=device)
    method = copy.copy(first)
    method.hparams = type(first.hparams)(**values)
    return method


class _Stacked:
    """K modules of one architecture as stacked parameters, called as one vmapped functional
    call (batched GEMMs: the discriminator) or, with ``loop=True``, model by model on slices of
    the stacked parameters (convolutions: oneDNN's grouped convolutions, which vmap makes of
    them, run 2-4x slower on CPU than one convolution per model)."""

    def __init__(self, modules: Sequence[torch.nn.Module], loop: bool = False) -> None:
        self.loop = loop
        params, buffers = stack_module_state(list(modules))
        if buffers:
            raise FastFVAEError("a pack stacks modules without buffers")
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.base = copy.deepcopy(modules[0]).to("meta")
        self.modules = list(modules)

        def one(params, x):
            return functional_call(self.base, dict(zip(self.names, params)), (x,))

        self._vmapped = vmap(one)

    def __call__(self, x: torch.Tensor):
        if not self.loop:
            return self._vmapped(self.params, x)
        # one unbind per stacked tensor: its backward stacks the K slices' gradients once (indexing
        # p[k] per model would give each slice's gradient as a zero-filled [K, ...] tensor to add)
        slices = [p.unbind(0) for p in self.params]
        outs = [functional_call(self.base, {n: s[k] for n, s in zip(self.names, slices)}, (x[k],))
                for k in range(x.shape[0])]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outs))
        return torch.stack(outs)

    @torch.no_grad()
    def write_back(self) -> None:
        """Each module's parameters from its slice of the stacked tensors."""
        for k, module in enumerate(self.modules):
            for name, stacked in zip(self.names, self.params):
                module.get_parameter(name).copy_(stacked[k])


def _stacked_adam(optims: Sequence[torch.optim.Adam], stacked_params: list[torch.Tensor],
                  capturable: bool = False) -> torch.optim.Adam:
    """One fused Adam over the stacked parameters, with the runs' settings and state. Only a plain
    torch Adam stacks (`plain_adam`): another optimiser (a plug-in adversary's SGD, AdamW...) is
    refused here, before training, rather than silently replaced by Adam (a sweep already plans
    such runs as packs of one on a GPU: `unstackable_adversary`). ``capturable``: the CUDA graph's
    Adam. A resumed state's step count is put on its parameter's device, where fused Adam keeps
    it whether capturable or not (the fused CUDA kernel reads it from device memory)."""
    from fastfvae.fast.step import plain_adam

    other = next((o for o in optims if not plain_adam(o)), None)
    if other is not None:
        raise FastFVAEError(f"a stacked pack (the GPU's) trains plain torch Adam only, and these runs use "
                            f"{_optimizer_name(other)}; train them with --pack 1, or as a CPU pack "
                            "(each run's own step)")
    group = optims[0].param_groups[0]
    adam = torch.optim.Adam(stacked_params, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                            weight_decay=group["weight_decay"], fused=True, capturable=capturable)
    per_run = [[o.state.get(p) for g in o.param_groups for p in g["params"]] for o in optims]
    if any(s for states in per_run for s in states):
        for i, p in enumerate(stacked_params):
            states = [states[i] for states in per_run]
            steps = {None if s is None else float(s["step"]) for s in states}
            if None in steps or len(steps) != 1:
                raise FastFVAEError("the runs of a pack must resume from the same step")
            adam.state[p] = {"step": torch.tensor(steps.pop(), dtype=torch.float32, device=p.device),
                             "exp_avg": torch.stack([s["exp_avg"] for s in states]),
                             "exp_avg_sq": torch.stack([s["exp_avg_sq"] for s in states])}
    return adam


def _optimizer_name(optimizer) -> str:
    if type(optimizer) is torch.optim.Adam:
        return "an Adam with options it does not take (weight decay, amsgrad, maximize, several groups)"
    return type(optimizer).__name__


def unstackable_adversary(cfg: TrainConfig) -> str | None:
    """What ``cfg``'s adversary optimiser is when a stacked pack cannot train it (it is not a plain
    torch Adam, `fastfvae.fast.step.plain_adam`); None when it can (or there is no adversary). Asked of the method's own optimiser builder on a stand-in parameter, so a
    sweep's plan knows it before any model is built."""
    from fastfvae.fast.step import plain_adam

    method = cfg.method()
    if not method.adversarial:
        return None
    optimizer = method.adversary_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.adam_eps)
    return None if plain_adam(optimizer) else _optimizer_name(optimizer)


def _write_adam_back(adam: torch.optim.Adam, optims: Sequence[torch.optim.Adam]) -> None:
    """Each run's optimiser state (the reference's format) from its slice of the stacked one."""
    stacked = adam.param_groups[0]["params"]
    if not all(p in adam.state for p in stacked):
        return
    for k, opt in enumerate(optims):
        saved = opt.state_dict()
        saved["state"] = {i: {"step": adam.state[p]["step"].clone(),
                              "exp_avg": adam.state[p]["exp_avg"][k].clone(),
                              "exp_avg_sq": adam.state[p]["exp_avg_sq"][k].clone()}
                          for i, p in enumerate(stacked)}
        opt.load_state_dict(saved)


#: The ways a pack's step can run (`make_pack_step`).
PACK_MECHANISMS = ("graph", "stacked", "threads")


def graph_applies(cfg: TrainConfig, device) -> bool:
    """True when ``cfg``'s single run on ``device`` would capture its step as one CUDA graph
    (`fastfvae.fast.step.FastOptions`: a fast run on CUDA with fused Adam, ``cuda_graph`` not
    turned off), so its pack does too (`GraphedPackStep`)."""
    return (torch.device(device).type == "cuda" and bool(cfg.fast) and cfg.cuda_graph is not False
            and bool(cfg.fused_adam))


def pack_mechanism(device: torch.device, requested: str | None = None, cfg: TrainConfig | None = None) -> str:
    """``requested`` checked, or the device's default: ``threads`` on CPU; on a GPU ``graph``
    when the runs' single run would be one CUDA graph (`graph_applies` for ``cfg``; off with
    ``cuda_graph=False``, ``--no-cuda-graph``), else ``stacked``."""
    kind = torch.device(device).type
    if requested is None:
        if kind == "cpu":
            return "threads"
        return "graph" if cfg is not None and graph_applies(cfg, device) else "stacked"
    if requested not in PACK_MECHANISMS:
        raise FastFVAEError(f"a pack's mechanism must be one of {', '.join(PACK_MECHANISMS)}, got {requested!r}")
    if requested == "threads" and kind != "cpu":
        raise FastFVAEError(f"the threaded pack is the CPU's (a GPU step draws its own noise and defers its syncs), "
                            f"and this pack trains on {kind}; use the stacked one")
    if requested == "graph" and kind != "cuda":
        raise FastFVAEError(f"the graphed pack is one CUDA graph and needs a CUDA device, and this pack trains on "
                            f"{kind}; use {'threads' if kind == 'cpu' else 'stacked'}")
    return requested


def make_pack_step(states: Sequence[TrainState], data, mechanism: str | None = None, workers: int | None = None,
                   cuda_rng_states: Sequence | None = None):
    """The step of a pack of ``states`` (all at the same step): `ThreadedPackStep` on CPU,
    `GraphedPackStep` on CUDA where the single run is graphed, `StackedPackStep` otherwise,
    unless ``mechanism`` names one (`PACK_MECHANISMS`); ``workers``: the threaded mechanism's
    worker threads (default: `ThreadedPackStep`'s); ``cuda_rng_states``: per run, the
    ``rng["torch_cuda"]`` of the checkpoint it resumes from (None for a fresh run), for the
    graphed pack's per-run noise generators. The step says which it is (``mechanism``)."""
    kind = pack_mechanism(states[0].device, mechanism, states[0].cfg)
    if workers is not None and kind != "threads":
        raise FastFVAEError(f"workers is a setting of the threaded pack mechanism, not of the {kind} one")
    if kind == "graph":
        return GraphedPackStep(states, data, cuda_rng_states=cuda_rng_states)
    if kind == "stacked":
        return StackedPackStep(states, data)
    return ThreadedPackStep(states, data, workers=workers)


class ThreadedPackStep:
    """A pack's step on CPU: each run's own single step, the K of them run concurrently on worker threads.

    Each run's step is the one its single run builds (`fastfvae.fast.make_fast_step` for a fast
    run, with the by-hand convolutions and discriminator, the space-to-depth layers and D's flat
    Adam in bf16; `make_reference_step` otherwise), so the pack adds no mechanism of its own and
    model k computes exactly what its single run computes with the same intra-op thread count.
    ``workers`` threads (default: one per intra-op thread of the process, at most K) take the
    models in turn; each worker runs its models with ``torch.get_num_threads() // workers``
    intra-op threads (at least 1), so a model's thread count, and with it every bit of its
    result, does not depend on which worker runs it. With one worker the steps run one after
    the other in the calling thread.

    Why threads: at batch 64 a step is hundreds of small oneDNN/MKL calls; split over the
    cores, each ends at a barrier, which costs the most when the cores are shared with other
    work (a descheduled thread stalls the others). One model per core has no barriers.
    The first step runs the models one at a time (each on a worker): a step's first call
    compiles what it compiles (bf16: D's flat Adam kernel) and builds its oneDNN primitives.

    ``__call__(inputs)`` (one `StepInputs` per run) returns the metrics as [K] tensors;
    `sync_state` writes each step's own state into its run's `TrainState`; `close` stops the workers.
    """

    mechanism = "threads"
    defers_sync = draws_own_noise = False

    def __init__(self, states: Sequence[TrainState], data, workers: int | None = None) -> None:
        from fastfvae.train.reference import make_reference_step

        self.states = list(states)
        cfg = self.states[0].cfg
        if cfg.fast:
            from fastfvae.fast import make_fast_step

            builder = make_fast_step
        else:
            builder = make_reference_step
        total = torch.get_num_threads()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise FastFVAEError(f"a threaded pack needs workers >= 1 (an integer), got {workers!r}")
        self._total_threads = total
        self.workers = min(len(self.states), total if workers is None else workers)
        self.threads_per_model = max(1, total // self.workers)
        self.steps = [builder(state, data) for state in self.states]
        self._pool = None
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastfvae-pack",
                                            initializer=torch.set_num_threads, initargs=(self.threads_per_model,))
        self._warm = False

    def __call__(self, inputs: Sequence) -> dict:
        if len(inputs) != len(self.steps):
            raise FastFVAEError(f"a pack of {len(self.steps)} runs takes {len(self.steps)} step inputs, got {len(inputs)}")
        if self._pool is None:
            outs = [step(i) for step, i in zip(self.steps, inputs)]
        elif not self._warm:
            outs = [self._pool.submit(step, i).result() for step, i in zip(self.steps, inputs)]
        else:
            outs = list(self._pool.map(lambda pair: pair[0](pair[1]), zip(self.steps, inputs)))
        self._warm = True
        return {name: torch.stack([out[name] for out in outs]) for name in outs[0]}

    def sync_state(self) -> None:
        for step in self.steps:
            sync = getattr(step, "sync_state", None)
            if sync is not None:
                sync()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            # The workers' torch.set_num_threads also set ATen's default for threads started
            # later; the caller's count is the process's again.
            torch.set_num_threads(self._total_threads)


class StackedPackStep:
    """The mechanism of `train_step` for K stacked runs, and the step that feeds it.

    ``__call__(inputs)`` takes one `StepInputs` per run (each drawn from that run's sampler and
    generator) and returns the metrics as [K] tensors; `sync_state` writes the stacked weights
    and optimiser state back into each run's `TrainState` (before a checkpoint or an evaluation).
    """

    mechanism = "stacked"
    #: the loop reads the metrics every step and draws each run's host noise
    defers_sync = draws_own_noise = False

    def __init__(self, states: Sequence[TrainState], data, capturable: bool = False) -> None:
        self.states, self.data = list(states), data
        cfgs = [s.cfg for s in self.states]
        self.device = self.states[0].device
        self.method = stacked_method(cfgs, self.device)
        self.shapes = StepShapes.of(cfgs[0], cfgs[0].method(), data)
        vaes = [s.models.vae for s in self.states]
        loop = self.device.type == "cpu"
        self.encoder = _Stacked([v.encoder for v in vaes], loop=loop)
        self.decoder = _Stacked([v.decoder for v in vaes], loop=loop)
        self.vae_params = self.encoder.params + self.decoder.params
        self.vae_opt = _stacked_adam([s.optims.vae for s in self.states], self.vae_params, capturable)
        self.disc = self.disc_opt = None
        self.disc_params: list[torch.Tensor] = []
        if self.method.adversarial:
            self.disc = _Stacked([s.models.disc for s in self.states])
            self.disc_params = self.disc.params
            self.disc_opt = _stacked_adam([s.optims.disc for s in self.states], self.disc_params, capturable)
            self.method.attach(self.adversary)
        self._render = self.shapes.obs is not None
        self.precision = cfgs[0].precision if cfgs[0].fast else "fp32"
        check_bf16_runs(self.precision, self.device, source="the pack's precision bf16")

    # --- the step ----------------------------------------------------------------------------
    def __call__(self, inputs: Sequence) -> dict:
        k, b = len(self.states), self.shapes.batch_size

        def stack(name):
            values = [getattr(i, name) for i in inputs]
            return None if values[0] is None else torch.stack(values).to(self.device)

        def images(rows_name, obs_name):
            rows = [getattr(i, rows_name) for i in inputs]
            if rows[0] is None:
                return None
            x = self.data.float_batch(np.concatenate(rows), self.device)
            if self._render:
                noise = torch.cat([getattr(i, obs_name) for i in inputs]).to(self.device)
                x = self.data.render(x, noise)
            return x.view(k, b, *x.shape[1:])

        step = self.states[0].step
        return train_step(self, self.method, images("rows", "obs"), images("rows2", "obs2"), stack("eps"),
                          stack("eps2"), stack("keys"), step)

    def sync_state(self) -> None:
        self.encoder.write_back()
        self.decoder.write_back()
        _write_adam_back(self.vae_opt, [s.optims.vae for s in self.states])
        if self.disc is not None:
            self.disc.write_back()
            _write_adam_back(self.disc_opt, [s.optims.disc for s in self.states])

    def close(self) -> None:
        """Nothing to stop (the threaded mechanism's counterpart stops its workers)."""

    # --- the mechanism ---------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast for the networks with ``precision="bf16"`` (the fast path's)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, x):
        with self.autocast():
            mu, logvar = self.encoder(x)
        return mu.float(), logvar.float()

    def decode(self, z):
        with self.autocast():
            return self.decoder(z).float()

    def recon_loss(self, logits, x):
        """The Bernoulli reconstruction loss of each run ([K] values: `fastfvae.objectives.recon_loss`)."""
        return recon_loss(logits, x)

    def sample_kl(self, mu, logvar, eps):
        return reparameterize(mu, logvar, eps), gaussian_kl(mu, logvar)

    def permute(self, z, keys):
        return permute_dims(z, keys)

    def adversary(self, z):
        with self.autocast():
            return self.disc(z).float()

    def adversary_pair(self, z_q, z_perm, logits_q=None):
        if logits_q is not None:
            return logits_q, self.adversary(z_perm)
        both = self.adversary(torch.cat([z_q, z_perm], dim=-2))
        b = z_q.shape[-2]
        return both[..., :b, :], both[..., b:, :]

    def vae_update(self, loss, retain_graph: bool = False) -> None:
        loss.sum().backward(inputs=self.vae_params, retain_graph=retain_graph)
        self.vae_opt.step()
        self.vae_opt.zero_grad(set_to_none=True)

    def adversary_update(self, loss, logits_q=None, logits_p=None) -> None:
        loss.sum().backward(inputs=self.disc_params)
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)


def pack_noise_generator(cfg: TrainConfig, device, saved_cuda_states=None, step: int = 0) -> torch.Generator:
    """Run ``cfg``'s own noise generator on ``device`` for a graphed pack at ``step``, as its
    single graphed run has it in the device's default generator, so that a pack's run and the
    single run continue identically:

    - a fresh run (``step`` 0): seeded ``noise_seed(cfg.seed)`` (the single fast step's
      ``torch.cuda.manual_seed``);
    - a resumed run whose checkpoint saved a state for this device (``rng["torch_cuda"]``, one
      state per device, as `capture_rng_states` writes it: a single run's checkpoint and a
      pack's read the same): that state;
    - a resumed run whose checkpoint has none (a CPU run's): the single run neither restores
      nor re-seeds the device generator then (the fast step seeds it at step 0 only), so it
      draws from where `build_models`' ``torch.manual_seed(cfg.seed)`` left it: seeded
      ``cfg.seed``, and so is this one.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    seed = pack_noise_seed(cfg, device, saved_cuda_states, step)
    if seed is None:
        generator.set_state(_saved_device_state(device, saved_cuda_states, step))
    else:
        generator.manual_seed(seed)
    return generator


def _saved_device_state(device: torch.device, saved_cuda_states, step: int):
    index = _device_index(device)
    if step > 0 and saved_cuda_states is not None and len(saved_cuda_states) > index:
        return saved_cuda_states[index]
    return None


def pack_noise_seed(cfg: TrainConfig, device, saved_cuda_states=None, step: int = 0) -> int | None:
    """The seed `pack_noise_generator` gives run ``cfg``'s generator at ``step`` (None: it takes
    the checkpoint's saved state instead): ``noise_seed(cfg.seed)`` for a fresh run, ``cfg.seed``
    for one resumed from a checkpoint without this device's generator state."""
    from fastfvae.train.state import noise_seed

    if _saved_device_state(torch.device(device), saved_cuda_states, step) is not None:
        return None
    return noise_seed(cfg.seed) if step == 0 else cfg.seed


def _device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.current_device() if device.index is None else device.index


class GraphedPackStep(StackedPackStep):
    """`StackedPackStep` captured as one CUDA graph, replayed once per step (on CUDA where the
    runs' single run is graphed: `graph_applies`).

    The same ideas as the single run's `fastfvae.fast.graph.GraphedStep`, with its pieces:
    static inputs (every run's rows and the step count as one int64 `StagedInputs` copy of
    [K, B] rows), a capturable fused Adam over the stacked tensors, `warm_up_and_capture`
    (warm-up on a side stream, then weights, Adam state and generators put back in place, so the
    captured addresses stay valid and the warm-up leaves no trace), the metrics as one stacked
    [metrics, K] matrix cloned per step (no host synchronisation: ``defers_sync``, the loop checks
    NaN/inf before it next reads or uses the weights: `fastfvae.train.loop.deferred_check_due`).

    Noise (``noise="device"``, the default, as the single graph's): drawn inside the graph, run
    k's from its own device generator (`pack_noise_generator`: seeded and checkpointed as the
    single run seeds and saves the device's default generator), registered with the graph, in the
    single run's order (`draw_noise`): so model k of the pack draws exactly the noise of the single
    graphed run with its seed, and each run's checkpoint carries its own generator state
    (`cuda_rng_state`). What it costs: before each replay torch writes every registered
    generator's seed and offset into the graph's device copies of them (a few tiny copies per run
    per step, host-launched), the price of K independent streams. ``noise="host"``: the runs'
    host-drawn noise is copied in (one float32 `StagedInputs` copy), the reference's stream.

    On CPU (the tests) the step binds the same static inputs and generators, runs the warm-up and
    undoes it, and then runs the iteration eagerly each step instead of replaying a graph.
    """

    mechanism = "graph"
    defers_sync = True

    def __init__(self, states: Sequence[TrainState], data, noise: str | None = None, warmup: int | None = None,
                 cuda_rng_states: Sequence | None = None) -> None:
        from fastfvae.fast.graph import WARMUP_STEPS

        states = list(states)
        device = states[0].device
        super().__init__(states, data, capturable=device.type == "cuda")
        cfg = states[0].cfg
        noise = (cfg.noise if cfg.noise != "auto" else "device") if noise is None else noise
        if noise not in ("host", "device"):
            raise FastFVAEError(f"a graphed pack's noise must be host or device, got {noise!r}")
        self.noise = noise
        self.draws_own_noise = noise == "device"
        saved = list(cuda_rng_states) if cuda_rng_states is not None else [None] * len(states)
        if len(saved) != len(states):
            raise FastFVAEError(f"{len(saved)} saved generator states for a pack of {len(states)} runs")
        self.generators = [pack_noise_generator(s.cfg, device, r, s.step) for s, r in zip(states, saved)]
        self._bind()
        optims = [o for o in (self.vae_opt, self.disc_opt) if o is not None]
        self.graph, self.out = None, None
        graph, out = _graph_api().warm_up_and_capture(
            self._run, self.vae_params + self.disc_params, optims, device,
            WARMUP_STEPS if warmup is None else warmup, self.generators if self.draws_own_noise else ())
        self.graph, self.out = graph, out

    def _bind(self) -> None:
        """The static inputs on the pack's device (no CUDA needed: the tests bind on CPU)."""
        from fastfvae.data.loaders.device import resident_images
        from fastfvae.train.progress import METRIC_KEYS

        self.metric_keys = tuple(METRIC_KEYS[:3]) + tuple(self.method.metric_names)
        # every run's rows (and the step count the regulariser sees) reach the graph as one int64 copy
        _graph_api().bind_static_inputs(self, self.shapes, self.device, runs=len(self.states))
        #: the dataset resident on the device, as stored (the single graph's device loader's)
        self.packed = resident_images(self.data, self.device)

    def _images(self, rows, obs):
        from fastfvae.data.loaders.unpack import gather_batch

        if rows is None:
            return None
        k, b = rows.shape
        x = gather_batch(self.packed, rows.reshape(k * b))
        if obs is not None:
            x = self.data.render(x, obs.reshape(k * b, *obs.shape[2:]))
        return x.view(k, b, *x.shape[1:])

    def _run(self) -> torch.Tensor:
        """The captured iteration: static inputs -> metrics [len(metric_keys), K]."""
        if self.draws_own_noise:
            self._draw_noise()
        metrics = train_step(self, self.method, self._images(self.rows, self.obs), self._images(self.rows2, self.obs2),
                             self.eps, self.eps2, self.keys, self.step_count)
        return torch.stack([metrics[name].float() for name in self.metric_keys])

    def _draw_noise(self) -> None:
        """Run k's noise into row k of the static noise inputs, from run k's generator."""
        draw = _graph_api().draw_noise
        for i, generator in enumerate(self.generators):
            draw([None if t is None else t[i] for t in (self.eps, self.eps2)],
                 [None if t is None else t[i] for t in (self.keys, self.obs, self.obs2)], generator)

    def __call__(self, inputs: Sequence) -> dict:
        if len(inputs) != len(self.states):
            raise ValueError(f"{len(inputs)} step inputs for a pack of {len(self.states)} runs")
        rows = [np.stack([i.rows for i in inputs])]
        if self.rows2 is not None:
            rows.append(np.stack([i.rows2 for i in inputs]))
        self.row_inputs.load(rows + [np.int64(self.states[0].step)])
        if not self.draws_own_noise:
            names = ["eps"] + (["eps2"] if self.eps2 is not None else []) + (["keys"] if self.keys is not None else [])
            names += (["obs"] if self.obs is not None else []) + (["obs2"] if self.obs2 is not None else [])
            self.noise_inputs.load([torch.stack([getattr(i, n) for i in inputs]) for n in names])
        if self.graph is not None:
            self.graph.replay()
            out = self.out.clone()
        else:
            out = self._run()
        return PackMetrics(out, self.metric_keys)

    def cuda_rng_state(self, i: int, states: list) -> list:
        """``states`` (a checkpoint's ``rng["torch_cuda"]``: one state per device) with this
        device's entry run ``i``'s own generator state: what the single run's checkpoint holds
        there (its default generator), so either resumes the other."""
        if not self.draws_own_noise:
            return states
        index = _device_index(self.device)
        states = list(states)
        states += [self.generators[i].get_state()] * (index + 1 - len(states))
        states[index] = self.generators[i].get_state()
        return states


def _graph_api():
    from fastfvae.fast import graph

    return graph


class PackMetrics(dict):
    """A pack step's metrics: name -> [K] tensor, each a row of one [metrics, K] matrix
    (``matrix``), which the pack's loop sums in one operation a step (`_PackMeter`)."""

    def __init__(self, matrix: torch.Tensor, names) -> None:
        names = tuple(names)
        if matrix.dim() != 2 or matrix.shape[0] != len(names):
            raise ValueError(f"pack metrics: {len(names)} names for a matrix of shape {tuple(matrix.shape)}")
        super().__init__((name, matrix[i]) for i, name in enumerate(names))
        self.matrix, self.names = matrix, names


class _PackMeter:
    """Interval sums of a pack's metric matrices (one device addition a step, no sync) and each
    run's means in `IntervalMeter`'s format (the loop's names first, None where never seen)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.names: tuple[str, ...] = ()
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: PackMetrics) -> None:
        matrix = metrics.matrix.detach().float()
        self.sums = matrix if self.sums is None else self.sums + matrix
        self.names = metrics.names
        self.count += 1

    def finite(self) -> list[bool]:
        """Per run: the summed metrics the single run checks (`CHECKED_METRICS`) finite (one
        device-to-host read); another metric (a plug-in's) may be NaN/inf without stopping it."""
        rows = [self.names.index(k) for k in single.CHECKED_METRICS if k in self.names]
        return torch.isfinite(self.sums[rows]).all(dim=0).tolist()

    def flush(self) -> tuple[list[dict], float]:
        from fastfvae.train.progress import METRIC_KEYS

        now = time.perf_counter()
        n = max(self.count, 1)
        totals = self.sums.T.tolist()  # [K][metrics]
        names = list(METRIC_KEYS) + [k for k in self.names if k not in METRIC_KEYS]
        means = [{k: (row[self.names.index(k)] / n if k in self.names else None) for k in names} for row in totals]
        rate = self.count / max(now - self.t0, 1e-9)
        self.sums, self.count, self.t0 = None, 0, now
        return means, rate


# --- the pack's loop --------------------------------------------------------------------------
def _unfinished(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    return [cfg for cfg in configs if not finished(cfg)]


def pack_evaluation(configs: Sequence[TrainConfig], data):
    """The runs' evaluation through training, from their config (``eval_every``, ``eval_metrics``,
    ``eval_budget``: shared by a pack's runs): ``evaluate(step, vaes)`` scores the K VAEs together
    (one pass over the images, `periodic_pack_evaluation`) and appends each one's line to its
    run's ``eval_log.jsonl``; None when the runs do not evaluate. Checked here, before training."""
    cfg0 = configs[0]
    if not cfg0.eval_every:
        return None
    from fastfvae.metrics.periodic import periodic_pack_evaluation

    return periodic_pack_evaluation(cfg0.eval_every, data, [c.out for c in configs], cfg0.eval_metrics,
                                    budget=cfg0.eval_budget)


def train_pack(configs: Sequence[TrainConfig], *, data=None, progress: bool = True, console=None,
               callbacks_for=None, evaluate: bool = True) -> list[single.RunResult | None]:
    """Train the runs of a pack together (`make_pack_step`: see the module docstring); returns one
    `RunResult` per config (None for a run that was already finished). ``callbacks_for(cfg,
    data)``: more per-step callbacks of each run, called with that run's state (synced from the
    pack first at its evaluation steps). ``evaluate``: score the runs through training as their
    configs say (`pack_evaluation`; the K models encode the images together)."""
    configs = [cfg.validate() for cfg in configs]
    check_pack(configs)
    todo = _unfinished(configs)
    if not todo:
        return [None] * len(configs)
    # The dataset loads on first use, once, shared by the training and its evaluation (so a bad
    # run folder fails before the slow load).
    data = single.lazy_training_data(todo[0]) if data is None else functools.cache(data) if callable(data) else data
    evaluation = pack_evaluation(todo, data) if evaluate else None  # bad settings: before anything
    if len(todo) == 1:  # a pack of one is a single run: the single fast step is the faster mechanism
        cfg = todo[0]
        resume = cfg.out if checkpoint_path(cfg.out).exists() else None
        callbacks = list(callbacks_for(cfg, data)) if callbacks_for is not None else []
        if evaluation is not None:
            callbacks.append(lambda state, metrics: evaluation(state.step, [state.models.vae]))
        result = single.run_training(cfg, data=data, resume=resume, progress=progress, console=console,
                                     callbacks=callbacks)
        return [result if c is cfg else None for c in configs]
    device = resolve_device(todo[0].device)
    results: dict[str, single.RunResult] = {}
    with single._StopOnSignals() as stop:
        folders, step = [], None
        try:
            for cfg in todo:
                resuming = checkpoint_path(cfg.out).exists()
                single.check_out(Path(cfg.out), resuming)
                folders.append(single._OwnedFolder(Path(cfg.out)))
                remove_stale_temp_files(Path(cfg.out), single.RUN_FILES)
            if callable(data):
                data = data()
            states, payloads = [], []
            for cfg in todo:
                state = TrainState.create(cfg, len(data), device)
                payload = load_checkpoint(cfg.out) if checkpoint_path(cfg.out).exists() else None
                if payload is not None:
                    saved = TrainConfig.from_dict(payload["config"])
                    conflicts = single.resume_conflicts(saved, cfg)
                    if conflicts:
                        raise FastFVAEError(f"cannot resume {checkpoint_path(cfg.out)}: it was trained with different "
                                            f"{', '.join(conflicts)}")
                    restore_state(state, payload, checkpoint_path(cfg.out))
                states.append(state)
                payloads.append(payload)
            if len({s.step for s in states}) != 1:
                raise FastFVAEError("the runs of a pack must be at the same step; train them as separate packs")
            step = make_pack_step(states, data, cuda_rng_states=[
                None if p is None else p.get("rng", {}).get("torch_cuda") for p in payloads])
            callbacks = [callbacks_for(cfg, data) if callbacks_for is not None else () for cfg in todo]
            if stop.requested:  # during set-up: nothing to save yet
                raise single._stopped_before_training(stop.signum, _kept_before_training(payloads))
        except BaseException:
            if step is not None:
                step.close()
            for folder in folders:
                folder.abandon()
            raise
        try:
            for state, result in zip(states, _train_pack(todo, states, payloads, step, data, callbacks, evaluation,
                                                         stop, progress, console)):
                results[state.cfg.out] = result
        finally:
            step.close()
            for folder in folders:
                folder.release()
    return [results.get(cfg.out) for cfg in configs]


def _kept_before_training(payloads) -> str:
    """What a pack stopped before its first step leaves: its runs' checkpoints as they were."""
    if all(p is None for p in payloads):
        return "no checkpoint was written"
    return f"each run's checkpoint is unchanged (step {next(p for p in payloads if p is not None)['state']['step']})"


def _train_pack(cfgs, states, payloads, step, data, callbacks, evaluation, stop, progress, console):
    """The steps of `train_pack` in the folders it owns; one `RunResult` per run."""
    cfg0, k = cfgs[0], len(cfgs)
    logs = [MetricLog(Path(c.out)) for c in cfgs]
    for cfg, payload, log in zip(cfgs, payloads, logs):
        out = Path(cfg.out)
        if payload is not None:
            log.truncate_after(int(payload["state"]["step"]))
            MetricLog(out, EVAL_LOG_NAME).truncate_after(int(payload["state"]["step"]))
        else:
            for name in (LOG_NAME, EVAL_LOG_NAME):
                (out / name).unlink(missing_ok=True)
        atomic_write_text(out / "config.json", cfg.to_json() + "\n")
    elapsed0 = [float(p.get("elapsed_s", 0.0)) if p is not None else 0.0 for p in payloads]
    last = [dict(p.get("metrics", {})) if p is not None else {} for p in payloads]
    # A step that defers host syncs (the graphed pack) gives its metrics as one matrix: one meter
    # sums it, and NaN/inf is checked before the loop next reads or uses the weights
    # (`fastfvae.train.loop.deferred_check_due`, the single run's rule).
    deferred = bool(getattr(step, "defers_sync", False))
    own_rng = getattr(step, "cuda_rng_state", None)
    host_noise = not getattr(step, "draws_own_noise", False)
    meters = [IntervalMeter() for _ in range(k)]
    pack_meter = _PackMeter() if deferred else None
    shapes = [StepShapes.of(c, data=data) for c in cfgs]
    t_start, step0 = time.perf_counter(), states[0].step
    evaluates = bool(cfg0.eval_every) and (evaluation is not None or any(callbacks))

    def check_and_save():
        step.sync_state()
        for cfg, state in zip(cfgs, states):
            bad = single.nonfinite_state(state)
            if bad is not None:
                raise single.TrainingDiverged(f"{cfg.out}: {bad} became NaN/inf (found at step {state.step}); the pack "
                                              f"stopped, each run's last good checkpoint is kept",
                                              outs=(cfg.out,), step=state.step)
        for i, (cfg, state) in enumerate(zip(cfgs, states)):
            rng = capture_rng_states()
            if own_rng is not None:  # each run's own device generator, where its single run keeps it
                rng["torch_cuda"] = own_rng(i, rng["torch_cuda"])
            save_checkpoint(Path(cfg.out), {"config": cfg.to_dict(), "state": state.state_dict(), "rng": rng,
                                            "elapsed_s": elapsed0[i] + time.perf_counter() - t_start,
                                            "metrics": last[i]})

    def flush(bar):
        if pack_meter is not None:
            if not pack_meter.count:
                return
            per_run, rate = pack_meter.flush()
        for i, (cfg, state, meter, log) in enumerate(zip(cfgs, states, meters, logs)):
            if pack_meter is not None:
                means = per_run[i]
            elif not meter.count:
                continue
            else:
                means, rate = meter.flush()
            last[i] = means
            log.write({"step": state.step, **means, "steps_per_s": rate,
                       "elapsed_s": elapsed0[i] + time.perf_counter() - t_start})
        bar.update(states[0].step, last[0], None)

    status = "completed"
    with TrainProgress(cfg0.steps, step0, progress, console) as bar:
        while states[0].step < cfg0.steps:
            if stop.requested:
                if states[0].step == step0:  # after set-up, before any step: still nothing to save
                    raise single._stopped_before_training(stop.signum, _kept_before_training(payloads))
                status = "interrupted"
                break
            inputs = [draw_step_inputs(s, st.sampler, st.generator, noise=host_noise) for s, st in zip(shapes, states)]
            metrics = step(inputs)
            for state in states:
                state.step += 1
            n = states[0].step
            per_run = None
            if pack_meter is not None:
                pack_meter.add(metrics)
                due = single.deferred_check_due(cfg0, n, stop.requested, evaluates and n % cfg0.eval_every == 0)
                finite = pack_meter.finite() if due else [True] * k
            else:
                per_run = [{name: value[i] for name, value in metrics.items()} for i in range(k)]
                for meter, m in zip(meters, per_run):
                    meter.add(m)
                checked = [metrics[key] for key in single.CHECKED_METRICS if key in metrics]
                finite = torch.isfinite(torch.stack([v.float() for v in checked])).all(dim=0).tolist()
            if not all(finite):
                bad = [c.out for c, ok in zip(cfgs, finite) if not ok]
                when = f"at step {n}" if pack_meter is None else f"by step {n}"
                raise single.TrainingDiverged(f"loss became NaN/inf {when} in {', '.join(bad)}; the pack stopped, "
                                              f"each run's last good checkpoint is kept", outs=bad, step=n)
            if n % cfg0.log_every == 0 or n == cfg0.steps:
                flush(bar)
            else:
                bar.update(n)
            if evaluates and n % cfg0.eval_every == 0:
                step.sync_state()
                if evaluation is not None:
                    evaluation(n, [state.models.vae for state in states])
            if any(callbacks):
                if per_run is None:
                    per_run = [{name: value[i] for name, value in metrics.items()} for i in range(k)]
                for cbs, state, m in zip(callbacks, states, per_run):
                    for callback in cbs:
                        callback(state, m)
            if cfg0.ckpt_every and n % cfg0.ckpt_every == 0 and n < cfg0.steps:
                check_and_save()
        flush(bar)
    seconds = time.perf_counter() - t_start
    check_and_save()
    stop_signal = (stop.signum or single.signal.SIGINT) if status == "interrupted" else None
    return [single.RunResult(state, Path(cfg.out), status, checkpoint_path(cfg.out), last[i], data, stop_signal,
                             state.step - step0, seconds) for i, (cfg, state) in enumerate(zip(cfgs, states))]
