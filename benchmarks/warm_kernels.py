"""Compile and tune, ahead of the timed suites, exactly the kernels the model benchmarks launch.

    python benchmarks/warm_kernels.py --device cuda --sizes 96:64,512:8 --dtype bf16 --backends triton,cuda

Runs each model (UNet++ L1..L4 and accurate mode, U-Net, wide U-Net) once per backend, size
and pass (inference; a training step for the fused backends), channels_last, so that Triton's
compilation and autotuning (persisted across processes) happen here, under their own time box in
benchmarks/gpu_check.sh, and not inside a timed benchmark. Prints one line per case with its
seconds; a failing case is reported and the rest go on (exit status 1 at the end). `--dims 3`
warms the 3D networks (one-channel volumes size^3, channels_last_3d) instead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from unetpp_fast.bench import timing as bench

MODELS = {
    "L1": ("unetpp", 1),
    "L2": ("unetpp", 2),
    "L3": ("unetpp", 3),
    "L4": ("unetpp", 4),
    "accurate": ("unetpp", None),
    "unet": ("unet", None),
    "wide_unet": ("wide_unet", None),
}


def _sizes(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        size, _, batch = item.partition(":")
        pairs.append((int(size), int(batch or 1)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="96:64,512:8", help="size:batch pairs")
    parser.add_argument("--dtype", default="bf16", choices=sorted(bench.DTYPES))
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--filters", default="", help="narrow networks for a dry run, e.g. 4,8,8,8,8")
    parser.add_argument("--no-train", action="store_true", help="inference kernels only")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="3: the 3D networks on volumes")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = bench.dtype_from_name(args.dtype)
    filters = tuple(int(f) for f in args.filters.split(",")) if args.filters else None
    channels = 1 if args.dims == 3 else 3
    layout = torch.channels_last_3d if args.dims == 3 else torch.channels_last
    failed = 0
    for backend in [b for b in args.backends.split(",") if b]:
        reason = bench.backend_unusable(backend, device, args.dims)
        if reason:
            print(f"skip {backend}: {reason}")
            continue
        for size, batch in _sizes(args.sizes):
            for name in [m for m in args.models.split(",") if m]:
                arch, prune = MODELS[name]
                start = time.perf_counter()
                try:
                    net = bench.build_model(
                        arch,
                        prune=prune,
                        device=device,
                        dtype=dtype,
                        channels_last=True,
                        filters=filters if arch != "wide_unet" else None,
                        in_channels=channels,
                        spatial_dims=args.dims,
                    )
                    x = torch.randn(batch, channels, *(size,) * args.dims, device=device, dtype=dtype)
                    x = x.contiguous(memory_format=layout)
                    with bench.run_with(backend), torch.no_grad():
                        net(x)
                    if not args.no_train and arch == "unetpp" and prune is None:
                        with bench.run_with(backend):
                            step = bench.make_training_step(
                                net.train(),
                                batch,
                                size,
                                dtype,
                                True,
                                backend,
                                channels,
                                spatial_dims=args.dims,
                            )
                            step()
                    bench.synchronize(device)
                    status = "ok"
                except Exception as exc:  # report and go on: the other kernels still get warmed
                    failed = 1
                    status = f"FAILED: {type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - start
                shape = f"{size}^3" if args.dims == 3 else f"{size}px"
                print(f"{backend:8s} {shape:>6s} b{batch:<3d} {name:9s} {seconds:7.1f} s  {status}")
                sys.stdout.flush()
    return failed


if __name__ == "__main__":
    sys.exit(main())
