"""Static performance model of the GPU kernels: an *estimate from SASS*, never a measurement.

For one convolution and one compiled kernel configuration (sm_90 SASS, read by `sass.py`), three
times on an H200, the largest of which is the estimate:

* issue_ms  = warp instructions the CTAs issue / (SMs used x 4 schedulers x 1.98 GHz), counting
  each K block's trip through the hot loop (per resample mode: see `ModeCost`) plus the code
  outside the hot loops once per CTA, and per piece where the kernel runs code of its own around
  a piece's loops (`KernelModel.piece_overhead`: the Triton forward's per-tap code);
* tensor_ms = tensor-core FLOPs the tiles execute (M, N and K padded to the tile) / 990 TFLOP/s
  (dense bf16), scaled up when there are fewer CTAs than SMs;
* memory_ms = bytes moved / 4.8 TB/s: every piece read once, weight and bias once, the output
  written once, plus one re-read of the pieces per extra output-channel tile when they do not fit
  in half of the 50 MB L2.

`floor_ms` is the node's roofline: max(its FLOPs / 990 TFLOP/s, unavoidable bytes / 4.8 TB/s).
What it cannot see (ASSUMPTIONS, BLIND_SPOTS) is part of every report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.sass import LoopStats, loop_tensor_flops_per_warp

# H200 SXM (sm_90): 132 SMs, 4 warp schedulers per SM issuing one instruction per clock each,
# 1.98 GHz boost clock; dense bf16 tensor-core peak 990 TFLOP/s; HBM3e 4.8 TB/s; 50 MB L2.
SMS = 132
ISSUE_PER_SM_PER_CLOCK = 4
CLOCK_HZ = 1.98e9
TENSOR_FLOPS = 990e12
HBM_BYTES_PER_S = 4.8e12
L2_BYTES = 50 * 2**20

ASSUMPTIONS = (
    "H200 SXM: 132 SMs x 4 schedulers x 1.98 GHz issue, 990 TFLOP/s dense bf16, 4.8 TB/s HBM, 50 MB L2.",
    "One warp instruction per scheduler per clock; every warp of a CTA runs the same hot loop.",
    "Per K block, a plain (`none`) piece costs the hot loop's cp.async path (shortest path with the "
    "most LDGSTS); a resampled piece its longest path. cuda kernels: a max-pool piece the longest "
    "path through a packed max (HMNMX2), a piece that is not 16-byte vectorisable the longest path "
    "through a 16-bit global load (inline) or the longest path plus the out-of-line loader's whole "
    "body; upper bounds where other branches of that path are not the mode's own. Per-mode compiled "
    "kernels (Triton with the mode as constexpr) cost exactly their own loop. A loop without LDGSTS "
    "costs its longest path for every mode (upper bound: its per-element branches cannot be "
    "attributed to a mode).",
    "Code outside the hot loops (prologue, pipeline fill, epilogue) is counted once per CTA along "
    "one path: the shortest with the most LDGSTS (the longest when the kernel has no cp.async); "
    "loops there (epilogue store loops) count one trip.",
    "Triton forward (one pipelined channel loop per read class, inside the tap loop or directly "
    "inside the piece loop; in source order direct, max-pool window, blend): its three hot loops "
    "are charged, in that order, to none, maxpool2 and up pieces (each its loop's longest path; the order is "
    "checked: the packed max must be in the second loop only, the direct loop shorter than the "
    "blend). Each piece also pays the code around its class's channel loop in the loop enclosing "
    "it: shortest path enclosing head -> channel-loop head (address set-up, pipeline prologue) "
    "plus channel-loop exit -> enclosing latch (drain); per tap (k*k times) when a tap loop encloses "
    "the channel loop, once per piece when the channel loop sits directly in the piece loop (one "
    "loop over all of a piece's taps, or k = 1); its trips are taps x ceil(C_p / BLOCK_K) either "
    "way. The once-per-CTA path above also passes once through that code (counted twice there, an "
    "upper bound). up_nearest pieces (direct loop in the kernel) "
    "are charged as up (blend): an upper bound; the UNet++ report has none. A node with C % 8 != 0 "
    "that the packed forward does not take runs the VEC = 1 kernel with its own `forward_scalar` "
    "configs, and is estimated with them.",
    "Triton packed forward (fused_conv_forward_packed.py; where its `packed_forward_applies` holds: "
    "the RGB input, one plain piece, taps x C_in <= 64): its K blocks are unrolled, so its SASS has "
    "no K loop and every instruction of the kernel (all but NOPs, both sides of any branch: an "
    "upper bound) is charged once per CTA, as ceil(taps x C_in / BLOCK_K) 'flat' K trips; its CTAs "
    "are BLOCK_H x BLOCK_W pixel blocks of one image (padding pixels in tensor time); estimated "
    "only for nodes of the C_in and k it was compiled for.",
    "A kernel that stages a 32-channel chunk once and runs its k*k taps from shared memory (the cuda "
    "halo kernel, 'per_chunk'): one trip = one chunk of one piece = its stage plus every tap (the "
    "taps unrolled in the loop body: the tile-FLOPs check fails unless a trip's MMAs are k*k tap "
    "steps); its CTAs are 8 x 16 pixel blocks of one image (of two images side by side when they are "
    "at most 7 wide), padding pixels included in tensor time.",
    "Triton staged forward (fused_conv_forward_staged.py; 2D 3x3 and 1x1 nodes whose pieces are read "
    "in 16-byte vectors: UNet++ past its input convolution, on the GPU path): 'per_chunk' as the cuda "
    "halo kernel, its halo in a per-CTA scratch slot in global memory instead of shared memory. Its "
    "loops nest pixel block > piece > 32-channel block > one staging loop per read class (direct, "
    "max-pool window, blend; SUB halo pixels per trip), the taps unrolled in the block loop. A trip "
    "of a class = the block loop's longest path less its longest staging trip plus ceil(halo "
    "pixels / SUB) trips of the class's staging loop; per pixel block the tile loop's code around "
    "the piece loop (epilogue included), per piece the piece loop's around the block loop; the "
    "persistent CTAs' prologue (about 2 per SM) is left out. Its 'CTAs' are the "
    "pixel blocks. The scratch traffic (each halo written once per block, read by k*k taps) is "
    "assumed to stay in L2 and is not charged to HBM: only the slots of resident CTAs are in use, "
    "e.g. 132-264 slots of 40 KB (bf16, 16 x 32 blocks), 5-11 MB of the 50 MB.",
    "Tensor time counts the MMAs the tiles execute: M, N and K padded to the tile (C_out = 1 in a "
    "64-wide tile costs 64 channels); with fewer CTAs than SMs only that many SMs work.",
    "Bytes: pieces read once at their stored size, weight/bias once, output written once; pieces "
    "larger than half the L2 are re-read once per extra output-channel tile. Halo re-reads of "
    "neighbouring tiles hit L2.",
    "Triton configs: the autotuner is assumed to find the config with the lowest estimate among "
    "those listed for the node's shape class.",
)

BLIND_SPOTS = (
    "Latency: the model is throughput-only. A CTA waiting on global memory, a barrier or a "
    "dependent MMA issues nothing; with few warps per SM (small late-level grids) latency, not "
    "issue, bounds the kernel, and this model is optimistic there.",
    "Occupancy and waves: registers and shared memory limit resident CTAs; the last partial wave "
    "of a grid is not modelled (only grids smaller than the SM count are scaled). The cuda halo "
    "kernel holds ~64-100 KB of shared memory per CTA (2-3 CTAs, 8-12 warps per SM), and its "
    "max-pool / bilinear staging is synchronous (loads, then stores): whether that many warps hide "
    "the load latency is not modelled.",
    "The Triton staged forward synchronises its CTA twice per 32-channel block (the scratch slot "
    "written, then read by the taps) and stages synchronously (loads, blend, stores): with 2 "
    "persistent CTAs of 4-8 warps per SM, whether the load and barrier latency is hidden is not "
    "modelled; nor is whether the scratch lines stay in L2 under the pieces' own traffic.",
    "Shared-memory bank conflicts and LDSM/LDS replays, L1/L2 hit rates, uncoalesced sectors: "
    "each instruction counts once whatever it costs in the memory pipeline.",
    "Tensor pipe and issue overlap perfectly (max, not sum); HGMMA asynchrony and the tensor "
    "pipe's own issue cost are not modelled separately.",
    "Tensor peak: one figure (990 TFLOP/s) for HGMMA (wgmma) and HMMA (mma.sync); on sm_90 "
    "mma.sync is reported to reach only about two thirds of the wgmma peak, so HMMA-based kernels "
    "(the cuda backend) are optimistic by up to ~1.5x where tensor-bound.",
    "The cuda forward also launches a small weight-pack kernel per call (C_out x k x k x Kp "
    "elements); it is not estimated.",
    "Launch gaps between kernels (~2-4 us each without CUDA graphs) are not included.",
    "Clock: 1.98 GHz boost is assumed; under sustained tensor load the H200 may clock lower.",
)


@dataclass(frozen=True)
class ConvShape:
    """A convolution as the estimator sees it (the operator's view, no network knowledge)."""

    name: str
    batch: int
    pieces: tuple[tuple[int, int, int, int], ...]  # (channels, stored height, stored width, resample code)
    out_channels: int
    kernel: int
    out_height: int
    out_width: int
    flops: int  # 2 x multiply-adds
    min_bytes: int  # the roofline's unavoidable bytes
    element_size: int = 2


@dataclass(frozen=True)
class ModeCost:
    """Warp instructions per trip through the hot loop for K blocks of one resample class."""

    instructions: float
    counts: dict[str, float]  # per instruction class (tensor, ldgsts, ldsm, ldg, lds, bar, ...)
    shortest: float = 0.0  # the loop's plain shortest path head -> back edge: a lower bound per trip


@dataclass(frozen=True)
class KernelModel:
    """One compiled kernel configuration, reduced to what the estimate needs."""

    backend: str  # "cuda" / "triton"
    kernel: str
    config: str
    block_m: int
    block_n: int
    block_k: int
    warps: int
    # "per_piece": taps x ceil(C_p / BK) blocks per piece; "flat": ceil(C_in taps / BK);
    # "per_chunk": ceil(C_p / BK) trips per piece, each running `taps_per_trip` taps
    k_blocking: str
    modes: dict[str, ModeCost]  # "none", "up", "maxpool2" (missing: use "any")
    overhead: float  # warp instructions outside the hot loops, per warp per CTA
    # Per piece of a class, charged on top of `overhead`: per-mode specialisations (one compiled
    # kernel per piece mode): the code outside the specialisation's hot loops (conservative: the
    # epilogue is counted once per piece); the Triton forward with one channel loop per class: k*k
    # x the code its tap loop runs around that class's channel loop.
    piece_overhead: dict[str, float] = field(default_factory=dict)
    # Triton: the VEC the kernel was compiled for (1: element-wise loads, its own config list); 0:
    # not specialised on it.
    vector_width: int = 0
    # Taps one hot-loop trip runs: 1 when a trip is one tap x block_k channels; k*k for a kernel
    # that stages a chunk once and runs every tap from shared memory ("per_chunk" K blocking).
    taps_per_trip: int = 1
    # (rows, columns) of the 2D output block a CTA owns (the halo kernel); () when a CTA owns
    # block_m consecutive pixels of the flattened batch (tiles then span rows and images).
    spatial_block: tuple[int, ...] = ()
    # Images at most this wide share a block in pairs (side by side, halves of its columns); 0: never.
    paired_width: int = 0
    # The Triton packed forward: the C_in it was compiled for (a constexpr: it estimates only nodes
    # of that C_in and its k); 0 for every other kernel.
    packed_channels: int = 0
    # The Triton staged forward (2D 3x3 nodes whose pieces are read in 16-byte vectors): a trip is
    # one 32-channel block staged on the block's halo + 9 taps; its "CTAs" are pixel blocks, which
    # persistent CTAs loop over.
    staged: bool = False
    registers: int = 0
    shared_bytes: int = 0
    local_bytes: int = 0
    flops_check: str = ""  # "" when the SASS MMAs per iteration match the tile, else what differs
    notes: tuple[str, ...] = field(default_factory=tuple)

    def cost(self, mode: str) -> ModeCost:
        return self.modes.get(mode) or self.modes["any"]


def piece_class(model: KernelModel, channels: int, code: int) -> str:
    """Cost class of a piece's K blocks: 'generic' (not 16-byte vectorisable: C % 8 != 0) where the
    kernel has such a path, else its resample class."""
    if channels % 8 and "generic" in model.modes:
        return "generic"
    return mode_class(code)


def mode_class(code: int) -> str:
    """Resample code -> the cost class of its K blocks."""
    if code == conv_spec.NONE:
        return "none"
    if code == conv_spec.MAXPOOL2:
        return "maxpool2"
    return "up"


def _mean_counts(loops: Sequence[LoopStats], which: str) -> dict[str, float]:
    keys = loops[0].counts.keys()
    return {
        key: sum(getattr(loop, f"{which}_path_counts")[key] for loop in loops) / len(loops) for key in keys
    }


def mode_costs_from_loops(loops: Sequence[LoopStats], modes: Sequence[str]) -> dict[str, ModeCost]:
    """Per-mode trip costs from the hot loops of one kernel whose body picks the mode at run time.

    `modes`: which classes the kernel was compiled for: ("none",) / ("up",) ... for a
    specialisation (every path of its loop is that mode: the mean of its loops' longest paths),
    or ("any",) for a kernel that branches on the mode per K block.
    """
    if not loops:
        raise ValueError("no hot loop: the kernel has no loop with tensor-core instructions")
    with_ldgsts = any(loop.counts["ldgsts"] for loop in loops)
    shortest = sum(loop.shortest_path for loop in loops) / len(loops)
    longest = ModeCost(
        sum(loop.max_path for loop in loops) / len(loops), _mean_counts(loops, "max"), shortest
    )
    if tuple(modes) != ("any",):
        return {mode: longest for mode in modes}
    plain = (
        ModeCost(sum(loop.min_path for loop in loops) / len(loops), _mean_counts(loops, "min"), shortest)
        if with_ldgsts
        else longest
    )
    return {"none": plain, "up": longest, "maxpool2": longest, "any": longest}


def check_tile_flops(loops: Sequence[LoopStats], block_m: int, block_n: int, block_k: int, warps: int) -> str:
    """'' when every hot loop's MMAs do exactly one BM x BN x BK tile step per trip, else a note."""
    expected = 2 * block_m * block_n * block_k
    for loop in loops:
        got = loop_tensor_flops_per_warp(loop) * warps
        if got != expected:
            return f"loop 0x{loop.head:x}: SASS MMAs do {got:.0f} FLOPs per trip, the tile {expected}"
    return ""


def k_blocks(shape: ConvShape, model: KernelModel) -> dict[str, int]:
    """K blocks per CTA by cost class."""
    taps = shape.kernel * shape.kernel
    blocks: dict[str, int] = {}
    if model.k_blocking == "flat":
        total = math.ceil(sum(c for c, *_ in shape.pieces) * taps / model.block_k)
        channels = sum(c for c, *_ in shape.pieces)
        for c, _, _, code in shape.pieces:  # a block's mode: apportioned by channels
            cls = piece_class(model, c, code)
            blocks[cls] = blocks.get(cls, 0) + total * c / channels
        return {mode: round(value) for mode, value in blocks.items()}
    per_block = 1 if model.k_blocking == "per_chunk" else taps  # per_chunk: the taps run inside a trip
    for c, _, _, code in shape.pieces:
        cls = piece_class(model, c, code)
        blocks[cls] = blocks.get(cls, 0) + per_block * math.ceil(c / model.block_k)
    return blocks


def cta_count(shape: ConvShape, model: KernelModel) -> int:
    """CTAs of the grid: pixel tiles (flattened, or 2D blocks per image) x output-channel tiles."""
    n_tiles = math.ceil(shape.out_channels / model.block_n)
    if model.spatial_block:
        rows, cols = model.spatial_block
        if shape.out_width <= model.paired_width:
            return math.ceil(shape.batch / 2) * math.ceil(shape.out_height / rows) * n_tiles
        per_image = math.ceil(shape.out_height / rows) * math.ceil(shape.out_width / cols)
        return shape.batch * per_image * n_tiles
    return math.ceil(shape.batch * shape.out_height * shape.out_width / model.block_m) * n_tiles


def estimate(shape: ConvShape, model: KernelModel) -> dict[str, float | int | str]:
    """One row: issue / tensor / memory / estimate / floor times (ms) of `shape` run by `model`."""
    ctas = cta_count(shape, model)
    blocks = k_blocks(shape, model)
    trips = sum(blocks.values())
    per_piece = (model.piece_overhead.get(mode_class(code), 0.0) for *_, code in shape.pieces)
    overhead = model.overhead + sum(per_piece)
    per_cta_warp = sum(n * model.cost(mode).instructions for mode, n in blocks.items()) + overhead
    instructions = per_cta_warp * model.warps * ctas
    sms = min(ctas, SMS)
    issue_s = instructions / (sms * ISSUE_PER_SM_PER_CLOCK * CLOCK_HZ)
    # Lower bound: every trip at the loop's plain shortest path (a guard may skip work no real
    # K block skips): brackets the estimate where the mode's path cannot be told from the SASS.
    low_warp = sum(
        n * (model.cost(mode).shortest or model.cost(mode).instructions) for mode, n in blocks.items()
    )
    issue_low_s = (low_warp + overhead) * model.warps * ctas / (sms * ISSUE_PER_SM_PER_CLOCK * CLOCK_HZ)
    tile_flops = 2 * model.block_m * model.block_n * model.block_k * model.taps_per_trip * trips * ctas
    tensor_s = tile_flops / (TENSOR_FLOPS * sms / SMS)
    piece_bytes = sum(shape.batch * c * h * w for c, h, w, _ in shape.pieces) * shape.element_size
    n_tiles = math.ceil(shape.out_channels / model.block_n)
    rereads = (n_tiles - 1) * piece_bytes if piece_bytes > L2_BYTES / 2 else 0
    moved = shape.min_bytes + rereads
    memory_s = moved / HBM_BYTES_PER_S
    times = {"issue": issue_s, "tensor": tensor_s, "memory": memory_s}
    bound = max(times, key=times.__getitem__)
    floor_s = max(shape.flops / TENSOR_FLOPS, shape.min_bytes / HBM_BYTES_PER_S)
    counts = {
        key: sum(n * model.cost(mode).counts.get(key, 0) for mode, n in blocks.items())
        for key in ("tensor", "ldgsts", "ldsm", "ldg", "lds", "bar")
    }
    return {
        "node": shape.name,
        "backend": model.backend,
        "kernel": model.kernel,
        "config": model.config,
        "ctas": ctas,
        "k_trips_per_cta": trips,
        "hot_loop_instr_per_trip": round((per_cta_warp - overhead) / max(trips, 1), 1),
        "overhead_instr_per_cta": round(overhead, 1),
        "warps": model.warps,
        "hot_loop_counts_per_cta_warp": {k: round(v, 1) for k, v in counts.items()},
        "gflop": shape.flops / 1e9,
        "tile_gflop": tile_flops / 1e9,
        "mbytes": moved / 1e6,
        "min_mbytes": shape.min_bytes / 1e6,
        "issue_ms": issue_s * 1e3,
        "tensor_ms": tensor_s * 1e3,
        "memory_ms": memory_s * 1e3,
        "estimate_ms": times[bound] * 1e3,
        "bound": bound,
        "estimate_low_ms": max(issue_low_s, tensor_s, memory_s) * 1e3,
        "floor_ms": floor_s * 1e3,
        "floor_bound": "tensor"
        if shape.flops / TENSOR_FLOPS >= shape.min_bytes / HBM_BYTES_PER_S
        else "memory",
        "ratio": times[bound] / floor_s if floor_s else math.inf,
    }


def best_estimate(shape: ConvShape, models: Sequence[KernelModel]) -> dict[str, float | int | str]:
    """The row of the model (config) with the lowest estimate: what an ideal autotuner picks."""
    rows = [estimate(shape, model) for model in models]
    return min(rows, key=lambda row: row["estimate_ms"])


def summarize(rows: Sequence[dict]) -> dict[str, float | int | str]:
    """Whole-model sums of one backend and size (kernels run one after another)."""
    total = {key: sum(row[key] for row in rows) for key in ("issue_ms", "tensor_ms", "memory_ms", "floor_ms")}
    estimate_ms = sum(row["estimate_ms"] for row in rows)
    estimate_low_ms = sum(row.get("estimate_low_ms", row["estimate_ms"]) for row in rows)
    bounds = [row["bound"] for row in rows]
    return {
        "nodes": len(rows),
        "gflop": sum(row["gflop"] for row in rows),
        "estimate_ms": estimate_ms,
        "estimate_low_ms": estimate_low_ms,
        "floor_ms": total["floor_ms"],
        "ratio": estimate_ms / total["floor_ms"] if total["floor_ms"] else math.inf,
        "worst_node_ratio": max(row["ratio"] for row in rows),
        "worst_node": max(rows, key=lambda row: row["ratio"])["node"],
        "nodes_by_bound": {bound: bounds.count(bound) for bound in sorted(set(bounds))},
        "issue_ms": total["issue_ms"],
        "tensor_ms": total["tensor_ms"],
        "memory_ms": total["memory_ms"],
    }


def kernel_model_dict(model: KernelModel) -> dict:
    return asdict(model)
