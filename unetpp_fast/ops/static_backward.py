"""Static estimate of the CUDA tensor-core fused backward: an *estimate from SASS*, never a measurement.

The kernels of csrc/cuda/fused_conv_bwd_tc.cu (dgrad per piece, the bilinear dgrad, the split-K
wgrad) are read from the extension's sm_90 SASS (`sass.py`: per hot-loop trip, the `none` path for
K blocks fed by cp.async only and the longest path for the wgrad's resampled pieces, whose values are
computed in registers). Per kernel the same three times as `static_model` (its H200 constants):
issue (warp instructions / SMs x 4 schedulers x clock), tensor (tile FLOPs, M / N / K padded to the
tiles, at 990 TFLOP/s) and memory (bytes / 4.8 TB/s); a kernel costs the largest, the kernels of a
node run one after another (their times add). The node's floor: max(2 x the forward's FLOPs /
990 TFLOP/s, unavoidable bytes / 4.8 TB/s), the bytes being grad_pre, the pieces and the weight read
once and every gradient written once. ASSUMPTIONS lists what the estimate adds to static_model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.kernel_resources import demangle, short_name
from unetpp_fast.ops.sass import LoopStats, hot_loops, loop_tensor_flops_per_warp, outside_path, parse_sass
from unetpp_fast.ops.static_model import (
    CLOCK_HZ,
    HBM_BYTES_PER_S,
    ISSUE_PER_SM_PER_CLOCK,
    SMS,
    TENSOR_FLOPS,
    ConvShape,
)

# Tiles of fused_conv_bwd_tc.cu (keep in step with its constants): 64 x 64 CTA tiles, dgrad K blocks
# of 32 output channels, wgrad K blocks of 32 pixels along a row (x k taps), bilinear dgrad CTAs of
# 4 x 8 sources; warps per CTA by kernel (dgrad 2 with 64 x 32 warp tiles, wgrad 4 with 32 x 32).
TILE = 64
WARPS = {"dgrad_kernel": 2, "dgrad_bilinear_kernel": 2, "wgrad_kernel_k1": 4, "wgrad_kernel_k3": 4}
DGRAD_K = 32
WGRAD_K = 32
SOURCE_BLOCK = (4, 8)
# Keys of kernel_costs: the wgrad is templated on the kernel size (one CTA per kernel row of taps).
KERNELS = ("dgrad_kernel", "dgrad_bilinear_kernel", "wgrad_kernel_k1", "wgrad_kernel_k3")

ASSUMPTIONS = (
    "static_model.ASSUMPTIONS and BLIND_SPOTS apply (H200 constants, throughput only).",
    "Per trip a dgrad K block costs its hot loop's cp.async path; a wgrad K block of a 64-channel tile "
    "the cp.async path when every channel of the tile is none / up_nearest, else the longest path (each "
    "warp holds all 8 chunks of the tile, so one max-pool or bilinear chunk makes every warp take it).",
    "A wgrad trip is one 32-pixel segment of an image row for the k taps of a kernel row (its "
    "halo of 32 + k - 1 virtual pixels built once); the split chunks' rounding is ignored.",
    "A bilinear dgrad CTA runs the GEMM over its source block's support: 2b + 2 virtual rows per b "
    "sources (2b + 3 with align_corners), padded to 64-row tiles; its gather epilogue is the code "
    "outside the hot loop, counted once per CTA.",
    "Memory: each dgrad launch reads grad_pre and the packed weight once and writes its piece's "
    "gradient once; the wgrad reads grad_pre and the pieces once (re-reads across taps and tiles hit "
    "L2) and writes + re-reads its fp32 split-K partials; the weight-pack and reduction kernels are "
    "counted as bytes only.",
)


@dataclass(frozen=True)
class LoopCost:
    """Warp instructions of one backward kernel (per warp): per hot-loop trip (two paths) and outside
    it, per CTA; `warps` of them run each CTA."""

    kernel: str
    cp_async_path: float
    longest_path: float
    outside: float
    tensor_flops_per_trip: float  # per CTA (all warps)
    warps: int  # WARPS[kernel]


def kernel_costs(sass_text: str, dtype: str = "__nv_bfloat16") -> dict[str, LoopCost]:
    """The hot-loop costs of the three kernels, from `cuobjdump -sass` text of the extension or a cubin."""
    functions = parse_sass(sass_text)
    names = demangle([f.name for f in functions])
    found: dict[str, LoopCost] = {}
    for function in functions:
        short = short_name(names[function.name])
        kernel, _, arguments = short.partition("<")
        arguments = [a.strip() for a in arguments.rstrip(">").split(",")]
        if arguments[0] != dtype:
            continue
        if kernel == "wgrad_kernel" and len(arguments) == 2:
            kernel = f"wgrad_kernel_k{arguments[1]}"
        if kernel not in KERNELS:
            continue
        loops: list[LoopStats] = hot_loops(function)
        if len(loops) != 1:
            raise RuntimeError(f"{short}: expected one tensor-core hot loop, found {len(loops)}")
        loop = loops[0]
        found[kernel] = LoopCost(
            kernel=short,
            cp_async_path=float(loop.min_path),
            longest_path=float(loop.max_path),
            outside=float(outside_path(function, loops)),
            tensor_flops_per_trip=loop_tensor_flops_per_warp(loop) * WARPS[kernel],
            warps=WARPS[kernel],
        )
    missing = [k for k in KERNELS if k not in found]
    if missing:
        raise RuntimeError(f"no {missing} <{dtype}> in the SASS")
    return found


def wgrad_segments(shape: ConvShape) -> int:
    """The wgrad's K blocks: segments of 32 pixels along x of one image row (fused_conv_bwd_tc.h)."""
    return shape.batch * shape.out_height * math.ceil(shape.out_width / WGRAD_K)


def wgrad_tiles(shape: ConvShape) -> int:
    """wgrad CTAs per split: output-channel tiles x kernel rows x virtual-channel tiles."""
    c_in = sum(c for c, *_ in shape.pieces)
    return math.ceil(shape.out_channels / TILE) * shape.kernel * math.ceil(c_in / TILE)


def wgrad_splits(shape: ConvShape) -> int:
    """fused_conv_bwd_tc.h tc_bwd_splits."""
    return max(1, min(math.ceil(264 / wgrad_tiles(shape)), math.ceil(wgrad_segments(shape) / 8)))


def _plain_channel_tiles(shape: ConvShape) -> int:
    """wgrad channel tiles (64 virtual channels) whose every channel is read by cp.async (none /
    up_nearest pieces): their warps never take the resampled path."""
    resampled = []
    offset = 0
    for channels, _, _, code in shape.pieces:
        if code not in (conv_spec.NONE, conv_spec.UP_NEAREST):
            resampled.append((offset, offset + channels))
        offset += channels
    tiles = math.ceil(offset / TILE)
    return sum(
        1 for t in range(tiles) if not any(lo < (t + 1) * TILE and hi > t * TILE for lo, hi in resampled)
    )


def _kernel_time(instructions: float, tile_flops: float, moved: float, ctas: int) -> dict[str, float]:
    sms = max(1, min(ctas, SMS))
    return {
        "issue": instructions / (sms * ISSUE_PER_SM_PER_CLOCK * CLOCK_HZ),
        "tensor": tile_flops / (TENSOR_FLOPS * sms / SMS),
        "memory": moved / HBM_BYTES_PER_S,
    }


def _bilinear_rows(shape: ConvShape, height: int, width: int, code: int) -> tuple[int, int]:
    """(CTAs along the image, GEMM rows per CTA) of a bilinear piece's dgrad."""
    extra = 3 if code == conv_spec.UP_BILINEAR_AC else 2
    (by, bx) = SOURCE_BLOCK
    rows = min(2 * by + extra, shape.out_height) * min(2 * bx + extra, shape.out_width)
    return math.ceil(height / by) * math.ceil(width / bx), math.ceil(rows / TILE) * TILE


def estimate_backward(shape: ConvShape, costs: dict[str, LoopCost]) -> dict[str, float | int | str]:
    """One row: the backward of `shape` on the tensor-core kernels, per kernel and in total (ms)."""
    taps = shape.kernel**2
    pixels = shape.batch * shape.out_height * shape.out_width
    c_in = sum(c for c, *_ in shape.pieces)
    e = shape.element_size
    g_bytes = pixels * shape.out_channels * e
    w_bytes = shape.out_channels * c_in * taps * e
    piece_bytes = [shape.batch * c * h * w * e for c, h, w, _ in shape.pieces]
    times: dict[str, dict[str, float]] = {}
    trips_dgrad = taps * math.ceil(shape.out_channels / DGRAD_K)
    for index, ((channels, height, width, code), stored) in enumerate(zip(shape.pieces, piece_bytes)):
        bilinear = code in (conv_spec.UP_BILINEAR, conv_spec.UP_BILINEAR_AC)
        cost = costs["dgrad_bilinear_kernel" if bilinear else "dgrad_kernel"]
        if bilinear:
            blocks, rows = _bilinear_rows(shape, height, width, code)
            ctas = shape.batch * blocks * math.ceil(channels / TILE)
            subtiles = rows // TILE
        else:
            ctas = math.ceil(pixels / TILE) * math.ceil(channels / TILE)
            subtiles = 1
        trips = ctas * subtiles * trips_dgrad
        instructions = cost.warps * (trips * cost.cp_async_path + ctas * cost.outside)
        moved = g_bytes + w_bytes + stored + (stored if code == conv_spec.MAXPOOL2 else 0)  # argmax re-read
        times[f"dgrad[{index}]"] = _kernel_time(instructions, trips * cost.tensor_flops_per_trip, moved, ctas)
    splits = wgrad_splits(shape)
    tiles = wgrad_tiles(shape)
    trips = tiles * wgrad_segments(shape)  # a trip: one segment, the MMAs of a kernel row of taps
    plain_tiles = _plain_channel_tiles(shape)
    cost = costs[f"wgrad_kernel_k{shape.kernel}"]
    ci_tiles = math.ceil(c_in / TILE)
    per_trip = (plain_tiles * cost.cp_async_path + (ci_tiles - plain_tiles) * cost.longest_path) / ci_tiles
    instructions = cost.warps * (trips * per_trip + tiles * splits * cost.outside)
    partial_bytes = 2 * splits * shape.out_channels * (c_in * taps + 1) * 4
    moved = g_bytes + sum(piece_bytes) + partial_bytes + w_bytes
    times["wgrad"] = _kernel_time(instructions, trips * cost.tensor_flops_per_trip, moved, tiles * splits)
    per_kernel = {name: max(t.values()) for name, t in times.items()}
    estimate_s = sum(per_kernel.values())
    min_bytes = g_bytes + 2 * sum(piece_bytes) + 2 * w_bytes
    flops = 2 * shape.flops
    floor_s = max(flops / TENSOR_FLOPS, min_bytes / HBM_BYTES_PER_S)
    return {
        "node": shape.name,
        # tc_bwd_qualifies' channel rule; a call failing it takes gather + cuDNN, not these kernels
        "qualifies": all(c % 8 == 0 for c, *_ in shape.pieces) and shape.out_channels % 8 == 0,
        "splits": splits,
        "kernels": {name: s * 1e3 for name, s in per_kernel.items()},  # ms per launch
        "bounds": {name: max(t, key=t.__getitem__) for name, t in times.items()},
        "issue_ms": sum(t["issue"] for t in times.values()) * 1e3,
        "tensor_ms": sum(t["tensor"] for t in times.values()) * 1e3,
        "memory_ms": sum(t["memory"] for t in times.values()) * 1e3,
        "estimate_ms": estimate_s * 1e3,
        "floor_ms": floor_s * 1e3,
        "ratio": estimate_s / floor_s if floor_s else math.inf,
    }
