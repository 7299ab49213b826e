"""`unetpp-fast predict`: segment images with a checkpoint; masks, probabilities and overlays."""

from __future__ import annotations

import argparse
from typing import Any

from unetpp_fast.cli import options
from unetpp_fast.cli.options import UsageError, fraction, non_negative_int, plural, positive_int, probability

NAME = "predict"
HELP = "segment images (or volumes, with a 3D checkpoint) with a checkpoint and write masks"
DESCRIPTION = (
    "Segment every image under INPUT (an image file, a folder of images, or a dataset folder in either "
    "layout) with a checkpoint from `train`; write one PNG mask (0/255) per image, at the image's own "
    "size, into --out. At native resolution the network sees the image as it is (padded; images larger "
    "than --tile run as overlapping tiles blended by MONAI's sliding_window_inference when MONAI is "
    "installed); resized, the image is squeezed to the training size and the result interpolated back. "
    "With a 3D checkpoint (train --dims 3), INPUT is a volume (.nii.gz, .nii, .npy, .npz) or a folder of "
    "them: each is normalised as in training, run whole or as overlapping --tile^3 windows (default 128), "
    "and written as OUT/<id>_mask.nii.gz (the input's affine) or OUT/<id>_mask.npy."
)
DEFAULT_TILE = 512  # the same as unetpp_fast.train.inference.DEFAULT_TILE, without importing torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_checkpoint_argument(parser)
    add = parser.add_argument
    add("input", help="image file or folder")
    add("--out", required=True, help="folder for the masks (and probabilities, overlays)")
    add(
        "--resolution",
        default="auto",
        choices=("auto", "native", "resized"),
        help="'native': the image at its own pixel scale; 'resized': squeezed to the training size as in the "
        "paper; 'auto': as the checkpoint was trained (native after --crop training) (default: %(default)s)",
    )
    add(
        "--tile",
        type=non_negative_int,
        default=DEFAULT_TILE,
        help="native resolution: images larger than "
        "this on a side run as overlapping tiles; 0: always the whole image (default: %(default)s)",
    )
    add("--overlap", type=fraction, default=0.25, help="overlap of neighbouring tiles (default: %(default)s)")
    add(
        "--threshold",
        type=probability,
        default=0.5,
        help="foreground where the probability exceeds this (default: %(default)s)",
    )
    add(
        "--save-probabilities",
        nargs="?",
        const="npy",
        default=None,
        choices=("npy", "tiff", "png"),
        metavar="FORMAT",
        help="also write the foreground probability per image: npy (float32, default), "
        "tiff (float32) or png (16-bit, probability x 65535)",
    )
    add(
        "--overlay",
        action="store_true",
        help="also write NAME_overlay.png: the contrast-stretched image with the mask tinted and outlined",
    )
    add(
        "--level",
        type=positive_int,
        default=None,
        help="use UNet++ pruned to head LEVEL (fast mode) instead of the accurate mode (mean of the heads)",
    )
    add(
        "--skip-unreadable",
        action="store_true",
        help="report an image that cannot be read and go on with the others (default: stop at it)",
    )
    add("--batch-size", type=positive_int, default=4, help="tiles per forward pass (default: %(default)s)")
    options.add_progress_option(parser)
    options.add_device_options(parser)


def print_start(summary: dict[str, Any]) -> None:
    size = summary["size"]
    how = "native resolution" + (", tiled above the --tile size" if summary["tiled"] else ", whole images")
    if summary["resolution"] == "resized":
        how = f"resized to {size}x{size}, masks interpolated back"
    options.print_header(
        NAME,
        [
            ("checkpoint", summary["checkpoint"]),
            ("model", options.describe_model(summary["model"], summary["params"])),
            ("device", options.device_text(summary["device"], summary["backend"])),
            ("images", f"{plural(summary['n_images'], 'image')}, {how}"),
            ("output", summary["out_dir"]),
        ],
    )


def _is_3d(checkpoint: str) -> bool:
    from unetpp_fast.train.training import read_checkpoint
    from unetpp_fast.train.volume_prediction import is_3d_checkpoint

    return is_3d_checkpoint(read_checkpoint(checkpoint))


def print_start_3d(summary: dict[str, Any]) -> None:
    window = summary["window"]
    how = f"whole, or overlapping {window}^3 windows when larger" if window else "whole volumes"
    norm = summary["hu_window"]
    options.print_header(
        NAME,
        [
            ("checkpoint", summary["checkpoint"]),
            ("model", options.describe_model(summary["model"], summary["params"])),
            ("device", options.device_text(summary["device"], summary["backend"])),
            ("volumes", f"{plural(summary['n_volumes'], 'volume')}, {how}"),
            ("intensity", f"HU window {norm[0]:g}..{norm[1]:g}" if norm else "z-score per volume"),
            ("output", summary["out_dir"]),
        ],
    )


def _run_3d(args: argparse.Namespace) -> int:
    from unetpp_fast.train.volume_prediction import predict_volumes

    if args.resolution == "resized" or args.overlay or args.save_probabilities not in (None, "npy"):
        raise UsageError(
            "a 3D checkpoint predicts volumes at native resolution: no --resolution resized, "
            "--overlay or tiff/png probabilities"
        )
    result = predict_volumes(
        args.checkpoint,
        args.input,
        args.out,
        device=args.device,
        backend=args.backend,
        level=args.level,
        window=None if args.tile == 0 else (128 if args.tile == DEFAULT_TILE else args.tile),
        overlap=args.overlap,
        threshold=args.threshold,
        save_probabilities=args.save_probabilities is not None,
        progress=options.progress_enabled(args),
        on_start=print_start_3d,
    )
    return 0 if result.written else 1


def run(args: argparse.Namespace) -> int:
    from unetpp_fast.train.evaluation import predict_folder

    if args.resolution == "resized" and args.tile != DEFAULT_TILE:
        raise UsageError("--tile applies to --resolution native only")
    options.setup_device(args)
    if _is_3d(args.checkpoint):
        return _run_3d(args)
    result = predict_folder(
        args.checkpoint,
        args.input,
        args.out,
        device=args.device,
        backend=args.backend,
        level=args.level,
        batch_size=args.batch_size,
        resolution=args.resolution,
        tile=args.tile,
        overlap=args.overlap,
        threshold=args.threshold,
        save_probabilities=args.save_probabilities,
        overlay=args.overlay,
        skip_unreadable=args.skip_unreadable,
        progress=options.progress_enabled(args),
        on_start=print_start,
    )
    return 0 if result.written or not result.skipped else 1
