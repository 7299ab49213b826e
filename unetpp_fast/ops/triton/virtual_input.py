"""Reading the virtual input: one piece, resampled in the load, as a [pixels, channels] tile.

Shared by the forward and the weight-gradient kernels, and the resample geometry (which
low-resolution pixels a high-resolution position reads, with which weights) shared with the
input-gradient kernels, so forward and adjoint can never disagree. Source indices follow
PyTorch exactly: nearest `floor(dst / 2)`; bilinear `max((dst + 0.5) / 2 - 0.5, 0)`
(align_corners False) or `dst * (in - 1) / (out - 1)` (align_corners True, the scale computed
in fp32 on the host); maxpool2 the 2x2 window at `2 * dst`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Resample codes (unetpp_fast.conv_spec), as compile-time constants for the kernels.
MODE_NONE = tl.constexpr(0)
MODE_UP_NEAREST = tl.constexpr(1)
MODE_UP_BILINEAR = tl.constexpr(2)
MODE_UP_BILINEAR_AC = tl.constexpr(3)
MODE_MAXPOOL2 = tl.constexpr(4)


@triton.jit
def bilinear_source(dst, size_in, scale, MODE: tl.constexpr):
    """Bilinear taps of high-resolution coordinates `dst`: (i0, i1, lambda0, lambda1), as PyTorch."""
    d = dst.to(tl.float32)
    if MODE == MODE_UP_BILINEAR:
        src = tl.maximum((d + 0.5) * 0.5 - 0.5, 0.0)
    else:
        src = d * scale
    i0 = src.to(tl.int32)  # src >= 0: truncation is floor
    i1 = i0 + (i0 < size_in - 1).to(tl.int32)
    lambda1 = src - i0.to(tl.float32)
    lambda0 = 1.0 - lambda1
    return i0, i1, lambda0, lambda1


@triton.jit
def upsample_weight(dst, src_index, size_in, scale, MODE: tl.constexpr):
    """Weight with which high-resolution coordinate `dst` reads low-resolution `src_index` (broadcasts)."""
    if MODE == MODE_UP_NEAREST:
        w = ((dst // 2) == src_index).to(tl.float32)
    else:
        i0, i1, lambda0, lambda1 = bilinear_source(dst, size_in, scale, MODE)
        w = tl.where(i0 == src_index, lambda0, 0.0) + tl.where(i1 == src_index, lambda1, 0.0)
    return w


@triton.jit
def load_piece_tile(
    ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    height,
    width,
    n,
    y,
    x,
    row_ok,
    c,
    c_ok,
    scale_h,
    scale_w,
    MODE: tl.constexpr,
):
    """Tile [pixels, channels] of resample(piece) at virtual positions (n, y, x), channels `c`.

    Rows with `row_ok` False (padding, past the end) read 0. Bilinear blends in fp32 and rounds to
    the piece's dtype, as a materialised `interpolate` would (which weights the four corners
    with the products of the row and column weights, as here).
    """
    mask = row_ok[:, None] & c_ok[None, :]
    base = n.to(tl.int64) * stride_n
    c_off = (c.to(tl.int64) * stride_c)[None, :]
    if MODE == MODE_NONE:
        off = base + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w
        tile = tl.load(ptr + off[:, None] + c_off, mask=mask, other=0.0)
    elif MODE == MODE_UP_NEAREST:
        off = base + (y // 2).to(tl.int64) * stride_h + (x // 2).to(tl.int64) * stride_w
        tile = tl.load(ptr + off[:, None] + c_off, mask=mask, other=0.0)
    elif MODE == MODE_MAXPOOL2:
        row0 = base + (2 * y).to(tl.int64) * stride_h
        col0 = (2 * x).to(tl.int64) * stride_w
        p = ptr + (row0 + col0)[:, None] + c_off
        v00 = tl.load(p, mask=mask, other=0.0)
        v01 = tl.load(p + stride_w, mask=mask, other=0.0)
        v10 = tl.load(p + stride_h, mask=mask, other=0.0)
        v11 = tl.load(p + stride_h + stride_w, mask=mask, other=0.0)
        top = tl.maximum(v00, v01, propagate_nan=tl.PropagateNan.ALL)
        bottom = tl.maximum(v10, v11, propagate_nan=tl.PropagateNan.ALL)
        tile = tl.maximum(top, bottom, propagate_nan=tl.PropagateNan.ALL)
    else:
        y0, y1, ly0, ly1 = bilinear_source(y, height, scale_h, MODE)
        x0, x1, lx0, lx1 = bilinear_source(x, width, scale_w, MODE)
        r0 = base + y0.to(tl.int64) * stride_h
        r1 = base + y1.to(tl.int64) * stride_h
        c0 = x0.to(tl.int64) * stride_w
        c1 = x1.to(tl.int64) * stride_w
        # Blend as each corner arrives: fewer live tiles (registers) than four loads then a blend.
        w00 = ly0[:, None] * lx0[:, None]
        w01 = ly0[:, None] * lx1[:, None]
        w10 = ly1[:, None] * lx0[:, None]
        w11 = ly1[:, None] * lx1[:, None]
        blend = w00 * tl.load(ptr + (r0 + c0)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w01 * tl.load(ptr + (r0 + c1)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w10 * tl.load(ptr + (r1 + c0)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w11 * tl.load(ptr + (r1 + c1)[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        tile = blend
    return tile.to(ptr.dtype.element_ty)
