"""Input-gradient kernels: the gradient w.r.t. each piece, written straight into that piece's gradient.

The gradient of the virtual input at a pixel is a transposed convolution of the pre-activation
gradient `G` ([N*H*W, C_out], contiguous) with the weight: an implicit GEMM over (tap, C_out).
Each piece then takes the adjoint of its resample inside the kernel, as a gather (no atomics):

* none: the virtual gradient itself.
* maxpool2: one program per pooled pixel; its gradient goes to the first maximum of the 2x2
  window in row-major order (PyTorch's tie-break), zeros to the other three.
* up (nearest, bilinear, bilinear align_corners): one program per segment of a low-resolution
  row. It sums the virtual gradient of the 2, 4 or 6 high-resolution rows that read this row
  (weighted per row), then applies the column weights as a small matrix product
  [low-res columns, high-res columns] @ [high-res columns, channels].

Nothing the size of an upsampled piece is allocated.
"""

from __future__ import annotations

import triton
import triton.language as tl

from unetpp_fast.ops.triton.virtual_input import (
    MODE_UP_BILINEAR,
    MODE_UP_NEAREST,
    pixel_coords,
    upsample_weight,
)


@triton.jit
def virtual_grad_tile(
    g_ptr,
    w_ptr,
    n,
    y,
    x,
    row_ok,
    c,
    c_ok,
    w_row0,
    H,
    W,
    sw_co,
    sw_c,
    sw_kh,
    sw_kw,
    C_OUT,
    KSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d loss / d virtual input at pixels (n, y, x), channels w_row0 + c: fp32 [BLOCK_M, BLOCK_C]."""
    PAD: tl.constexpr = KSIZE // 2
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        for kw in tl.static_range(KSIZE):
            oy = y + (PAD - kh)
            ox = x + (PAD - kw)
            ok = row_ok & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
            g_row = ((n.to(tl.int64) * H + oy) * W + ox) * C_OUT
            w_cols = (w_row0 + c).to(tl.int64) * sw_c + (kh * sw_kh + kw * sw_kw)
            for co0 in range(0, C_OUT, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO)
                co_ok = co < C_OUT
                g = tl.load(
                    g_ptr + g_row[:, None] + co[None, :], mask=ok[:, None] & co_ok[None, :], other=0.0
                )
                wt = tl.load(
                    w_ptr + w_cols[None, :] + co.to(tl.int64)[:, None] * sw_co,
                    mask=co_ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(g, wt, acc, input_precision=PRECISION)
    return acc


# Sizes and strides unspecialised (one compile for every node); the channel strides (1 on the GPU
# path, channels_last) stay specialised so channel accesses vectorise.
_INTS = ["M", "H", "W", "C_P", "W_ROW0", "sw_co", "sw_c", "sw_kh", "sw_kw", "C_OUT", "sgn", "sgh", "sgw"]


@triton.jit(do_not_specialize=_INTS)
def input_grad_kernel(
    gx_ptr,
    sgn,
    sgc,
    sgh,
    sgw,
    g_ptr,
    w_ptr,
    M,
    H,
    W,
    C_P,
    W_ROW0,
    sw_co,
    sw_c,
    sw_kh,
    sw_kw,
    C_OUT,
    KSIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Piece read without resampling: its gradient is the virtual gradient of its channels."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    c_ok = c < C_P
    n, y, x = pixel_coords(offs_m, H, W)
    acc = virtual_grad_tile(g_ptr, w_ptr, n, y, x, m_ok, c, c_ok, W_ROW0, H, W, sw_co, sw_c, sw_kh, sw_kw,
                            C_OUT, KSIZE, BLOCK_M, BLOCK_C, BLOCK_CO, PRECISION)  # fmt: skip
    off = n.to(tl.int64) * sgn + y.to(tl.int64) * sgh + x.to(tl.int64) * sgw
    off = off[:, None] + (c.to(tl.int64) * sgc)[None, :]
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=_INTS + ["sxn", "sxh", "sxw"])
def input_grad_maxpool_kernel(
    gx_ptr,
    sgn,
    sgc,
    sgh,
    sgw,
    x_ptr,
    sxn,
    sxc,
    sxh,
    sxw,
    g_ptr,
    w_ptr,
    M,
    H,
    W,
    C_P,
    W_ROW0,
    sw_co,
    sw_c,
    sw_kh,
    sw_kw,
    C_OUT,
    KSIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Max-pooled piece: route each pooled pixel's gradient to its window's argmax (first max wins)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    c_ok = c < C_P
    n, y, x = pixel_coords(offs_m, H, W)
    grad = virtual_grad_tile(g_ptr, w_ptr, n, y, x, m_ok, c, c_ok, W_ROW0, H, W, sw_co, sw_c, sw_kh, sw_kw,
                             C_OUT, KSIZE, BLOCK_M, BLOCK_C, BLOCK_CO, PRECISION)  # fmt: skip
    grad = grad.to(gx_ptr.dtype.element_ty)
    mask = m_ok[:, None] & c_ok[None, :]
    y2 = (2 * y).to(tl.int64)
    x2 = (2 * x).to(tl.int64)
    px = x_ptr + (n.to(tl.int64) * sxn + y2 * sxh + x2 * sxw)[:, None] + (c.to(tl.int64) * sxc)[None, :]
    best = tl.load(px, mask=mask, other=0.0)
    arg = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    # PyTorch: take a window element when (value > max) or isnan(value), scanning row-major.
    v = tl.load(px + sxw, mask=mask, other=0.0)
    take = (v > best) | (v != v)
    arg = tl.where(take, 1, arg)
    best = tl.where(take, v, best)
    v = tl.load(px + sxh, mask=mask, other=0.0)
    take = (v > best) | (v != v)
    arg = tl.where(take, 2, arg)
    best = tl.where(take, v, best)
    v = tl.load(px + sxh + sxw, mask=mask, other=0.0)
    take = (v > best) | (v != v)
    arg = tl.where(take, 3, arg)

    pg = gx_ptr + (n.to(tl.int64) * sgn + y2 * sgh + x2 * sgw)[:, None] + (c.to(tl.int64) * sgc)[None, :]
    zero = tl.zeros_like(grad)
    tl.store(pg, tl.where(arg == 0, grad, zero), mask=mask)
    tl.store(pg + sgw, tl.where(arg == 1, grad, zero), mask=mask)
    tl.store(pg + sgh, tl.where(arg == 2, grad, zero), mask=mask)
    tl.store(pg + sgh + sgw, tl.where(arg == 3, grad, zero), mask=mask)


@triton.jit(do_not_specialize=_INTS + ["HP", "WP"])
def input_grad_up_kernel(
    gx_ptr,
    sgn,
    sgc,
    sgh,
    sgw,
    g_ptr,
    w_ptr,
    HP,
    WP,
    H,
    W,
    C_P,
    W_ROW0,
    sw_co,
    sw_c,
    sw_kh,
    sw_kw,
    C_OUT,
    scale_h,
    scale_w,
    MODE: tl.constexpr,
    KSIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_HR: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Upsampled piece: gather, for each low-resolution pixel, the high-resolution gradients it fed."""
    # High-res rows/columns that read low-res row y / column x: nearest 2y..2y+1; bilinear
    # 2y-1..2y+2; align_corners 2y-2..2y+3 (its scale is just under 1/2).
    if MODE == MODE_UP_NEAREST:
        NROWS: tl.constexpr = 2
        ROW_SHIFT: tl.constexpr = 0
        COL_SHIFT: tl.constexpr = 0
        SEGMENT: tl.constexpr = BLOCK_HR // 2
    elif MODE == MODE_UP_BILINEAR:
        NROWS: tl.constexpr = 4
        ROW_SHIFT: tl.constexpr = -1
        COL_SHIFT: tl.constexpr = -2
        SEGMENT: tl.constexpr = (BLOCK_HR - 4) // 2
    else:
        NROWS: tl.constexpr = 6
        ROW_SHIFT: tl.constexpr = -2
        COL_SHIFT: tl.constexpr = -2
        SEGMENT: tl.constexpr = (BLOCK_HR - 4) // 2
    BLOCK_LR: tl.constexpr = BLOCK_HR // 2

    segments = tl.cdiv(WP, SEGMENT)
    pid = tl.program_id(0)
    seg = pid % segments
    row = pid // segments
    y = row % HP
    n = row // HP
    x_lo = seg * SEGMENT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C_P

    j = tl.arange(0, BLOCK_HR)
    X = 2 * x_lo + COL_SHIFT + j
    col_ok = (X >= 0) & (X < W)
    n_vec = tl.zeros((BLOCK_HR,), dtype=tl.int32) + n
    acc = tl.zeros((BLOCK_HR, BLOCK_C), dtype=tl.float32)
    for r in range(NROWS):  # a runtime loop: unrolling it would multiply the code (and compile time)
        Y = 2 * y + ROW_SHIFT + r
        wy = upsample_weight(Y, y, HP, scale_h, MODE)
        if (Y >= 0) & (Y < H) & (wy != 0.0):
            Y_vec = tl.zeros((BLOCK_HR,), dtype=tl.int32) + Y
            grad = virtual_grad_tile(g_ptr, w_ptr, n_vec, Y_vec, X, col_ok, c, c_ok, W_ROW0, H, W,
                                     sw_co, sw_c, sw_kh, sw_kw, C_OUT, KSIZE, BLOCK_HR, BLOCK_C,
                                     BLOCK_CO, PRECISION)  # fmt: skip
            acc += wy * grad

    i = tl.arange(0, BLOCK_LR)
    x_low = x_lo + i
    low_ok = (i < SEGMENT) & (x_low < WP)
    col_weights = upsample_weight(X[None, :], x_low[:, None], WP, scale_w, MODE)
    col_weights = tl.where(col_ok[None, :], col_weights, 0.0)
    result = tl.dot(col_weights, acc, input_precision="ieee")

    off = n.to(tl.int64) * sgn + y.to(tl.int64) * sgh + x_low.to(tl.int64) * sgw
    off = off[:, None] + (c.to(tl.int64) * sgc)[None, :]
    tl.store(gx_ptr + off, result.to(gx_ptr.dtype.element_ty), mask=low_ok[:, None] & c_ok[None, :])
