"""Pre-activation gradient and weight-gradient kernels.

`preactivation_grad_kernel` applies the activation's derivative, read from the saved output
(`out > 0`; exact for relu and for leaky_relu with a positive slope), and writes G as
[N*H*W, C_out] contiguous: the A operand of every other backward GEMM, output-sized.

`weight_grad_kernel` computes, per tap and piece, dW[tap, co, c] = sum_pixels G[p, co] *
V_piece[p + tap - pad, c], reading the virtual input through the same resampling loads as the
forward, every piece in one launch (the piece is a grid axis over the descriptor table, its mode a
run-time value). The pixel sum is split into chunks (split-K) written to separate fp32 partials
that the host sums in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from unetpp_fast.ops.triton.virtual_input import (
    channel_offsets,
    gather_tile,
    piece_row,
    pixel_coords,
    source_geometry,
    tap_shifts,
)

ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)


# Sizes and strides unspecialised: one compile serves every node.
_PRE_INTS = ["s_go_n", "s_go_c", "s_go_d", "s_go_h", "s_go_w", "s_o_n", "s_o_c", "s_o_d", "s_o_h", "s_o_w",
             "M", "D", "H", "W", "C_OUT"]  # fmt: skip


@triton.jit(do_not_specialize=_PRE_INTS)
def preactivation_grad_kernel(
    gp_ptr,
    go_ptr,
    s_go_n,
    s_go_c,
    s_go_d,  # 0 in 2D
    s_go_h,
    s_go_w,
    o_ptr,
    s_o_n,
    s_o_c,
    s_o_d,
    s_o_h,
    s_o_w,
    M,
    D,  # 1 in 2D
    H,
    W,
    C_OUT,
    slope,
    ACT: tl.constexpr,
    DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (co < C_OUT)[None, :]
    n, z, y, x = pixel_coords(offs_m, D, H, W, DIMS)
    n, z, y, x = n.to(tl.int64), z.to(tl.int64), y.to(tl.int64), x.to(tl.int64)
    co64 = co.to(tl.int64)[None, :]
    go_off = n * s_go_n + y * s_go_h + x * s_go_w
    o_off = n * s_o_n + y * s_o_h + x * s_o_w
    if DIMS == 3:
        go_off += z * s_go_d
        o_off += z * s_o_d
    g = tl.load(go_ptr + go_off[:, None] + co64 * s_go_c, mask=mask, other=0.0)
    if ACT != 0:
        o = tl.load(o_ptr + o_off[:, None] + co64 * s_o_c, mask=mask, other=0.0)
        if ACT == ACT_RELU:
            g = tl.where(o > 0, g, tl.zeros_like(g))
        else:
            g = tl.where(o > 0, g, g * slope)
    g_off = offs_m.to(tl.int64)[:, None] * C_OUT + co64
    tl.store(gp_ptr + g_off, g.to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["NUM_PIECES", "MAX_C", "M", "D", "H", "W", "C_IN", "C_OUT", "CHUNK"])
def weight_grad_kernel(
    part_ptr,  # fp32 [splits, C_out, C_in, taps]: the weight's own layout, no permute after
    g_ptr,  # G: [M, C_out] contiguous, the pieces' dtype
    table_ptr,
    NUM_PIECES,
    MAX_C,
    M,
    D,  # 1 in 2D
    H,
    W,
    C_IN,
    C_OUT,
    CHUNK,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,
    PRECISION: tl.constexpr,
    C_CONTIG: tl.constexpr,
    VEC: tl.constexpr,  # > 1: 16-byte channel vectors (launch_common.vector_width)
    BLOCK_CO: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)  # depth taps: 1 in 2D
    KK: tl.constexpr = KD * KSIZE * KSIZE
    c_blocks = tl.cdiv(MAX_C, BLOCK_C)
    piece = tl.program_id(1) // c_blocks
    x_ptr, s_n, s_c, s_d, s_h, s_w, pd, ph, pw, pc, mode, c_first, scale_d, scale_h, scale_w = piece_row(
        table_ptr, piece, g_ptr, VEC, DIMS
    )
    c = (tl.program_id(1) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    if (tl.program_id(1) % c_blocks) * BLOCK_C < pc:  # the piece's channel blocks; the rest idle
        co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        tap = tl.program_id(2) % KK
        split = tl.program_id(2) // KK
        kz, kh, kw = tap_shifts(tap, KSIZE, DIMS)
        co_ok = co < C_OUT
        c_ok = c < pc
        c_off = channel_offsets(c, s_c, C_CONTIG)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, M)

        acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            m = p0 + tl.arange(0, BLOCK_P)
            m_ok = m < end
            n, oz, oy, ox = pixel_coords(m, D, H, W, DIMS)
            y = oy + kh - PAD
            x = ox + kw - PAD
            row_ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            if DIMS == 3:
                z = oz + kz - PAD
                row_ok = row_ok & (z >= 0) & (z < D)
            else:
                z = oz
            g_t = tl.load(
                g_ptr + m.to(tl.int64)[None, :] * C_OUT + co[:, None],
                mask=co_ok[:, None] & m_ok[None, :],
                other=0.0,
            )
            (o000, o001, o010, o011, o100, o101, o110, o111,
             w000, w001, w010, w011, w100, w101, w110, w111) = source_geometry(
                n, z, y, x, s_n, s_d, s_h, s_w, pd, ph, pw, scale_d, scale_h, scale_w, mode, VEC, DIMS,
                False,
            )  # fmt: skip
            v = gather_tile(x_ptr, o000, o001, o010, o011, o100, o101, o110, o111,
                            w000, w001, w010, w011, w100, w101, w110, w111, c_off,
                            row_ok[:, None] & c_ok[None, :], mode, DIMS)  # fmt: skip
            acc = tl.dot(g_t, v, acc, input_precision=PRECISION)

        row = split.to(tl.int64) * C_OUT + co
        off = (row[:, None] * C_IN + (c_first + c)[None, :]) * KK + tap
        tl.store(part_ptr + off, acc, mask=co_ok[:, None] & c_ok[None, :])
