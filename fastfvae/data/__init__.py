"""dSprites: the container, factor grids, sampling, file loaders and the procedural set."""

from fastfvae.data.dsprites import (  # noqa: F401
    BASES, FACTOR_NAMES, FACTOR_SIZES, LATENT_FACTOR_INDICES, NUM_IMAGES, SHAPE_NAMES,
    DSprites, classes_of, index_of, pack_images, possible_values, unpack_images, values_of,
)
from fastfvae.data.grid import FactorGrid  # noqa: F401
from fastfvae.data.sampling import EpochSampler, epoch_permutation  # noqa: F401
