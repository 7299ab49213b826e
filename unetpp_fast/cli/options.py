"""What every subcommand shares: argument types, option groups, headers, errors, number formatting.

Nothing here imports torch at module level: `unetpp-fast --help` builds every parser without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from unetpp_fast.train.text import plural

EXIT_USAGE = 2


class UsageError(ValueError):
    """A combination of options that cannot work."""


# ----------------------------------------------------------------------------------------------
# argument types


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in its own messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1")
probability = _number(float, lambda v: 0.0 <= v <= 1.0, "a probability between 0 and 1")


def int_list(text: str) -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128)."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 32,64,128, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------
# option groups


def add_device_options(parser: argparse.ArgumentParser, backend: bool = True) -> None:
    """--device, --backend, --threads."""
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default="auto",
        help="where to run: 'auto' (the GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N' "
        "(default: %(default)s)",
    )
    if backend:
        group.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "reference", "triton", "cuda", "cpu"),
            help="which implementation runs the fused convolutions: 'auto' picks cuda > triton on GPUs and "
            "cpu (the C++ extension) > reference on CPUs; 'reference' is plain PyTorch "
            "(default: %(default)s)",
        )
    group.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for PyTorch (default: PyTorch's choice, one per core). On a busy machine fewer "
        "threads than cores can be much faster",
    )


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file (best.pth) or run folder")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (they are off anyway when stderr is not a terminal, e.g. in a log file)",
    )


def progress_enabled(args: argparse.Namespace) -> bool:
    """Bars only on a terminal: redirected into a log, every redraw would be a new line."""
    return bool(getattr(args, "progress", True)) and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------
# running


def setup_device(args: argparse.Namespace) -> Any:
    """Apply --threads and resolve --device (a GPU asked for but absent is a usage error)."""
    import torch

    from unetpp_fast.train.training import resolve_device

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def write_json(path: str, payload: Any) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def describe_model(spec: dict[str, Any], params: int) -> str:
    """'UNet++ 8,16,32,64 (deep supervision), 120,345 parameters'."""
    names = {"unetpp": "UNet++", "unet": "U-Net", "wide_unet": "wide U-Net"}
    text = names.get(spec.get("arch", ""), str(spec.get("arch")))
    if spec.get("filters"):
        text += " " + ",".join(str(f) for f in spec["filters"])
    if spec.get("arch") == "unetpp":
        text += " (deep supervision)" if spec.get("deep_supervision") else " (one head)"
    return f"{text}, {plural(params, 'parameter')}"


def device_text(device: Any, backend: str) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}), backend {backend}"
    return f"cpu ({plural(torch.get_num_threads(), 'thread')}), backend {backend}"


def print_header(command: str, rows: Iterable[tuple[str, str]], file: Any = None) -> None:
    """The settings a job runs with, one per line, before it starts."""
    out = file or sys.stdout
    print(f"unetpp-fast {command}", file=out)
    for key, value in rows:
        print(f"  {key:<11} {value}", file=out)
    out.flush()


def unmatched_mask_warning(masks: list[str]) -> str | None:
    """One line about mask files that have no image (they are left out), or None."""
    if not masks:
        return None
    shown = ", ".join(os.path.basename(m) for m in masks[:3]) + (", ..." if len(masks) > 3 else "")
    return f"warning: {plural(len(masks), 'mask')} without an image, left out: {shown}"
