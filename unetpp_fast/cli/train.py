"""`unetpp-fast train`: train U-Net / wide U-Net / UNet++ on DSB2018 as in the UNet++ paper."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from unetpp_fast.cli import options
from unetpp_fast.cli.options import (
    UsageError,
    fraction,
    int_list,
    non_negative_int,
    plural,
    positive_float,
    probability,
)
from unetpp_fast.cli.options import positive_int as pos_int

NAME = "train"
HELP = "train on DSB2018 (paper setting: 96x96, Adam 3e-4, BCE+Dice, early stopping)"
DESCRIPTION = (
    "Train U-Net / wide U-Net / UNet++ on cell-nuclei images as in the UNet++ paper: inputs resized to "
    "--size (or random --crop patches at native resolution), Adam (lr 3e-4), the BCE + Dice loss of Eq. 2 "
    "(averaged over the heads with deep supervision), a seeded train/validation split, early stopping on "
    "validation IoU. Writes OUT/best.pth at each improvement, and OUT/last.pth (for --resume), "
    "OUT/history.json and OUT/history.png after every epoch, each atomically. A folder holding another "
    "run is refused unless --overwrite. The paper-size UNet++ (9M parameters) takes tens of seconds per "
    "batch on a 2-core CPU: for a quick CPU run try --filters 8,16,32,64,128 --batch-size 4."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_options(parser.add_argument_group("run"))
    _add_model_options(parser.add_argument_group("model"))
    _add_recipe_options(parser.add_argument_group("data and recipe"))
    _add_volume_options(parser.add_argument_group("3D volumes"))
    _add_speed_options(parser.add_argument_group("speed and multi-GPU"))
    options.add_progress_option(parser)
    options.add_device_options(parser)


def _add_run_options(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--data",
        default=None,
        help="dataset folder: merged layout (images/<id>.png + masks/<id>.png) or the "
        "Kaggle DSB2018 stage1_train layout (<id>/images/<id>.png + <id>/masks/*.png, one PNG per nucleus); "
        "required unless --resume",
    )
    add(
        "--out",
        default=None,
        help="run folder for checkpoints and logs (default: runs/unetpp for a new run, "
        "the checkpoint's own folder with --resume)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="start a new run in a folder that holds another; its files "
        "are moved into OUT/replaced-<time>/, not deleted",
    )
    add(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a run's last.pth (or its folder): "
        "the model, data split and optimizer come from it; --epochs, --patience, --device, --backend apply",
    )


def _add_model_options(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--arch",
        default="unetpp",
        choices=("unetpp", "unet", "wide_unet"),
        help="model (default: %(default)s)",
    )
    add(
        "--filters",
        type=int_list,
        default=(32, 64, 128, 256, 512),
        help="channels per level, 3 to 6 levels (default: 32,64,128,256,512; ignored by wide_unet)",
    )
    ds = group.add_mutually_exclusive_group()
    ds.add_argument(
        "--deep-supervision",
        dest="deep_supervision",
        action="store_true",
        default=True,
        help="UNet++ with a head on every X[0,j] and the loss averaged over them (default)",
    )
    ds.add_argument(
        "--no-deep-supervision",
        dest="deep_supervision",
        action="store_false",
        help="UNet++ with one head on X[0,depth] (pruning then is not possible)",
    )
    add(
        "--block",
        default="conv_bn_relu",
        choices=("conv_bn_relu", "conv_relu"),
        help="convolution block: conv-BN-ReLU twice, or the paper's conv-ReLU twice (default: %(default)s)",
    )
    add(
        "--upsample",
        default="bilinear_ac",
        choices=("bilinear_ac", "bilinear", "nearest", "deconv"),
        help="decoder upsampling: bilinear with align_corners=True (as pytorch-nested-unet), bilinear, "
        "nearest, or a 2x2 transposed convolution (default: %(default)s)",
    )


def _add_recipe_options(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--size",
        type=pos_int,
        default=96,
        help="images are resized to SIZE x SIZE, the paper's setting (default: %(default)s)",
    )
    add(
        "--crop",
        type=pos_int,
        default=None,
        metavar="SIZE",
        help="instead of resizing, train on random "
        "SIZE x SIZE crops at native resolution and validate on whole images (for native-resolution predict)",
    )
    add(
        "--epochs",
        type=pos_int,
        default=100,
        help="total epochs, counting resumed ones (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=pos_int,
        default=16,
        help="images per step, the global batch: under torchrun each of the N processes takes "
        "BATCH_SIZE / N of it (so it must be divisible by N) and a step equals one process's step on "
        "the whole batch (default: %(default)s)",
    )
    add("--lr", type=positive_float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    add("--weight-decay", type=float, default=0.0, help="Adam weight decay (default: %(default)s)")
    add(
        "--patience",
        type=non_negative_int,
        default=20,
        help="stop after this many epochs without a better "
        "validation IoU; 0: never stop early (default: %(default)s)",
    )
    add(
        "--val-fraction",
        type=fraction,
        default=0.2,
        help="share of images held out for validation (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=41,
        help="seed of the split, the initial weights and the batch order (default: %(default)s)",
    )
    add(
        "--limit",
        type=pos_int,
        default=None,
        help="use only this many images (a seeded subset), for quick runs",
    )
    add("--no-augment", dest="augment", action="store_false", help="no random flips / 90-degree rotations")


def _hu_window(text: str) -> tuple[float, float]:
    """'-1000,400' -> (-1000.0, 400.0)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH in Hounsfield units, e.g. -1000,400, got {text!r}"
        ) from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return low, high


def _add_volume_options(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--dims",
        type=int,
        choices=(2, 3),
        default=None,
        help="2: images (DSB2018 layouts); 3: volumes, OUT/images/<id>.nii.gz|.nii|.npy|.npz with "
        "masks/<id>.* (3D UNet++, 3x3x3 convolutions, trained on random --crop^3 patches, default 64, "
        "validated on whole volumes); default: 3 when --data holds volume files, else 2",
    )
    add(
        "--hu-window",
        type=_hu_window,
        default=None,
        metavar="LOW,HIGH",
        help="3D CT: clip intensities to [LOW, HIGH] Hounsfield units and scale to [0, 1] "
        "(e.g. -1000,400 for lung); default: each volume's z-score",
    )
    add(
        "--foreground",
        type=probability,
        default=0.5,
        help="3D: share of training patches centred (with jitter) on a foreground voxel "
        "(default: %(default)s)",
    )
    add(
        "--patches-per-volume",
        type=pos_int,
        default=1,
        help="3D: training patches drawn from each volume per epoch (default: %(default)s)",
    )


def _add_speed_options(group: argparse._ArgumentGroup) -> None:
    add = group.add_argument
    add(
        "--amp",
        default="off",
        choices=("off", "bf16", "fp16"),
        help="mixed precision: autocast to bf16, or to fp16 with GradScaler loss scaling (fp16 needs a "
        "CUDA GPU; bf16 also runs on the CPU); the loss and the weights stay float32 (default: %(default)s)",
    )
    cl = group.add_mutually_exclusive_group()
    cl.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_true",
        default=None,
        help="model and inputs in channels_last memory format (default on CUDA: the fused GPU kernels' "
        "layout, so no call converts layouts)",
    )
    cl.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep NCHW (contiguous) tensors (default on the CPU)",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the training model (the fused convolutions stay single graph nodes); "
        "the first steps are slow while it compiles",
    )
    add(
        "--workers",
        type=non_negative_int,
        default=0,
        help="DataLoader worker processes that augment batches (with pinned memory on CUDA); "
        "0: in the training process (default: %(default)s)",
    )
    add(
        "--sync-bn",
        action="store_true",
        help="under torchrun: SyncBatchNorm, BatchNorm statistics over the global batch instead of each "
        "process's share (no effect in a single process)",
    )


def _config(args: argparse.Namespace) -> Any:
    from unetpp_fast.train.training import TrainConfig

    if not args.data and not args.resume:
        raise UsageError("train needs --data DATASET_FOLDER (or --resume CHECKPOINT)")
    names = (
        "arch",
        "filters",
        "deep_supervision",
        "block",
        "upsample",
        "size",
        "crop",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "patience",
        "val_fraction",
        "seed",
        "limit",
        "augment",
        "device",
        "backend",
        "amp",
        "channels_last",
        "compile",
        "workers",
        "sync_bn",
        "hu_window",
        "foreground",
        "patches_per_volume",
    )
    settings = {name: getattr(args, name) for name in names}
    settings["dims"] = args.dims or _inferred_dims(args.data)
    return TrainConfig(
        data=args.data or "", out_dir=args.out or "", progress=options.progress_enabled(args), **settings
    )


def _inferred_dims(data: str | None) -> int:
    """3 for a folder of volumes, else 2 (with --resume alone, the checkpoint's own setting wins)."""
    from unetpp_fast.train.volume_data import is_volume_folder

    return 3 if data and is_volume_folder(data) else 2


def _scale_text(config: Any) -> str:
    if config.dims == 3:
        window = (
            f"HU window {config.hu_window[0]:g}..{config.hu_window[1]:g}" if config.hu_window else "z-score"
        )
        return (
            f"volumes, random {config.crop}^3 patches ({config.foreground:.0%} on foreground, "
            f"{config.patches_per_volume} per volume), {window}"
        )
    if config.crop:
        return f"random {config.crop}x{config.crop} crops at native resolution"
    return f"resized to {config.size}x{config.size}"


def print_start(summary: dict[str, Any]) -> None:
    config = summary["config"]
    scale = _scale_text(config)
    epochs = f"{summary['start_epoch'] + 1}..{summary['epochs']}"
    if summary["start_epoch"]:
        epochs += f" (resuming after epoch {summary['start_epoch']})"
    rows = [
        ("data", f"{config.data or '(from the checkpoint)'}"),
        ("images", f"{summary['n_train']:,} train + {summary['n_val']:,} validation, {scale}"),
        ("model", options.describe_model(summary["model"], summary["params"])),
        ("device", options.device_text(summary["device"], summary["backend"])),
        ("speed", _speed_text(summary)),
        ("epochs", epochs),
        ("output", summary["out_dir"]),
    ]
    options.print_header(NAME, rows)
    warning = options.unmatched_mask_warning(summary.get("unmatched_masks", []))
    if warning:
        print(warning)


def _speed_text(summary: dict[str, Any]) -> str:
    """'2 processes (DDP, 8 images each, SyncBatchNorm), amp bf16, channels_last, compiled'."""
    config = summary["config"]
    parts = []
    if summary.get("processes", 1) > 1:
        ddp = f"DDP, {plural(summary['local_batch'], 'image')} each"
        if config.sync_bn:
            ddp += ", SyncBatchNorm"
        parts.append(f"{summary['processes']} processes ({ddp})")
    parts.append("fp32" if config.amp == "off" else f"amp {config.amp}")
    parts.append("channels_last" if summary.get("channels_last") else "NCHW")
    if config.compile:
        parts.append("compiled")
    if config.workers:
        parts.append(f"{plural(config.workers, 'data worker')}")
    return ", ".join(parts)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that reports."""
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace) -> int:
    from unetpp_fast.train.training import TrainingInterrupted, train

    options.setup_device(args)
    config = _config(args)
    log = None if config.progress else print  # without bars, tqdm.write and print are the same
    try:
        result = train(config, resume=args.resume, log=log, overwrite=args.overwrite, on_start=print_start)
    except TrainingInterrupted as stop:
        if _is_main_process():
            _explain_interrupt(stop)
        return 130
    if not _is_main_process():
        return 0
    print(
        f"best validation IoU {result.best_iou:.4f} at epoch {result.best_epoch} "
        f"({plural(result.epochs_run, 'epoch')}); checkpoints: {result.best_path}, {result.last_path}"
    )
    return 0


def _explain_interrupt(stop: Any) -> None:
    done = f"after {plural(stop.epochs_done, 'completed epoch')} of {stop.epochs}"
    if stop.last_path is None:
        print(f"unetpp-fast train: interrupted {done}; nothing was saved", file=sys.stderr)
        return
    command = f"unetpp-fast train --resume {shlex.quote(stop.last_path)} --epochs {stop.epochs}"
    print(
        f"unetpp-fast train: interrupted {done}; {stop.last_path} holds epoch {stop.epochs_done}",
        file=sys.stderr,
    )
    print(f"continue with:  {command}", file=sys.stderr)
