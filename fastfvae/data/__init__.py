"""Ground-truth datasets (`GroundTruthData`, reached by name through `load_dataset`): dSprites
(the container, factor grids, sampling, file loaders, the procedural set), its colour and
noisy variants, and 3dshapes."""

from fastfvae.data.base import GroundTruthData  # noqa: F401
from fastfvae.data.dsprites import (  # noqa: F401
    BASES, FACTOR_NAMES, FACTOR_SIZES, LATENT_FACTOR_INDICES, NUM_IMAGES, SHAPE_NAMES,
    DSprites, classes_of, index_of, pack_images, possible_values, unpack_images, values_of,
)
from fastfvae.data.grid import FactorGrid  # noqa: F401
from fastfvae.data.sampling import EpochSampler, epoch_permutation  # noqa: F401
from fastfvae.data.files import load_file, load_hdf5, load_npz, save_hdf5, save_npz  # noqa: F401
from fastfvae.data.procedural import procedural_dsprites  # noqa: F401
from fastfvae.data.download import cache_dir, download_dsprites  # noqa: F401
from fastfvae.data.load import load_dsprites  # noqa: F401
from fastfvae.data.variants import ColorDSprites, NoisyDSprites  # noqa: F401
from fastfvae.data.shapes3d import Shapes3D, download_shapes3d, load_shapes3d  # noqa: F401
from fastfvae.data.registry import DATASETS, dataset_channels, load_dataset, register_dataset  # noqa: F401
