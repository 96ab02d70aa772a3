"""`fastfvae data info|show|download`: what a dSprites set is, a picture of it, the real file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastfvae.data.paths import check_output_file
from fastfvae.errors import FastFVAEError

#: The file `data show` writes when --out is a folder (and by default).
GRID_NAME = "dsprites_grid.png"

DESCRIPTION = """\
Inspect or fetch dSprites. Without PATH, `info` and `show` use the default set:
the real file in the cache directory ($FASTFVAE_HOME, default ~/.cache/fastfvae) if
`fastfvae data download` put it there, else the procedural set. PATH may be the canonical
NPZ or the HDF5 release, recognised by content.
"""


DOWNLOAD_DESCRIPTION = """\
Fetch dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz (or, with --dataset shapes3d,
3dshapes.h5) into --dest (default: the cache directory). A dropped transfer resumes where it
stopped; the file gets its final name only once checked (dSprites: SHA-256 if one is given,
else zip CRCs and the layout; 3dshapes: SHA-256, pinned, then the layout), and a file
already there is checked the same way before it counts as present. An unknown host, a
refused connection or an HTTP 4xx answer fails at once; a stalled server after two
--timeout waits. One download per --dest at a time: a second one fails at once, naming the
first one's PID.
"""


def _load(args):
    from fastfvae.data import load_dsprites
    from fastfvae.data.files import PartialSetError

    try:
        return load_dsprites(args.path, require_full=not args.allow_partial)
    except PartialSetError as exc:  # these commands offer the option that accepts a subset
        raise exc.with_option("--allow-partial") from None


def run_info(args: argparse.Namespace) -> int:
    from fastfvae.data import cache_dir
    from fastfvae.data.load import cached_file

    data = _load(args)
    mib = 1024 * 1024
    print(f"source:        {data.source}")
    print(f"images:        {len(data)} x 64 x 64, binary ({'full set, real row order' if data.is_full else 'partial set'})")
    print("factors:       " + ", ".join(f"{n} {s}" for n, s in zip(data.factor_names, data.factor_sizes)))
    print(f"memory:        {data.nbytes / mib:.1f} MiB (images bit-packed {data.packed.nbytes / mib:.1f} MiB; "
          f"unpacked would be {len(data) * 4096 / mib:.0f} MiB)")
    import numpy as np

    sample = np.random.default_rng(0).choice(len(data), size=min(len(data), 4096), replace=False)
    print(f"on-pixels:     {100 * float(data.images_at(sample).mean()):.2f}% "
          f"(mean over {len(sample)} random images)")
    cached = cached_file()
    print(f"cache dir:     {cache_dir()} (real file {'present' if cached else 'absent'})")
    return 0


def figure_path(out: str) -> Path:
    """The file `data show --out OUT` writes, checked to be writable (nothing is created).

    A folder gets `GRID_NAME` inside it; a name without an extension gets ``.png`` (the
    file matplotlib would write, so the path printed is the path written); any other
    extension must be an image format matplotlib writes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(out).expanduser()
    if path.is_dir():
        path = path / GRID_NAME
    elif out.endswith(("/", os.sep)):
        raise FastFVAEError(f"--out {out}: no such folder; expected an existing folder or a .png file name")
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise FastFVAEError(f"--out {out}: {path.suffix!r} is not an image format matplotlib writes; "
                            f"expected one of {', '.join('.' + f for f in sorted(formats))}")
    return check_output_file(path, "--out")


def run_show(args: argparse.Namespace) -> int:
    from fastfvae.viz.dataset_grid import save_dataset_grid

    if args.seed < 0:  # numpy's default_rng takes any integer from 0 up
        raise FastFVAEError(f"--seed must be 0 or more (any size), got {args.seed}")
    if args.columns < 1:
        raise FastFVAEError(f"--columns must be at least 1, got {args.columns}")
    out = figure_path(args.out)  # before the data is loaded
    data = _load(args)
    path = save_dataset_grid(data, out, columns=args.columns, seed=args.seed)
    print(f"wrote {path}", file=sys.stderr)
    return 0


#: The datasets `data download --dataset` fetches (the colour and noisy dSprites use the dSprites file).
DOWNLOADABLE = ("dsprites", "shapes3d")


def run_download(args: argparse.Namespace) -> int:
    from fastfvae.data.download import DSPRITES, download_file
    from fastfvae.data.shapes3d import SHAPES3D

    if args.dataset not in DOWNLOADABLE:
        raise FastFVAEError(f"--dataset {args.dataset!r} cannot be downloaded; expected one of "
                            f"{', '.join(DOWNLOADABLE)} (color_dsprites and noisy_dsprites use the dsprites file)")
    if args.retries < 0:
        raise FastFVAEError(f"--retries must be 0 or more, got {args.retries}")
    if not args.timeout > 0:
        raise FastFVAEError(f"--timeout must be more than 0 seconds, got {args.timeout}")
    target = DSPRITES if args.dataset == "dsprites" else SHAPES3D
    path = download_file(target, url=args.url, sha256=args.sha256, dest=args.dest, retries=args.retries,
                         timeout=args.timeout, force=args.force)
    print(path)
    return 0


def register(subparsers) -> None:
    from fastfvae.data.download import ATTEMPTS_WITHOUT_PROGRESS, DEFAULT_TIMEOUT, DSPRITES_URL, SHA256_ENV

    p = subparsers.add_parser("data", help="inspect, draw or download dSprites", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    def add_path(q):
        q.add_argument("path", nargs="?", default=None, metavar="PATH", help="a dSprites .npz/.hdf5 file")
        q.add_argument("--allow-partial", action="store_true",
                       help="accept a file with fewer than 737,280 rows (a subset)")

    q = sub.add_parser("info", help="source, size, factors and memory of a dSprites set")
    add_path(q)
    q.set_defaults(func=run_info)

    q = sub.add_parser("show", help="write a PNG: random images and one sweep per factor")
    add_path(q)
    q.add_argument("--out", default=GRID_NAME, metavar="FILE|DIR",
                   help=f"image to write; a folder gets {GRID_NAME} inside it, a name without an "
                        f"extension gets .png (default: {GRID_NAME})")
    q.add_argument("--seed", type=int, default=0, help="seed of the random images, 0 or more (default 0)")
    q.add_argument("--columns", type=int, default=10, help="images per row (default 10)")
    q.set_defaults(func=run_show)

    q = sub.add_parser("download", help="fetch the real dSprites NPZ (or 3dshapes) into the cache directory",
                       description=DOWNLOAD_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--dataset", default="dsprites", metavar="{" + ",".join(DOWNLOADABLE) + "}",
                   help="which file to fetch (default dsprites)")
    q.add_argument("--url", default=None,
                   help=f"http(s) address to fetch it from (default: the dataset's own, {DSPRITES_URL} for dSprites)")
    q.add_argument("--sha256", default=None, metavar="HEX",
                   help=f"expected SHA-256 (default: ${SHA256_ENV} or $FASTFVAE_SHAPES3D_SHA256, else the "
                        "pinned digest if any); without one the file must be a dSprites NPZ (members, shapes, "
                        "row order)")
    q.add_argument("--dest", default=None, metavar="DIR",
                   help="folder to save into, created if missing (default: the cache directory)")
    q.add_argument("--retries", type=int, default=5,
                   help="retries after a dropped connection, a timeout or an HTTP 5xx answer (default 5); "
                        f"{ATTEMPTS_WITHOUT_PROGRESS} attempts in a row that receive nothing end the download")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"seconds without data before an attempt fails (default {DEFAULT_TIMEOUT:g})")
    q.add_argument("--force", action="store_true", help="download again even if the file is already there")
    q.set_defaults(func=run_download)
