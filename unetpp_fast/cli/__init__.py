"""The `unetpp-fast` command line: info, bench, train, eval, predict.

    unetpp-fast bench                                   # UNet++ L1..L4 and U-Net, fused vs plain PyTorch
    unetpp-fast train --data ../shared/data/dsb2018/96x96 --out runs/unetpp
    unetpp-fast eval runs/unetpp/best.pth
    unetpp-fast predict runs/unetpp/best.pth my_images/ --out masks/

One module per subcommand, each with NAME, HELP, DESCRIPTION, add_arguments(parser) and
run(args) -> exit status; a new subcommand is one such module and one entry in SUBCOMMANDS.
Shared option groups and argument types live in `options`. Nothing is imported from torch until a
command runs, so `--help` answers at once.

Errors in what the user gave (paths, files, options, devices) print one line and exit with status
2; UNETPP_FAST_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from unetpp_fast.cli.options import EXIT_USAGE, UsageError

__all__ = ["EXIT_USAGE", "SUBCOMMANDS", "UsageError", "build_parser", "main"]

# Modules of unetpp_fast.cli, in the order `--help` lists them.
SUBCOMMANDS = ("info", "bench", "train", "evaluate", "predict", "export", "make_volumes")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unetpp-fast")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def subcommands() -> dict[str, ModuleType]:
    """{command name: its module}."""
    modules = [importlib.import_module(f"unetpp_fast.cli.{name}") for name in SUBCOMMANDS]
    return {module.NAME: module for module in modules}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetpp-fast",
        description="UNet++ with fused virtual-concatenation convolutions: benchmark the pruning "
        "trade-off on this machine, train and evaluate on the DSB2018 cell-nuclei data, segment images.",
        epilog="Set UNETPP_FAST_DEBUG=1 to see full tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"unetpp-fast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in subcommands().items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (exit 2), not that the program is."""
    from unetpp_fast.compat.checkpoint import StateDictMismatchError

    return (
        ValueError,
        StateDictMismatchError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename and exc.strerror:  # "[Errno 13] ..." reads badly
        text = f"{exc.strerror.lower()}: {exc.filename!r}"
    return text.splitlines()[0] if text else "failed without a message (UNETPP_FAST_DEBUG=1 shows where)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for errors in the user's input)."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get("UNETPP_FAST_DEBUG", "").strip() not in ("", "0")
    run = subcommands()[args.command].run
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"unetpp-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = isinstance(exc, _user_errors())
        if debug or not (user_error or isinstance(exc, RuntimeError)):
            raise  # a bug: the traceback is what a report needs
        # Under torchrun every process meets the same error: rank 0 alone says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"unetpp-fast {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
