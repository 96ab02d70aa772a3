"""The fast path: the reference training step's algorithm, compiled / fused / with less work.

`make_fast_step(state, data, options=None)` is the ``step_builder`` that ``fastfvae train
--fast`` passes to `fastfvae.train.loop.run_training`; `FastOptions` selects precision,
loader, compilation and fused ops. See `fastfvae.fast.step` for what differs from the
reference and why the result is the same.
"""

from fastfvae.fast.precision import PARITY_RTOL, PRECISIONS  # noqa: F401
from fastfvae.fast.step import LOADERS, FastOptions, FastStep, make_fast_step  # noqa: F401
