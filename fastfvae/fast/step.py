"""The fast training step: `fastfvae.train.step.train_step` over faster mechanisms.

`make_fast_step(state, data, options)` is a ``step_builder`` for `fastfvae.train.loop.run_training`:
it returns a `StepFn` taking the same `StepInputs` (drawn in the documented order) and running
the same algorithm — `train_step` and the method's own regulariser and adversary step — with
`FastStep` as the mechanism, so with fp32 it computes what the reference computes, up to float
round-off. What the mechanism does differently, and why each change leaves the result unchanged:

1. An adversary's two halves in one pass: updates that cannot reuse the TC term's logits run
   D once on the concatenation [z_q; permuted z_p] (one 2B GEMM chain instead of two B ones;
   the loss is formed from the two halves).
2. Fused Adam (one kernel over all tensors; capturable on CUDA) instead of the per-tensor loop,
   for the VAE and for an adversary whose method builds a plain Adam (`plain_adam`); any other
   adversary optimiser is stepped as built, as in the reference step (without a CUDA graph).
3. Convolutions in channels_last (oneDNN's native layout on CPU, NHWC tensor cores on GPU).
4. Optional bf16 autocast (``precision="bf16"``) for the networks; the losses, the method's
   regulariser and the optimiser state stay fp32.
5. Batches come from the dataset resident on the device, as stored (bit-packed or uint8;
   ``--loader device``): gather + unpack are part of the step; or from the torch/DALI loaders,
   in the same order. Observation noise (colour / noisy dSprites) is rendered on the device.
6. On CPU (no compilation): the convolutions' bias gradients as plain sums outside oneDNN's
   weight-gradient primitive (`fastfvae.fast.conv`), with bf16 the reconstruction loss of the
   bf16 logits as one native pass each way (`fastfvae.ops.native_recon`), and D's
   forward/backward written out (`fastfvae.fast.disc_by_hand`): D(z) for the regulariser is an
   autograd node whose backward is D's input gradient only, D's parameter gradient for both
   halves is one 2B-row pass. With
   bf16 the layers run in bf16 with explicit casts instead of autocast, and D's Adam is one
   compiled kernel over flat buffers (`fastfvae.fast.flat_adam`: bf16 gradient in, bf16 weights out).
7. On CUDA the whole iteration (batch, VAE forward/backward, adversary updates, both Adam
   updates) is compiled (Inductor) and captured as one CUDA graph (`fastfvae.fast.graph`): one
   replay per step, no host synchronisation; metrics stay on the device until the loop logs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fastfvae.errors import FastFVAEError
from fastfvae.fast import conv as by_hand
from fastfvae.fast.allocator import keep_freed_memory
from fastfvae.fast.disc_by_hand import DiscriminatorByHand
from fastfvae.fast.flat_adam import FlatAdam
from fastfvae.fast.impl import OpSet, fused_ops_available, select_ops
from fastfvae.fast.optim import FastAdam, fast_optimizers
from fastfvae.fast.precision import autocast, check_bf16_runs, check_precision
from fastfvae.objectives import recon_loss
from fastfvae.ops import native_recon
from fastfvae.train.config import COMPILE_MODES, LOADERS
from fastfvae.train.step import StepInputs, StepShapes, train_step


@dataclass(frozen=True)
class FastOptions:
    """How the fast step runs. ``None`` / ``"auto"`` fields resolve per device (`resolved`)."""

    precision: str = "fp32"          # "fp32" (parity) or "bf16" (autocast)
    loader: str = "device"           # where batches come from: device | torch | dali
    compile: str = "auto"            # none | model (torch.compile the networks) | auto
    channels_last: bool = True
    fused_adam: bool = True
    fused_ops: bool | None = None    # fastfvae.ops Triton ops; None = on CUDA when available
    cuda_graph: bool | None = None   # capture the whole step as one CUDA graph; None = on CUDA
    noise: str = "auto"              # host (the reference's stream) | device (in-graph); auto:
                                     # device with a CUDA graph, else host
    by_hand: bool | None = None      # split-backward convolutions + D written out (6.);
                                     # None = when nothing is compiled or captured (CPU)
    native_d: bool | None = None     # the by-hand D on the native library (fastfvae.ops.native_mlp:
                                     # forward, input grad, fused grads + Adam); None = on the CPU
                                     # by-hand step where the library is loaded with an AVX-512
                                     # GEMM (`native_mlp.default_here`) and D and its optimiser
                                     # fit it (a plain Adam, Linear/LeakyReLU layers)

    def resolved(self, device: torch.device) -> "FastOptions":
        check_bf16_runs(check_precision(self.precision), device, source="precision bf16")
        if self.loader not in LOADERS:
            raise FastFVAEError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.compile not in COMPILE_MODES:
            raise FastFVAEError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        cuda = device.type == "cuda"
        fused_ops = (cuda and fused_ops_available()) if self.fused_ops is None else self.fused_ops
        # On CPU, compiling the networks does not pay (convolutions and GEMMs are oneDNN/MKL
        # calls either way; docs/dropped-levers.md): eager is the CPU default.
        compile_mode = ("model" if cuda else "none") if self.compile == "auto" else self.compile
        cuda_graph = cuda if self.cuda_graph is None else self.cuda_graph
        if cuda_graph and not cuda:
            raise FastFVAEError("cuda_graph needs a CUDA device")
        if cuda_graph and not self.fused_adam:  # the reference Adam is not capturable
            raise FastFVAEError("fused_adam=False needs cuda_graph=False (the CUDA graph captures the "
                                "fused, capturable Adam; the reference Adam cannot be captured)")
        noise = ("device" if cuda_graph else "host") if self.noise == "auto" else self.noise
        if noise not in ("host", "device") or (noise == "device" and not cuda_graph):
            raise FastFVAEError(f"noise must be host, or device with a CUDA graph, got {self.noise!r}")
        eager = compile_mode == "none" and not cuda_graph
        by_hand = eager if self.by_hand is None else self.by_hand
        if by_hand and not eager:
            raise FastFVAEError("by_hand needs an eager step (compile='none', no CUDA graph)")
        if self.native_d and not (by_hand and device.type == "cpu"):
            raise FastFVAEError("native_d needs the by-hand CPU step (a CPU device, compile='none', by_hand)")
        native_d = self.native_d
        if native_d is None:
            from fastfvae.ops import native_mlp

            # None stays None where it would apply: the step then tries it and falls back quietly
            native_d = None if by_hand and device.type == "cpu" and native_mlp.default_here() else False
        return replace(self, fused_ops=fused_ops, compile=compile_mode, cuda_graph=cuda_graph, noise=noise,
                       by_hand=by_hand, native_d=native_d)

    @property
    def draws_own_noise(self) -> bool:
        """True (resolved options) when the step draws eps/keys inside the CUDA graph: the loop
        then draws no host noise for it."""
        return bool(self.cuda_graph) and self.noise == "device"


def plain_adam(optimizer: torch.optim.Optimizer) -> bool:
    """True when the fast step's own Adam (`FastAdam`, and `FlatAdam` in bf16 on CPU) computes
    what ``optimizer`` computes: exactly `torch.optim.Adam` (not a subclass such as AdamW), one
    parameter group, no weight decay, amsgrad, maximize or differentiable option. They are built
    from its lr, betas and eps alone, so any other optimiser an adversarial method returns runs as
    it was built (docs/methods.md, "A method with an adversary")."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    return not (group.get("weight_decay") or group.get("amsgrad") or group.get("maximize")
                or group.get("differentiable") or group.get("decoupled_weight_decay"))


def _is_channels_last(module: torch.nn.Module) -> bool:
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in module.parameters() if p.dim() == 4)


class _ByHandAdversary(torch.autograd.Function):
    """D(z) by hand (rows 0:B of its activation buffer) as an autograd node whose backward is
    D's input gradient only: the VAE loss's TC term reaches z, never D's parameters."""

    @staticmethod
    def forward(ctx, z, d):
        ctx.d = d
        return d.forward(z.detach())

    @staticmethod
    def backward(ctx, grad_logits):
        return ctx.d.input_grad(grad_logits), None


class FastStep:
    """The fast step for one `TrainState`: a mechanism of `fastfvae.train.step.train_step`.

    Call with `StepInputs`; returns 0-dim metric tensors. The algorithm is `train_step` and the
    method's own code; this class only says how each piece runs (the numbered list of the module docstring)."""

    def __init__(self, state, data, options: FastOptions | None = None) -> None:
        self.state, self.cfg, self.device, self.data = state, state.cfg, state.device, data
        opts = options or FastOptions()
        # an adversary optimiser the fast Adam cannot stand in for runs as the method built it
        own_disc_optim = state.optims.disc is not None and not plain_adam(state.optims.disc)
        if own_disc_optim:
            if opts.cuda_graph:
                raise FastFVAEError(f"the CUDA graph captures a plain torch Adam only (as the fast step's fused Adam), "
                                    f"and {self.cfg.model}'s adversary optimiser is "
                                    f"{type(state.optims.disc).__name__}; train with --no-cuda-graph")
            if opts.cuda_graph is None:
                opts = replace(opts, cuda_graph=False)
        self.options = opts = opts.resolved(self.device)
        self.method = self.cfg.method()
        self.shapes = StepShapes.of(self.cfg, self.method, data)
        self.second = self.shapes.second_batch
        vae, disc = state.models
        if opts.channels_last and not _is_channels_last(vae):
            # a state built for the reference step: the layout changes, not one value
            vae.to(memory_format=torch.channels_last)
        #: the step's own optimisers (fused Adam), started from the state's and written back into
        #: them by `sync_state`; without fused Adam the state's own
        self.optims = fast_optimizers(state.optims) if opts.fused_adam and not own_disc_optim else state.optims
        if own_disc_optim and opts.fused_adam:  # the method's own optimiser, stepped as the reference's
            self.optims = type(state.optims)(FastAdam(state.optims.vae), state.optims.disc)
        self.vae_params = list(vae.parameters())
        self.disc_params = [] if disc is None else list(disc.parameters())
        self.ops: OpSet = select_ops(disc, bool(opts.fused_ops))
        self._encode, self._decode, self._disc = vae.encode, vae.decode, self.ops.disc
        if opts.compile == "model":
            self._encode, self._decode = torch.compile(vae.encode), torch.compile(vae.decode)
            self._disc = None if disc is None else torch.compile(self.ops.disc)
        self._batches = _BatchSource(opts.loader, data, state, self.device, opts.channels_last)
        self._render = self.shapes.obs is not None
        self._dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
        #: image-side layers in space-to-depth form (`fastfvae.fast.conv`: oneDNN's one-channel
        #: kernels are slow). bf16 and stored one-channel observations only: in fp32 its different
        #: summation order reaches Adam's near-zero-gradient elements (second moment ~1e-11),
        #: which Adam moves by ~lr whatever their sign, beyond the fp32 parity tolerance
        #: (docs/fast-path.md)
        self._s2d = opts.by_hand and opts.precision == "bf16" and vae.channels == 1 and not self._render
        self._d_by_hand = self._flat_adam = None
        if opts.native_d is not False and disc is not None:
            self._d_by_hand = _native_discriminator(disc, 2 * self.cfg.batch_size, self._dtype,
                                                    None if own_disc_optim else self.optims.disc,
                                                    required=bool(opts.native_d))
        self.options = opts = replace(opts, native_d=self._d_by_hand is not None)
        if self._d_by_hand is None and opts.by_hand and disc is not None:
            self._d_by_hand = DiscriminatorByHand(disc, 2 * self.cfg.batch_size, self._dtype)
            if opts.precision == "bf16" and self.device.type == "cpu" and not own_disc_optim:
                # D's update as one compiled kernel over flat buffers (`fastfvae.fast.flat_adam`)
                self._flat_adam = FlatAdam(self.optims.disc, self.disc_params, self._dtype)
                self._d_by_hand.use_flat(self._flat_adam)
        if self.method.adversarial:
            self.method.attach(self.adversary)
        if self.device.type == "cpu":
            keep_freed_memory()
        self._graph = None
        #: True when metrics must not be read every step (the loop checks them at log time).
        self.defers_sync = bool(opts.cuda_graph)
        #: True when the step ignores the inputs' noise (the loop then draws rows only).
        self.draws_own_noise = opts.draws_own_noise
        if opts.cuda_graph:
            from fastfvae.fast.graph import GraphedStep
            from fastfvae.train.state import noise_seed

            if state.step == 0:  # a resumed run has its CUDA generator state from the checkpoint
                torch.cuda.manual_seed(noise_seed(self.cfg.seed))
            self._graph = GraphedStep(self, noise=opts.noise)

    def sync_state(self) -> None:
        """Write what the step keeps of its own (its optimisers' state; with the flat Adam, D's
        weights and moments in flat buffers) into the `TrainState` it was given, in the
        reference's format: the loop calls this before it checks, saves or returns the state."""
        if self._flat_adam is not None:
            self._flat_adam.write_back()
            self._d_by_hand.weights_written()  # the parameters now equal the flat weights
        for own, theirs in zip(self.optims, self.state.optims):
            if own is not None and own is not theirs:
                theirs.load_state_dict(own.state_dict())

    # --- the iteration -------------------------------------------------------------------
    def __call__(self, inputs: StepInputs) -> dict:
        if self._graph is not None:
            return self._graph(inputs)
        to = self.device

        def dev(t):
            return None if t is None else t.to(to)

        x, x2 = self._batches.images(inputs, s2d=self._s2d)
        x, x2 = self.observe(x, dev(inputs.obs)), None if x2 is None else self.observe(x2, dev(inputs.obs2))
        return self.body(x, x2, dev(inputs.eps), dev(inputs.eps2), dev(inputs.keys), self.state.step)

    def observe(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The dataset's rendering of a batch with its observation noise (colour, background)."""
        if not self._render:
            return x
        return self.data.render(x, noise).contiguous(memory_format=self._batches.format)

    def body(self, x, x2, eps, eps2, keys, step) -> dict:
        """One iteration on device tensors; no host synchronisation (graph-capturable)."""
        if self._flat_adam is not None and self._flat_adam.ensure_bound():
            self._d_by_hand.parameters_changed()  # a load replaced D's optimiser state: new flat buffers
        return train_step(self, self.method, x, x2, eps, eps2, keys, step)

    # --- the mechanism: how each piece of `train_step` runs ----------------------------------
    def autocast(self):
        return autocast(self.options.precision, self.device)

    def encode(self, x):
        if self.options.by_hand:
            return by_hand.encode(self.state.models.vae.encoder, x, self._dtype, self._s2d)
        with self.autocast():
            mu, logvar = self._encode(x)
        return mu.float(), logvar.float()

    def decode(self, z):
        if self.options.by_hand:
            # with s2d the logits are in space-to-depth layout, as x is: the summed loss is the same
            logits = by_hand.decode(self.state.models.vae.decoder, z, self._dtype, self._s2d)
            # bf16 logits the fused loss takes stay bf16 (it reads them as they are: no float32
            # copy, and no cast in the backward); any other go to the loss in float32
            return logits if native_recon.takes_logits(logits) else logits.float()
        with self.autocast():
            return self._decode(z).float()

    def recon_loss(self, logits, x):
        """The Bernoulli reconstruction loss: the native fused pass where it fits (the bf16
        by-hand step's logits, `fastfvae.ops.native_recon`), else `fastfvae.objectives.recon_loss`
        on float32 logits (the fp32 step's: torch's own summation order, the parity precision)."""
        if native_recon.fits(logits, x):
            return native_recon.recon_loss(logits, x)
        return recon_loss(logits.float(), x)

    def sample_kl(self, mu, logvar, eps):
        return self.ops.sample_kl(mu, logvar, eps)

    def permute(self, z, keys):
        return self.ops.permute(z, keys)

    def adversary(self, z):
        if self._d_by_hand is not None:
            return _ByHandAdversary.apply(z, self._d_by_hand)
        with self.autocast():
            return self._disc(z).float()

    def adversary_pair(self, z_q, z_perm, logits_q=None):
        """Logits on z_q and z_perm: one 2B-row pass, or with ``logits_q`` (the TC term's, from
        D's current parameters) only the permuted half."""
        b = z_q.shape[0]
        d = self._d_by_hand
        if d is not None:
            if logits_q is not None:
                logits_p = d.forward(z_perm, start=b)
            else:
                both = d.forward(torch.cat([z_q, z_perm]))
                logits_q, logits_p = both[:b], both[b:]
            return logits_q.detach().requires_grad_(), logits_p.requires_grad_()
        with self.autocast():
            if logits_q is not None:
                return logits_q, self._disc(z_perm).float()
            both = self._disc(torch.cat([z_q, z_perm])).float()
        return both[:b], both[b:]

    def vae_update(self, loss, retain_graph: bool = False) -> None:
        loss.backward(inputs=self.vae_params, retain_graph=retain_graph and self._d_by_hand is None)
        self.optims.vae.step()
        self.optims.vae.zero_grad(set_to_none=True)

    def adversary_update(self, loss, logits_q=None, logits_p=None) -> None:
        optim, d = self.optims.disc, self._d_by_hand
        if d is None:
            loss.backward(inputs=self.disc_params)
            optim.step()
            optim.zero_grad(set_to_none=True)
            return
        grad_logits = torch.cat(torch.autograd.grad(loss, [logits_q, logits_p]))
        if self.options.native_d:  # gradients straight into Adam, the packed weights rewritten
            d.update(grad_logits)
            return
        d.param_grads(grad_logits)
        if self._flat_adam is not None:
            self._flat_adam.step()
            d.weights_written()
        else:
            optim.step()
            optim.zero_grad(set_to_none=True)
            d.parameters_changed()


def _native_discriminator(disc, rows: int, dtype: torch.dtype, optimizer, required: bool):
    """`fastfvae.ops.native_mlp.NativeDiscriminator` for ``native_d`` (its update is
    torch.optim.Adam's formula on the optimiser's own state, so ``optimizer`` must be that plain Adam).
    Not ``required`` (the default ``native_d=None``): None where D or its optimiser does not fit
    the native one, and the step keeps its torch D."""
    from fastfvae.ops.native_mlp import NativeDiscriminator

    if optimizer is None:
        if required:
            raise FastFVAEError("native_d runs D's Adam natively: it needs a plain torch Adam adversary optimiser")
        return None
    try:
        return NativeDiscriminator(disc, rows, dtype, optimizer)
    except FastFVAEError:
        if required:
            raise
        return None


class _BatchSource:
    """The step's batches in the sampler's order: gathered from the resident packed set
    (``device``) or taken from a torch/DALI loader kept in step with the run's sampler."""

    def __init__(self, kind: str, data, state, device: torch.device, channels_last: bool) -> None:
        from fastfvae.data.loaders import make_loader

        self.kind, self.device = kind, device
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.loader = make_loader(kind, data, state.cfg.batch_size, seed=state.cfg.seed, device=device)
        if kind != "device":
            self.loader.load_state_dict({"order": "epoch", "sampler": state.sampler.state_dict()})
        self.packed = getattr(self.loader, "packed", None)

    def rows_tensor(self, rows: np.ndarray) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return rows.to(self.device, non_blocking=True) if self.device.type == "cuda" else rows

    def gather(self, rows: torch.Tensor, s2d: bool = False) -> torch.Tensor:
        """Rows of the resident set (bit-packed or uint8) -> float32 [B, C, 64, 64] (graph-safe),
        or with ``s2d`` (bit-packed only) their space-to-depth layout [B, 4, 32, 32]."""
        from fastfvae.data.loaders.unpack import gather_batch, gather_unpack_s2d

        if s2d:
            return gather_unpack_s2d(self.packed, rows)
        return gather_batch(self.packed, rows).contiguous(memory_format=self.format)

    def _from_loader(self, rows: np.ndarray) -> torch.Tensor:
        images, got = self.loader.next_batch_with_rows()
        if isinstance(got, torch.Tensor):
            got = None if got.is_cuda else got.numpy()  # never synchronise a GPU for a check
        if got is not None and not np.array_equal(got, rows):
            raise RuntimeError(f"the {self.kind} loader is out of step with the run's sampler")
        return images.to(self.device).contiguous(memory_format=self.format)

    def images(self, inputs: StepInputs, s2d: bool = False):
        if self.kind == "device":
            x = self.gather(self.rows_tensor(inputs.rows), s2d)
            x2 = None if inputs.rows2 is None else self.gather(self.rows_tensor(inputs.rows2), s2d)
            return x, x2
        x = self._from_loader(inputs.rows)
        x2 = None if inputs.rows2 is None else self._from_loader(inputs.rows2)
        if s2d:
            x, x2 = by_hand.space_to_depth(x), None if x2 is None else by_hand.space_to_depth(x2)
        return x, x2


def options_of(cfg) -> FastOptions:
    """The fast-path options a run's config holds (``config.json`` records them)."""
    return FastOptions(precision=cfg.precision, loader=cfg.loader, compile=cfg.compile, channels_last=cfg.channels_last,
                       fused_adam=cfg.fused_adam, fused_ops=cfg.fused_ops, cuda_graph=cfg.cuda_graph, noise=cfg.noise,
                       by_hand=cfg.by_hand)


def make_fast_step(state, data, options: FastOptions | None = None) -> FastStep:
    """``step_builder`` for `run_training`: the fast step for ``state`` (options from the config
    when not given)."""
    return FastStep(state, data, options_of(state.cfg) if options is None else options)
