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

Each kernel serves every piece of its kind in one launch: the pieces come from the descriptor
table (virtual_input.piece_row), their gradients from a second table of the same layout, the
piece index is grid axis 2 and the resample mode a run-time value. Nothing the size of an
upsampled piece is allocated.
"""

from __future__ import annotations

import triton
import triton.language as tl

from unetpp_fast.ops.triton.virtual_input import (
    MODE_UP_BILINEAR,
    MODE_UP_NEAREST,
    channel_offsets,
    piece_row,
    pixel_coords,
    upsample_weight,
)


@triton.jit
def virtual_grad_tile(
    g_ptr,
    w_ptr,
    n,
    z,
    y,
    x,
    row_ok,
    c,
    c_ok,
    w_row0,
    D,
    H,
    W,
    sw_co,
    sw_c,
    sw_kd,
    sw_kh,
    sw_kw,
    C_OUT,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d loss / d virtual input at pixels (n, z, y, x), channels w_row0 + c: fp32 [BLOCK_M, BLOCK_C]."""
    PAD: tl.constexpr = KSIZE // 2
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)  # depth taps: 1 in 2D
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for kd in tl.static_range(KD):
        for kh in tl.static_range(KSIZE):
            for kw in tl.static_range(KSIZE):
                oy = y + (PAD - kh)
                ox = x + (PAD - kw)
                ok = row_ok & (oy >= 0) & (oy < H) & (ox >= 0) & (ox < W)
                if DIMS == 3:
                    oz = z + (PAD - kd)
                    ok = ok & (oz >= 0) & (oz < D)
                    g_row = (((n.to(tl.int64) * D + oz) * H + oy) * W + ox) * C_OUT
                    w_cols = (w_row0 + c).to(tl.int64) * sw_c + (kd * sw_kd + kh * sw_kh + kw * sw_kw)
                else:
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


@triton.jit
def _take_if_larger(px, step, mask, best, arg, index):
    """One window element in PyTorch's scan: taken when (value > max) or isnan(value)."""
    v = tl.load(px + step, mask=mask, other=0.0)
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, index, arg)


# Sizes and strides unspecialised: one compile serves every node.
_INTS = ["M", "BATCH", "D", "H", "W", "sw_co", "sw_c", "sw_kd", "sw_kh", "sw_kw", "C_OUT"]


@triton.jit(do_not_specialize=_INTS)
def input_grad_kernel(
    gtable_ptr,  # the pieces' gradients, one table row each (pointer, strides)
    table_ptr,  # the pieces
    g_ptr,
    w_ptr,
    M,
    D,  # 1 in 2D
    H,
    W,
    sw_co,
    sw_c,
    sw_kd,  # 0 in 2D
    sw_kh,
    sw_kw,
    C_OUT,
    POOL: tl.constexpr,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,
    PRECISION: tl.constexpr,
    C_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Plain pieces (POOL False): the gradient is the virtual gradient of their channels. Max-pooled
    pieces (POOL True): each pooled pixel's gradient goes to its window's argmax (first max wins,
    row-major over the 2x2 or 2x2x2 window, as PyTorch)."""
    p = tl.program_id(2)
    x_ptr, sxn, sxc, sxd, sxh, sxw, _, _, _, pc, _, w_row0, _, _, _ = piece_row(table_ptr, p, g_ptr, 1, DIMS)
    gx_ptr, sgn, sgc, sgd, sgh, sgw, _, _, _, _, _, _, _, _, _ = piece_row(gtable_ptr, p, g_ptr, 1, DIMS)
    if tl.program_id(1) * BLOCK_C < pc:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m_ok = offs_m < M
        c_ok = c < pc
        mask = m_ok[:, None] & c_ok[None, :]
        n, z, y, x = pixel_coords(offs_m, D, H, W, DIMS)
        grad = virtual_grad_tile(g_ptr, w_ptr, n, z, y, x, m_ok, c, c_ok, w_row0, D, H, W, sw_co, sw_c, sw_kd,
                                 sw_kh, sw_kw, C_OUT, KSIZE, DIMS, BLOCK_M, BLOCK_C, BLOCK_CO,
                                 PRECISION)  # fmt: skip
        grad = grad.to(gx_ptr.dtype.element_ty)
        n64 = n.to(tl.int64)
        if POOL:
            y2 = (2 * y).to(tl.int64)
            x2 = (2 * x).to(tl.int64)
            src = n64 * sxn + y2 * sxh + x2 * sxw
            dst = n64 * sgn + y2 * sgh + x2 * sgw
            if DIMS == 3:
                z2 = (2 * z).to(tl.int64)
                src += z2 * sxd
                dst += z2 * sgd
            px = x_ptr + src[:, None] + channel_offsets(c, sxc, C_CONTIG)
            best = tl.load(px, mask=mask, other=0.0)
            arg = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
            # PyTorch's scan order: (z,) y, x row-major; index = 4 dz + 2 dy + dx.
            best, arg = _take_if_larger(px, sxw, mask, best, arg, 1)
            best, arg = _take_if_larger(px, sxh, mask, best, arg, 2)
            best, arg = _take_if_larger(px, sxh + sxw, mask, best, arg, 3)
            if DIMS == 3:
                best, arg = _take_if_larger(px, sxd, mask, best, arg, 4)
                best, arg = _take_if_larger(px, sxd + sxw, mask, best, arg, 5)
                best, arg = _take_if_larger(px, sxd + sxh, mask, best, arg, 6)
                best, arg = _take_if_larger(px, sxd + sxh + sxw, mask, best, arg, 7)

            off = dst[:, None] + channel_offsets(c, sgc, C_CONTIG)
            zero = tl.zeros_like(grad)
            tl.store(gx_ptr + off, tl.where(arg == 0, grad, zero), mask=mask)
            tl.store(gx_ptr + off + sgw, tl.where(arg == 1, grad, zero), mask=mask)
            tl.store(gx_ptr + off + sgh, tl.where(arg == 2, grad, zero), mask=mask)
            tl.store(gx_ptr + off + sgh + sgw, tl.where(arg == 3, grad, zero), mask=mask)
            if DIMS == 3:
                tl.store(gx_ptr + off + sgd, tl.where(arg == 4, grad, zero), mask=mask)
                tl.store(gx_ptr + off + sgd + sgw, tl.where(arg == 5, grad, zero), mask=mask)
                tl.store(gx_ptr + off + sgd + sgh, tl.where(arg == 6, grad, zero), mask=mask)
                tl.store(gx_ptr + off + sgd + sgh + sgw, tl.where(arg == 7, grad, zero), mask=mask)
        else:
            off = n64 * sgn + y.to(tl.int64) * sgh + x.to(tl.int64) * sgw
            if DIMS == 3:
                off += z.to(tl.int64) * sgd
            tl.store(gx_ptr + off[:, None] + channel_offsets(c, sgc, C_CONTIG), grad, mask=mask)


@triton.jit
def up_segment(block_hr, mode):
    """Low-resolution pixels per program (as fused_conv_backward.up_segment): a segment of BLOCK_HR
    high-resolution columns, less the 4 border columns bilinear reads beyond its own."""
    return tl.where(mode == MODE_UP_NEAREST, block_hr // 2, (block_hr - 4) // 2)


@triton.jit
def _add_rows(
    acc, wz, n_vec, Z_vec, X, col_ok, y, n_rows, row_shift, HP, scale_h, mode, c, c_ok, w_row0, g_ptr, w_ptr,
    D, H, W, sw_co, sw_c, sw_kd, sw_kh, sw_kw, C_OUT,
    KSIZE: tl.constexpr, DIMS: tl.constexpr, BLOCK_HR: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + the weighted virtual gradients of the high-resolution rows Y that read low-resolution
    row y (in 3D within depth row Z_vec, weighted by wz too)."""
    for r in range(n_rows):
        Y = 2 * y + row_shift + r
        wy = upsample_weight(Y, y, HP, scale_h, mode)
        if (Y >= 0) & (Y < H) & (wy != 0.0):
            Y_vec = tl.zeros((BLOCK_HR,), dtype=tl.int32) + Y
            grad = virtual_grad_tile(g_ptr, w_ptr, n_vec, Z_vec, Y_vec, X, col_ok, c, c_ok, w_row0, D, H, W,
                                     sw_co, sw_c, sw_kd, sw_kh, sw_kw, C_OUT, KSIZE, DIMS, BLOCK_HR, BLOCK_C,
                                     BLOCK_CO, PRECISION)  # fmt: skip
            if DIMS == 3:
                acc += (wz * wy) * grad
            else:
                acc += wy * grad
    return acc


@triton.jit(do_not_specialize=_INTS)
def input_grad_up_kernel(
    gtable_ptr,
    table_ptr,
    g_ptr,
    w_ptr,
    BATCH,
    D,  # 1 in 2D
    H,
    W,
    sw_co,
    sw_c,
    sw_kd,  # 0 in 2D
    sw_kh,
    sw_kw,
    C_OUT,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,
    PRECISION: tl.constexpr,
    C_CONTIG: tl.constexpr,
    BLOCK_HR: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Upsampled pieces: gather, for each low-resolution pixel, the high-resolution gradients it fed.
    One program per segment of a low-resolution row (n, (z,) y); in 3D the high-resolution rows
    that read it are (depth row, row) pairs, each weighted by the product of the two axis weights."""
    p = tl.program_id(2)
    _, _, _, _, _, _, DP, HP, WP, pc, mode, w_row0, scale_d, scale_h, scale_w = piece_row(
        table_ptr, p, g_ptr, 1, DIMS
    )
    gx_ptr, sgn, sgc, sgd, sgh, sgw, _, _, _, _, _, _, _, _, _ = piece_row(gtable_ptr, p, g_ptr, 1, DIMS)
    # High-res rows/columns that read low-res row y / column x: nearest 2y..2y+1; bilinear
    # 2y-1..2y+2; align_corners 2y-2..2y+3 (its scale is just under 1/2). Depth rows alike.
    nearest = mode == MODE_UP_NEAREST
    n_rows = tl.where(nearest, 2, tl.where(mode == MODE_UP_BILINEAR, 4, 6))
    row_shift = tl.where(nearest, 0, tl.where(mode == MODE_UP_BILINEAR, -1, -2))
    col_shift = tl.where(nearest, 0, -2)
    segment = up_segment(BLOCK_HR, mode)
    BLOCK_LR: tl.constexpr = BLOCK_HR // 2

    segments = tl.cdiv(WP, segment)
    pid = tl.program_id(0)
    seg = pid % segments
    row = pid // segments
    y = row % HP
    if DIMS == 3:
        z = (row // HP) % DP
        n = (row // HP) // DP
    else:
        z = y * 0  # unused in 2D
        n = row // HP
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if (tl.program_id(1) * BLOCK_C < pc) & (n < BATCH):  # grid axis 0 fits the largest piece
        x_lo = seg * segment
        c_ok = c < pc
        j = tl.arange(0, BLOCK_HR)
        X = 2 * x_lo + col_shift + j
        col_ok = (X >= 0) & (X < W)
        n_vec = tl.zeros((BLOCK_HR,), dtype=tl.int32) + n
        acc = tl.zeros((BLOCK_HR, BLOCK_C), dtype=tl.float32)
        # Run-time loops: unrolling them would multiply the code (and compile time).
        if DIMS == 3:
            for rz in range(n_rows):
                Z = 2 * z + row_shift + rz
                wz = upsample_weight(Z, z, DP, scale_d, mode)
                if (Z >= 0) & (Z < D) & (wz != 0.0):
                    Z_vec = tl.zeros((BLOCK_HR,), dtype=tl.int32) + Z
                    acc = _add_rows(acc, wz, n_vec, Z_vec, X, col_ok, y, n_rows, row_shift, HP, scale_h, mode,
                                    c, c_ok, w_row0, g_ptr, w_ptr, D, H, W, sw_co, sw_c, sw_kd, sw_kh, sw_kw,
                                    C_OUT, KSIZE, DIMS, BLOCK_HR, BLOCK_C, BLOCK_CO, PRECISION)  # fmt: skip
        else:
            acc = _add_rows(acc, 1.0, n_vec, n_vec, X, col_ok, y, n_rows, row_shift, HP, scale_h, mode,
                            c, c_ok, w_row0, g_ptr, w_ptr, D, H, W, sw_co, sw_c, sw_kd, sw_kh, sw_kw,
                            C_OUT, KSIZE, DIMS, BLOCK_HR, BLOCK_C, BLOCK_CO, PRECISION)  # fmt: skip

        i = tl.arange(0, BLOCK_LR)
        x_low = x_lo + i
        low_ok = (i < segment) & (x_low < WP)
        col_weights = upsample_weight(X[None, :], x_low[:, None], WP, scale_w, mode)
        col_weights = tl.where(col_ok[None, :], col_weights, 0.0)
        result = tl.dot(col_weights, acc, input_precision="ieee")

        off = n.to(tl.int64) * sgn + y.to(tl.int64) * sgh + x_low.to(tl.int64) * sgw
        if DIMS == 3:
            off += z.to(tl.int64) * sgd
        off = off[:, None] + channel_offsets(c, sgc, C_CONTIG)
        tl.store(gx_ptr + off, result.to(gx_ptr.dtype.element_ty), mask=low_ok[:, None] & c_ok[None, :])
