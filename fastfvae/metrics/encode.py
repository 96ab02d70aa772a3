"""Turning a model into codes: the whole-dataset code table, and dlib-style per-batch encoding.

The representation is the encoder mean (dlib's "mean" postprocessing), computed in eval mode
without gradients, in batches, on the model's device. Models are duck-typed: anything with
``encode(x) -> (mu, logvar)`` and ``parameters()`` (metrics never import ``fastfvae.models``).
Data is a `fastfvae.data.base.GroundTruthData` (or anything with ``float_batch(rows, device)``
and ``len``).

What is encoded is what the model sees (`observed_batch`):

* a dataset whose observations are its stored images: those images. Bit-packed ones
  (``storage`` "bits", dSprites) travel to a GPU as their bytes (8x less) and are unpacked
  there; ``"uint8"`` ones (3dshapes) travel as uint8 and are divided by 255 there
  (`GroundTruthData.float_batch`);
* a dataset with observation noise (colour / noisy dSprites: ``observation_noise_shape`` is
  not None): its base images rendered (``data.render``, the training step's rendering) with
  `row_uniforms`, one fixed draw per row keyed by (`OBSERVATION_NOISE_SEED`, row). A row's
  code is then the same whatever the batch it is encoded in, the other rows asked for or
  the device, so the code table, `CachedEncoder` and `PerBatchEncoder` agree.
  disentanglement_lib instead draws the noise anew for every observation a metric samples
  (from the metric's ``RandomState``); a code table cannot, so for these datasets the scores
  are those of one fixed noisy observation per factor combination.
"""

from __future__ import annotations

import contextlib

import numpy as np

from fastfvae.errors import FastFVAEError


def model_device(model):
    """The device of the model's first parameter (CPU for a parameter-less model)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode and inference mode for the duration; the training flag is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


#: The seed of the observation noise of encoded rows: row r's uniforms are
#: ``np.random.default_rng([OBSERVATION_NOISE_SEED, r])``'s first draws (`row_uniforms`).
OBSERVATION_NOISE_SEED = 0


def has_observation_noise(data) -> bool:
    """True for a dataset whose observations carry randomness beyond their factors."""
    noise_shape = getattr(data, "observation_noise_shape", None)
    return noise_shape is not None and noise_shape(1) is not None


def check_channels(model, data) -> None:
    """FastFVAEError unless the model takes the channels of the dataset's observations
    (checked before any encoding; a model without a ``channels`` attribute is not checked)."""
    model_channels = getattr(model, "channels", None)
    data_channels = getattr(data, "channels", None)
    if model_channels is not None and data_channels is not None and model_channels != data_channels:
        name = getattr(data, "name", type(data).__name__)
        raise FastFVAEError(f"the model takes {model_channels}-channel images but {name}'s observations have "
                            f"{data_channels}; expected the dataset the model was trained on")


#: Images per encoder call on a CPU. Every activation of a batch this size (the largest, the
#: first convolution's output, is 16 MiB) stays below glibc's mmap threshold once
#: `keep_freed_memory` is set, so each batch reuses the previous batch's memory instead of
#: page-faulting fresh pages in; the speeds behind the choice are in docs/metrics.md.
CPU_BATCH_SIZE = 128
#: Images per encoder call on a GPU (where larger batches keep the device busy).
DEVICE_BATCH_SIZE = 1024
#: Encoder arithmetic: fp32 (the default, what every score in docs/metrics.md is), or bf16
#: autocast (opt-in: faster, and its codes differ from fp32's by ~1e-3, which can move a score).
PRECISIONS = ("fp32", "bf16")


def default_batch_size(device) -> int:
    """`CPU_BATCH_SIZE` on a CPU, `DEVICE_BATCH_SIZE` elsewhere."""
    import torch

    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else DEVICE_BATCH_SIZE


def keep_host_memory(device) -> None:
    """On a CPU, keep freed memory in the process heap (`fastfvae.fast.allocator`,
    process-wide and one-way): batch after batch of activations then reuses the same pages
    instead of page-faulting (and zeroing) fresh ones, which cost more system time than the
    convolutions' user time (docs/metrics.md)."""
    import torch

    if torch.device(device).type == "cpu":
        from fastfvae.fast.allocator import keep_freed_memory

        keep_freed_memory()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise FastFVAEError(f"unknown encoder precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device, precision: str):
    """bf16 autocast on ``device`` for ``precision="bf16"``, else nothing."""
    import torch

    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _is_channels_last(model) -> bool:
    import torch

    return all(p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters())


@contextlib.contextmanager
def inference_models(models, channels_last: bool = False):
    """The models to encode with, in eval and inference mode, for the duration.

    ``channels_last`` (opt-in): each model whose 4-D weights are not channels_last already is
    replaced by a channels_last copy, so the caller's model, its memory layout and its
    training flag are left as they were (a model that cannot be copied is used as it is).
    On the CPU oneDNN's channels_last convolutions are about 1.2x faster, but they sum in
    another order: codes within ~2e-6 of the contiguous ones, enough to move beta-VAE's
    score in the third decimal (docs/metrics.md), so it is not the default. Otherwise the
    models themselves are put in eval mode and their training flags restored after.
    """
    import copy

    import torch

    prepared, restore = [], []
    for model in models:
        if channels_last and not _is_channels_last(model):
            try:
                model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            except (TypeError, RuntimeError, copy.Error):
                pass
            else:
                prepared.append(model.eval())
                continue
        restore.append((model, model.training))
        prepared.append(model.eval())
    try:
        with torch.inference_mode():
            yield prepared
    finally:
        for model, was_training in restore:
            model.train(was_training)


def check_models(models, data):
    """The models' common device; FastFVAEError for a model without ``encode``, one whose
    channels are not the data's, or models on different devices (checked before encoding)."""
    if not models:
        raise FastFVAEError("no models given; expected at least one VAE")
    devices = []
    for i, model in enumerate(models):
        if not hasattr(model, "encode"):
            raise FastFVAEError(f"model {i} ({type(model).__name__}) has no encode(x) -> (mu, logvar); expected a VAE")
        check_channels(model, data)
        devices.append(model_device(model))
    if len(set(devices)) > 1:
        raise FastFVAEError(f"the models are on different devices ({', '.join(sorted(map(str, set(devices))))}); "
                            "expected all of them on one device")
    return devices[0]


def encode_rows_many(models, data, rows: np.ndarray, batch_size: int | None = None, device=None,
                     progress: bool = False, channels_last: bool = False,
                     precision: str = "fp32") -> list[np.ndarray]:
    """float32 [n, D_k] encoder means of the observations of ``rows`` (`observed_batch`), one
    array per model: each batch of images is produced (gathered, unpacked, uploaded,
    rendered) once and given to every model.

    ``batch_size``: images per batch (None: `default_batch_size` of the device). On a CPU
    the process keeps freed memory in its heap (`fastfvae.fast.allocator.keep_freed_memory`,
    process-wide), so the batches stop page-faulting; the codes are bit for bit those of any
    other batch size (but 1) here. ``channels_last`` (opt-in, `inference_models`) and
    ``precision="bf16"`` (opt-in, `PRECISIONS`) are faster and change the codes' last bits
    or more. ``progress``: a progress bar on stderr.
    A row's code does not depend on the other rows of its batch (beyond the convolution
    library's choice of algorithm for a batch size), nor on the other models.
    """
    import torch

    check_precision(precision)
    models = list(models)
    own_device = check_models(models, data)
    device = own_device if device is None else torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise FastFVAEError(f"the encoder batch size must be >= 1 image, got {batch_size}")
    keep_host_memory(device)
    rows = np.asarray(rows, dtype=np.int64)
    chunks: list[list] = [[] for _ in models]
    starts = range(0, rows.shape[0], batch_size)
    if progress:
        from rich.console import Console
        from rich.progress import track

        what = f"encoding {rows.shape[0]:,} images" + (f" ({len(models)} models)" if len(models) > 1 else "")
        starts = track(starts, description=what, console=Console(stderr=True), transient=True)
    with inference_models(models, channels_last) as prepared, autocast(device, precision):
        for start in starts:
            x = observed_batch(data, rows[start:start + batch_size], device)
            for k, model in enumerate(prepared):
                chunks[k].append(model.encode(x)[0].float())  # stays on the device: one copy back at the end
    if not rows.shape[0]:
        return [np.zeros((0, 0), dtype=np.float32) for _ in models]
    return [np.ascontiguousarray(torch.cat(c).cpu().numpy(), dtype=np.float32) for c in chunks]


def encode_rows(model, data, rows: np.ndarray, batch_size: int | None = None, device=None,
                progress: bool = False, channels_last: bool = False, precision: str = "fp32") -> np.ndarray:
    """`encode_rows_many` of one model: float32 [n, D] encoder means of ``rows``' observations."""
    return encode_rows_many([model], data, rows, batch_size, device, progress, channels_last, precision)[0]


def row_uniforms(rows: np.ndarray, shape: tuple[int, ...], seed: int = OBSERVATION_NOISE_SEED) -> np.ndarray:
    """float32 [n, *shape] uniforms U[0, 1): row ``r``'s are the first draws of
    ``np.random.default_rng([seed, r])``, so they depend on the row alone (a SeedSequence
    per row: numpy's way to independent streams)."""
    out = np.empty((len(rows), *shape), dtype=np.float32)
    for i, row in enumerate(np.asarray(rows, dtype=np.int64)):
        np.random.default_rng([seed, int(row)]).random(out=out[i], dtype=np.float32)
    return out


def observed_batch(data, rows: np.ndarray, device):
    """float32 [n, channels, 64, 64] on ``device``: the observations of ``rows`` the model is
    given (see the module docstring for the noise of colour / noisy dSprites)."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = np.asarray(rows, dtype=np.int64)
    base = _stored_images(data, rows, device)
    if not has_observation_noise(data):
        return base
    noise_shape = data.observation_noise_shape(rows.shape[0])
    noise = torch.from_numpy(row_uniforms(rows, tuple(noise_shape[1:]))).to(device)
    return data.render(base, noise)


def _stored_images(data, rows: np.ndarray, device):
    """float32 [n, base_channels, 64, 64] on ``device``, as the loaders deliver them; on a GPU
    bit-packed bytes travel and are unpacked there (8x less to copy)."""
    import torch

    storage = getattr(data, "storage", "bits")
    if device.type != "cpu" and storage == "bits" and hasattr(data, "packed"):
        from fastfvae.data.loaders.unpack import unpack_bits

        return unpack_bits(torch.from_numpy(np.asarray(data.packed[rows])).to(device, non_blocking=True))
    return data.float_batch(rows, device)


def encode_dataset(model, data, batch_size: int | None = None, device=None, progress: bool = False,
                   channels_last: bool = False, precision: str = "fp32") -> np.ndarray:
    """The code table: float32 [len(data), D] encoder means of every row, in row order."""
    return encode_rows(model, data, np.arange(len(data), dtype=np.int64), batch_size, device, progress,
                       channels_last, precision)


class PerBatchEncoder:
    """dlib's way: a representation function that encodes the sampled images on every call."""

    def __init__(self, model, data, batch_size: int | None = None, device=None):
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return encode_rows(self.model, self.data, rows, self.batch_size, self.device)


class CachedEncoder:
    """A representation function that encodes each distinct row once, on first request.

    With dlib's default sample sizes nearly every dSprites row is drawn, so this costs the
    same as `encode_dataset`; with reduced sizes (a quick score during training) it encodes
    only the rows the metric draws.
    """

    def __init__(self, model, data, batch_size: int | None = None, device=None):
        self.model, self.data, self.batch_size, self.device = model, data, batch_size, device
        self.table: np.ndarray | None = None
        self.done = np.zeros(len(data), dtype=bool)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        missing = np.unique(rows[~self.done[rows]])
        if missing.size:
            codes = encode_rows(self.model, self.data, missing, self.batch_size, self.device)
            if self.table is None:
                self.table = np.zeros((len(self.data), codes.shape[1]), dtype=np.float32)
            self.table[missing] = codes
            self.done[missing] = True
        return self.table[rows]

    @property
    def num_encoded(self) -> int:
        return int(self.done.sum())
