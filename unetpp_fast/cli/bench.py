"""`unetpp-fast bench`: inference speed of UNet++ L1..L4 and U-Net, fused backend vs plain PyTorch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from unetpp_fast.cli import options
from unetpp_fast.cli.options import UsageError, int_list, non_negative_int, plural, positive_int, write_json

NAME = "bench"
HELP = "inference speed of UNet++ L1..L4 and U-Net: fused backend vs plain PyTorch"
DESCRIPTION = (
    "Time inference of UNet++ pruned to each level L1..L4 (fast mode: only the sub-network of head L "
    "runs) and of U-Net, with the fused backend and with plain PyTorch (cat + interpolate + conv2d: the "
    "reference), on the best available device. Prints a table (ms per batch, images/s, seconds per 10k "
    "images as in the paper's Fig. 3, speed-up, and which backend ran how many convolutions per "
    "forward) and draws time vs pruning level as a PNG. --dims 3 times the 3D networks on volumes "
    "(3x3x3 convolutions, one input channel; 64^3 batch 2 bf16 on a GPU, 32^3 batch 1 on a CPU); "
    "--train-step adds forward + backward + Adam rows of the full UNet++. Defaults finish in about a "
    "minute on a 2-core CPU."
)
DEFAULT_PLOT = "unetpp-fast-bench.png"
COLUMNS = {
    "model": "model",
    "backend_label": "backend",
    "params_used": "params",
    "ms_per_batch": "ms / batch",
    "images_per_s": "images / s",
    "s_per_10k": "s / 10k images",
    "ratio_vs_eager": "speed-up vs PyTorch",
    "ran": "convolutions ran on",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--backends",
        default="auto",
        help="comma-separated benchmark backends: 'fused' (the fused operator, "
        "backend picked automatically), 'eager' (plain PyTorch, the reference), 'compile' (plain PyTorch "
        "under torch.compile; slow to start), or a fused backend forced by name: 'cpu', 'cuda', 'triton', "
        "'reference'. 'auto' = 'fused,eager': each fused convolution on the backend auto picks by "
        "measurement (plain PyTorch included for inference) (default: %(default)s)",
    )
    _add_shape_options(parser)
    _add_model_options(parser)
    _add_output_options(parser)
    options.add_device_options(parser, backend=False)


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--dims",
        type=int,
        choices=(2, 3),
        default=2,
        help="2: images [N, 3, S, S]; 3: volumes [N, 1, S, S, S] and the 3D networks (default: %(default)s)",
    )
    add(
        "--batch",
        type=positive_int,
        default=None,
        help="images (volumes) per batch (default: 4 on CPU, 64 on GPU; 3D: 1 on CPU, 2 on GPU)",
    )
    add(
        "--size",
        type=positive_int,
        default=None,
        help="image height and width / volume side (default: 96; 3D: 32 on CPU, 64 on GPU)",
    )
    add(
        "--train-step",
        action="store_true",
        help="add rows timing one training step (forward, backward, Adam) of the full UNet++",
    )
    add(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="data type of weights and inputs: 'auto' = fp32 on CPU, bf16 on GPU (default: %(default)s)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--levels",
        type=int_list,
        default=(1, 2, 3, 4),
        help="UNet++ pruning levels to time (default: 1,2,3,4)",
    )
    add(
        "--filters",
        type=int_list,
        default=None,
        help="channels per level for UNet++ and U-Net (default: the paper's 32,64,128,256,512)",
    )
    add("--no-unet", action="store_true", help="leave out the U-Net rows")
    add("--wide-unet", action="store_true", help="add the wide U-Net rows (35,70,140,280,560)")
    add(
        "--channels-last",
        choices=("auto", "yes", "no"),
        default="auto",
        help="channels_last memory format: 'auto' = yes on GPU, no on CPU (default: %(default)s)",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--warmup", type=non_negative_int, default=None, help="untimed calls first (default: 2 CPU, 10 GPU)")
    add(
        "--rounds",
        type=positive_int,
        default=None,
        help="timed rounds; each round runs every backend once, interleaved (default: 20 CPU, 30 GPU)",
    )
    add(
        "--plot",
        default=DEFAULT_PLOT,
        help="PNG to draw time vs pruning level into; '' for none (default: %(default)s)",
    )
    add(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write the rows as JSON to FILE; without FILE, print them on stdout instead of the table",
    )


def _check_shape_options(args: argparse.Namespace) -> None:
    if args.filters is not None and len(args.filters) - 1 < max(args.levels):
        raise UsageError(
            f"--levels {max(args.levels)} needs at least {max(args.levels) + 1} --filters entries"
        )
    if max(args.levels) > 4 and args.filters is None:
        raise UsageError("--levels: the default network has 4 levels (1..4); pass --filters for a deeper one")
    size_multiple = 2 ** (len(args.filters) - 1 if args.filters else 4)
    if args.size is not None and args.size % size_multiple:
        raise UsageError(f"--size {args.size} must be a multiple of {size_multiple} for this network depth")


def choose_backends(spec: str, device: Any, dims: int = 2) -> tuple[list[str], list[str]]:
    """(benchmark backends to run, notes) for --backends on `device`."""
    from unetpp_fast.bench import timing

    if spec == "auto":
        # The fused model under `auto`, which picks per convolution (by measurement, reference
        # included for inference): the "convolutions ran on" column says what it picked.
        notes = []
        reason = timing.backend_unusable("cpu", device, dims) if device.type == "cpu" else ""
        if reason:
            notes.append(f"note: the fused CPU backend is unavailable ({reason})")
        return [timing.FUSED, timing.EAGER], notes
    chosen = [b.strip() for b in spec.split(",") if b.strip()]
    for name in chosen:
        if name not in timing.BENCH_BACKENDS:
            raise UsageError(
                f"--backends: unknown backend {name!r}, expected some of {', '.join(timing.BENCH_BACKENDS)}"
            )
        reason = timing.backend_unusable(name, device, dims)
        if reason:
            raise UsageError(f"--backends: {name!r} cannot run on {device}: {reason}")
    return chosen, []


def backend_label(backend: str, device: Any) -> str:
    """Table label: which implementation a benchmark backend runs ('fused': auto, per convolution)."""
    from unetpp_fast.bench import timing

    if backend == timing.EAGER:
        return "reference (PyTorch)"
    if backend == timing.FUSED:
        return "fused (auto)"
    return f"fused ({backend})" if backend in timing.FUSED_BACKENDS else backend


def add_params_used(rows: Sequence[dict[str, Any]], filters: Sequence[int] | None, dims: int = 2) -> None:
    """Add 'params_used': the parameters a pruned UNet++ level actually runs (its sub-network's)."""
    from unetpp_fast.nn.unetpp import UNetPlusPlus

    full = UNetPlusPlus(
        in_channels=3 if dims == 2 else 1,
        filters=tuple(filters) if filters else (32, 64, 128, 256, 512),
        deep_supervision=True,
        spatial_dims=dims,
    )
    counts: dict[int, int] = {}
    for row in rows:
        level = row.get("prune")
        if level is not None and level not in counts:
            counts[level] = sum(p.numel() for p in full.pruned(level).parameters())
        row["params_used"] = counts[level] if level is not None else row.get("params")


def format_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table cells: counts with thousands separators, large numbers without decimals."""

    def cell(value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
            return f"{value:,.0f}"
        return value

    return [{title: cell(r.get(key)) for key, title in COLUMNS.items()} for r in rows]


def _settings(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    volumes = args.dims == 3
    default_batch = (2 if gpu else 1) if volumes else (64 if gpu else 4)
    default_size = (64 if gpu else 32) if volumes else 96
    return {
        "dtype": args.dtype if args.dtype != "auto" else ("bf16" if gpu else "fp32"),
        "batch": args.batch or default_batch,
        "size": args.size or default_size,
        "warmup": args.warmup if args.warmup is not None else (10 if gpu else 2),
        "rounds": args.rounds or (30 if gpu else 20),
        "channels_last": gpu if args.channels_last == "auto" else args.channels_last == "yes",
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from unetpp_fast.bench import timing
    from unetpp_fast.cli.options import setup_device

    device = setup_device(args)
    gpu = device.type == "cuda"
    s = _settings(args, gpu)
    args.size = s["size"]
    _check_shape_options(args)
    backends, notes = choose_backends(args.backends, device, args.dims)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {plural(torch.get_num_threads(), 'thread')}"
    shape = "x".join([str(args.size)] * args.dims)
    if args.json != "-":
        layout = ", channels_last" if s["channels_last"] else ""
        print(
            f"unetpp-fast bench on {device} ({where}): batch {s['batch']}, {shape}, "
            f"{s['dtype']}{layout}, median of {s['rounds']} interleaved rounds after {s['warmup']} "
            "warm-up (speed-up: the median of the per-round ratios)",
            flush=True,
        )
    rows = timing.pruning_throughput(
        batch=s["batch"],
        size=args.size,
        device=device,
        dtype=s["dtype"],
        channels_last=s["channels_last"],
        backends_to_run=backends,
        levels=args.levels,
        include_unet=not args.no_unet,
        include_wide_unet=args.wide_unet,
        warmup=s["warmup"],
        rounds=s["rounds"],
        filters=args.filters,
        spatial_dims=args.dims,
    )
    add_params_used(rows, args.filters, args.dims)
    if args.train_step:
        rows += train_step_rows(args, s, device, backends)
    labels = {b: backend_label(b, device) for b in backends}
    for row in rows:
        row.update(
            backend_label=labels.get(row["backend"], row["backend"]), device=str(device), device_name=where
        )
        row["ran"] = None if row.get("error") else timing.calls_text(row.get("backend_calls"))
    report = {"device": str(device), "device_name": where, "dims": args.dims, "notes": notes, "rows": rows}
    _report(args, report)
    if args.plot:
        from unetpp_fast.bench.plots import plot_pruning_speed

        plot_rows = [
            dict(r, backend=r["backend_label"]) for r in rows if r.get("prune") or r["model"] == "U-Net"
        ]
        plot_pruning_speed(plot_rows, args.plot, f"{where}: batch {s['batch']}, {shape}, {s['dtype']}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 1 if rows and all(r.get("error") for r in rows) else 0


def train_step_rows(
    args: argparse.Namespace, s: dict[str, Any], device: Any, backends: Sequence[str]
) -> list:
    """Rows timing one training step (forward, backward, Adam) of the full UNet++ per backend."""
    from unetpp_fast.bench import timing

    channels = 3 if args.dims == 2 else 1
    kw: dict[str, Any] = {"device": device, "in_channels": channels, "spatial_dims": args.dims}
    if args.filters:
        kw["filters"] = args.filters
    runnable = [b for b in backends if b != timing.FUSED_GRAPH]
    # every backend's steps interleaved round by round (see timing.interleaved_timing)
    results = timing.training_step_throughputs(
        lambda: timing.build_model("unetpp", **kw),
        runnable,
        s["batch"],
        args.size,
        device,
        s["dtype"],
        s["channels_last"],
        warmup=s["warmup"],
        rounds=s["rounds"],
        in_channels=channels,
        spatial_dims=args.dims,
    )
    rows: list[dict[str, Any]] = []
    for backend, result in results.items():
        row: dict[str, Any] = {"model": "UNet++ train step", "prune": None, "backend": backend, "error": None}
        row.update(dtype=s["dtype"], batch=s["batch"], size=args.size, spatial_dims=args.dims)
        if isinstance(result, BaseException):
            row["error"] = timing.error_text(result)
        else:
            row.update(timing.throughput_fields(result), peak_memory_bytes=result.peak_memory_bytes)
        rows.append(row)
    eager = results.get(timing.EAGER)
    for row in rows:
        result = results[row["backend"]]
        paired = isinstance(eager, timing.Throughput) and isinstance(result, timing.Throughput)
        row["ratio_vs_eager"] = timing.paired_speedup(result, eager) if paired else None
    return rows


def _report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from unetpp_fast.bench import timing

    if args.json == "-":
        print(json.dumps(report, indent=1))
        return
    print(timing.format_table(format_rows(report["rows"]), list(COLUMNS.values())))
    for note in report["notes"]:
        print(note)
    for row in report["rows"]:
        if row.get("error"):
            print(f"error: {row['model']} on {row['backend']}: {row['error']}")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
