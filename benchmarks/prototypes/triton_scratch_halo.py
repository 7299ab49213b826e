"""Prototype, not used by the package: a Triton 3x3 forward that stages each 32-channel block of
the virtual input ONCE per output tile on the tile's halo, into a per-CTA scratch slot in global
memory, and runs the 9 taps from there. Persistent CTAs reuse their slot (a few MB in all: it
stays in L2). The resample (bilinear blend, 2x2 max) is computed once per halo pixel instead of
once per tap, and the tap loads need no mask (the halo holds the zero padding) and one scalar
offset per tap. The CUDA backend's halo kernel does the same in shared memory, which Triton does
not expose. It is table-driven as the package's forward (its piece table, read classes, offset
helpers and epilogue): any pieces, every 2D mode, one compile; channels_last pieces whose channel
counts are whole 16-byte vectors, channels_last weight and output.

    python benchmarks/prototypes/triton_scratch_halo.py --check     # interpreter, vs fp64 (CPU)
    python benchmarks/prototypes/triton_scratch_halo.py --project   # sm_90 SASS -> L4 estimate

--project compiles the kernel for sm_90 per config, reads the warp instructions of one channel
block (staging + 9 taps) per read class from the SASS with the static model's loop reader (the
block loop's longest path, less its longest staging trip, plus the class's staging trips), and
projects every 3x3 convolution of the UNet++ L4 forward (bf16, batch 16) with the static model's
arithmetic: issue = instructions x warps x tiles / (132 SMs x 4 x 1.98 GHz), tensor = tile FLOPs /
990 TFLOP/s, memory = the node's unavoidable bytes / 4.8 TB/s (the scratch traffic assumed to stay
in L2), estimate = the largest, per node the best config that does not spill. The input conv (RGB,
the packed kernel) and the 1x1 heads are not this kernel's.

Read on 2026-12-03 (triton 3.8, sm_90): per channel block at BH 16 BW 32 BN 32, 8 warps: none 983,
up_bilinear_ac 2258, maxpool2 1463 warp instructions (the forward's per-tap kernel today: 9 trips
of 153 / 415 / 317 at M256 N32); 206 registers, no spills. Projection of the 3x3 convolutions:
1.46x their floor at 96x96 (0.2392 / 0.1642 ms), 1.08x at 512x512 (5.022 / 4.668 ms), against
3.78x / 3.38x for the whole model today; worst node X2,j at 24x24 (1.78x, tile padding).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if "--check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import torch
import triton
import triton.language as tl

from unetpp_fast.ops.triton.epilogue import bias_and_activation
from unetpp_fast.ops.triton.virtual_input import (
    class_channels,
    direct_offsets,
    nan_max,
    piece_row,
    pool_offsets,
    source_geometry,
    window_steps,
)


@triton.jit
def _stage_table_rows(x_ptr, st_ptrs, n, gy, gx, inside, r_ok, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                      scale_w, mode, READ: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """`_stage_rows` for a table row, by read class READ (0 direct: none / up_nearest, 1 max-pool
    window, 2 bilinear blend in fp32, rounded to the piece's dtype as a materialised interpolate)."""
    c_ok = (c0 + tl.arange(0, st_ptrs.shape[1])) < pc
    mask = inside[:, None] & c_ok[None, :]
    chan = (tl.multiple_of(c0, VEC) + tl.arange(0, st_ptrs.shape[1]))[None, :]
    zero = gy * 0
    if READ == 0:
        off = direct_offsets(n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, mode, VEC, 2)
        value = tl.load(x_ptr + off[:, None] + chan, mask=mask, other=0.0)
    elif READ == 1:
        first = x_ptr + pool_offsets(n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, VEC, 2)[:, None] + chan
        d_w, d_h, _ = window_steps(s_w, s_h, s_n * 0, VEC)
        top = nan_max(tl.load(first, mask=mask, other=0.0), tl.load(first + d_w, mask=mask, other=0.0))
        low = first + d_h
        low = nan_max(tl.load(low, mask=mask, other=0.0), tl.load(low + d_w, mask=mask, other=0.0))
        value = nan_max(top, low)
    else:
        (o00, o01, o10, o11, _, _, _, _, w00, w01, w10, w11, _, _, _, _) = source_geometry(
            n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, zero + 1, ph, pw, 0.0, scale_h, scale_w, mode,
            VEC, 2, True,
        )  # fmt: skip
        value = w00[:, None] * tl.load(x_ptr + o00[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w01[:, None] * tl.load(x_ptr + o01[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w10[:, None] * tl.load(x_ptr + o10[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w11[:, None] * tl.load(x_ptr + o11[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
    tl.store(st_ptrs, value.to(st_ptrs.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _stage_table_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h, scale_w, mode,
                       halo_pixels, k, HALO_W: tl.constexpr, SUB: tl.constexpr, READ: tl.constexpr,
                       VEC: tl.constexpr):  # fmt: skip
    BK: tl.constexpr = k.shape[0]
    for part in range(0, halo_pixels, SUB):  # a run-time bound: one loop per read class in the SASS
        r = part + tl.arange(0, SUB)
        hy = r // HALO_W
        hx = r - hy * HALO_W
        r_ok = r < halo_pixels
        gy = y0 - 1 + hy
        gx = x0 - 1 + hx
        inside = r_ok & (gy >= 0) & (gy < H) & (gx >= 0) & (gx < W)
        st_ptrs = slot + (r * BK)[:, None] + k[None, :]
        _stage_table_rows(x_ptr, st_ptrs, n, gy, gx, inside, r_ok, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                          scale_w, mode, READ, VEC)  # fmt: skip


@triton.jit
def conv3x3_staged(out_ptr, w_ptr, b_ptr, table_ptr, scratch_ptr, NUM_PIECES, N, H, W, C_OUT, sw_co, sw_kh,
                   sw_kw, halo_pixels, TILES_W, TILES_H, NUM_TILES, slope, HAS_BIAS: tl.constexpr,
                   ACT: tl.constexpr, VEC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
                   BN: tl.constexpr, HALO: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    """out (channels_last, dense) = act(conv3x3(virtual input) + bias); the weight channels_last
    (C_in stride 1); every piece channels_last with C a multiple of VEC."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HALO_W: tl.constexpr = BW + 2
    i = tl.arange(0, BH * BW)
    iy = i // BW
    ix = i % BW
    k = tl.arange(0, BK)
    co = tl.program_id(1) * BN + tl.arange(0, BN)
    co_ok = co < C_OUT
    slot = scratch_ptr + (tl.program_id(1) * nprog + pid) * (HALO * BK)  # this CTA's alone
    a_rows = slot + ((iy * HALO_W + ix) * BK)[:, None] + k[None, :]  # tap (ky, kx) = (0, 0)
    w_tile = (co.to(tl.int64) * sw_co)[None, :] + k[:, None]
    for tile in range(pid, NUM_TILES, nprog):  # persistent over the output tiles
        tx = tile % TILES_W
        rest = tile // TILES_W
        ty = rest % TILES_H
        n = rest // TILES_H
        y0 = ty * BH
        x0 = tx * BW
        acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
        for p in range(NUM_PIECES):
            x_ptr, s_n, s_c, s_d, s_h, s_w, pd, ph, pw, pc, mode, c_first, scale_d, scale_h, scale_w = (
                piece_row(table_ptr, p, w_ptr, VEC, 2)
            )
            n_direct, n_pool, n_blend = class_channels(table_ptr, p, VEC)
            w_piece = w_ptr + c_first
            for c0 in range(0, pc, BK):
                tl.debug_barrier()  # every tap of the previous block has read the slot
                if n_direct > 0:
                    _stage_table_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                       scale_w, mode, halo_pixels, k, HALO_W, SUB, 0, VEC)  # fmt: skip
                elif n_pool > 0:
                    _stage_table_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                       scale_w, mode, halo_pixels, k, HALO_W, SUB, 1, VEC)  # fmt: skip
                else:
                    _stage_table_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                       scale_w, mode, halo_pixels, k, HALO_W, SUB, 2, VEC)  # fmt: skip
                tl.debug_barrier()  # the block is in the slot for every thread
                b_mask = ((c0 + k) < pc)[:, None] & co_ok[None, :]
                w_block = w_piece + c0 + w_tile
                for tap in tl.static_range(9):
                    a = tl.load(a_rows + ((tap // 3) * HALO_W + tap % 3) * BK)  # the padding is in the halo
                    b = tl.load(w_block + (tap // 3) * sw_kh + (tap % 3) * sw_kw, mask=b_mask, other=0.0)
                    acc = tl.dot(a, b, acc)
        acc = bias_and_activation(acc, b_ptr, co, co_ok, slope, HAS_BIAS, ACT)
        oy = y0 + iy
        ox = x0 + ix
        out_mask = ((oy < H) & (ox < W))[:, None] & co_ok[None, :]
        out_off = (((n * H + oy) * W + ox).to(tl.int64) * C_OUT)[:, None] + co[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def run_staged(pieces, codes, weight, bias, activation, *, bh=16, bw=16, bn=32, sub=128, programs=3):
    """The table-driven kernel on the package's piece table; returns channels_last output."""
    from unetpp_fast.ops import conv_spec
    from unetpp_fast.ops.triton import epilogue, launch_common

    pieces = [p.contiguous(memory_format=torch.channels_last) for p in pieces]
    height, width = conv_spec.resampled_size(pieces[0].shape[2], pieces[0].shape[3], codes[0])
    n, c_out = pieces[0].shape[0], weight.shape[0]
    weight = weight.contiguous(memory_format=torch.channels_last)
    table = launch_common.piece_table(pieces, codes)
    vec = launch_common.vector_width(pieces)
    assert vec > 1, "the staged kernel reads 16-byte channel vectors"
    out = torch.full((n, c_out, height, width), float("nan"), dtype=weight.dtype).contiguous(
        memory_format=torch.channels_last
    )
    tiles_w, tiles_h = triton.cdiv(width, bw), triton.cdiv(height, bh)
    co_tiles = triton.cdiv(c_out, bn)
    halo = halo_rows(bh, bw, sub)
    scratch = torch.full((co_tiles * programs * halo * 32,), float("nan"), dtype=weight.dtype)
    kind, slope = conv_spec.parse_activation(activation)
    conv3x3_staged[(programs, co_tiles)](
        out, weight, bias if bias is not None else weight, table, scratch, len(pieces), n, height, width,
        c_out, weight.stride(0), weight.stride(2), weight.stride(3), (bh + 2) * (bw + 2), tiles_w, tiles_h,
        n * tiles_h * tiles_w, slope, HAS_BIAS=bias is not None, ACT=epilogue.ACTIVATION_CODES[kind], VEC=vec,
        BH=bh, BW=bw, BK=32, BN=bn, HALO=halo, SUB=sub,
    )  # fmt: skip
    return out


def halo_rows(bh: int, bw: int, sub: int) -> int:
    return triton.cdiv((bh + 2) * (bw + 2), sub) * sub  # whole SUB parts


def check() -> None:
    """fp32 (the interpreter cannot run bf16 dots), TF32 off: exact but for the summation order."""
    from unetpp_fast.ops import conv_spec, reference

    gen = torch.Generator().manual_seed(0)
    table_cases = (  # ([(C, mode)], C_out, H, W, N, CTAs, BN, activation)
        ([(32, conv_spec.NONE), (64, conv_spec.UP_BILINEAR_AC)], 32, 20, 36, 2, 3, 32, "relu"),
        (
            [(16, conv_spec.NONE), (8, conv_spec.UP_NEAREST), (24, conv_spec.UP_BILINEAR)],
            40,
            12,
            18,
            1,
            2,
            32,
            "leaky_relu:0.1",
        ),  # fmt: skip
        ([(40, conv_spec.MAXPOOL2)], 64, 10, 14, 2, 2, 64, "none"),
        (
            [
                (8, conv_spec.NONE),
                (8, conv_spec.UP_NEAREST),
                (8, conv_spec.UP_BILINEAR),
                (8, conv_spec.UP_BILINEAR_AC),
                (16, conv_spec.MAXPOOL2),
            ],
            24,
            6,
            6,
            3,
            2,
            32,
            "relu",
        ),  # fmt: skip
    )
    for specs, c_out, h, w, n, programs, bn, activation in table_cases:
        pieces = []
        for channels, mode in specs:
            if mode in conv_spec.UPSAMPLING_MODES:
                size = (h // 2, w // 2)
            elif mode == conv_spec.MAXPOOL2:
                size = (2 * h + 1, 2 * w)
            else:
                size = (h, w)
            pieces.append(torch.randn(n, channels, *size, generator=gen))
        codes = [mode for _, mode in specs]
        c_in = sum(c for c, _ in specs)
        weight = torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5
        bias = torch.randn(c_out, generator=gen) * 0.1
        got = run_staged(pieces, codes, weight, bias, activation, bn=bn, programs=programs)
        want = reference.forward(
            [t.double() for t in pieces], codes, weight.double(), bias.double(), activation
        )
        assert not torch.isnan(got).any(), "an output element was never written"
        error = ((got.double() - want).norm() / want.norm()).item()
        print(f"table kernel, modes {codes} -> {c_out} {h}x{w} N {n}: relative error vs fp64 {error:.2e}")
        assert error < 1e-5


def block_costs(bh: int, bw: int, bn: int, sub: int, warps: int, stages: int) -> dict:
    """Warp instructions per channel block (staging + 9 taps) per read class, and per tile outside
    the blocks, from the kernel's sm_90 SASS (one compile: every class's staging loop is in it);
    registers and stack."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from unetpp_fast.ops import sass as sass_reader
    from unetpp_fast.ops.kernel_resources import find_cuobjdump

    tool = find_cuobjdump()
    constexprs = dict(
        HAS_BIAS=True, ACT=1, VEC=8, BH=bh, BW=bw, BK=32, BN=bn, HALO=halo_rows(bh, bw, sub), SUB=sub
    )
    signature = {
        "out_ptr": "*bf16",
        "w_ptr": "*bf16",
        "b_ptr": "*bf16",
        "table_ptr": "*i64",
        "scratch_ptr": "*bf16",
    }
    ints = ("NUM_PIECES", "N", "H", "W", "C_OUT", "sw_co", "sw_kh", "sw_kw", "halo_pixels", "TILES_W",
            "TILES_H", "NUM_TILES")  # fmt: skip
    signature.update({name: "i32" for name in ints})
    signature["slope"] = "fp32"
    signature.update({name: "constexpr" for name in constexprs})
    # pointers 16-byte aligned; C_out and the weight strides multiples of 16 (UNet++: 32, 64, ...)
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 9, 10, 11, 12)}
    source = ASTSource(fn=conv3x3_staged, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "staged.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        (function,) = sass_reader.parse_sass(sass_reader.disassemble(path, tool))
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    resources = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    found = sass_reader.loops(function)
    paths = {loop.head: len(sass_reader._paths(function, loop)[1]) for loop in found}
    (block,) = sass_reader.hot_loops(function)  # the channel-block loop (the 9 taps unrolled in it)
    block_loop = next(loop for loop in found if loop.head == block.head)
    staging = [loop for loop in found if block_loop.contains(loop)]
    if len(staging) != 3:
        raise RuntimeError(
            f"expected one staging loop per read class in the block loop, found {len(staging)}"
        )
    body = function.instructions

    def has(loop, wanted) -> bool:
        return any(wanted(body[i]) for i in range(loop.first, loop.last + 1))

    pool = next(loop for loop in staging if has(loop, sass_reader.is_packed_max))
    blend = next(loop for loop in staging if loop is not pool and has(loop, lambda inst: inst.base == "FFMA"))
    direct = next(loop for loop in staging if loop is not pool and loop is not blend)
    # The block's longest path runs one trip of its longest staging loop: the rest of the block
    # is what every class pays once; a class adds its own loop's trips.
    base = block.max_path - max(paths[loop.head] for loop in staging)
    trips = -(-((bh + 2) * (bw + 2)) // sub)
    tile_loop = next(loop for loop in found if loop.contains(block_loop) and not any(
        other.contains(block_loop) and loop.contains(other) for other in found))  # fmt: skip
    return {
        "none": base + trips * paths[direct.head],
        "maxpool2": base + trips * paths[pool.head],
        "up": base + trips * paths[blend.head],
        "tile": paths[tile_loop.head] - block.max_path,
        "resources": resources,
    }


CONFIGS = (  # (BH, BW, BN, SUB, warps, stages)
    (16, 16, 32, 128, 8, 3),
    (16, 32, 32, 128, 8, 3),
    (16, 16, 64, 128, 8, 3),
    (16, 32, 64, 128, 8, 3),
    (16, 16, 128, 128, 8, 3),
    (8, 8, 32, 128, 4, 3),
    (8, 8, 64, 128, 4, 3),
    (8, 16, 64, 128, 4, 3),
)


def project() -> None:
    from unetpp_fast.bench import static_estimate
    from unetpp_fast.ops import conv_spec, static_model

    clock = static_model.SMS * static_model.ISSUE_PER_SM_PER_CLOCK * static_model.CLOCK_HZ
    costs = {}
    for config in CONFIGS:
        c = block_costs(*config)
        usable = not c["resources"].get("STACK") and not c["resources"].get("LOCAL")
        if usable:  # a config that spills is not projected
            costs[config] = c
        print(
            f"BH {config[0]} BW {config[1]} BN {config[2]} SUB {config[3]} w{config[4]} s{config[5]}: "
            f"per channel block none {c['none']}, up {c['up']}, maxpool {c['maxpool2']} warp instructions; "
            f"per tile {c['tile']}; {c['resources']}{'' if usable else ' (spills: not used)'}"
        )
    mode_of = {conv_spec.NONE: "none", conv_spec.UP_BILINEAR_AC: "up", conv_spec.MAXPOOL2: "maxpool2"}
    for size, batch in static_estimate.SIZES:
        total = floor_total = 0.0
        rows = []
        for shape, count in static_estimate.conv_shapes(size, batch):
            if shape.kernel != 3 or any(c % 16 for c, *_ in shape.pieces):
                continue  # the RGB input (packed kernel) and the 1x1 heads: not this kernel
            floor = max(
                shape.flops / static_model.TENSOR_FLOPS, shape.min_bytes / static_model.HBM_BYTES_PER_S
            )
            best = None
            for config, c in costs.items():
                bh, bw, bn, _, warps, _ = config
                tiles = (
                    batch
                    * -(-shape.out_height // bh)
                    * -(-shape.out_width // bw)
                    * -(-shape.out_channels // bn)
                )
                instructions = sum(-(-ch // 32) * c[mode_of[mode]] for ch, _, _, mode in shape.pieces)
                instructions += c["tile"]
                issue = tiles * instructions * warps / clock
                k_total = sum(-(-ch // 32) * 32 for ch, *_ in shape.pieces) * 9
                tensor = tiles * 2 * bh * bw * bn * k_total / static_model.TENSOR_FLOPS
                memory = shape.min_bytes / static_model.HBM_BYTES_PER_S
                estimate = max(issue, tensor, memory)
                if best is None or estimate < best[0]:
                    best = (estimate, config, issue, tensor, memory)
            total += best[0] * count
            floor_total += floor * count
            rows.append((shape.name, count, best, floor))
        print(f"\n{size}x{size} b{batch}: 3x3 convolutions but the input conv")
        for name, count, (estimate, config, issue, tensor, memory), floor in rows:
            print(
                f"  {name:22s} x{count} BH{config[0]} BW{config[1]} BN{config[2]}: issue {issue * 1e3:.4f} "
                f"tensor {tensor * 1e3:.4f} memory {memory * 1e3:.4f} -> {estimate * 1e3:.4f} ms, "
                f"{estimate / floor:.2f}x floor"
            )
        print(f"  sum {total * 1e3:.4f} ms, floor {floor_total * 1e3:.4f} ms: {total / floor_total:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="interpreter run against the fp64 reference")
    parser.add_argument("--project", action="store_true", help="sm_90 SASS costs and the L4 projection")
    args = parser.parse_args()
    if args.check:
        check()
    if args.project:
        project()


if __name__ == "__main__":
    main()
