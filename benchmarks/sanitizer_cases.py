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

# (batch, piece channels, modes, output size, C_out, k, activation): one row a case, run for each
# dtype and layout. `quick` (racecheck) keeps the rows marked True.
Row = tuple[int, list[int], list[str], tuple[int, ...], int, int, str, bool]

ROWS_2D: list[Row] = [
    # one dense skip node reading every resample mode at once, odd channel counts (generic path)
    (2, [3, 5, 4, 6, 2], list(MODES), (6, 10), 7, 3, "relu", True),
    *[(1, [9], [mode], (10, 6), 5, 3, "none", False) for mode in MODES],
    (3, [16, 17], ["none", "up_bilinear_ac"], (8, 8), 33, 3, "leaky_relu", False),
    (2, [32], ["none"], (12, 12), 1, 1, "none", False),
    # every piece vectorisable (C % 8 == 0) and blocks mostly covered: the CUDA halo-tile kernel in
    # channels_last (a partial block at the right edge, C_out 32 and 64 tiles, a partial N tile)
    (2, [32, 32], ["none", "up_bilinear_ac"], (16, 30), 32, 3, "relu", True),
    (1, [16, 64], ["none", "maxpool2"], (16, 30), 64, 3, "leaky_relu", False),
    (1, [8, 24, 16], ["up_nearest", "up_bilinear", "none"], (8, 16), 40, 3, "none", False),
    # the network's input convolution: one RGB piece (3 channels, either layout; Triton's packed
    # kernel, partial 16 x 16 blocks at the right and bottom edges)
    (2, [3], ["none"], (17, 30), 32, 3, "relu", True),
]
ROWS_3D: list[Row] = [
    (2, [8, 8, 8, 8, 16], list(MODES_3D), (4, 6, 6), 12, 3, "relu", True),
    (1, [32, 3], ["none", "maxpool2"], (3, 5, 7), 40, 3, "leaky_relu", False),
    (2, [16], ["none"], (4, 4, 4), 1, 1, "none", False),
]


def _cases(rows: list[Row], dtypes: list[torch.dtype], quick: bool, seed: int) -> list[ConvCase]:
    out = []
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for batch, channels, modes, out_hw, c_out, k, activation, in_quick in rows:
                if quick and not in_quick:
                    continue
                out.append(
                    ConvCase(batch, channels, modes, out_hw, c_out, k, dtype, layout, activation, seed=seed)
                )
                seed += 1
    return out


def cases_3d(dtypes: list[torch.dtype], quick: bool) -> list[ConvCase]:
    """3D: every mode in one node (k = 3, both layouts), plus a 1x1x1 head and a wide vectorised node."""
    return _cases(ROWS_3D, dtypes, quick, seed=1000)


def cases(device: torch.device, quick: bool, backend: str = "cuda") -> list[ConvCase]:
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    if quick:
        dtypes = dtypes[:1] + dtypes[2:]  # fp32 and bf16
    out = _cases(ROWS_2D, dtypes, quick, seed=0)
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
