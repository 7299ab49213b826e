"""`unetpp-fast predict`: segment images with a checkpoint; masks, probabilities and overlays."""

from __future__ import annotations

import argparse
from typing import Any

from unetpp_fast.cli import options
from unetpp_fast.cli.options import UsageError, fraction, non_negative_int, plural, positive_int, probability

NAME = "predict"
HELP = "segment an image or a folder of images with a checkpoint and write masks"
DESCRIPTION = (
    "Segment every image under INPUT (an image file, a folder of images, or a dataset folder in either "
    "layout) with a checkpoint from `train`; write one PNG mask (0/255) per image, at the image's own "
    "size, into --out. At native resolution the network sees the image as it is (padded; images larger "
    "than --tile run as overlapping tiles blended by MONAI's sliding_window_inference when MONAI is "
    "installed); resized, the image is squeezed to the training size and the result interpolated back."
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


def run(args: argparse.Namespace) -> int:
    from unetpp_fast.train.evaluation import predict_folder

    if args.resolution == "resized" and args.tile != DEFAULT_TILE:
        raise UsageError("--tile applies to --resolution native only")
    options.setup_device(args)
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
