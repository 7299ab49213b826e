"""Reproduce the "Cell nuclei" column of Table 3 of the UNet++ paper on DSB2018 (96x96).

Trains U-Net, wide U-Net, UNet++ without and with deep supervision with the same recipe (Adam,
lr 3e-4, BCE + Dice, early stopping on validation IoU, the same seeded split) and prints the
paper's parameters and IoU beside ours.

    python benchmarks/reproduce_table3.py                     # GPU: the full runs (minutes each)
    python benchmarks/reproduce_table3.py --quick             # CPU smoke run: few images, narrow nets
    python benchmarks/reproduce_table3.py --paper-blocks      # conv-ReLU blocks + transposed-conv
                                                              # upsampling: the paper's 7.76M / 9.04M

The paper's numbers (Zhou et al., DLMIA 2018, Table 3) come from Keras models with one input
channel, no batch norm and 2x2 transposed-convolution upsampling, trained on their own split;
ours default to the pytorch-nested-unet recipe (conv-BN-ReLU, bilinear upsampling, RGB input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from unetpp_fast.train import training

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "dsb2018" / "96x96"
PAPER_FILTERS = (32, 64, 128, 256, 512)
WIDE_FILTERS = (35, 70, 140, 280, 560)

# Table 3 of the paper, "Cell nuclei" column: (parameters, IoU %).
PAPER_TABLE3 = {
    "U-Net": ("7.76M", 90.77),
    "wide U-Net": ("9.13M", 90.92),
    "UNet++ w/o DS": ("9.04M", 92.63),
    "UNet++ w/ DS": ("9.04M", 92.52),
}


def _scaled(filters: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    return tuple(max(1, f // divisor) for f in filters)


def experiments(quick: bool) -> list[tuple[str, dict]]:
    """(name, TrainConfig overrides); --quick divides every width by 4 so the CPU can train them."""
    divisor = 4 if quick else 1
    unet_filters = _scaled(PAPER_FILTERS, divisor)
    # wide_unet fixes its widths: the quick run uses a U-Net with the wide widths scaled alike.
    wide = {"arch": "wide_unet"} if not quick else {"arch": "unet", "filters": _scaled(WIDE_FILTERS, divisor)}
    return [
        ("U-Net", {"arch": "unet", "filters": unet_filters}),
        ("wide U-Net", wide),
        ("UNet++ w/o DS", {"arch": "unetpp", "filters": unet_filters, "deep_supervision": False}),
        ("UNet++ w/ DS", {"arch": "unetpp", "filters": unet_filters, "deep_supervision": True}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="DSB2018 folder (default: %(default)s)")
    parser.add_argument("--out", default="runs/table3", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="max epochs per model (default: 100; 3 with --quick)"
    )
    parser.add_argument(
        "--patience", type=int, default=20, help="early-stopping patience (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default: 16; 4 with --quick)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only this many images (default: all; 96 with --quick)"
    )
    parser.add_argument(
        "--seed", type=int, default=41, help="split / init / batch-order seed (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: 96 images, 3 epochs, batch 4, lr 1e-3, widths / 4",
    )
    parser.add_argument(
        "--paper-blocks",
        action="store_true",
        help="conv-ReLU blocks and transposed-conv upsampling (the paper's Keras models) instead of "
        "conv-BN-ReLU and bilinear upsampling",
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated subset of the rows, e.g. 'U-Net,UNet++ w/ DS'"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rerun into --out when it holds earlier runs (their files are moved aside, never deleted)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.data):
        print(
            f"reproduce_table3: error: data folder {args.data!r} does not exist (pass --data)",
            file=sys.stderr,
        )
        return 2
    epochs = args.epochs or (3 if args.quick else 100)
    limit = args.limit or (96 if args.quick else None)
    lr = args.lr if not args.quick or args.lr != 3e-4 else 1e-3  # a few quick epochs need a larger step
    wanted = [m.strip() for m in args.models.split(",")] if args.models else None
    block, upsample = ("conv_relu", "deconv") if args.paper_blocks else ("conv_bn_relu", "bilinear_ac")

    rows = []
    for name, overrides in experiments(args.quick):
        if wanted and name not in wanted:
            continue
        config = training.TrainConfig(
            data=args.data,
            out_dir=os.path.join(args.out, name.replace(" ", "_").replace("/", "")),
            epochs=epochs,
            batch_size=args.batch_size or (4 if args.quick else 16),
            lr=lr,
            patience=args.patience,
            limit=limit,
            seed=args.seed,
            device=args.device,
            block=block,
            upsample=upsample,
            progress=sys.stderr.isatty(),
            **overrides,
        )
        began = time.perf_counter()
        print(f"== {name}: {config.model_spec()}", flush=True)
        result = training.train(config, log=print, overwrite=args.overwrite)
        params = training.count_parameters(training.build_model(config.model_spec()))
        rows.append(
            {
                "model": name,
                "params": params,
                "iou": result.best_iou,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "minutes": (time.perf_counter() - began) / 60,
                "paper_params": PAPER_TABLE3[name][0],
                "paper_iou": PAPER_TABLE3[name][1],
            }
        )

    device = training.resolve_device(args.device)
    print()
    print(
        f"Table 3, cell nuclei (DSB2018 {'subset of ' + str(limit) + ' images' if limit else '670 images'}, "
        f"96x96, {device}{', quick: widths / 4' if args.quick else ''}, blocks {block}, upsample {upsample})"
    )
    print(
        "| architecture | params (paper) | params (ours) | IoU % (paper) | IoU % (ours) | best epoch / run |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['paper_params']} | {r['params'] / 1e6:.2f}M | {r['paper_iou']:.2f} | "
            f"{100 * r['iou']:.2f} | {r['best_epoch']} / {r['epochs_run']} |"
        )
    os.makedirs(args.out, exist_ok=True)
    summary = os.path.join(args.out, "table3.json")
    with open(summary, "w") as fh:
        json.dump(
            {"quick": args.quick, "limit": limit, "epochs": epochs, "device": str(device), "rows": rows},
            fh,
            indent=1,
        )
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
