r"""Small fused-conv cases that reach every kernel of a backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 benchmarks/sanitizer_cases.py --backend cuda
    compute-sanitizer --tool racecheck --error-exitcode 9 \
        python3 benchmarks/sanitizer_cases.py --backend cuda --quick

Each case runs forward and backward (every resample mode, kernel sizes 1 and 3, each activation,
fp32/fp16/bf16, NCHW and channels_last, odd sizes and channel counts so the edge masks are hit;
3D cases with 5-D pieces, NCDHW and channels_last_3d, when the backend declares 3D)
and is compared with the fp64 reference, so a kernel that reads or writes out of bounds, races,
or leaves output unwritten fails here rather than silently. Exit status 0 only if all match.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from unetpp_fast.ops import backends
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference

MODES = ("none", "up_nearest", "up_bilinear", "up_bilinear_ac", "maxpool2")
MODES_3D = ("none", "up_nearest", "up_trilinear", "up_trilinear_ac", "maxpool2")


def cases_3d(dtypes: list[torch.dtype], quick: bool) -> list[ConvCase]:
    """3D: every mode in one node (k = 3, both layouts), plus a 1x1x1 head and a wide vectorised node."""
    out = []
    seed = 1000
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            out.append(
                ConvCase(
                    batch=2,
                    channels=[8, 8, 8, 8, 16],
                    modes=list(MODES_3D),
                    out_hw=(4, 6, 6),
                    c_out=12,
                    k=3,
                    dtype=dtype,
                    layout=layout,
                    activation="relu",
                    seed=seed,
                )
            )
            seed += 1
            if quick:
                continue
            out.append(
                ConvCase(
                    batch=1,
                    channels=[32, 3],
                    modes=["none", "maxpool2"],
                    out_hw=(3, 5, 7),
                    c_out=40,
                    k=3,
                    dtype=dtype,
                    layout=layout,
                    activation="leaky_relu",
                    seed=seed,
                )
            )
            out.append(
                ConvCase(
                    batch=2,
                    channels=[16],
                    modes=["none"],
                    out_hw=(4, 4, 4),
                    c_out=1,
                    k=1,
                    dtype=dtype,
                    layout=layout,
                    activation="none",
                    seed=seed + 1,
                )
            )
            seed += 2
    return out


def cases(device: torch.device, quick: bool, backend: str = "cuda") -> list[ConvCase]:
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    if quick:
        dtypes = dtypes[:1] + dtypes[2:]  # fp32 and bf16
    out = []
    seed = 0
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            # one dense skip node reading every resample mode at once
            out.append(
                ConvCase(
                    batch=2,
                    channels=[3, 5, 4, 6, 2],
                    modes=list(MODES),
                    out_hw=(6, 10),
                    c_out=7,
                    k=3,
                    dtype=dtype,
                    layout=layout,
                    activation="relu",
                    seed=seed,
                )
            )
            seed += 1
            if quick:
                continue
            for mode in MODES:
                out.append(
                    ConvCase(
                        batch=1,
                        channels=[9],
                        modes=[mode],
                        out_hw=(10, 6),
                        c_out=5,
                        k=3,
                        dtype=dtype,
                        layout=layout,
                        activation="none",
                        seed=seed,
                    )
                )
                seed += 1
            out.append(
                ConvCase(
                    batch=3,
                    channels=[16, 17],
                    modes=["none", "up_bilinear_ac"],
                    out_hw=(8, 8),
                    c_out=33,
                    k=3,
                    dtype=dtype,
                    layout=layout,
                    activation="leaky_relu",
                    seed=seed,
                )
            )
            out.append(
                ConvCase(
                    batch=2,
                    channels=[32],
                    modes=["none"],
                    out_hw=(12, 12),
                    c_out=1,
                    k=1,
                    dtype=dtype,
                    layout=layout,
                    activation="none",
                    seed=seed + 1,
                )
            )
            seed += 2
    if 3 in backends.capabilities(backend).spatial_dims:
        out += cases_3d(dtypes, quick)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", help="fused backend to exercise (cuda, triton, cpu)")
    parser.add_argument("--device", default=None, help="default: cuda for cuda/triton, else cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases (racecheck is slow)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if args.backend in ("cuda", "triton") else "cpu"))
    reason = backends.why_unusable(args.backend, device)
    if reason:
        print(f"backend {args.backend} cannot run on {device}: {reason}")
        return 2
    failures = 0
    todo = cases(device, args.quick, args.backend)
    start = time.perf_counter()
    for case in todo:
        try:
            assert_matches_reference(case, args.backend, device)
        except AssertionError as exc:
            failures += 1
            print(f"FAIL {exc}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(
        f"{len(todo) - failures}/{len(todo)} cases match the fp64 reference on {args.backend} ({device}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
