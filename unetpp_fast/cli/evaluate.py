"""`unetpp-fast eval`: IoU / Dice per pruning level and accurate mode, inference time, overlay PNG."""

from __future__ import annotations

import argparse
import json
from typing import Any

from unetpp_fast.cli import options
from unetpp_fast.cli.options import non_negative_int, plural, positive_int

NAME = "eval"
HELP = "IoU / Dice per pruning level and accurate mode, inference time, overlay PNG"
DESCRIPTION = (
    "Evaluate a checkpoint written by `train` on its validation split (rebuilt from the settings stored in "
    "the checkpoint): IoU and Dice for UNet++ pruned to L1..Ldepth and for the accurate mode (mean of the "
    "heads), the inference time per image of each (median over interleaved rounds, with its spread), and "
    "an overlay PNG (image, ground truth, prediction, errors) of a few validation samples. Writes "
    "OUT/metrics.json and OUT/overlays.png."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_checkpoint_argument(parser)
    add = parser.add_argument
    add("--data", default=None, help="dataset folder, if it moved since training (default: the checkpoint's)")
    add("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    add(
        "--batch-size",
        type=positive_int,
        default=16,
        help="images per forward pass, and per timed batch on a GPU (a CPU times 4) (default: %(default)s)",
    )
    add(
        "--samples",
        type=non_negative_int,
        default=4,
        help="validation images drawn in the overlay PNG; 0 for none (default: %(default)s)",
    )
    add(
        "--rounds",
        type=positive_int,
        default=None,
        help="timed forward passes per mode, interleaved across "
        "modes; the median and spread are reported (default: 10 on a CPU, 30 on a GPU)",
    )
    add("--json", action="store_true", help="print the metrics as JSON instead of lines")
    options.add_progress_option(parser)
    options.add_device_options(parser)


def print_start(summary: dict[str, Any]) -> None:
    scale = (
        "whole images at native resolution"
        if summary["native"]
        else (f"resized to {summary['size']}x{summary['size']}")
    )
    if summary.get("dims") == 3:
        scale = "whole volumes (overlapping windows when larger than 128^3)"
    options.print_header(
        NAME,
        [
            ("checkpoint", f"{summary['checkpoint']} (epoch {summary['epoch']})"),
            ("model", options.describe_model(summary["model"], summary["params"])),
            ("device", options.device_text(summary["device"], summary["backend"])),
            ("images", f"{plural(summary['n_val'], 'validation image')} from {summary['data']}, {scale}"),
            ("timing", f"median of {plural(summary['rounds'], 'round')} per mode, interleaved"),
            ("output", summary["out_dir"]),
        ],
    )
    warning = options.unmatched_mask_warning(summary["unmatched_masks"])
    if warning:
        print(warning)


def run(args: argparse.Namespace) -> int:
    from unetpp_fast.train.evaluation import evaluate

    options.setup_device(args)
    report = evaluate(
        args.checkpoint,
        data=args.data,
        out_dir=args.out,
        device=args.device,
        backend=args.backend,
        batch_size=args.batch_size,
        samples=args.samples,
        timing_rounds=args.rounds,
        log=(lambda _msg: None) if args.json else print,
        progress=options.progress_enabled(args),
        on_start=None if args.json else print_start,
    )
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    overlay = f" and {report['overlay_path']}" if "overlay_path" in report else ""
    print(f"wrote {report['metrics_path']}{overlay}")
    return 0
