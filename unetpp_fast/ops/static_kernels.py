"""The kernel configurations the static model estimates, read from sm_90 SASS (no GPU needed).

* cuda: the forward kernels in the built extension (`cuobjdump -sass -arch sm_90 _C.so`); their
  tile shapes are listed in `CUDA_FORWARD_TILES` and checked against the MMAs of the hot loop.
* triton: the forward kernel AOT-compiled for sm_90 with each of its autotune configs
  (`unetpp_fast.ops.triton.aot`), one specialisation per resample class when the mode is a
  constexpr; SASS cached on disk, keyed by the Triton sources and version.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.kernel_resources import (
    demangle,
    extension_library_path,
    find_cuobjdump,
    kernel_resources,
    short_name,
)
from unetpp_fast.ops.sass import (
    Function,
    class_counts,
    code_around,
    disassemble,
    enclosing_loops,
    hot_loops,
    is_packed_max,
    longest_path,
    outside_path,
    parse_sass,
    path_through,
    subroutine_size,
    tensor_flops,
)
from unetpp_fast.ops.sass import loops as sass_loops
from unetpp_fast.ops.static_model import (
    ConvShape,
    KernelModel,
    ModeCost,
    check_tile_flops,
    mode_costs_from_loops,
)

# Tile shape of each CUDA C++ forward kernel (csrc/cuda/): keep in step with the kernels' constants;
# `check_tile_flops` flags a mismatch with the MMAs found in the SASS. block_n None: the kernel's
# template argument BN (kernel<T, BN, KS, DIMS>, DIMS 2 or 3 spatial dimensions; kernel<T, BN> for a
# kernel of one kernel size `ksize`), else kernel<T, KS>.
CUDA_FORWARD_TILES: dict[str, dict] = {
    "fused_conv_fwd_wmma_kernel": dict(block_m=64, block_n=64, block_k=32, warps=4, k_blocking="flat"),
    "fused_conv_fwd_tc_kernel": dict(block_m=128, block_n=None, block_k=32, warps=4, k_blocking="per_piece"),
    # fused_conv_tc_halo.cuh, kernel<T, BN, PAIRS>: 8 x 16 pixel blocks (PAIRS = 2: two images at most
    # `paired_width` wide side by side), a trip = one 32-channel chunk staged once + 9 taps.
    "fused_conv_fwd_tc_halo_kernel": dict(
        block_m=128,
        block_n=None,
        block_k=32,
        warps=4,
        k_blocking="per_chunk",
        taps_per_trip=9,
        spatial_block=(8, 16),
        paired_width=7,
        ksize=3,
    ),
}
# What the fp16 / bf16 forward runs (fused_conv_cuda.cpp): the halo kernel where `cuda_halo_applies`,
# the linear one elsewhere; UNETPP_FAST_CUDA_LEGACY_FORWARD=1: the WMMA one.
CUDA_FORWARD_LAUNCHED = ("fused_conv_fwd_tc_kernel", "fused_conv_fwd_tc_halo_kernel")

# kernel<T, KS> / kernel<T, BN, KS> / kernel<T, BN, KS, DIMS>
_TEMPLATE = re.compile(r"^(\w+)<([^,>]+),\s*(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?>")
_CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "float16": "__half"}


def _non_hot_instructions(function: Function, loops: list) -> float:
    """Instructions a CTA issues outside the hot loops, along one path (`sass.outside_path`)."""
    return float(outside_path(function, loops))


def _cuda_config(tiles: dict) -> str:
    """'M128,N64,K32 w4'; the halo kernel: 'halo 8x16,N64,K32x9 w4' ('2x8x8': two images per block)."""
    if tiles.get("spatial_block"):
        rows, cols = tiles["spatial_block"]
        block = f"2x{rows}x{cols // 2}" if tiles.get("paired_width") else f"{rows}x{cols}"
        taps = tiles.get("taps_per_trip", 1)
        return f"halo {block},N{tiles['block_n']},K{tiles['block_k']}x{taps} w{tiles['warps']}"
    return f"M{tiles['block_m']},N{tiles['block_n']},K{tiles['block_k']} w{tiles['warps']}"


def cuda_halo_applies(shape: ConvShape) -> bool:
    """Whether the launcher runs the halo kernel (fused_conv_tc.cu `halo_applies`): 2D k = 3, every
    piece 16-byte vectorisable (channels_last assumed: C % 8 == 0) or `none` (the RGB input)."""
    return shape.kernel == 3 and all(c % 8 == 0 or code == conv_spec.NONE for c, _, _, code in shape.pieces)


def cuda_select(
    models: dict[int, list[KernelModel]], k: int, c_out: int, shape: ConvShape | None = None
) -> KernelModel:
    """The variant the launcher runs (fused_conv_tc.cu `dispatch`): the halo kernel where it applies
    to `shape` (when given and compiled), else the linear one; BN 32 when C_out <= 32 (and for the
    halo kernel's paired narrow images), else 64."""
    variants = models.get(k) or models[3]
    halo = [m for m in variants if m.spatial_block]
    if halo and shape is not None and cuda_halo_applies(shape):
        paired = [m for m in halo if shape.out_width <= m.paired_width]  # the launcher's PAIRS = 2 instance
        variants = paired or [m for m in halo if not m.paired_width]
    else:
        variants = [m for m in variants if not m.spatial_block] or variants
    if len(variants) == 1:
        return variants[0]
    wanted = 32 if c_out <= 32 else 64
    return next((m for m in variants if m.block_n == wanted), variants[-1])


def cuda_forward_models(
    library: str | None = None,
    dtype: str = "bfloat16",
    kernel: str | tuple[str, ...] = CUDA_FORWARD_LAUNCHED,
    spatial_dims: int = 2,
) -> dict[int, list[KernelModel]]:
    """KernelModels of the launched CUDA forward kernels per kernel size k (one per kernel and tile
    variant), from the extension's (or a cubin's) sm_90 SASS; `spatial_dims` picks the 2D or 3D
    instance of a kernel templated on DIMS (kernels without that argument are 2D)."""
    kernels = (kernel,) if isinstance(kernel, str) else tuple(kernel)
    library = library or extension_library_path()
    tool = find_cuobjdump()
    if library is None or tool is None:
        raise RuntimeError("needs the built unetpp_fast._C and cuobjdump")
    functions = parse_sass(disassemble(library, tool, "sm_90"))
    names = demangle([f.name for f in functions])
    resources = {r.kernel: r for r in kernel_resources(library) if r.arch == "sm_90"}
    models: dict[int, list[KernelModel]] = {}
    for function in functions:
        short = short_name(names[function.name])
        match = _TEMPLATE.match(short)
        if not match or match.group(1) not in kernels or match.group(2) != _CUDA_TYPES[dtype]:
            continue
        if int(match.group(5) or 2) != spatial_dims:
            continue
        tiles = dict(CUDA_FORWARD_TILES[match.group(1)])
        ksize, paired_width = tiles.pop("ksize", None), tiles.pop("paired_width", 0)
        if tiles["block_n"] is None and ksize:  # kernel<T, BN, PAIRS> of one kernel size
            tiles["block_n"], k = int(match.group(3)), ksize
            tiles["paired_width"] = paired_width if int(match.group(4) or 1) == 2 else 0
        elif tiles["block_n"] is None:
            tiles["block_n"], k = int(match.group(3)), int(match.group(4))
        else:
            k = int(match.group(3))
        loops = hot_loops(function)
        usage = resources.get(short)
        modes = mode_costs_from_loops(loops, ("any",))
        pool = [path_through(function, loop, is_packed_max) for loop in loops]
        if all(length for length, _ in pool):  # max-pool blocks: the longest path through the packed max
            counts = {key: sum(c[key] for _, c in pool) / len(pool) for key in pool[0][1]}
            mean = sum(length for length, _ in pool) / len(pool)
            modes["maxpool2"] = ModeCost(mean, counts, modes["any"].shortest)
        calls = sorted({target for loop in loops for target in loop.calls})
        if calls:  # an out-of-line path (the per-element loader): charged with its whole body
            longest = modes["any"]
            extra = sum(subroutine_size(function, target) for target in calls)
            modes["generic"] = ModeCost(longest.instructions + extra, dict(longest.counts))
        elif any(loop.element_path for loop in loops):  # an inline per-element loader: its own path
            with_path = [loop for loop in loops if loop.element_path]
            counts = {
                key: sum(loop.element_path_counts[key] for loop in with_path) / len(with_path)
                for key in with_path[0].element_path_counts
            }
            mean = sum(loop.element_path for loop in with_path) / len(with_path)
            modes["generic"] = ModeCost(mean, counts, modes["any"].shortest)
        model = KernelModel(
            backend="cuda",
            kernel=short,
            config=_cuda_config(tiles),
            modes=modes,
            overhead=_non_hot_instructions(function, loops),
            registers=usage.registers if usage else 0,
            shared_bytes=usage.shared_bytes if usage else 0,
            local_bytes=usage.local_bytes if usage else 0,
            flops_check=check_tile_flops(
                loops,
                tiles["block_m"],
                tiles["block_n"],
                tiles["block_k"] * tiles.get("taps_per_trip", 1),
                tiles["warps"],
            ),
            notes=tuple(f"hot loop 0x{s.head:x}-0x{s.latch:x}: {s.tensor_opcodes}" for s in loops),
            **tiles,
        )
        models.setdefault(k, []).append(model)
    for variants in models.values():
        variants.sort(key=lambda m: (bool(m.spatial_block), m.paired_width, m.block_n))
    if not models:
        names = " / ".join(kernels)
        raise RuntimeError(f"no {names}<{_CUDA_TYPES[dtype]}, ...> in the sm_90 SASS of {library}")
    return models


def _cache_dir() -> str:
    root = os.environ.get("UNETPP_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "unetpp_fast"
    )
    return os.path.join(root, "sass")


def _triton_source_hash() -> str:
    import triton

    from unetpp_fast.ops import triton as triton_pkg

    digest = hashlib.sha256(triton.__version__.encode())
    for path in sorted(glob.glob(os.path.join(os.path.dirname(triton_pkg.__file__), "*.py"))):
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _compile_sass(spec, config, tool: str, source_hash: str) -> tuple[str, dict]:
    """sm_90 SASS text and resource usage of one Triton specialisation (disk-cached)."""
    from unetpp_fast.ops.triton import aot

    key = json.dumps([source_hash, spec.fn.__name__, sorted(map(str, spec.constexprs.items())), str(config)])
    path = os.path.join(_cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if os.path.isfile(path):
        with open(path) as handle:
            cached = json.load(handle)
        return cached["sass"], cached["resources"]
    with tempfile.TemporaryDirectory() as workdir:
        compiled = aot.compile_one(spec, config, 90, "bfloat16", workdir, tool)
        cubins = glob.glob(os.path.join(workdir, "*.cubin"))
        if len(cubins) != 1:
            raise RuntimeError(f"expected one cubin from aot.compile_one, found {cubins}")
        text = disassemble(cubins[0], tool)
    resources = {
        "registers": compiled.registers,
        "shared_bytes": compiled.shared_bytes,
        "local_bytes": max(compiled.local_bytes, compiled.stack_bytes),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"sass": text, "resources": resources}, handle)
    return text, resources


# The Triton forward's channel loops inside its tap loop, in source order (fused_conv_forward.py):
# direct (none / up_nearest), max-pool window (maxpool2), blend (up_bilinear(_ac)).
TRITON_CLASS_LOOPS = ("none", "maxpool2", "up")


def triton_vector_width(shape: ConvShape) -> int:
    """The VEC the Triton launcher picks (launch_common.vector_width_if_aligned) for dense
    channels_last pieces: 16-byte vectors when every piece's C (hence every stride) is a whole
    number of them, else 1 (element-wise loads: the RGB input)."""
    vec = 16 // shape.element_size
    return vec if all(c % vec == 0 for c, *_ in shape.pieces) else 1


def triton_class_costs(
    function: Function, loops: list, taps: int
) -> tuple[dict[str, ModeCost], dict[str, float]]:
    """Per read class of the Triton forward (three channel loops, `TRITON_CLASS_LOOPS`): the trip cost
    of its own loop, and what one piece of that class pays outside it (`taps` x the tap loop's code
    around the channel loop). Raises RuntimeError when the SASS does not have that structure."""
    if len(loops) != len(TRITON_CLASS_LOOPS):
        raise RuntimeError(f"{function.name}: {len(loops)} hot loops, expected one per read class (3)")
    pooled = [path_through(function, loop, is_packed_max)[0] > 0 for loop in loops]
    if pooled != [False, True, False] or not loops[0].max_path < loops[2].max_path:
        raise RuntimeError(
            f"{function.name}: hot loops not in the order direct / max-pool / blend (packed max in "
            f"{pooled}, longest paths {[loop.max_path for loop in loops]})"
        )
    modes: dict[str, ModeCost] = {}
    per_piece: dict[str, float] = {}
    for mode, loop in zip(TRITON_CLASS_LOOPS, loops):
        modes[mode] = mode_costs_from_loops([loop], (mode,))[mode]
        # Depth 2, a channel loop inside a tap loop inside the piece loop: the code around it runs
        # once per tap. Depth 1, the channel loop directly in the piece loop (one loop over every
        # tap of the piece, the tap decoded per trip; or k = 1, whose tap loop the compiler folds
        # away): once per piece. Its trips are taps x ceil(C_p / BLOCK_K) either way (k_blocks).
        depth = len(enclosing_loops(function, loop))
        if depth not in (1, 2):
            raise RuntimeError(
                f"{function.name}: channel loop 0x{loop.head:x} nested {depth} deep, taps {taps}"
            )
        per_piece[mode] = float((taps if depth == 2 else 1) * code_around(function, loop))
    modes["any"] = max(modes.values(), key=lambda cost: cost.instructions)
    return modes, per_piece


def triton_packed_applies(shape: ConvShape) -> bool:
    """Whether the Triton launcher runs the packed forward for `shape` (its own
    `packed_forward_applies`, asked with meta tensors of the node's shapes, bf16)."""
    import torch

    from unetpp_fast.ops.triton.fused_conv_forward_packed import packed_forward_applies

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(shape.element_size, torch.bfloat16)
    pieces = [torch.empty(shape.batch, c, h, w, dtype=dtype, device="meta") for c, h, w, _ in shape.pieces]
    channels = sum(c for c, *_ in shape.pieces)
    weight = torch.empty(shape.out_channels, channels, shape.kernel, shape.kernel, dtype=dtype, device="meta")
    return packed_forward_applies(pieces, [code for *_, code in shape.pieces], weight)


def _function_tensor_flops_per_warp(function: Function) -> float:
    """Tensor FLOPs one warp issues along the whole function (a kernel without a K loop: each
    tensor instruction once; HGMMA a quarter of its warpgroup's)."""
    total = 0.0
    for inst in function.instructions:
        if inst.klass == "tensor":
            flops, unit = tensor_flops(inst.opcode)
            total += flops / 4 if unit == "warpgroup" else flops
    return total


def triton_packed_model(spec, config, tool: str, source_hash: str, progress=None) -> KernelModel:
    """KernelModel of the packed forward (`fused_conv_forward_packed.py`) for one config: its K
    blocks are unrolled (no K loop in the SASS), so one CTA issues every instruction of the
    function once (`sass.outside_path` without hot loops: every instruction but NOPs, both sides
    of any branch, an upper bound), split evenly over its K blocks. With a K loop (a compiler that
    kept one) the loop's trips and the code outside it are charged as for any kernel.
    'flat' K blocking: ceil(taps x C_in / BLOCK_K) trips; its CTAs are BLOCK_H x BLOCK_W blocks of
    one image. Valid only for nodes of its C_in and k (`packed_channels`, the spec's KSIZE)."""
    constexprs = spec.constexprs
    k_total = constexprs["KSIZE"] ** constexprs["DIMS"] * constexprs["C_IN"]
    block_k = constexprs["BLOCK_K"]
    trips = -(-k_total // block_k)
    if progress:
        progress(f"triton {spec.name} C_IN={constexprs['C_IN']} k={constexprs['KSIZE']} {config}")
    text, usage = _compile_sass(spec, config, tool, source_hash)
    (function,) = parse_sass(text)
    loops = hot_loops(function)
    block_m = config.kwargs["BLOCK_H"] * config.kwargs["BLOCK_W"]
    block_n = config.kwargs["BLOCK_N"]
    expected = 2 * block_m * block_n * block_k
    if loops:
        modes = mode_costs_from_loops(loops, ("none",))
        overhead = _non_hot_instructions(function, loops)
        check = check_tile_flops(loops, block_m, block_n, block_k, config.num_warps)
        notes = (f"K loop 0x{loops[0].head:x}: {loops[0].tensor_opcodes}",)
    else:
        whole = outside_path(function, [])
        counts = {key: 0.0 for key in ("tensor", "ldgsts", "ldsm", "ldg", "lds", "bar")}
        for inst in function.instructions:
            if inst.klass in counts:
                counts[inst.klass] += 1.0 / trips
        modes = {"none": ModeCost(whole / trips, counts, whole / trips)}
        overhead = 0.0
        got = _function_tensor_flops_per_warp(function) * config.num_warps
        check = (
            ""
            if got == expected * trips
            else f"SASS MMAs do {got:.0f} FLOPs per CTA, {trips} tiles {expected * trips}"
        )
        notes = (f"no K loop: {whole} instructions per warp per CTA, {trips} K block(s) unrolled",)
    modes["any"] = modes["none"]
    blocks = ",".join(f"{name[len('BLOCK_') :]}{v}" for name, v in config.kwargs.items())
    return KernelModel(
        backend="triton",
        kernel=f"{spec.fn.__name__} k={constexprs['KSIZE']} C_IN={constexprs['C_IN']}",
        config=f"{blocks},K{block_k} w{config.num_warps}s{config.num_stages}",
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        warps=config.num_warps,
        k_blocking="flat",
        modes=modes,
        overhead=overhead,
        spatial_block=(config.kwargs["BLOCK_H"], config.kwargs["BLOCK_W"]),
        packed_channels=constexprs["C_IN"],
        registers=usage.get("registers", 0),
        shared_bytes=usage.get("shared_bytes", 0),
        local_bytes=usage.get("local_bytes", 0),
        flops_check=check,
        notes=notes,
    )


def triton_staged_applies(shape: ConvShape) -> bool:
    """Whether the Triton launcher runs the staged forward for `shape` on the GPU path: 2D k = 3 or 1
    with every piece read in 16-byte vectors (`fused_conv_forward_staged.staged_forward_applies`;
    the packed forward takes precedence where it applies)."""
    return shape.kernel in (1, 3) and triton_vector_width(shape) > 1


def triton_staged_model(spec, config, tool: str, source_hash: str, progress=None) -> KernelModel:
    """KernelModel of the staged forward (`fused_conv_forward_staged.py`) for one config. Its loops
    nest tile > piece > 32-channel block > one staging loop per read class (direct, max-pool window,
    blend; SUB halo pixels per trip), the 9 taps unrolled in the block loop. A trip of the model is
    one block: the block loop's longest path less its longest staging trip, plus the class's own
    staging trips (ceil(halo pixels / SUB)). Per pixel block ("CTA"): the tile loop around the piece
    loop; per piece: the piece loop around the block loop. The persistent CTAs' prologue (once per
    CTA, a few hundred CTAs) is left out."""
    kw = config.kwargs
    if progress:
        progress(f"triton {spec.name} {config}")
    text, usage = _compile_sass(spec, config, tool, source_hash)
    (function,) = parse_sass(text)
    found = sass_loops(function)
    (block,) = hot_loops(function)
    block_loop = next(loop for loop in found if loop.head == block.head)
    staging = [loop for loop in found if block_loop.contains(loop)]
    enclosing = sorted((loop for loop in found if loop.contains(block_loop)), key=lambda loop: loop.first)
    from unetpp_fast.ops.triton.fused_conv_forward_staged import halo_rows

    ksize = spec.constexprs["KSIZE"]
    taps = ksize * ksize
    trips = halo_rows(kw["BLOCK_H"], kw["BLOCK_W"], kw["SUB"], ksize) // kw["SUB"]  # staging trips per block
    if len(staging) != 3 or len(enclosing) != 2:
        raise RuntimeError(
            f"{function.name}: expected 3 staging loops in the block loop and 2 loops around it, found "
            f"{len(staging)} and {len(enclosing)}"
        )
    tile_loop, piece_loop = enclosing
    body = function.instructions
    keys = ("tensor", "ldgsts", "ldsm", "ldg", "lds", "sts", "bar")
    paths = {loop.head: longest_path(function, loop) for loop in (*staging, piece_loop, tile_loop)}

    def holds(loop, wanted) -> bool:
        return any(wanted(body[i]) for i in range(loop.first, loop.last + 1))

    pool = next(loop for loop in staging if holds(loop, is_packed_max))
    blend = next(
        loop for loop in staging if loop is not pool and holds(loop, lambda inst: inst.base == "FFMA")
    )
    direct = next(loop for loop in staging if loop is not pool and loop is not blend)
    longest = max(staging, key=lambda loop: len(paths[loop.head]))
    base_counts = {key: block.max_path_counts.get(key, 0) for key in keys}
    longest_counts = class_counts([body[i] for i in paths[longest.head]])
    modes: dict[str, ModeCost] = {}
    for name, loop in (("none", direct), ("maxpool2", pool), ("up", blend)):
        own = class_counts([body[i] for i in paths[loop.head]])
        instructions = block.max_path - len(paths[longest.head]) + trips * len(paths[loop.head])
        counts = {
            key: base_counts[key] - longest_counts.get(key, 0) + trips * own.get(key, 0) for key in keys
        }
        modes[name] = ModeCost(float(instructions), counts, float(instructions))
    note = (
        f"staging trips {trips} per block (direct {len(paths[direct.head])}, maxpool "
        f"{len(paths[pool.head])}, blend {len(paths[blend.head])} per trip)"
    )
    modes["any"] = modes["up"]
    per_piece = float(len(paths[piece_loop.head]) - block.max_path)
    per_tile = float(len(paths[tile_loop.head]) - len(paths[piece_loop.head]))
    block_m = kw["BLOCK_H"] * kw["BLOCK_W"]
    block_k = spec.constexprs["BLOCK_K"]
    return KernelModel(
        backend="triton",
        kernel=f"{spec.fn.__name__} k={spec.constexprs['KSIZE']} VEC={spec.constexprs['VEC']}",
        config=f"H{kw['BLOCK_H']},W{kw['BLOCK_W']},N{kw['BLOCK_N']},K{block_k}x{taps},SUB{kw['SUB']} "
        f"w{config.num_warps}s{config.num_stages}",
        block_m=block_m,
        block_n=kw["BLOCK_N"],
        block_k=block_k,
        warps=config.num_warps,
        k_blocking="per_chunk",
        modes=modes,
        overhead=per_tile,
        piece_overhead={"none": per_piece, "maxpool2": per_piece, "up": per_piece},
        vector_width=spec.constexprs["VEC"],
        taps_per_trip=taps,
        spatial_block=(kw["BLOCK_H"], kw["BLOCK_W"]),
        staged=True,
        registers=usage.get("registers", 0),
        shared_bytes=usage.get("shared_bytes", 0),
        local_bytes=usage.get("local_bytes", 0),
        flops_check=check_tile_flops([block], block_m, kw["BLOCK_N"], block_k * taps, config.num_warps),
        notes=(f"block loop 0x{block.head:x}: {block.tensor_opcodes}; {note}",),
    )


def triton_forward_models(
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
    packed_channels: tuple[int, ...] = (3,),
) -> dict[int, list[tuple[str, KernelModel]]]:
    """(shape class, KernelModel) of every forward config per kernel size k, from Triton's sm_90 SASS:
    the VEC 8 kernel over the `forward` configs and the VEC 1 one over `forward_scalar`
    (`KernelModel.vector_width` tells them apart), and the packed forward (k = 3, one model per
    C_in in `packed_channels`: the RGB input) over `forward_packed` (`KernelModel.packed_channels`).

    `quick`: the first config of each shape class, k = 3 only (the head then uses the k = 3 costs).
    """
    from unetpp_fast.ops.triton import aot, configs
    from unetpp_fast.ops.triton.fused_conv_forward_packed import packed_block_k

    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships inside the triton wheel)")
    source_hash = _triton_source_hash()
    models: dict[int, list[tuple[str, KernelModel]]] = {}
    for name in ("forward", "forward_scalar"):
        forward = next(spec for spec in aot.kernel_specs(dims=(2,)) if spec.name == name)
        listed = configs.all_gpu_configs(name, arch=90)
        if quick:
            listed = [next(item for item in listed if item[0] == cls) for cls in configs.SHAPE_CLASSES]
        ks = (3,) if quick or "KSIZE" not in forward.constexprs else (3, 1)
        for k in ks:
            for shape_class, config in listed:
                model = _triton_model(forward, config, k, tool, source_hash, progress)
                models.setdefault(k, []).append((shape_class, model))
    for spec in aot.kernel_specs(dims=(2,)):
        if spec.name not in ("forward_staged", "forward_staged_1x1"):
            continue
        if quick and spec.constexprs["KSIZE"] != 3:
            continue
        listed = configs.all_gpu_configs(spec.name, arch=90)
        if quick:
            listed = [next(item for item in listed if item[0] == cls) for cls in configs.SHAPE_CLASSES]
        for shape_class, config in listed:
            models.setdefault(spec.constexprs["KSIZE"], []).append(
                (shape_class, triton_staged_model(spec, config, tool, source_hash, progress))
            )
    packed = next(spec for spec in aot.kernel_specs(dims=(2,)) if spec.name == "forward_packed")
    listed = configs.all_gpu_configs("forward_packed", arch=90)
    if quick:
        listed = [next(item for item in listed if item[0] == cls) for cls in configs.SHAPE_CLASSES]
    for channels in packed_channels:
        k_total = 9 * channels
        constexprs = dict(packed.constexprs, C_IN=channels, KSIZE=3, BLOCK_K=packed_block_k(k_total))
        spec = dataclasses.replace(packed, constexprs=constexprs)
        for shape_class, config in listed:
            models.setdefault(3, []).append(
                (shape_class, triton_packed_model(spec, config, tool, source_hash, progress))
            )
    return models


def _triton_model(forward, config, k: int, tool: str, source_hash: str, progress) -> KernelModel:
    """KernelModel of one forward spec (`aot.KernelSpec`) at one config and kernel size."""
    per_mode = "MODE0" in forward.constexprs  # the mode as a constexpr: one specialisation per class
    variants = (
        {"none": conv_spec.NONE, "up": conv_spec.UP_BILINEAR_AC, "maxpool2": conv_spec.MAXPOOL2}
        if per_mode
        else {"any": None}
    )
    vec = forward.constexprs.get("VEC", 0)
    modes: dict[str, ModeCost] = {}
    piece_overhead: dict[str, float] = {}
    overhead = 0.0
    usage: dict = {}
    checks: list[str] = []
    notes: list[str] = []
    for mode, code in variants.items():
        if k == 1 and mode != "none" and per_mode:
            continue  # the 1x1 heads read one plain piece
        constexprs = dict(forward.constexprs)
        if "KSIZE" in constexprs:
            constexprs["KSIZE"] = k
        if per_mode:
            constexprs.update(NUM_PIECES=1, MODE0=code)
        spec = dataclasses.replace(forward, constexprs=constexprs)
        if progress:
            progress(f"triton {forward.name} k={k} {mode} {config}")
        text, usage_one = _compile_sass(spec, config, tool, source_hash)
        (function,) = parse_sass(text)
        loops = hot_loops(function)
        if per_mode:
            modes.update(mode_costs_from_loops(loops, (mode,)))
            piece_overhead[mode] = _non_hot_instructions(function, loops)
        else:
            modes, piece_overhead = triton_class_costs(function, loops, k * k)
            overhead = _non_hot_instructions(function, loops)
            # 2: the class's code around its loop is paid per tap; 1: once per piece.
            nesting = "/".join(str(len(enclosing_loops(function, loop))) for loop in loops)
            notes.append(f"channel loops {'/'.join(TRITON_CLASS_LOOPS)} nested {nesting} deep")
        usage = {key: max(usage.get(key, 0), value) for key, value in usage_one.items()}
        check = check_tile_flops(
            loops,
            config.kwargs["BLOCK_M"],
            config.kwargs["BLOCK_N"],
            config.kwargs["BLOCK_K"],
            config.num_warps,
        )
        if check:
            checks.append(f"{mode}: {check}")
        notes.append(f"{mode}: {len(loops)} hot loops, {loops[0].tensor_opcodes if loops else {}}")
    if "none" in modes and "any" not in modes:
        modes["any"] = max(modes.values(), key=lambda cost: cost.instructions)
    blocks = ",".join(f"{name[len('BLOCK_') :]}{v}" for name, v in config.kwargs.items())
    return KernelModel(
        backend="triton",
        kernel=f"{forward.fn.__name__} k={k}" + (f" VEC={vec}" if vec else ""),
        config=f"{blocks} w{config.num_warps}s{config.num_stages}",
        block_m=config.kwargs["BLOCK_M"],
        block_n=config.kwargs["BLOCK_N"],
        block_k=config.kwargs["BLOCK_K"],
        warps=config.num_warps,
        k_blocking="per_piece",
        modes=modes,
        overhead=overhead,
        piece_overhead=piece_overhead,
        vector_width=vec,
        registers=usage.get("registers", 0),
        shared_bytes=usage.get("shared_bytes", 0),
        local_bytes=usage.get("local_bytes", 0),
        flops_check="; ".join(checks),
        notes=tuple(notes),
    )
