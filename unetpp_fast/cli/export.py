"""`unetpp-fast export`: a trained checkpoint as an ONNX file of standard operators, parity-checked."""

from __future__ import annotations

import argparse

from unetpp_fast.cli import options
from unetpp_fast.cli.options import UsageError, positive_int

NAME = "export"
HELP = "write a checkpoint as an ONNX file (standard operators), checked against PyTorch in onnxruntime"
DESCRIPTION = (
    "Export a checkpoint written by `train` to ONNX for ONNX Runtime, TensorRT or an inference server: "
    "every fused convolution becomes Concat/Resize/MaxPool -> Conv -> Relu, BatchNorm is folded into the "
    "Conv weights, batch, height and width are dynamic (height and width multiples of 2**depth). By "
    "default the model is exported as `eval` runs it (accurate mode: the mean of the heads); --level N "
    "exports only the sub-network of head N (pruned UNet++, fewer Conv nodes). The file is then run in "
    "onnxruntime on a random input of another batch and size and compared with PyTorch. Needs the "
    'export extra: pip install "unetpp-fast[export]".'
)
TOLERANCE = 1e-4  # relative, fp32: above it the export is reported as failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_checkpoint_argument(parser)
    add = parser.add_argument
    add("--onnx", required=True, metavar="OUT", help="the .onnx file to write (its folder is created)")
    add(
        "--level",
        type=positive_int,
        default=None,
        metavar="N",
        help="export UNet++ pruned to level N (1..depth): only the nodes X[i,j] with i + j <= N and head N "
        "(default: the whole model in accurate mode)",
    )
    add(
        "--size",
        type=positive_int,
        default=None,
        help="height and width of the example input, a multiple of 2**depth (default: the training size)",
    )
    add(
        "--static",
        action="store_true",
        help="fix the batch (1) and the spatial size to the example's instead of dynamic dimensions",
    )
    add("--opset", type=positive_int, default=18, help="ONNX opset version (default: %(default)s)")
    add(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip running the file in onnxruntime and comparing its output with PyTorch's",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from unetpp_fast.compat import export as deploy
    from unetpp_fast.train.training import load_trained

    model, payload = load_trained(args.checkpoint, "cpu")  # ONNX files are written from fp32 CPU weights
    size = args.size or int(payload.get("config", {}).get("size", 96))
    # Level L keeps L halvings: its sizes need only be multiples of 2**L.
    multiple = 2**args.level if args.level else deploy.spatial_multiple(model) or 1
    if size % multiple:
        raise UsageError(f"--size {size} must be a multiple of {multiple} (one halving per level)")
    in_channels = int(payload["model"].get("in_channels", 3))
    example = torch.randn(1, in_channels, size, size)
    options.print_header(
        NAME,
        [
            ("checkpoint", f"{payload['path']} (epoch {payload.get('epoch', '?')})"),
            ("model", options.describe_model(payload["model"], payload.get("params", 0))),
            ("export", f"level {args.level}" if args.level else "whole model (accurate mode)"),
            ("shapes", f"static 1x{in_channels}x{size}x{size}" if args.static else _dynamic_text(multiple)),
        ],
    )
    try:
        path = deploy.export_onnx(
            model, args.onnx, example, level=args.level, dynamic=not args.static, opset=args.opset
        )
    except ImportError as exc:  # the optional export packages are missing: the user can fix that
        raise UsageError(str(exc)) from None
    ops = deploy.onnx_op_counts(path)
    summary = ", ".join(f"{count} {op}" for op, count in sorted(ops.items(), key=lambda kv: -kv[1]))
    print(f"wrote {path} (opset {args.opset}): {summary}")
    if not args.check:
        return 0
    # Another batch and size than the example's when they are dynamic: the check covers that too.
    shape = (1, in_channels, size, size) if args.static else (2, in_channels, size + multiple, size)
    try:
        error = deploy.onnx_relative_error(path, model, torch.randn(shape), level=args.level)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    verdict = "ok" if error <= TOLERANCE else f"FAILED (tolerance {TOLERANCE:.0e})"
    print(f"onnxruntime vs PyTorch at {'x'.join(map(str, shape))}: relative error {error:.2e} {verdict}")
    return 0 if error <= TOLERANCE else 1


def _dynamic_text(multiple: int) -> str:
    return f"dynamic batch, height and width (multiples of {multiple})"
