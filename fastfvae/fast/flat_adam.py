"""Adam for the discriminator in the bf16 CPU step: one compiled kernel over flat buffers.

D has 5 M parameters. In bf16 each D update otherwise makes three passes over them after its
GEMMs: the bf16 gradient cast to fp32, fused Adam, and the fp32 -> bf16 weight cast the next
GEMMs read. Here D's parameters and Adam moments are views of flat fp32 buffers, its gradient
a view of a flat bf16 buffer the GEMMs write into, and one Inductor-compiled elementwise kernel
reads the bf16 gradient, updates the moments and the fp32 weights with torch's Adam formula,
and writes the bf16 weight copy: one pass instead of three (timings in docs/fast-path.md).

The flat fp32 weights are FlatAdam's own copy of D's parameters; the optimiser it drives (the
fast step's own Adam, whose state tensors become views of the flat moment buffers) keeps the
usual per-parameter state, so its ``state_dict`` is the reference's format. `write_back` copies
the flat weights into the parameters (the fast step does before the loop reads the run's
state); `FlatAdam.bind` re-points everything after a load replaced the optimiser's tensors.
"""

from __future__ import annotations

import warnings

import torch

_compiled = None


def adam_update(param, grad, exp_avg, exp_avg_sq, weights_out, step_size, bias_correction2_sqrt,
                one_minus_beta1, beta2, one_minus_beta2, eps) -> None:
    """torch's Adam (no weight decay, no amsgrad) on flat tensors, then ``weights_out`` (bf16) =
    ``param``. ``grad`` may be bf16 (read as fp32). ``step_size`` = lr / (1 - beta1^t) and
    ``bias_correction2_sqrt`` = sqrt(1 - beta2^t) are 0-dim tensors computed on the host (a pow
    of a tensor step inside the kernel slows Inductor's loop down, docs/dropped-levers.md; as
    Python floats they would recompile it every step); the betas (1 - beta1, beta2, 1 - beta2,
    each formed in double on the host as torch's Adam does) and ``eps`` are 0-dim tensors too,
    and the length is dynamic: one compiled kernel serves every D size and optimiser setting."""
    grad = grad.float()
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).add_(grad * grad * one_minus_beta2)
    param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps))
    weights_out.copy_(param)


def _kernel():
    """`adam_update` compiled (one C++ loop on CPU); eager if compiling fails (no C++ compiler)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(adam_update, dynamic=True, fullgraph=True)
    return _compiled


class FlatAdam:
    """Drive ``optimizer`` (a one-group Adam over ``params``) from flat buffers; see the module doc."""

    def __init__(self, optimizer: torch.optim.Adam, params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("FlatAdam needs a single parameter group")
        group = optimizer.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            raise ValueError("FlatAdam computes plain Adam: no weight decay, amsgrad or maximize")
        if {id(p) for p in group["params"]} != {id(p) for p in params}:
            raise ValueError("FlatAdam's params must be the optimiser's")
        self.optimizer, self.params, self.dtype = optimizer, list(params), dtype
        self._eager = False
        self.bind()

    # --- binding ---------------------------------------------------------------------------
    def bind(self) -> None:
        """Copy the parameters into FlatAdam's own flat weights, make their Adam moments views of
        flat buffers and add a flat gradient buffer (values kept; missing state is created as
        torch's Adam creates it at its first step)."""
        state = self.optimizer.state
        for p in self.params:
            s = state[p]
            if "step" not in s:
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        steps = {float(state[p]["step"]) for p in self.params}
        if len(steps) != 1:
            raise ValueError(f"FlatAdam needs one step count for all parameters, got {sorted(steps)}")
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.flat_param = self._flatten([p.detach() for p in self.params])
            self.flat_exp_avg = self._flatten([state[p]["exp_avg"] for p in self.params])
            self.flat_exp_avg_sq = self._flatten([state[p]["exp_avg_sq"] for p in self.params])
            for p, m, v in zip(self.params, self._views(self.flat_exp_avg), self._views(self.flat_exp_avg_sq)):
                state[p]["exp_avg"], state[p]["exp_avg_sq"] = m, v
            self.flat_grad = torch.zeros_like(self.flat_param, dtype=self.dtype)
            self.flat_weights = self.flat_param.to(self.dtype)
        self.grads = self._views(self.flat_grad)
        self.weights = self._views(self.flat_weights)
        self._bound = self._pointers()

    def _flatten(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(p.shape) for chunk, p in zip(flat.split(self.sizes), self.params)]

    def _pointers(self) -> tuple:
        state = self.optimizer.state
        return tuple((p.data_ptr(), state[p]["exp_avg"].data_ptr(), state[p]["exp_avg_sq"].data_ptr())
                     for p in self.params)

    def ensure_bound(self) -> bool:
        """Re-bind when a parameter or moment was replaced (``load_state_dict``); True if it did."""
        state = self.optimizer.state
        if all("exp_avg" in state[p] for p in self.params) and self._pointers() == self._bound:
            return False
        self.bind()
        return True

    def refresh_weights(self) -> None:
        """Take the parameters' values (they changed outside `step`: a load, a copy) into the flat
        weights and their ``dtype`` copy."""
        with torch.no_grad():
            torch._foreach_copy_(self._views(self.flat_param), [p.detach() for p in self.params])
            self.flat_weights.copy_(self.flat_param)

    def write_back(self) -> None:
        """Copy the flat weights (updated by `step`) into the parameters."""
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self.params], self._views(self.flat_param))

    # --- the update ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """One Adam update from ``grads`` (which the caller filled); writes the bf16 weights."""
        state, group = self.optimizer.state, self.optimizer.param_groups[0]
        steps = [state[p]["step"] for p in self.params]
        torch._foreach_add_(steps, 1.0)
        t, (beta1, beta2) = float(steps[0]), group["betas"]
        step_size = torch.tensor(float(group["lr"]) / (1 - beta1 ** t))
        bias_correction2_sqrt = torch.tensor((1 - beta2 ** t) ** 0.5)
        args = (self.flat_param, self.flat_grad, self.flat_exp_avg, self.flat_exp_avg_sq, self.flat_weights,
                step_size, bias_correction2_sqrt,
                *map(torch.tensor, (1 - beta1, float(beta2), 1 - beta2, float(group["eps"]))))
        if not self._eager:
            try:
                _kernel()(*args)
                return
            except Exception as err:  # no C++ toolchain for Inductor: the same arithmetic, eager
                warnings.warn(f"compiling the flat Adam kernel failed ({type(err).__name__}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
                self._eager = True
        adam_update(*args)
