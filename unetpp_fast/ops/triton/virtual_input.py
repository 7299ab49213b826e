"""Reading the virtual input: the piece descriptor table, and one piece resampled in the load.

Every kernel takes its pieces from a per-call int64 table (launch_common.piece_table: one row of
`launch_common.TABLE_FIELDS` per piece) and loops over it at run time, so the piece count and the
resample modes are not compile-time constants: one compiled kernel serves every node.

The resample geometry (which source pixels a virtual position reads, with which weights) is
shared by the forward, the weight gradient and the input-gradient kernels, so forward and
adjoint can never disagree. Source indices follow PyTorch exactly: nearest `floor(dst / 2)`;
bilinear `max((dst + 0.5) / 2 - 0.5, 0)` (align_corners False) or `dst * (in - 1) / (out - 1)`
(align_corners True, the scale rounded to fp32 on the host); maxpool2 the 2x2 window at `2 * dst`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Resample codes (unetpp_fast.ops.conv_spec), as constants for the kernels.
MODE_NONE = tl.constexpr(0)
MODE_UP_NEAREST = tl.constexpr(1)
MODE_UP_BILINEAR = tl.constexpr(2)
MODE_UP_BILINEAR_AC = tl.constexpr(3)
MODE_MAXPOOL2 = tl.constexpr(4)
ROW = tl.constexpr(12)  # int64 fields per table row (launch_common.TABLE_FIELDS)


@triton.jit
def pixel_coords(m, H, W):
    """(n, y, x) of flat output-pixel indices m = (n * H + y) * W + x."""
    return m // (W * H), (m // W) % H, m % W


@triton.jit
def piece_row(table_ptr, p, like_ptr, VEC: tl.constexpr):
    """Row `p` of the table: (pointer typed as `like_ptr`, strides n/c/h/w (int64), height, width,
    channels, mode, channel offset (int32), align-corners scales h/w (fp32)).

    VEC > 1: the launcher checked that the pointer is 16-byte aligned and the channel count a
    multiple of VEC (the hints sit here, on the defining ops: on a helper's result they are lost
    when the call is inlined)."""
    row = table_ptr + p * ROW
    ptr = tl.load(row).to(tl.pointer_type(like_ptr.dtype.element_ty))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    s_n = tl.load(row + 1)
    s_c = tl.load(row + 2)
    s_h = tl.load(row + 3)
    s_w = tl.load(row + 4)
    height = tl.load(row + 5).to(tl.int32)
    width = tl.load(row + 6).to(tl.int32)
    channels = tl.load(row + 7).to(tl.int32)
    if VEC > 1:
        channels = tl.multiple_of(channels, VEC)
    mode = tl.load(row + 8).to(tl.int32)
    offset = tl.load(row + 9).to(tl.int32)
    scale_h = tl.load(row + 10).to(tl.int32).to(tl.float32, bitcast=True)
    scale_w = tl.load(row + 11).to(tl.int32).to(tl.float32, bitcast=True)
    return ptr, s_n, s_c, s_h, s_w, height, width, channels, mode, offset, scale_h, scale_w


@triton.jit
def bilinear_source(dst, size_in, scale, mode):
    """Bilinear taps of high-resolution coordinates `dst`: (i0, i1, lambda0, lambda1), as PyTorch."""
    d = dst.to(tl.float32)
    src = tl.where(mode == MODE_UP_BILINEAR, tl.maximum((d + 0.5) * 0.5 - 0.5, 0.0), d * scale)
    i0 = src.to(tl.int32)  # src >= 0 wherever the result is used: truncation is floor
    i1 = i0 + (i0 < size_in - 1).to(tl.int32)
    lambda1 = src - i0.to(tl.float32)
    lambda0 = 1.0 - lambda1
    return i0, i1, lambda0, lambda1


@triton.jit
def _axis_source(dst, size_in, scale, mode):
    """Along one axis: the two source indices a virtual coordinate reads and their weights."""
    b0, b1, l0, l1 = bilinear_source(dst, size_in, scale, mode)
    bilinear = (mode == MODE_UP_BILINEAR) | (mode == MODE_UP_BILINEAR_AC)
    single = tl.where(mode == MODE_UP_NEAREST, dst // 2, dst)
    i0 = tl.where(bilinear, b0, tl.where(mode == MODE_MAXPOOL2, 2 * dst, single))
    i1 = tl.where(bilinear, b1, tl.where(mode == MODE_MAXPOOL2, 2 * dst + 1, i0))
    return i0, i1, l0, l1


@triton.jit
def source_geometry(n, y, x, s_n, s_h, s_w, height, width, scale_h, scale_w, mode, VEC: tl.constexpr):
    """Element offsets of the (up to) four source pixels of virtual positions (n, y, x), and their
    bilinear weights (fp32). Depends on the tap, not on the channel: hoisted out of K loops.
    int32: the launchers refuse pieces whose extent reaches 2**31 elements (registers: four int64
    offset vectors per row spill on sm_80/sm_90)."""
    y0, y1, ly0, ly1 = _axis_source(y, height, scale_h, mode)
    x0, x1, lx0, lx1 = _axis_source(x, width, scale_w, mode)
    base = n * s_n.to(tl.int32)
    r0 = base + y0 * s_h.to(tl.int32)
    r1 = base + y1 * s_h.to(tl.int32)
    c0 = x0 * s_w.to(tl.int32)
    c1 = x1 * s_w.to(tl.int32)
    o00 = r0 + c0
    o01 = r0 + c1
    o10 = r1 + c0
    o11 = r1 + c1
    if VEC > 1:  # the launcher checked: every stride is a multiple of VEC
        o00 = tl.multiple_of(o00, VEC)
        o01 = tl.multiple_of(o01, VEC)
        o10 = tl.multiple_of(o10, VEC)
        o11 = tl.multiple_of(o11, VEC)
    return o00, o01, o10, o11, ly0 * lx0, ly0 * lx1, ly1 * lx0, ly1 * lx1


@triton.jit
def gather_tile(ptr, o00, o01, o10, o11, w00, w01, w10, w11, c_off, mask, mode):
    """Tile [pixels, channels] of resample(piece) from the offsets of `source_geometry`.

    Masked rows (padding, past the end) read 0. Bilinear blends in fp32 and rounds to the piece's
    dtype, as a materialised `interpolate` would; max-pooling propagates NaN like max_pool2d.
    """
    if mode == MODE_MAXPOOL2:
        v00 = tl.load(ptr + o00[:, None] + c_off, mask=mask, other=0.0)
        v01 = tl.load(ptr + o01[:, None] + c_off, mask=mask, other=0.0)
        v10 = tl.load(ptr + o10[:, None] + c_off, mask=mask, other=0.0)
        v11 = tl.load(ptr + o11[:, None] + c_off, mask=mask, other=0.0)
        top = tl.maximum(v00, v01, propagate_nan=tl.PropagateNan.ALL)
        bottom = tl.maximum(v10, v11, propagate_nan=tl.PropagateNan.ALL)
        # Rounded back explicitly: maximum promotes bf16 operands.
        tile = tl.maximum(top, bottom, propagate_nan=tl.PropagateNan.ALL).to(ptr.dtype.element_ty)
    elif (mode == MODE_UP_BILINEAR) | (mode == MODE_UP_BILINEAR_AC):
        # Blend as each corner arrives: fewer live tiles (registers) than four loads then a blend.
        blend = w00[:, None] * tl.load(ptr + o00[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w01[:, None] * tl.load(ptr + o01[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w10[:, None] * tl.load(ptr + o10[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        blend += w11[:, None] * tl.load(ptr + o11[:, None] + c_off, mask=mask, other=0.0).to(tl.float32)
        tile = blend.to(ptr.dtype.element_ty)
    else:
        tile = tl.load(ptr + o00[:, None] + c_off, mask=mask, other=0.0)
    return tile


@triton.jit
def channel_offsets(c, s_c, C_CONTIG: tl.constexpr):
    """[1, channels] element offsets; C_CONTIG (the GPU path: channels_last) makes the stride 1."""
    if C_CONTIG:
        off = c[None, :]
    else:
        off = (c * s_c.to(tl.int32))[None, :]
    return off


@triton.jit
def upsample_weight(dst, src_index, size_in, scale, mode):
    """Weight with which high-resolution coordinate `dst` reads low-resolution `src_index` (broadcasts)."""
    i0, i1, lambda0, lambda1 = bilinear_source(dst, size_in, scale, mode)
    bilinear = tl.where(i0 == src_index, lambda0, 0.0) + tl.where(i1 == src_index, lambda1, 0.0)
    nearest = ((dst // 2) == src_index).to(tl.float32)
    return tl.where(mode == MODE_UP_NEAREST, nearest, bilinear)
