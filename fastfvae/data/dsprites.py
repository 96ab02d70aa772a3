"""The `DSprites` container: exactly the real dataset's content and layout, kept compact.

Matthey et al. (2017), https://github.com/deepmind/dsprites-dataset. 737,280 binary 64x64
images, one per combination of 6 factors (color, shape, scale, orientation, posX, posY),
stored row-major over the factors with posY fastest:
``row = dot(latents_classes, (737280, 245760, 40960, 1024, 32, 1))``.

Images are held bit-packed (``np.packbits`` of each flattened 64x64 image: 512 bytes a row,
0.38 GB for the whole set instead of 3.0 GB), and unpacked only for the rows asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastfvae.data.base import GroundTruthData
from fastfvae.data.grid import FactorGrid
from fastfvae.errors import FastFVAEError

IMAGE_SIZE = 64
PACKED_ROW_BYTES = IMAGE_SIZE * IMAGE_SIZE // 8
FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
FACTOR_SIZES = (1, 3, 6, 40, 32, 32)
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
BASES = (737280, 245760, 40960, 1024, 32, 1)
SHAPE_NAMES = ("square", "ellipse", "heart")  # shape values 1, 2, 3
#: The factors that vary (all but color), as disentanglement_lib's ``dsprites_full`` uses them.
LATENT_FACTOR_INDICES = (1, 2, 3, 4, 5)
LATENT_FACTOR_NAMES = tuple(FACTOR_NAMES[k] for k in LATENT_FACTOR_INDICES)
LATENT_FACTOR_SIZES = tuple(FACTOR_SIZES[k] for k in LATENT_FACTOR_INDICES)
_GRID = FactorGrid(FACTOR_SIZES)
LATENT_GRID = FactorGrid(LATENT_FACTOR_SIZES)


def possible_values() -> dict[str, np.ndarray]:
    """The value of each class of each factor, as in the real file's metadata."""
    return {
        "color": np.array([1.0]),
        "shape": np.array([1.0, 2.0, 3.0]),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2 * np.pi, 40),
        "posX": np.linspace(0.0, 1.0, 32),
        "posY": np.linspace(0.0, 1.0, 32),
    }


def index_of(classes: np.ndarray) -> np.ndarray:
    """Row index of each [n, 6] ``latents_classes`` row."""
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim != 2 or classes.shape[1] != 6:
        raise FastFVAEError(f"latents_classes must have shape [n, 6], got {list(classes.shape)}")
    return _GRID.rows_from_factors(classes)


def classes_of(rows: np.ndarray) -> np.ndarray:
    """[n, 6] ``latents_classes`` of each row index (inverse of `index_of`)."""
    return _GRID.factors_of(np.asarray(rows, dtype=np.int64))


def values_of(classes: np.ndarray) -> np.ndarray:
    """[n, 6] float64 ``latents_values`` for [n, 6] classes."""
    table = possible_values()
    classes = np.asarray(classes, dtype=np.int64)
    return np.stack([table[name][classes[:, k]] for k, name in enumerate(FACTOR_NAMES)], axis=1)


def pack_images(images: np.ndarray) -> np.ndarray:
    """uint8 {0,1} [n, 64, 64] -> bit-packed uint8 [n, 512] (MSB first, row-major pixels)."""
    images = np.asarray(images)
    return np.packbits(images.reshape(images.shape[0], -1).astype(bool), axis=1)


def unpack_images(packed: np.ndarray) -> np.ndarray:
    """Bit-packed uint8 [n, 512] -> uint8 {0,1} [n, 64, 64]."""
    return np.unpackbits(packed, axis=1).reshape(packed.shape[0], IMAGE_SIZE, IMAGE_SIZE)


@dataclass
class DSprites(GroundTruthData):
    """dSprites images (bit-packed) with their factor tables: the ``dsprites`` dataset.

    ``packed``: uint8 [N, 512]; ``latents_classes``: int64 [N, 6]; ``latents_values``:
    float64 [N, 6]; ``source``: where it came from ("procedural", or a file path).
    N is 737,280 for the real or procedural set; small synthetic sets (tests) may hold
    fewer rows, in which case row i is the i-th stored image.

    ``factor_names`` / ``factor_sizes`` are the 5 latent factors as disentanglement_lib's
    ``dsprites_full`` uses them (colour, of size 1, is not one); ``file_factor_names`` /
    ``file_factor_sizes`` are the 6 columns of the factor tables.
    """

    packed: np.ndarray
    latents_classes: np.ndarray
    latents_values: np.ndarray
    source: str = "memory"

    name = "dsprites"
    channels = 1
    base_channels = 1
    storage = "bits"
    factor_names = LATENT_FACTOR_NAMES
    factor_sizes = LATENT_FACTOR_SIZES
    file_factor_names = FACTOR_NAMES
    file_factor_sizes = FACTOR_SIZES

    def __post_init__(self) -> None:
        n = self.packed.shape[0]
        if self.packed.dtype != np.uint8 or self.packed.shape != (n, PACKED_ROW_BYTES):
            raise FastFVAEError(
                f"packed images must be uint8 [N, {PACKED_ROW_BYTES}], got "
                f"{self.packed.dtype} {list(self.packed.shape)}"
            )
        for name in ("latents_classes", "latents_values"):
            table = getattr(self, name)
            if table.shape != (n, 6):
                raise FastFVAEError(f"{name} must have shape [{n}, 6], got {list(table.shape)}")

    @classmethod
    def from_images(cls, images: np.ndarray, latents_classes: np.ndarray,
                    latents_values: np.ndarray | None = None, source: str = "memory") -> "DSprites":
        """Build from unpacked uint8 {0,1} [N, 64, 64] images."""
        classes = np.asarray(latents_classes, dtype=np.int64)
        values = values_of(classes) if latents_values is None else np.asarray(latents_values, np.float64)
        return cls(pack_images(images), classes, values, source)

    # --- content -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.packed.shape[0]

    @property
    def is_full(self) -> bool:
        """True when every factor combination is present, in the real row order."""
        return len(self) == NUM_IMAGES

    @property
    def images(self) -> np.ndarray:
        """All images, unpacked: uint8 [N, 64, 64] (3.0 GB for the full set; prefer `images_at`)."""
        return unpack_images(self.packed)

    @property
    def possible_values(self) -> dict[str, np.ndarray]:
        return possible_values()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.latents_classes.nbytes + self.latents_values.nbytes

    def images_at(self, rows: np.ndarray) -> np.ndarray:
        """uint8 {0,1} [n, 64, 64] images of the given rows."""
        return unpack_images(self.packed[np.asarray(rows, dtype=np.int64)])

    def float_batch(self, rows: np.ndarray, device=None):
        """float32 torch tensor [n, 1, 64, 64] in {0., 1.} for the given rows."""
        import torch

        images = torch.from_numpy(self.images_at(rows))
        return images.to(device=device, dtype=torch.float32).unsqueeze(1)

    # --- factor helpers over the 5 varying factors (disentanglement_lib semantics) ----------
    @property
    def latent_grid(self) -> FactorGrid:
        return LATENT_GRID

    def sample_factors(self, n: int, random_state: np.random.RandomState) -> np.ndarray:
        """[n, 5] classes of (shape, scale, orientation, posX, posY), drawn as dlib does."""
        return LATENT_GRID.sample_factors(n, random_state)

    def rows_from_factors(self, factors: np.ndarray) -> np.ndarray:
        """Row index of each [n, 5] latent factor combination (full dataset only)."""
        if not self.is_full:
            raise FastFVAEError(
                f"factor lookups need the full dataset ({NUM_IMAGES} rows), this one has {len(self)}"
            )
        return LATENT_GRID.rows_from_factors(factors)

    def index_of(self, classes: np.ndarray) -> np.ndarray:
        return index_of(classes)

    def classes_of(self, rows: np.ndarray) -> np.ndarray:
        return classes_of(rows)
