"""The `unetpp-fast` command line: info, bench, train, eval, predict.

    unetpp-fast bench                                   # UNet++ L1..L4 and U-Net, fused vs plain PyTorch
    unetpp-fast train --data ../shared/data/dsb2018/96x96 --out runs/unetpp
    unetpp-fast eval runs/unetpp/best.pth
    unetpp-fast predict runs/unetpp/best.pth my_images/ --out masks/

Errors in what the user gave (paths, files, options) print one line and exit with status 2;
UNETPP_FAST_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from unetpp_fast import __version__
from unetpp_fast.bench import timing as bench_module
from unetpp_fast.train.data import DatasetError

EXIT_USAGE = 2
DEFAULT_BENCH_PLOT = "unetpp-fast-bench.png"
REFERENCE_BACKEND = bench_module.EAGER  # plain PyTorch: cat + interpolate / max_pool2d + conv2d + activation


class UsageError(ValueError):
    """A combination of options that cannot work."""


# ----------------------------------------------------------------------------------------------
# argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 32,64,128, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where to run: 'auto' (the GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N' "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "reference", "triton", "cuda", "cpu"),
        help="which implementation runs the fused convolutions: 'auto' picks cuda > triton on GPUs and "
        "cpu (the C++ extension) > reference on CPUs; 'reference' is plain PyTorch (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for PyTorch (default: PyTorch's choice, one per core). On a busy machine fewer "
        "threads than cores can be much faster",
    )


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unetpp-fast",
        description="UNet++ with fused virtual-concatenation convolutions: benchmark the pruning "
        "trade-off on this machine, train and evaluate on the DSB2018 cell-nuclei data.",
        epilog="Set UNETPP_FAST_DEBUG=1 to see full tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"unetpp-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser(
        "info",
        help="versions, usable backends, GPU, and what the extension was built with",
        description="Print versions (Python, PyTorch, CUDA, Triton), the GPU, the fused-convolution "
        "backends usable for CPU and CUDA tensors, and the build information of the compiled extension.",
    )
    info.add_argument("--json", action="store_true", help="print the information as JSON")

    bench = sub.add_parser(
        "bench",
        help="inference speed of UNet++ L1..L4 and U-Net: fused backend vs plain PyTorch",
        description="Time inference of UNet++ pruned to each level L1..L4 (fast mode: only the "
        "sub-network of head L runs) and of U-Net, with the fused backend and with plain PyTorch "
        "(cat + interpolate + conv2d: the reference), on the best available device. Prints a table "
        "(ms per batch, images/s, seconds per 10k images as in the paper's Fig. 3, speed-up) and "
        "draws time vs pruning level as a PNG. Defaults finish in about a minute on a 2-core CPU.",
    )
    bench.add_argument(
        "--device",
        default="auto",
        help="'auto' (the GPU when there is one), 'cpu', 'cuda' or 'cuda:N' (default: %(default)s)",
    )
    bench.add_argument(
        "--backends",
        default="auto",
        help="comma-separated benchmark backends: 'fused' (the fused operator, backend picked "
        "automatically), 'eager' (plain PyTorch, the reference), 'compile' (plain PyTorch under "
        "torch.compile; slow to start), or a fused backend forced by name: 'cpu', 'cuda', 'triton', "
        "'reference'. 'auto' = the fused backend of the device (cpu extension on CPUs, cuda/triton on "
        "GPUs) and eager (default: %(default)s)",
    )
    bench.add_argument(
        "--batch", type=_positive_int, default=None, help="images per batch (default: 4 on CPU, 64 on GPU)"
    )
    bench.add_argument(
        "--size", type=_positive_int, default=96, help="image height and width (default: %(default)s)"
    )
    bench.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="data type of weights and inputs: 'auto' = fp32 on CPU, bf16 on GPU (default: %(default)s)",
    )
    bench.add_argument(
        "--levels",
        type=_int_list,
        default=(1, 2, 3, 4),
        help="UNet++ pruning levels to time (default: 1,2,3,4)",
    )
    bench.add_argument(
        "--filters",
        type=_int_list,
        default=None,
        help="channels per level for UNet++ and U-Net (default: the paper's 32,64,128,256,512)",
    )
    bench.add_argument("--no-unet", action="store_true", help="leave out the U-Net rows")
    bench.add_argument("--wide-unet", action="store_true", help="add the wide U-Net rows (35,70,140,280,560)")
    bench.add_argument(
        "--channels-last",
        choices=("auto", "yes", "no"),
        default="auto",
        help="channels_last memory format: 'auto' = yes on GPU, no on CPU (default: %(default)s)",
    )
    bench.add_argument(
        "--warmup", type=_non_negative_int, default=None, help="untimed calls first (default: 1 CPU, 10 GPU)"
    )
    bench.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help="timed calls, median reported (default: 5 CPU, 30 GPU)",
    )
    bench.add_argument(
        "--plot",
        default=DEFAULT_BENCH_PLOT,
        help="PNG to draw time vs pruning level into; '' for none (default: %(default)s)",
    )
    bench.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write the rows as JSON to FILE; without FILE, print them on stdout instead of the table",
    )
    bench.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads for PyTorch (default: one per core)"
    )

    train = sub.add_parser(
        "train",
        help="train on DSB2018 (paper setting: 96x96, Adam 3e-4, BCE+Dice, early stopping)",
        description="Train U-Net / wide U-Net / UNet++ on cell-nuclei images as in the UNet++ paper: "
        "inputs resized to --size, Adam (lr 3e-4), the BCE + Dice loss of Eq. 2 (averaged over the heads "
        "with deep supervision), a seeded train/validation split, early stopping on validation IoU. "
        "Writes OUT/best.pth at each improvement, OUT/last.pth after every epoch (for --resume), "
        "OUT/history.json and OUT/history.png. The paper-size UNet++ (9M parameters) takes tens of "
        "seconds per batch on a 2-core CPU: for a quick CPU run try --filters 8,16,32,64,128 --batch-size 4.",
    )
    train.add_argument(
        "--data",
        default=None,
        help="dataset folder: merged layout (images/<id>.png + masks/<id>.png) or the Kaggle DSB2018 "
        "stage1_train layout (<id>/images/<id>.png + <id>/masks/*.png, one PNG per nucleus); "
        "required unless --resume",
    )
    train.add_argument(
        "--out", default="runs/unetpp", help="output folder for checkpoints and logs (default: %(default)s)"
    )
    train.add_argument(
        "--arch",
        default="unetpp",
        choices=("unetpp", "unet", "wide_unet"),
        help="model (default: %(default)s)",
    )
    train.add_argument(
        "--filters",
        type=_int_list,
        default=(32, 64, 128, 256, 512),
        help="channels per level, 3 to 6 levels (default: 32,64,128,256,512; ignored by wide_unet)",
    )
    ds = train.add_mutually_exclusive_group()
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
    train.add_argument(
        "--block",
        default="conv_bn_relu",
        choices=("conv_bn_relu", "conv_relu"),
        help="convolution block: conv-BN-ReLU twice, or the paper's conv-ReLU twice (default: %(default)s)",
    )
    train.add_argument(
        "--upsample",
        default="bilinear_ac",
        choices=("bilinear_ac", "bilinear", "nearest", "deconv"),
        help="decoder upsampling: bilinear with align_corners=True (as pytorch-nested-unet), bilinear, "
        "nearest, or a 2x2 transposed convolution (default: %(default)s)",
    )
    train.add_argument(
        "--size",
        type=_positive_int,
        default=96,
        help="images are resized to SIZE x SIZE (default: %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=100,
        help="total epochs, counting resumed ones (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size", type=_positive_int, default=16, help="images per step (default: %(default)s)"
    )
    train.add_argument(
        "--lr", type=_positive_float, default=3e-4, help="Adam learning rate (default: %(default)s)"
    )
    train.add_argument(
        "--weight-decay", type=float, default=0.0, help="Adam weight decay (default: %(default)s)"
    )
    train.add_argument(
        "--patience",
        type=_non_negative_int,
        default=20,
        help="stop after this many epochs without a better validation IoU; 0: never stop early "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.2,
        help="share of images held out for validation (default: %(default)s)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=41,
        help="seed of the split, the initial weights and the batch order (default: %(default)s)",
    )
    train.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="use only this many images (a seeded subset), for quick runs",
    )
    train.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random flips / 90-degree rotations"
    )
    train.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue from OUT/last.pth (or a run folder): the model, data split and optimizer come from "
        "it; --epochs, --patience, --out, --device, --backend apply",
    )
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_device_options(train)

    evaluate = sub.add_parser(
        "eval",
        help="IoU / Dice per pruning level and accurate mode, inference time, overlay PNG",
        description="Evaluate a checkpoint written by `train` on its validation split (rebuilt from the "
        "settings stored in the checkpoint): IoU and Dice for UNet++ pruned to L1..Ldepth and for the "
        "accurate mode (mean of the heads), the inference time per image of each, and an overlay PNG "
        "(image, ground truth, prediction, errors) of a few validation samples. Writes OUT/metrics.json "
        "and OUT/overlays.png.",
    )
    evaluate.add_argument("checkpoint", help="checkpoint file (best.pth) or run folder")
    evaluate.add_argument(
        "--data",
        default=None,
        help="dataset folder, if it moved since training (default: the one in the checkpoint)",
    )
    evaluate.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        help="images per forward pass, and per timed batch on a GPU (a CPU times 4) (default: %(default)s)",
    )
    evaluate.add_argument(
        "--samples",
        type=_non_negative_int,
        default=4,
        help="validation images drawn in the overlay PNG; 0 for none (default: %(default)s)",
    )
    evaluate.add_argument(
        "--rounds",
        type=_positive_int,
        default=3,
        help="timed forward passes per mode, median reported (default: %(default)s)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON instead of lines")
    _add_device_options(evaluate)

    predict = sub.add_parser(
        "predict",
        help="segment a folder of images with a checkpoint and write masks",
        description="Segment every image under INPUT (an image file, a folder of images, or a dataset "
        "folder in either layout) with a checkpoint from `train`; write one PNG mask (0/255) per image, "
        "at the image's own size, into --out.",
    )
    predict.add_argument("checkpoint", help="checkpoint file (best.pth) or run folder")
    predict.add_argument("input", help="image file or folder")
    predict.add_argument("--out", required=True, help="folder for the masks")
    predict.add_argument(
        "--level",
        type=_positive_int,
        default=None,
        help="use UNet++ pruned to head LEVEL (fast mode) instead of the accurate mode (mean of the heads)",
    )
    predict.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images per forward pass (default: %(default)s)"
    )
    _add_device_options(predict)
    return parser


# ----------------------------------------------------------------------------------------------
# commands


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def collect_info() -> dict[str, Any]:
    from unetpp_fast import available_backends, build_info
    from unetpp_fast.ops.backends import why_unusable

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this platform
        triton_version = None
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    backends: dict[str, Any] = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        unusable = {name: why_unusable(name, device) for name in ("reference", "triton", "cuda", "cpu")}
        backends[device] = {
            "available": available_backends(device),
            "unavailable": {k: v for k, v in unusable.items() if v},
        }
    if "cuda" not in backends:
        backends["cuda"] = {"available": [], "unavailable": {"all": "no CUDA GPU is visible to PyTorch"}}
    return {
        "unetpp_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_threads": torch.get_num_threads(),
        "gpus": gpus,
        "backends": backends,
        "build": build_info(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"unetpp-fast {info['unetpp_fast']}  (python {info['python']}, {info['platform']})")
    print(
        f"torch {info['torch']}  CUDA {info['torch_cuda'] or '-'}  triton {info['triton'] or 'not installed'}"
    )
    print(f"CPU threads: {info['cpu_threads']}")
    if info["gpus"]:
        for gpu in info["gpus"]:
            print(
                f"GPU {gpu['index']}: {gpu['name']} "
                f"(sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB)"
            )
    else:
        print("GPU: none visible to PyTorch")
    for device, entry in info["backends"].items():
        print(f"backends for {device} tensors: {', '.join(entry['available']) or 'none'}")
        for name, reason in entry["unavailable"].items():
            print(f"  {name}: {reason}")
    build = info["build"]
    print(
        f"extension: {'loaded' if build['extension_loaded'] else 'not loaded'}"
        + (f" ({build['extension_unavailable_reason']})" if build["extension_unavailable_reason"] else "")
    )
    print(
        f"  built with C++: {build['cxx']}, CUDA: {build['cuda']}"
        + (f" (archs {', '.join(build['cuda_archs'])})" if build["cuda_archs"] else "")
        + f"; against torch {build['built_against_torch']}, running torch {build['running_torch']}"
    )
    if build["kernels"]:
        print(f"  kernels: {', '.join(build['kernels'])}")
    return 0


def _bench_backends(spec: str, device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to run, notes) for --backends on `device`."""
    notes: list[str] = []
    if spec == "auto":
        if device.type == "cuda":
            chosen = [bench_module.FUSED, REFERENCE_BACKEND]
        elif not bench_module.backend_unusable("cpu", device):
            chosen = ["cpu", REFERENCE_BACKEND]
        else:
            chosen = [REFERENCE_BACKEND]
            reason = bench_module.backend_unusable("cpu", device)
            notes.append(
                f"note: the fused CPU backend is unavailable ({reason}); only the reference was timed"
            )
        return chosen, notes
    chosen = [b.strip() for b in spec.split(",") if b.strip()]
    for name in chosen:
        if name not in bench_module.BENCH_BACKENDS:
            raise UsageError(
                f"--backends: unknown backend {name!r}, expected some of {bench_module.BENCH_BACKENDS}"
            )
        reason = bench_module.backend_unusable(name, device)
        if reason:
            raise UsageError(f"--backends: {name!r} cannot run on {device}: {reason}")
    return chosen, notes


def _backend_label(backend: str, device: torch.device) -> str:
    """Table label: which implementation a benchmark backend runs ('fused' resolves to a concrete one)."""
    if backend == REFERENCE_BACKEND:
        return "reference (PyTorch)"
    if backend == bench_module.FUSED:
        from unetpp_fast.ops.backends import resolve_name, use_backend

        with use_backend("auto"):
            return f"fused ({resolve_name(device)})"
    if backend in bench_module.FUSED_BACKENDS:
        return f"fused ({backend})"
    return backend


def _params_used(rows: Sequence[dict[str, Any]], filters: Sequence[int] | None) -> None:
    """Add 'params_used': the parameters a pruned UNet++ level actually runs (its sub-network's)."""
    from unetpp_fast.nn.unetpp import UNetPlusPlus

    full = UNetPlusPlus(filters=tuple(filters) if filters else (32, 64, 128, 256, 512), deep_supervision=True)
    counts: dict[int, int] = {}
    for row in rows:
        level = row.get("prune")
        if level is not None and level not in counts:
            counts[level] = sum(p.numel() for p in full.pruned(level).parameters())
        row["params_used"] = counts[level] if level is not None else row.get("params")


BENCH_COLUMNS = {
    "model": "model",
    "backend_label": "backend",
    "params_used": "params",
    "ms_per_batch": "ms / batch",
    "images_per_s": "images / s",
    "s_per_10k": "s / 10k images",
    "ratio_vs_eager": "speed-up vs PyTorch",
}


def cmd_bench(args: argparse.Namespace) -> int:
    from unetpp_fast.train.training import resolve_device

    _set_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if gpu else "fp32")
    batch = args.batch or (64 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    rounds = args.rounds or (30 if gpu else 5)
    channels_last = gpu if args.channels_last == "auto" else args.channels_last == "yes"
    if args.filters is not None and len(args.filters) - 1 < max(args.levels):
        raise UsageError(
            f"--levels {max(args.levels)} needs at least {max(args.levels) + 1} --filters entries"
        )
    if max(args.levels) > 4 and args.filters is None:
        raise UsageError("--levels: the default network has 4 levels (1..4); pass --filters for a deeper one")
    size_multiple = 2 ** (len(args.filters) - 1 if args.filters else 4)
    if args.size % size_multiple:
        raise UsageError(f"--size {args.size} must be a multiple of {size_multiple} for this network depth")
    backends, notes = _bench_backends(args.backends, device)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    if args.json != "-":
        print(
            f"unetpp-fast bench on {device} ({where}): batch {batch}, {args.size}x{args.size}, {dtype}"
            f"{', channels_last' if channels_last else ''}, median of {rounds} after {warmup} warm-up",
            flush=True,
        )
    rows = bench_module.pruning_throughput(
        batch=batch,
        size=args.size,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        backends_to_run=backends,
        levels=args.levels,
        include_unet=not args.no_unet,
        include_wide_unet=args.wide_unet,
        warmup=warmup,
        rounds=rounds,
        filters=args.filters,
    )
    labels = {b: _backend_label(b, device) for b in backends}
    _params_used(rows, args.filters)
    for row in rows:
        row["backend_label"] = labels.get(row["backend"], row["backend"])
        row["device"] = str(device)
        row["device_name"] = where
    report = {"device": str(device), "device_name": where, "notes": notes, "rows": rows}
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        shown = [{title: r.get(key) for key, title in BENCH_COLUMNS.items()} for r in rows]
        print(bench_module.format_table(shown, list(BENCH_COLUMNS.values())))
        for note in notes:
            print(note)
        failed = [r for r in rows if r.get("error")]
        for row in failed:
            print(f"error: {row['model']} on {row['backend']}: {row['error']}")
        if args.json:
            _write_json(args.json, report)
            print(f"wrote {args.json}")
    if args.plot:
        from unetpp_fast.bench.plots import plot_pruning_speed

        plot_rows = [dict(r, backend=r["backend_label"]) for r in rows]
        title = f"{where}: batch {batch}, {args.size}x{args.size}, {dtype}"
        plot_pruning_speed(plot_rows, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 1 if rows and all(r.get("error") for r in rows) else 0


def _write_json(path: str, payload: Any) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def cmd_train(args: argparse.Namespace) -> int:
    from unetpp_fast.bench.plots import plot_history
    from unetpp_fast.train.training import TrainConfig, train

    _set_threads(args.threads)
    if not args.data and not args.resume:
        raise UsageError("train needs --data DATASET_FOLDER (or --resume CHECKPOINT)")
    config = TrainConfig(
        data=args.data or "",
        out_dir=args.out,
        arch=args.arch,
        filters=args.filters,
        deep_supervision=args.deep_supervision,
        block=args.block,
        upsample=args.upsample,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        val_fraction=args.val_fraction,
        seed=args.seed,
        limit=args.limit,
        augment=args.augment,
        device=args.device,
        backend=args.backend,
        progress=args.progress,
    )
    result = train(config, resume=args.resume, log=print if not args.progress else None)
    if result.history:
        plot_history(result.history, os.path.join(args.out, "history.png"))
    print(
        f"best validation IoU {result.best_iou:.4f} at epoch {result.best_epoch} "
        f"({result.epochs_run} epochs); checkpoints: {result.best_path}, {result.last_path}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from unetpp_fast.train.evaluation import evaluate

    _set_threads(args.threads)
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
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"wrote {report['metrics_path']}"
            + (f" and {report['overlay_path']}" if "overlay_path" in report else "")
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from unetpp_fast.train.evaluation import predict_folder

    _set_threads(args.threads)
    predict_folder(
        args.checkpoint,
        args.input,
        args.out,
        device=args.device,
        backend=args.backend,
        level=args.level,
        batch_size=args.batch_size,
    )
    return 0


COMMANDS = {
    "info": cmd_info,
    "bench": cmd_bench,
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from unetpp_fast.compat.checkpoint import StateDictMismatchError
    from unetpp_fast.train.training import CheckpointError

    return (
        DatasetError,
        CheckpointError,
        StateDictMismatchError,
        UsageError,
        FileNotFoundError,
        NotADirectoryError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for errors in the user's input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("UNETPP_FAST_DEBUG", "").strip() not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("unetpp-fast: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"unetpp-fast {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, RuntimeError) as exc:
        # Option values the model or a backend rejects (ValueError: exit 2), or a failure while running
        # (RuntimeError, e.g. a GPU asked for but absent: exit 1): one line, no traceback.
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"unetpp-fast {args.command}: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
