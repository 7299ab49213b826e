"""`unetpp-fast make-volumes`: write the synthetic lung-nodule set (3D volumes with masks)."""

from __future__ import annotations

import argparse
import os

from unetpp_fast.cli.options import positive_int, probability

NAME = "make-volumes"
HELP = "write a synthetic 3D lung-nodule set (CT-like volumes + masks) for train --dims 3"
DESCRIPTION = (
    "Write COUNT synthetic CT-like volumes (int16 Hounsfield units: lung parenchyma around -850 HU with "
    "noise, 0..N rotated ellipsoid nodules with partial-volume edges) and their masks as OUT/images/<id> "
    "and OUT/masks/<id>: the folder layout `train --dims 3` reads. A share of the cases (--empty) holds "
    "no nodule. Files are .npy, or .nii.gz with nibabel installed (the volumes extra) or --format nifti. "
    "It stands in for LIDC-IDRI, the paper's 3D task, which cannot be shipped."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("out", help="folder to write images/ and masks/ into (created)")
    add("--count", type=positive_int, default=16, help="number of volumes (default: %(default)s)")
    add(
        "--size",
        type=positive_int,
        default=64,
        help="side of each cubic volume, >= 16 (default: %(default)s)",
    )
    add(
        "--max-nodules", type=positive_int, default=2, help="nodules per case, at most (default: %(default)s)"
    )
    add(
        "--empty",
        type=probability,
        default=0.25,
        help="share of cases without nodules (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add(
        "--format",
        dest="file_format",
        choices=("auto", "npy", "nifti"),
        default="auto",
        help="file format: 'auto' = NIfTI (.nii.gz) when nibabel is installed, else .npy "
        "(default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from unetpp_fast.train.synthetic_volumes import write_synthetic_volumes
    from unetpp_fast.train.volume_data import find_volume_pairs

    ids = write_synthetic_volumes(
        args.out,
        count=args.count,
        size=args.size,
        seed=args.seed,
        file_format=args.file_format,
        max_nodules=args.max_nodules,
        empty=args.empty,
    )
    pairs = [p for p in find_volume_pairs(args.out) if p[0] in set(ids)]
    extension = os.path.basename(pairs[0][1]).split(".", 1)[1] if pairs else "?"
    print(
        f"wrote {len(ids)} volumes of {args.size}^3 (.{extension}) with masks to {args.out}/images and "
        f"{args.out}/masks; train on them with: unetpp-fast train --dims 3 --data {args.out}"
    )
    return 0
