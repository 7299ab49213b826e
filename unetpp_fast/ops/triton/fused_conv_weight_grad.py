"""Pre-activation gradient and weight-gradient kernels.

`preactivation_grad_kernel` applies the activation's derivative, read from the saved output
(`out > 0`; exact for relu and for leaky_relu with a positive slope), and writes G as
[N*H*W, C_out] contiguous: the A operand of every other backward GEMM, output-sized.

`weight_grad_kernel` computes, per tap and piece, dW[tap, co, c] = sum_pixels G[p, co] *
V_piece[p + tap - pad, c], reading the virtual input through the same resampling loads as the
forward. The pixel sum is split into chunks (split-K) written to separate fp32 partials that the
host sums in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

from unetpp_fast.ops.triton.virtual_input import load_piece_tile

ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)


@triton.jit
def preactivation_grad_kernel(
    gp_ptr,
    go_ptr,
    s_go_n,
    s_go_c,
    s_go_h,
    s_go_w,
    o_ptr,
    s_o_n,
    s_o_c,
    s_o_h,
    s_o_w,
    M,
    H,
    W,
    C_OUT,
    slope,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (co < C_OUT)[None, :]
    x = (offs_m % W).to(tl.int64)
    y = ((offs_m // W) % H).to(tl.int64)
    n = (offs_m // (W * H)).to(tl.int64)
    co64 = co.to(tl.int64)[None, :]
    g = tl.load(
        go_ptr + (n * s_go_n + y * s_go_h + x * s_go_w)[:, None] + co64 * s_go_c, mask=mask, other=0.0
    )
    if ACT != 0:
        o = tl.load(o_ptr + (n * s_o_n + y * s_o_h + x * s_o_w)[:, None] + co64 * s_o_c, mask=mask, other=0.0)
        if ACT == ACT_RELU:
            g = tl.where(o > 0, g, tl.zeros_like(g))
        else:
            g = tl.where(o > 0, g, g * slope)
    g_off = offs_m.to(tl.int64)[:, None] * C_OUT + co64
    tl.store(gp_ptr + g_off, g.to(gp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def weight_grad_kernel(
    part_ptr,  # fp32 [splits, k * k, C_out, C_in]
    g_ptr,
    x_ptr,
    sn,
    sc,
    sh,
    sw,
    ph,
    pw,
    scale_h,
    scale_w,
    M,
    H,
    W,
    C_P,
    W_ROW0,
    C_IN,
    C_OUT,
    CHUNK,
    MODE: tl.constexpr,
    KSIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    KK: tl.constexpr = KSIZE * KSIZE
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(2) % KK
    split = tl.program_id(2) // KK
    kh = tap // KSIZE
    kw = tap % KSIZE
    co_ok = co < C_OUT
    c_ok = c < C_P
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, M)

    acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        m = p0 + tl.arange(0, BLOCK_P)
        m_ok = m < end
        ox = m % W
        oy = (m // W) % H
        n = m // (W * H)
        y = oy + kh - PAD
        x = ox + kw - PAD
        row_ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        g_t = tl.load(
            g_ptr + m.to(tl.int64)[None, :] * C_OUT + co[:, None],
            mask=co_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        v = load_piece_tile(x_ptr, sn, sc, sh, sw, ph, pw, n, y, x, row_ok, c, c_ok, scale_h, scale_w, MODE)
        acc = tl.dot(g_t, v, acc, input_precision=PRECISION)

    row = (split * KK + tap).to(tl.int64) * C_OUT + co
    off = row[:, None] * C_IN + (W_ROW0 + c)[None, :]
    tl.store(part_ptr + off, acc, mask=co_ok[:, None] & c_ok[None, :])
