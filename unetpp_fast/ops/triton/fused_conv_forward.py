"""Forward kernel: implicit-GEMM convolution of the virtual (concatenated, resampled) input.

    out[m, co] = act(bias[co] + sum_{piece, tap, c} V_p[pixel(m) + tap - pad, c] * W[co, off_p + c, tap])

M runs over output pixels (n, y, x), N over output channels, K over (piece, tap, channel block):
one run-time loop over the piece descriptor table (virtual_input.piece_row), so any number of
pieces and any resample modes share one compiled kernel per (k, dtype, activation, bias). The
per-(piece, tap) source offsets and interpolation weights are computed once, outside the channel
loop. Pieces and weight are read through their strides; on the GPU path the kernel reads them
channels_last (channel vectors of 16 bytes), so a piece or weight stored otherwise is copied into
that layout first (a model in `torch.channels_last` needs no copy).

The launcher (fused_conv_forward) runs two other kernels where they apply, decided once per launch
plan: the packed forward (fused_conv_forward_packed.py: one plain piece with few channels, the RGB
input) and, on the GPU path, the staged forward (fused_conv_forward_staged.py: 2D 3x3 and 1x1 calls
read in 16-byte vectors, each channel block staged once per pixel block on its halo).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs, launch_common
from unetpp_fast.ops.triton.epilogue import ACTIVATION_CODES, bias_and_activation, strided_output_offsets
from unetpp_fast.ops.triton.fused_conv_forward_packed import fused_conv_forward_packed, packed_forward_applies
from unetpp_fast.ops.triton.fused_conv_forward_staged import (
    BLOCK_K as STAGED_BLOCK_K,
)
from unetpp_fast.ops.triton.fused_conv_forward_staged import (
    fused_conv_forward_staged_kernel,
    max_programs,
    scratch_elements,
    staged_config_name,
    staged_forward_applies,
    staged_grid,
)
from unetpp_fast.ops.triton.launch_common import cdiv
from unetpp_fast.ops.triton.virtual_input import (
    MODE_UP_NEAREST,
    channel_offsets,
    class_channels,
    direct_offsets,
    interleave_pairs,
    nan_max,
    piece_row,
    pixel_coords,
    pool_offsets,
    source_geometry,
    tap_shifts,
    widened_pairs,
    window_steps,
)

# Sizes and strides unspecialised: one compile serves every node. so_c stays specialised (1 on the GPU
# path, channels_last, so the store vectorises).
_INTS = ["NUM_PIECES", "M", "D", "H", "W", "C_OUT", "sw_co", "sw_c", "sw_kd", "sw_kh", "sw_kw",
         "so_n", "so_d", "so_h", "so_w"]  # fmt: skip


@triton.jit
def _weight_tap(w_piece, tap, sw_kd, sw_kh, sw_kw, KSIZE: tl.constexpr, DIMS: tl.constexpr):
    """Scalar pointer to a tap's weights of the piece's first channel."""
    kz, kh, kw = tap_shifts(tap, KSIZE, DIMS)
    if DIMS == 3:
        return w_piece + (kz * sw_kd + kh * sw_kh + kw * sw_kw)
    return w_piece + (kh * sw_kh + kw * sw_kw)


@triton.jit
def _weight_block(w_piece, tap, k0, sw_kd, sw_kh, sw_kw, sw_c, KSIZE: tl.constexpr, DIMS: tl.constexpr,
                  VEC: tl.constexpr, C_CONTIG: tl.constexpr):  # fmt: skip
    """Scalar pointer to the weights of (tap, channel k0) of a piece."""
    w_tap = _weight_tap(w_piece, tap, sw_kd, sw_kh, sw_kw, KSIZE, DIMS) + _channel_step(k0, sw_c, C_CONTIG)
    if VEC > 1:  # the launcher checked: weight 16-byte aligned, every stride but C_in's in vectors
        w_tap = tl.multiple_of(w_tap, 16)
    return w_tap


@triton.jit
def _next_block(k0, tap, pc, BLOCK_K: tl.constexpr):
    """(channel block, tap) of the next trip: channel blocks inner, taps outer; no division."""
    k0 += BLOCK_K
    wrap = k0 >= pc
    return tl.where(wrap, 0, k0), tap + wrap.to(tl.int32)


@triton.jit
def _nearest_step(v, shift, half):
    """Source-index step along one axis from virtual coordinate v to v + shift (shift in -1..1,
    scalar): `shift` itself, or for `up_nearest` (`half`) (v + shift) // 2 - v // 2, which is
    -1 / 0 / +1 by the parity of v. One multiply-add per row: the parity's factor is a scalar."""
    factor = tl.where(half & (shift != 0), 1, 0)
    step = tl.where(half, -(shift < 0).to(tl.int32), shift)
    return (v & 1) * factor + step


@triton.jit
def _direct_loop(acc, x_ptr, n, oz, oy, ox, valid, s_n, s_d, s_h, s_w, s_c, mode, w_piece,
                 sw_kd, sw_kh, sw_kw, sw_c, w_tile, co_ok, pc, k_lane, KSIZE: tl.constexpr,
                 DIMS: tl.constexpr, VEC: tl.constexpr, C_CONTIG: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """Every (tap, channel block) of a piece read one source pixel per position (`none`,
    `up_nearest`) in ONE loop: the tap is decoded per trip from two carried counters, so Triton
    pipelines the loads (cp.async) across taps, and no per-tap prologue / drain is paid. Per trip
    and row: the tap's bit of `valid` (zero padding) and a step per axis from the centre pixel."""
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)
    trips = KD * KSIZE * KSIZE * tl.cdiv(pc, BLOCK_K)
    c_off = channel_offsets(k_lane, s_c, C_CONTIG)
    PAD: tl.constexpr = KSIZE // 2
    half = mode == MODE_UP_NEAREST
    centre = direct_offsets(n, oz, oy, ox, s_n, s_d, s_h, s_w, mode, VEC, DIMS)
    k0 = pc * 0
    tap = pc * 0
    for _ in range(0, trips):
        k0 = tl.multiple_of(k0, BLOCK_K)
        kz, ky, kx = tap_shifts(tap, KSIZE, DIMS)
        offset = centre + _nearest_step(oy, ky - PAD, half) * s_h.to(tl.int32)
        offset += _nearest_step(ox, kx - PAD, half) * s_w.to(tl.int32)
        if DIMS == 3:
            offset += _nearest_step(oz, kz - PAD, half) * s_d.to(tl.int32)
        if VEC > 1:  # the launcher checked: every stride is a multiple of VEC
            offset = tl.multiple_of(offset, VEC)
        row_ok = ((valid >> tap) & 1) != 0
        c_ok = (k0 + k_lane) < pc
        a_ptrs = x_ptr + offset[:, None] + (c_off + _channel_step(k0, s_c, C_CONTIG))
        w_tap = _weight_block(w_piece, tap, k0, sw_kd, sw_kh, sw_kw, sw_c, KSIZE, DIMS, VEC, C_CONTIG)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_tap + w_tile, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        k0, tap = _next_block(k0, tap, pc, BLOCK_K)
    return acc


@triton.jit
def _axis_validity(v, size, KSIZE: tl.constexpr):
    """Bit j set where v + j - KSIZE // 2 lies in [0, size): 3 bits for k = 3, 1 bit for k = 1."""
    if KSIZE == 3:
        return (v > 0).to(tl.int32) | 2 | ((v + 1 < size).to(tl.int32) << 2)
    return tl.full(v.shape, 1, tl.int32)


@triton.jit
def _spread(bits, KSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Each of the KSIZE bits of `bits` widened to a run of BLOCK ones at position j * BLOCK."""
    ones: tl.constexpr = (1 << BLOCK) - 1
    out = (bits & 1) * ones
    if KSIZE == 3:
        out |= ((bits >> 1) & 1) * (ones << BLOCK)
        out |= ((bits >> 2) & 1) * (ones << (2 * BLOCK))
    return out


@triton.jit
def _tap_validity(oz, oy, ox, m_ok, D, H, W, KSIZE: tl.constexpr, DIMS: tl.constexpr):
    """Per output pixel, bit `tap` set where that tap reads inside the virtual image (the others
    read zero padding): computed once per CTA, the same for every piece (27 taps fit an int32).
    From three bits per axis: x's bits repeated per row of taps (one multiply), AND-ed with y's
    (and z's) bits spread over their rows (planes) of taps."""
    x_bits = _axis_validity(ox, W, KSIZE)
    y_bits = _axis_validity(oy, H, KSIZE)
    if KSIZE == 3:
        bits = (x_bits * 0b001001001) & _spread(y_bits, KSIZE, 3)
    else:
        bits = x_bits & y_bits
    if DIMS == 3:
        z_bits = _axis_validity(oz, D, KSIZE)
        if KSIZE == 3:
            bits = (bits * ((1 << 18) | (1 << 9) | 1)) & _spread(z_bits, KSIZE, 9)
        else:
            bits = bits & z_bits
    return tl.where(m_ok, bits, 0)


@triton.jit
def _channel_step(k0, stride, C_CONTIG: tl.constexpr):
    """Elements from a piece's (or the weight's) first channel to channel k0."""
    step = k0
    if not C_CONTIG:
        step = k0.to(tl.int64) * stride
    return step


@triton.jit
def _pool_loop(acc, x_ptr, n, oz, oy, ox, valid, s_n, s_d, s_h, s_w, s_c, w_piece,
               sw_kd, sw_kh, sw_kw, sw_c, w_tile, co_ok, pc, k_lane, KSIZE: tl.constexpr,
               DIMS: tl.constexpr, VEC: tl.constexpr, C_CONTIG: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
    """Every (tap, channel block) of a `maxpool2` piece in one loop, as `_direct_loop`: the 2x2
    (2x2x2) window at scalar distances d_w, d_h (d_d) from its first pixel; NaN propagates as in
    max_pool2d."""
    PAD: tl.constexpr = KSIZE // 2
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)
    trips = KD * KSIZE * KSIZE * tl.cdiv(pc, BLOCK_K)
    c_off = channel_offsets(k_lane, s_c, C_CONTIG)
    d_w, d_h, d_d = window_steps(s_w, s_h, s_d, VEC)
    centre = pool_offsets(n, oz, oy, ox, s_n, s_d, s_h, s_w, VEC, DIMS)
    k0 = pc * 0
    tap = pc * 0
    for _ in range(0, trips):
        k0 = tl.multiple_of(k0, BLOCK_K)
        kz, ky, kx = tap_shifts(tap, KSIZE, DIMS)
        # A tap moves the window by 2 source pixels per virtual one: a scalar shift of the centre.
        shift = 2 * ((ky - PAD) * d_h + (kx - PAD) * d_w)
        if DIMS == 3:
            shift += 2 * (kz - PAD) * d_d
        offset = centre + shift
        if VEC > 1:
            offset = tl.multiple_of(offset, VEC)
        row_ok = ((valid >> tap) & 1) != 0
        c_ok = (k0 + k_lane) < pc
        a_ptrs = x_ptr + offset[:, None] + (c_off + _channel_step(k0, s_c, C_CONTIG))
        mask = row_ok[:, None] & c_ok[None, :]
        top = nan_max(tl.load(a_ptrs, mask=mask, other=0.0), tl.load(a_ptrs + d_w, mask=mask, other=0.0))
        low = a_ptrs + d_h
        low = nan_max(tl.load(low, mask=mask, other=0.0), tl.load(low + d_w, mask=mask, other=0.0))
        best = nan_max(top, low)
        if DIMS == 3:
            back = a_ptrs + d_d
            top = nan_max(tl.load(back, mask=mask, other=0.0), tl.load(back + d_w, mask=mask, other=0.0))
            low = back + d_h
            best = nan_max(best, nan_max(top, nan_max(tl.load(low, mask=mask, other=0.0),
                                             tl.load(low + d_w, mask=mask, other=0.0))))  # fmt: skip
        a = best.to(x_ptr.dtype.element_ty)  # maximum promotes bf16 operands: rounded back (exact)
        w_tap = _weight_block(w_piece, tap, k0, sw_kd, sw_kh, sw_kw, sw_c, KSIZE, DIMS, VEC, C_CONTIG)
        b = tl.load(w_tap + w_tile, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        k0, tap = _next_block(k0, tap, pc, BLOCK_K)
    return acc


@triton.jit
def _blend_loop(acc, p000, p001, p010, p011, p100, p101, p110, p111,
                w000, w001, w010, w011, w100, w101, w110, w111, a_step, w_ptrs, w_step,
                row_ok, co_ok, pc, k_lane, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                DIMS: tl.constexpr):  # fmt: skip
    """The channel loop of an `up_bilinear(_ac)` piece from its corners' pointers: (bi/tri)linear
    blend in fp32 as each corner arrives, rounded to the piece's dtype as a materialised
    `interpolate` would be."""
    for k0 in range(0, pc, BLOCK_K):
        c_ok = (k0 + k_lane) < pc
        mask = row_ok[:, None] & c_ok[None, :]
        blend = w000[:, None] * tl.load(p000, mask=mask, other=0.0).to(tl.float32)
        blend += w001[:, None] * tl.load(p001, mask=mask, other=0.0).to(tl.float32)
        blend += w010[:, None] * tl.load(p010, mask=mask, other=0.0).to(tl.float32)
        blend += w011[:, None] * tl.load(p011, mask=mask, other=0.0).to(tl.float32)
        if DIMS == 3:
            blend += w100[:, None] * tl.load(p100, mask=mask, other=0.0).to(tl.float32)
            blend += w101[:, None] * tl.load(p101, mask=mask, other=0.0).to(tl.float32)
            blend += w110[:, None] * tl.load(p110, mask=mask, other=0.0).to(tl.float32)
            blend += w111[:, None] * tl.load(p111, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptrs, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(blend.to(p000.dtype.element_ty), b, acc, input_precision=PRECISION)
        p000 += a_step
        p001 += a_step
        p010 += a_step
        p011 += a_step
        if DIMS == 3:
            p100 += a_step
            p101 += a_step
            p110 += a_step
            p111 += a_step
        w_ptrs += w_step
    return acc


@triton.jit
def _blend_pairs_loop(acc, x_ptr, o000, o001, o010, o011, o100, o101, o110, o111,
                      w000, w001, w010, w011, w100, w101, w110, w111, w_ptrs, w_step,
                      row_ok, co_ok, pc, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                      DIMS: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """`_blend_loop` for bf16 pieces read in 16-byte vectors (VEC > 1, channels contiguous): each
    32-bit word holds two channels, widened to fp32 by one shift or one mask (a bf16 is the top
    half of its fp32), half the unpacking instructions of element-wise loads."""
    words = tl.multiple_of(x_ptr.to(tl.pointer_type(tl.int32)), 16)
    half = tl.arange(0, BLOCK_K // 2)
    p000 = words + tl.multiple_of(o000 // 2, VEC // 2)[:, None] + half[None, :]
    p001 = words + tl.multiple_of(o001 // 2, VEC // 2)[:, None] + half[None, :]
    p010 = words + tl.multiple_of(o010 // 2, VEC // 2)[:, None] + half[None, :]
    p011 = words + tl.multiple_of(o011 // 2, VEC // 2)[:, None] + half[None, :]
    p100 = words + tl.multiple_of(o100 // 2, VEC // 2)[:, None] + half[None, :]
    p101 = words + tl.multiple_of(o101 // 2, VEC // 2)[:, None] + half[None, :]
    p110 = words + tl.multiple_of(o110 // 2, VEC // 2)[:, None] + half[None, :]
    p111 = words + tl.multiple_of(o111 // 2, VEC // 2)[:, None] + half[None, :]
    k_lane = tl.arange(0, BLOCK_K)
    pc_words = tl.multiple_of(pc // 2, VEC // 2)  # pc is a multiple of VEC
    for k0 in range(0, pc, BLOCK_K):
        mask = row_ok[:, None] & ((k0 // 2 + half) < pc_words)[None, :]
        lo, hi = widened_pairs(p000, w000, mask)
        lo_c, hi_c = widened_pairs(p001, w001, mask)
        lo += lo_c
        hi += hi_c
        lo_c, hi_c = widened_pairs(p010, w010, mask)
        lo += lo_c
        hi += hi_c
        lo_c, hi_c = widened_pairs(p011, w011, mask)
        lo += lo_c
        hi += hi_c
        if DIMS == 3:
            lo_c, hi_c = widened_pairs(p100, w100, mask)
            lo += lo_c
            hi += hi_c
            lo_c, hi_c = widened_pairs(p101, w101, mask)
            lo += lo_c
            hi += hi_c
            lo_c, hi_c = widened_pairs(p110, w110, mask)
            lo += lo_c
            hi += hi_c
            lo_c, hi_c = widened_pairs(p111, w111, mask)
            lo += lo_c
            hi += hi_c
        a = interleave_pairs(lo, hi)
        c_ok = (k0 + k_lane) < pc
        b = tl.load(w_ptrs, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        step = BLOCK_K // 2
        p000 += step
        p001 += step
        p010 += step
        p011 += step
        if DIMS == 3:
            p100 += step
            p101 += step
            p110 += step
            p111 += step
        w_ptrs += w_step
    return acc


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=["w_ptr", "b_ptr"])
def fused_conv_forward_kernel(
    out_ptr,
    w_ptr,  # [C_out, C_in, (k,) k, k], any strides (C_CONTIG: C_in stride 1)
    b_ptr,
    table_ptr,  # int64 [NUM_PIECES, ROW]
    NUM_PIECES,
    M,
    D,  # 1 in 2D
    H,
    W,
    C_OUT,
    sw_co,
    sw_c,
    sw_kd,  # 0 in 2D
    sw_kh,
    sw_kw,
    so_n,
    so_c,
    so_d,  # 0 in 2D
    so_h,
    so_w,
    slope,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,  # 2 or 3: 2D compiles without any depth term
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    C_CONTIG: tl.constexpr,  # channel stride 1 in every piece and in the weight
    OUT_DENSE: tl.constexpr,  # the output is a dense channels_last tensor (always on the GPU path)
    VEC: tl.constexpr,  # > 1: pieces and weight 16-byte aligned in VEC-element channel vectors
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    co_ok = offs_co < C_OUT
    n, oz, oy, ox = pixel_coords(offs_m, D, H, W, DIMS)
    PAD: tl.constexpr = KSIZE // 2
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)  # depth taps: 1 in 2D
    k_lane = tl.arange(0, BLOCK_K)
    w_co = offs_co.to(tl.int64) * sw_co
    if VEC > 1:  # the launcher checked: weight 16-byte aligned, every weight stride but C_in's in vectors
        w_co = tl.multiple_of(w_co, VEC)
    w_co = w_co[None, :]
    if C_CONTIG:
        w_k = k_lane[:, None]
        w_step = BLOCK_K
    else:
        w_k = k_lane.to(tl.int64)[:, None] * sw_c
        w_step = BLOCK_K * sw_c.to(tl.int64)
    w_tile = w_co + w_k  # a K block of the weight from its first (tap, channel)

    valid = _tap_validity(oz, oy, ox, m_ok, D, H, W, KSIZE, DIMS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(NUM_PIECES):
        x_ptr, s_n, s_c, s_d, s_h, s_w, pd, ph, pw, pc, mode, c_first, scale_d, scale_h, scale_w = piece_row(
            table_ptr, p, w_ptr, VEC, DIMS
        )
        n_direct, n_pool, n_blend = class_channels(table_ptr, p, VEC)
        w_piece = w_ptr + c_first * sw_c
        # One loop per class of read, each only as long as its own read; the class comes from the
        # table at run time (uniform over the CTA), the other two loops run no trip.
        if n_direct > 0:
            acc = _direct_loop(acc, x_ptr, n, oz, oy, ox, valid, s_n, s_d, s_h, s_w, s_c, mode,
                               w_piece, sw_kd, sw_kh, sw_kw, sw_c, w_tile, co_ok, n_direct, k_lane,
                               KSIZE, DIMS, VEC, C_CONTIG, BLOCK_K, PRECISION)  # fmt: skip
        if n_pool > 0:
            acc = _pool_loop(acc, x_ptr, n, oz, oy, ox, valid, s_n, s_d, s_h, s_w, s_c,
                             w_piece, sw_kd, sw_kh, sw_kw, sw_c, w_tile, co_ok, n_pool, k_lane,
                             KSIZE, DIMS, VEC, C_CONTIG, BLOCK_K, PRECISION)  # fmt: skip
        # The blend recomputes its corners' offsets and weights per tap: outside its channel loop.
        c_off = channel_offsets(k_lane, s_c, C_CONTIG)
        a_step = BLOCK_K * s_c  # int64: a channel block further (BLOCK_K when C_CONTIG)
        if C_CONTIG:
            a_step = BLOCK_K
        for tap in range(tl.where(n_blend > 0, KD * KSIZE * KSIZE, 0)):
            kz, ky, kx = tap_shifts(tap, KSIZE, DIMS)
            y = oy + (ky - PAD)
            x = ox + (kx - PAD)
            z = oz
            if DIMS == 3:
                z = oz + (kz - PAD)
            row_ok = ((valid >> tap) & 1) != 0
            w_tap = _weight_tap(w_piece, tap, sw_kd, sw_kh, sw_kw, KSIZE, DIMS)
            if VEC > 1:
                w_tap = tl.multiple_of(w_tap, 16)
            w_ptrs = w_tap + w_tile
            (o000, o001, o010, o011, o100, o101, o110, o111,
             w000, w001, w010, w011, w100, w101, w110, w111) = source_geometry(
                n, z, y, x, s_n, s_d, s_h, s_w, pd, ph, pw, scale_d, scale_h, scale_w, mode, VEC, DIMS,
                True,
            )  # fmt: skip
            if (VEC > 1) & C_CONTIG & (x_ptr.dtype.element_ty == tl.bfloat16):
                acc = _blend_pairs_loop(acc, x_ptr, o000, o001, o010, o011, o100, o101, o110, o111,
                                        w000, w001, w010, w011, w100, w101, w110, w111, w_ptrs, w_step,
                                        row_ok, co_ok, n_blend, BLOCK_K, PRECISION, DIMS,
                                        VEC)  # fmt: skip
            else:
                acc = _blend_loop(acc, x_ptr + o000[:, None] + c_off, x_ptr + o001[:, None] + c_off,
                                  x_ptr + o010[:, None] + c_off, x_ptr + o011[:, None] + c_off,
                                  x_ptr + o100[:, None] + c_off, x_ptr + o101[:, None] + c_off,
                                  x_ptr + o110[:, None] + c_off, x_ptr + o111[:, None] + c_off,
                                  w000, w001, w010, w011, w100, w101, w110, w111, a_step,
                                  w_ptrs, w_step, row_ok, co_ok, n_blend, k_lane, BLOCK_K, PRECISION,
                                  DIMS)  # fmt: skip

    acc = bias_and_activation(acc, b_ptr, offs_co, co_ok, slope, HAS_BIAS, ACT)
    if OUT_DENSE:  # (pixel m, channel co) at m * C_OUT + co: no pixel coordinates in the store's layout
        out_off = (offs_m.to(tl.int64) * C_OUT)[:, None] + offs_co[None, :]
    else:
        out_off = strided_output_offsets(n, oz, oy, ox, offs_co, so_n, so_c, so_d, so_h, so_w, DIMS)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


class _Plan:
    """Everything a forward call's metadata (shapes, strides, dtypes, device, modes, activation)
    decides, prepared once: the steady-state call only allocates the output, finds the table of
    its pieces' addresses and launches. Never data pointers: those are re-read at every call."""

    __slots__ = ("out_shape", "alloc_format", "out_format", "relayout", "bias_relayout", "trivial", "kind",
                 "slope", "pixels", "rows", "kernel_name", "vec", "tables", "scalars", "constexprs",
                 "weight_relayout", "shape_class", "grid", "launches", "device", "out_strides",
                 "packed", "staged")  # fmt: skip


_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride
_DATA_PTR = torch.Tensor.data_ptr
_reduce, _OR = functools.reduce, operator.or_


def _plan_key(pieces, codes, weight, bias, activation) -> tuple:
    # map() over C-level getters: the key is built on every call. fp32 dots follow the TF32
    # switch (dot_precision): part of the key.
    return (
        *codes,
        activation,
        weight.shape,
        weight.stride(),
        weight.dtype,
        weight.get_device(),  # -1 for CPU tensors; cheaper than .device
        None if bias is None else bias.stride(),
        weight.dtype is torch.float32 and torch._C._get_cublas_allow_tf32(),
        *map(_SHAPE, pieces),
        *map(_STRIDE, pieces),
    )


def _make_plan(pieces, codes, weight, bias, activation) -> _Plan:
    plan = _Plan()
    plan.staged = None  # (config name, grid, scratch, constexprs) where the staged forward takes the call
    # Few input channels (the RGB input): every (tap, channel) pair in one K block of its own kernel.
    plan.packed = packed_forward_applies(pieces, codes, weight)
    if plan.packed:
        return plan
    plan.kind, plan.slope = _activation(activation)
    first = pieces[0]
    dims = launch_common.dims_of(first)
    spatial = conv_spec.resampled_shape(tuple(first.shape[2:]), codes[0])
    c_out, c_in = weight.shape[:2]
    k = weight.shape[2]
    out_format = conv_spec.output_memory_format(first)
    gpu = launch_common.on_gpu_layout()
    plan.alloc_format = conv_spec.channels_last_format(first.dim()) if gpu else out_format
    # None: the kernel's output is already in the output's format (no copy at the end).
    plan.out_format = None if plan.alloc_format == out_format else out_format
    plan.relayout = gpu and any(launch_common.kernel_layout(p) is not p for p in pieces)
    if plan.relayout:
        pieces = [launch_common.kernel_layout(p) for p in pieces]
    # The GPU path reads the weight with C_in contiguous (channels_last): weight vectors along K.
    plan.weight_relayout = gpu and launch_common.kernel_layout(weight) is not weight
    if plan.weight_relayout:
        weight = launch_common.kernel_layout(weight)
    plan.bias_relayout = bias is not None and bias.stride(0) != 1  # the kernel reads bias[co] densely
    plan.out_shape = (first.shape[0], c_out, *spatial)
    depth, height, width = launch_common.spatial3(plan.out_shape)
    plan.pixels = first.shape[0] * depth * height * width
    launch_common.check_pixel_count(plan.pixels, "the output")
    plan.trivial = plan.pixels * c_out == 0 or c_in == 0
    # Pieces without channels stay in the table: their channel loop runs zero times.
    plan.rows = launch_common.piece_rows(pieces, codes)
    plan.tables = launch_common.TableCache(size=64)
    c_contig = gpu or (weight.stride(1) == 1 and all(p.stride(1) == 1 for p in pieces))
    plan.vec = launch_common.vector_width_if_aligned(pieces, weight) if c_contig else 1
    plan.constexprs = dict(
        KSIZE=k,
        DIMS=dims,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATION_CODES[plan.kind],
        PRECISION=launch_common.dot_precision(weight.dtype),
        C_CONTIG=c_contig,
        # empty_output allocates the alloc format densely: channels_last strides are then (pixel, C_out).
        OUT_DENSE=plan.alloc_format == conv_spec.channels_last_format(first.dim()),
    )
    plan.shape_class = configs.shape_class(c_in, c_out)
    # Per VEC (decided per call, by the addresses): VEC = 1 tunes over its own, narrower configs.
    plan.kernel_name = {
        v: configs.config_name("forward" if v > 1 else "forward_scalar", dims) for v in {1, plan.vec}
    }
    plan.device = weight.device
    pixels = plan.pixels

    def grid(meta):
        return (cdiv(pixels, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"]))

    plan.grid = grid
    plan.scalars = plan.out_strides = None  # the output's strides: read from the first output allocated
    plan.launches = {}
    dense = plan.alloc_format == conv_spec.channels_last_format(first.dim())
    if dense and staged_forward_applies(pieces, codes, weight, plan.vec):
        plan.staged = _staged_plan(first.shape[0], height, width, c_out, weight, plan, len(pieces))
    return plan


def _staged_plan(
    batch: int, height: int, width: int, c_out: int, weight: torch.Tensor, plan: _Plan, num_pieces: int
) -> tuple:
    """(config name, grid, scratch elements, constexprs, scalar arguments) of the staged forward for
    this kind of call (`weight` as the kernel reads it: its strides are part of the plan's key): the
    scratch serves every config it may tune over, on this device or under the interpreter."""
    programs = max_programs(weight.device)
    ksize = plan.constexprs["KSIZE"]
    name = staged_config_name(ksize)
    if launch_common.interpreting():
        candidates = [configs.interpreter_config(name)]
    else:
        arch = launch_common.device_arch(weight.device)
        candidates = configs.gpu_configs(name, plan.shape_class, arch=arch)
    constexprs = {key: plan.constexprs[key] for key in ("HAS_BIAS", "ACT", "PRECISION", "KSIZE")}
    constexprs.update(VEC=plan.vec, BLOCK_K=STAGED_BLOCK_K)
    grid = staged_grid(batch, height, width, c_out, programs)
    scalars = (num_pieces, batch, height, width, c_out, weight.stride(0), weight.stride(2), weight.stride(3),
               float(plan.slope))  # fmt: skip
    return name, grid, scratch_elements(candidates, c_out, programs, ksize), constexprs, scalars


def fused_conv_forward(
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """act(conv(cat(resample(pieces)), weight, bias, padding=k//2)) without materialising the
    input: conv2d for 4-D pieces, conv3d for 5-D ones.

    The operator layer has validated the call (conv_spec.check_inputs): nothing is re-checked here.
    """
    key = _plan_key(pieces, codes, weight, bias, activation)
    plans = launch_common.PLANS
    plan = plans.get(("forward", key))
    if plan is None:
        plan = _make_plan(pieces, codes, weight, bias, activation)
        if len(plans) >= launch_common.MAX_PLANS:
            plans.clear()
        plans["forward", key] = plan
    if plan.packed:
        return fused_conv_forward_packed(pieces, codes, weight, bias, activation, key=key)
    if plan.relayout:
        pieces = [launch_common.kernel_layout(p) for p in pieces]
    if plan.weight_relayout:
        weight = launch_common.kernel_layout(weight)
    out = launch_common.empty_output(plan.out_shape, weight, plan.alloc_format, strides=plan.out_strides)
    if plan.trivial:
        return _trivial(out, weight, bias, plan)
    if bias is None:
        bias = weight  # any valid pointer: HAS_BIAS is False
    elif plan.bias_relayout:
        bias = bias.contiguous()
    addresses = tuple(map(_DATA_PTR, pieces))
    table = plan.tables.get_keyed(addresses, lambda: _rows_at(plan.rows, addresses), plan.device)
    # 16-byte vectors need every piece and the weight 16-byte aligned: the address bits below 16, OR-ed.
    vec = plan.vec if not (_reduce(_OR, addresses) | weight.data_ptr()) & 15 else 1
    if plan.scalars is None:
        plan.out_strides = out.stride()
        c_out = plan.out_shape[1]
        plan.scalars = (len(pieces), plan.pixels, *launch_common.spatial3(plan.out_shape), c_out,
                        *launch_common.strides5(weight), *launch_common.strides5(out),
                        float(plan.slope))  # fmt: skip
    if plan.staged is not None and vec == plan.vec:
        _launch_staged(plan, out, weight, bias, table)
        return out if plan.out_format is None else out.contiguous(memory_format=plan.out_format)
    entry = plan.launches.get(vec)
    if entry is None:
        constexprs = dict(plan.constexprs, VEC=vec)
        args = (out, weight, bias, table, *plan.scalars)
        rt = launch_common.runtime()
        if isinstance(rt, launch_common.InterpreterRuntime):  # no compiled kernel to keep
            name = plan.kernel_name[vec]
            launch_common.launch(fused_conv_forward_kernel, name, plan.shape_class, plan.grid, plan.pixels,
                                 weight.dtype, weight.device, args, constexprs)  # fmt: skip
            return out if plan.out_format is None else out.contiguous(memory_format=plan.out_format)
        handle, grid, tail, settled = launch_common.prepare(
            fused_conv_forward_kernel, plan.kernel_name[vec], plan.shape_class, plan.grid, plan.pixels,
            weight.dtype, weight.device, args, constexprs,
        )  # fmt: skip
        entry = (rt, handle, grid, (*plan.scalars, *tail))
        if settled:  # a stand-in chosen inside a CUDA-graph capture is not kept
            plan.launches[vec] = entry
    rt, handle, grid, rest = entry
    rt.launch(handle, grid, (out, weight, bias, table, *rest))
    return out if plan.out_format is None else out.contiguous(memory_format=plan.out_format)


def _launch_staged(plan: _Plan, out, weight, bias, table) -> None:
    """The staged forward (fused_conv_forward_staged.py) into `out`, with a scratch of its own: a
    stream-ordered allocation per call, so calls on several streams never share a slot."""
    name, grid, elements, constexprs, scalars = plan.staged
    scratch = torch.empty(elements, dtype=weight.dtype, device=weight.device)
    args = (out, weight, bias, table, scratch, *scalars)
    entry = plan.launches.get("staged")
    if entry is None:
        rt = launch_common.runtime()
        if isinstance(rt, launch_common.InterpreterRuntime):  # no compiled kernel to keep
            launch_common.launch(fused_conv_forward_staged_kernel, name, plan.shape_class, grid, plan.pixels,
                                 weight.dtype, weight.device, args, constexprs)  # fmt: skip
            return
        handle, call_grid, tail, settled = launch_common.prepare(
            fused_conv_forward_staged_kernel, name, plan.shape_class, grid, plan.pixels,
            weight.dtype, weight.device, args, constexprs,
        )  # fmt: skip
        entry = (rt, handle, call_grid, tail)
        if settled:  # a stand-in chosen inside a CUDA-graph capture is not kept
            plan.launches["staged"] = entry
    rt, handle, call_grid, tail = entry
    rt.launch(handle, call_grid, (*args, *tail))


def _rows_at(rows: tuple[int, ...], addresses: tuple[int, ...]) -> list[int]:
    """The plan's table rows with the pieces' current addresses."""
    filled = list(rows)
    filled[:: launch_common.ROW] = addresses
    return filled


def _trivial(out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """No output elements, or no input channels (the output is the activated bias)."""
    if out.numel() == 0:
        return out
    c_out = plan.out_shape[1]
    value = bias if bias is not None else torch.zeros(c_out, dtype=out.dtype, device=out.device)
    out.copy_(value.view(1, c_out, *[1] * (out.dim() - 2)).expand_as(out))
    fmt = plan.alloc_format if plan.out_format is None else plan.out_format
    return _activate_inplace(out, plan.kind, plan.slope).contiguous(memory_format=fmt)


@functools.lru_cache(maxsize=64)
def _activation(activation: str) -> tuple[str, float]:
    return conv_spec.parse_activation(activation)


def _activate_inplace(out: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    if kind == "relu":
        out.clamp_(min=0)
    elif kind == "leaky_relu":
        torch.nn.functional.leaky_relu_(out, slope)
    return out
