"""Reading the virtual input: the piece descriptor table, and one piece resampled in the load.

Every kernel takes its pieces from a per-call int64 table (launch_common.piece_table: one row of
`launch_common.TABLE_FIELDS` per piece) and loops over it at run time, so the piece count and the
resample modes are not compile-time constants: one compiled kernel serves every node.

2D and 3D are one kernel family: the constexpr DIMS (2 or 3) decides whether the depth axis
exists. 2D is the D = 1 case (depth 1, depth stride 0 in the table) and compiles to the code of a
2D-only kernel: every depth term sits behind `if DIMS == 3` (four bilinear corners, a 2x2
window); 3D reads eight corners (trilinear) or a 2x2x2 window.

The resample geometry (which source pixels a virtual position reads, with which weights) is
shared by the forward, the weight gradient and the input-gradient kernels, so forward and
adjoint can never disagree. Source indices follow PyTorch exactly, per axis: nearest
`floor(dst / 2)`; (bi/tri)linear `max((dst + 0.5) / 2 - 0.5, 0)` (align_corners False) or
`dst * (in - 1) / (out - 1)` (align_corners True, the scale rounded to fp32 on the host);
maxpool2 the window at `2 * dst`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Resample codes (unetpp_fast.ops.conv_spec), as constants for the kernels; 3D shares them
# (UP_BILINEAR* mean trilinear, MAXPOOL2 a 2x2x2 window).
MODE_NONE = tl.constexpr(0)
MODE_UP_NEAREST = tl.constexpr(1)
MODE_UP_BILINEAR = tl.constexpr(2)
MODE_UP_BILINEAR_AC = tl.constexpr(3)
MODE_MAXPOOL2 = tl.constexpr(4)
ROW = tl.constexpr(18)  # int64 fields per table row (launch_common.TABLE_FIELDS)


@triton.jit
def pixel_coords(m, D, H, W, DIMS: tl.constexpr):
    """(n, z, y, x) of flat output-pixel indices m = ((n * D + z) * H + y) * W + x (z is 0 in 2D)."""
    x = m % W
    rows = m // W
    y = rows % H
    if DIMS == 3:
        planes = rows // H
        z = planes % D
        n = planes // D
    else:
        z = tl.zeros_like(m)
        n = rows // H
    return n, z, y, x


@triton.jit
def tap_shifts(tap, KSIZE: tl.constexpr, DIMS: tl.constexpr):
    """(kz, ky, kx) of a flat tap index (kz 0 in 2D): one scalar division per tap, outside K loops."""
    kx = tap % KSIZE
    if DIMS == 3:
        ky = (tap // KSIZE) % KSIZE
        kz = tap // (KSIZE * KSIZE)
    else:
        ky = tap // KSIZE
        kz = tap * 0  # unused in 2D: compiled away
    return kz, ky, kx


@triton.jit
def piece_row(table_ptr, p, like_ptr, VEC: tl.constexpr, DIMS: tl.constexpr):
    """Row `p` of the table: (pointer typed as `like_ptr`, strides n/c/d/h/w (int64), depth, height,
    width, channels, mode, channel offset (int32), align-corners scales d/h/w (fp32)). In 2D the
    depth fields are not read (stride 0, depth 1, scale 0).

    VEC > 1: the launcher checked that the pointer is 16-byte aligned and the channel count a
    multiple of VEC (the hints sit here, on the defining ops: on a helper's result they are lost
    when the call is inlined)."""
    row = table_ptr + p * ROW
    ptr = tl.load(row).to(tl.pointer_type(like_ptr.dtype.element_ty))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    s_n = tl.load(row + 1)
    s_c = tl.load(row + 2)
    s_h = tl.load(row + 4)
    s_w = tl.load(row + 5)
    height = tl.load(row + 7).to(tl.int32)
    width = tl.load(row + 8).to(tl.int32)
    channels = tl.load(row + 9).to(tl.int32)
    if VEC > 1:
        channels = tl.multiple_of(channels, VEC)
    mode = tl.load(row + 10).to(tl.int32)
    offset = tl.load(row + 11).to(tl.int32)
    scale_h = tl.load(row + 13).to(tl.int32).to(tl.float32, bitcast=True)
    scale_w = tl.load(row + 14).to(tl.int32).to(tl.float32, bitcast=True)
    if DIMS == 3:
        s_d = tl.load(row + 3)
        depth = tl.load(row + 6).to(tl.int32)
        scale_d = tl.load(row + 12).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        s_d = s_n * 0
        depth = height * 0 + 1
        scale_d = scale_h * 0.0
    return (ptr, s_n, s_c, s_d, s_h, s_w, depth, height, width, channels, mode, offset,
            scale_d, scale_h, scale_w)  # fmt: skip


@triton.jit
def class_channels(table_ptr, p, VEC: tl.constexpr):
    """Row `p`'s channel counts per read class (direct, pool, blend): the piece's channels under its
    class, 0 under the others. Separate fields, not a test of the mode: the compiler cannot tell
    that two of them are 0, so the forward's three channel loops stay one after another in the
    SASS, each reached from the one before (what sass.outside_path walks)."""
    row = table_ptr + p * ROW
    direct = tl.load(row + 15).to(tl.int32)
    pool = tl.load(row + 16).to(tl.int32)
    blend = tl.load(row + 17).to(tl.int32)
    if VEC > 1:
        direct = tl.multiple_of(direct, VEC)
        pool = tl.multiple_of(pool, VEC)
        blend = tl.multiple_of(blend, VEC)
    return direct, pool, blend


@triton.jit
def bilinear_source(dst, size_in, scale, mode):
    """Linear taps of high-resolution coordinates `dst` along one axis: (i0, i1, lambda0, lambda1),
    as PyTorch."""
    d = dst.to(tl.float32)
    src = tl.where(mode == MODE_UP_BILINEAR, tl.maximum((d + 0.5) * 0.5 - 0.5, 0.0), d * scale)
    i0 = src.to(tl.int32)  # src >= 0 wherever the result is used: truncation is floor
    i1 = i0 + (i0 < size_in - 1).to(tl.int32)
    lambda1 = src - i0.to(tl.float32)
    lambda0 = 1.0 - lambda1
    return i0, i1, lambda0, lambda1


@triton.jit
def _axis_source(dst, size_in, scale, mode, BILINEAR_ONLY: tl.constexpr):
    """Along one axis: the two source indices a virtual coordinate reads and their weights.
    BILINEAR_ONLY: the caller reads only up_bilinear(_ac) pieces (the forward's blend loop): the
    selects for the other modes are left out."""
    b0, b1, l0, l1 = bilinear_source(dst, size_in, scale, mode)
    if BILINEAR_ONLY:
        return b0, b1, l0, l1
    bilinear = (mode == MODE_UP_BILINEAR) | (mode == MODE_UP_BILINEAR_AC)
    single = tl.where(mode == MODE_UP_NEAREST, dst // 2, dst)
    i0 = tl.where(bilinear, b0, tl.where(mode == MODE_MAXPOOL2, 2 * dst, single))
    i1 = tl.where(bilinear, b1, tl.where(mode == MODE_MAXPOOL2, 2 * dst + 1, i0))
    return i0, i1, l0, l1


@triton.jit
def source_geometry(
    n, z, y, x, s_n, s_d, s_h, s_w, depth, height, width, scale_d, scale_h, scale_w, mode,
    VEC: tl.constexpr, DIMS: tl.constexpr, BILINEAR_ONLY: tl.constexpr,
):  # fmt: skip
    """Element offsets of the (up to) eight source pixels of virtual positions (n, z, y, x), and
    their interpolation weights (fp32): corner (dz, dy, dx) is o_{dz dy dx}. In 2D only the four
    dz = 0 corners are real (the dz = 1 ones repeat them and gather_tile never reads them).
    Depends on the tap, not on the channel: hoisted out of K loops.
    int32: the launchers refuse pieces whose extent reaches 2**31 elements (registers: four int64
    offset vectors per row spill on sm_80/sm_90)."""
    y0, y1, ly0, ly1 = _axis_source(y, height, scale_h, mode, BILINEAR_ONLY)
    x0, x1, lx0, lx1 = _axis_source(x, width, scale_w, mode, BILINEAR_ONLY)
    base = n * s_n.to(tl.int32)
    c0 = x0 * s_w.to(tl.int32)
    c1 = x1 * s_w.to(tl.int32)
    w00 = ly0 * lx0
    w01 = ly0 * lx1
    w10 = ly1 * lx0
    w11 = ly1 * lx1
    if DIMS == 3:
        z0, z1, lz0, lz1 = _axis_source(z, depth, scale_d, mode, BILINEAR_ONLY)
        p0 = base + z0 * s_d.to(tl.int32)
        p1 = base + z1 * s_d.to(tl.int32)
        r00 = p0 + y0 * s_h.to(tl.int32)
        r01 = p0 + y1 * s_h.to(tl.int32)
        r10 = p1 + y0 * s_h.to(tl.int32)
        r11 = p1 + y1 * s_h.to(tl.int32)
        o000 = r00 + c0
        o001 = r00 + c1
        o010 = r01 + c0
        o011 = r01 + c1
        o100 = r10 + c0
        o101 = r10 + c1
        o110 = r11 + c0
        o111 = r11 + c1
        w000 = lz0 * w00
        w001 = lz0 * w01
        w010 = lz0 * w10
        w011 = lz0 * w11
        w100 = lz1 * w00
        w101 = lz1 * w01
        w110 = lz1 * w10
        w111 = lz1 * w11
    else:
        r0 = base + y0 * s_h.to(tl.int32)
        r1 = base + y1 * s_h.to(tl.int32)
        o000 = r0 + c0
        o001 = r0 + c1
        o010 = r1 + c0
        o011 = r1 + c1
        o100, o101, o110, o111 = o000, o001, o010, o011
        w000, w001, w010, w011 = w00, w01, w10, w11
        w100, w101, w110, w111 = w00, w01, w10, w11
    if VEC > 1:  # the launcher checked: every stride is a multiple of VEC
        o000 = tl.multiple_of(o000, VEC)
        o001 = tl.multiple_of(o001, VEC)
        o010 = tl.multiple_of(o010, VEC)
        o011 = tl.multiple_of(o011, VEC)
        if DIMS == 3:
            o100 = tl.multiple_of(o100, VEC)
            o101 = tl.multiple_of(o101, VEC)
            o110 = tl.multiple_of(o110, VEC)
            o111 = tl.multiple_of(o111, VEC)
    return (o000, o001, o010, o011, o100, o101, o110, o111,
            w000, w001, w010, w011, w100, w101, w110, w111)  # fmt: skip


@triton.jit
def direct_offsets(n, z, y, x, s_n, s_d, s_h, s_w, mode, VEC: tl.constexpr, DIMS: tl.constexpr):
    """Element offsets of the one source pixel a `none` or `up_nearest` piece reads at virtual
    positions (n, z, y, x). Rows outside the image (padding) get offsets that must stay masked."""
    half = mode == MODE_UP_NEAREST
    ys = tl.where(half, y // 2, y)
    xs = tl.where(half, x // 2, x)
    offset = n * s_n.to(tl.int32) + ys * s_h.to(tl.int32) + xs * s_w.to(tl.int32)
    if DIMS == 3:
        offset += tl.where(half, z // 2, z) * s_d.to(tl.int32)
    if VEC > 1:  # the launcher checked: every stride is a multiple of VEC
        offset = tl.multiple_of(offset, VEC)
    return offset


@triton.jit
def pool_offsets(n, z, y, x, s_n, s_d, s_h, s_w, VEC: tl.constexpr, DIMS: tl.constexpr):
    """Element offsets of the first pixel (2z, 2y, 2x) of each virtual position's max-pool window;
    the others are at + s_w, + s_h, + s_d (scalars)."""
    offset = n * s_n.to(tl.int32) + (2 * y) * s_h.to(tl.int32) + (2 * x) * s_w.to(tl.int32)
    if DIMS == 3:
        offset += (2 * z) * s_d.to(tl.int32)
    if VEC > 1:
        offset = tl.multiple_of(offset, VEC)
    return offset


@triton.jit
def window_steps(s_w, s_h, s_d, VEC: tl.constexpr):
    """Element distances from a max-pool window's first pixel to the next along x, y (and z):
    int32, in whole VEC-element vectors when VEC > 1 (the launcher checked the strides)."""
    d_w = s_w.to(tl.int32)
    d_h = s_h.to(tl.int32)
    d_d = s_d.to(tl.int32)
    if VEC > 1:
        d_w = tl.multiple_of(d_w, VEC)
        d_h = tl.multiple_of(d_h, VEC)
        d_d = tl.multiple_of(d_d, VEC)
    return d_w, d_h, d_d


@triton.jit
def nan_max(a, b):
    """Maximum that propagates NaN, as max_pool2d / max_pool3d."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _corner(ptr, offset, c_off, mask):
    return tl.load(ptr + offset[:, None] + c_off, mask=mask, other=0.0)


@triton.jit
def _blend(ptr, offset, weight, c_off, mask):
    return weight[:, None] * _corner(ptr, offset, c_off, mask).to(tl.float32)


@triton.jit
def gather_tile(
    ptr, o000, o001, o010, o011, o100, o101, o110, o111,
    w000, w001, w010, w011, w100, w101, w110, w111, c_off, mask, mode, DIMS: tl.constexpr,
):  # fmt: skip
    """Tile [pixels, channels] of resample(piece) from the offsets of `source_geometry`.

    Masked rows (padding, past the end) read 0. (Bi/tri)linear blends in fp32 and rounds to the
    piece's dtype, as a materialised `interpolate` would; max-pooling propagates NaN like
    max_pool2d / max_pool3d.
    """
    if mode == MODE_MAXPOOL2:
        top = nan_max(_corner(ptr, o000, c_off, mask), _corner(ptr, o001, c_off, mask))
        bottom = nan_max(_corner(ptr, o010, c_off, mask), _corner(ptr, o011, c_off, mask))
        best = nan_max(top, bottom)
        if DIMS == 3:
            top = nan_max(_corner(ptr, o100, c_off, mask), _corner(ptr, o101, c_off, mask))
            bottom = nan_max(_corner(ptr, o110, c_off, mask), _corner(ptr, o111, c_off, mask))
            best = nan_max(best, nan_max(top, bottom))
        # Rounded back explicitly: maximum promotes bf16 operands.
        tile = best.to(ptr.dtype.element_ty)
    elif (mode == MODE_UP_BILINEAR) | (mode == MODE_UP_BILINEAR_AC):
        # Blend as each corner arrives: fewer live tiles (registers) than all loads then a blend.
        blend = _blend(ptr, o000, w000, c_off, mask)
        blend += _blend(ptr, o001, w001, c_off, mask)
        blend += _blend(ptr, o010, w010, c_off, mask)
        blend += _blend(ptr, o011, w011, c_off, mask)
        if DIMS == 3:
            blend += _blend(ptr, o100, w100, c_off, mask)
            blend += _blend(ptr, o101, w101, c_off, mask)
            blend += _blend(ptr, o110, w110, c_off, mask)
            blend += _blend(ptr, o111, w111, c_off, mask)
        tile = blend.to(ptr.dtype.element_ty)
    else:
        tile = _corner(ptr, o000, c_off, mask)
    return tile


@triton.jit
def widened_pairs(words, weight, mask):
    """weight * (low, high) halves of a tile of 32-bit words each holding two bf16 channels, in fp32:
    a bf16 is the top half of its fp32, so widening is one shift or one mask per channel."""
    u = tl.load(words, mask=mask, other=0)
    lo = (u << 16).to(tl.float32, bitcast=True)
    hi = (u & -65536).to(tl.float32, bitcast=True)
    return weight[:, None] * lo, weight[:, None] * hi


@triton.jit
def interleave_pairs(lo, hi):
    """fp32 [pixels, words] low / high halves -> the bf16 [pixels, 2 * words] tile (channel 2j is
    the low half of word j)."""
    return tl.join(lo.to(tl.bfloat16), hi.to(tl.bfloat16)).reshape(lo.shape[0], 2 * lo.shape[1])


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
    """Weight with which high-resolution coordinate `dst` reads low-resolution `src_index` along one
    axis (broadcasts); a trilinear weight is the product of three."""
    i0, i1, lambda0, lambda1 = bilinear_source(dst, size_in, scale, mode)
    bilinear = tl.where(i0 == src_index, lambda0, 0.0) + tl.where(i1 == src_index, lambda1, 0.0)
    nearest = ((dst // 2) == src_index).to(tl.float32)
    return tl.where(mode == MODE_UP_NEAREST, nearest, bilinear)
