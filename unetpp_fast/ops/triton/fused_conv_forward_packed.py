"""Forward kernel for convolutions with a small reduction: im2col packed into K.

    out[m, co] = act(bias[co] + sum_k X[pixel(m) + shift(k)] * W[co, k]),  k = (tap, c), K = taps x C_in

The main forward (fused_conv_forward.py) runs one K block per (piece, tap, channel block): for the
RGB input convolution (3 channels, 9 taps) that is 9 blocks each 3/16 full, plus the per-tap code
around them. Here one plain piece (mode `none`) with taps x C_in <= MAX_PACKED_K is read as one
K block (two at most) holding every (tap, channel) pair, with no per-tap code. The tile is built
column by column at compile time (k, hence its tap shift and channel, is a constexpr per column:
C_in is a constexpr and the K blocks are unrolled): a column's element offset is one scalar and its
border test one compare per shifted axis, shared by the columns of that shift; the columns are
joined pairwise into the tile (bit-reversed order, which the weight tile follows). A CTA owns a
BLOCK_H x BLOCK_W block of one image plane, so no pixel needs a division by the image size. The
kernel has no loop (sm_90 SASS of the RGB 3x3 at 16x16 N32 w8: 582 instructions per warp).

Loads are element-wise through the piece's and the weight's strides (3 channels are no 16-byte
vector): no layout copy on any path, NCHW, channels_last or a strided view alike. The epilogue
(bias, activation) and the store are the main forward's.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs, launch_common
from unetpp_fast.ops.triton.epilogue import ACTIVATION_CODES, bias_and_activation, strided_output_offsets
from unetpp_fast.ops.triton.launch_common import cdiv
from unetpp_fast.ops.triton.virtual_input import tap_shifts

# taps x C_in of the largest packed reduction: one or two K blocks of 32, which compile without
# spills on sm_80 and sm_90 (aot.py compiles K 63 in 2D and K 54 in 3D: at most 128 registers).
MAX_PACKED_K = 64
PACKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Sizes and strides unspecialised: one compile serves every image size and layout of the input.
_INTS = ["D", "H", "W", "C_OUT", "sx_n", "sx_c", "sx_d", "sx_h", "sx_w", "sw_co", "sw_c", "sw_kd", "sw_kh",
         "sw_kw", "so_n", "so_c", "so_d", "so_h", "so_w"]  # fmt: skip


@triton.jit
def _column(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, K: tl.constexpr,
            C_IN: tl.constexpr, KSIZE: tl.constexpr, DIMS: tl.constexpr, K_TOTAL: tl.constexpr):  # fmt: skip
    """Column K of the packed input tile: every pixel's element at (tap, channel) = divmod(K, C_IN).
    K is a constexpr, so the tap's shift is one: its offset is a scalar and its border test one
    compare per shifted axis (shared by every column of that shift). Past K_TOTAL: zeros."""
    if K < K_TOTAL:
        TAP: tl.constexpr = K // C_IN
        PAD: tl.constexpr = KSIZE // 2
        DX: tl.constexpr = TAP % KSIZE - PAD
        DY: tl.constexpr = (TAP // KSIZE) % KSIZE - PAD
        DZ: tl.constexpr = TAP // (KSIZE * KSIZE) - PAD
        ok = m_ok
        if DY < 0:
            ok = ok & (oy >= -DY)
        if DY > 0:
            ok = ok & (oy < H - DY)
        if DX < 0:
            ok = ok & (ox >= -DX)
        if DX > 0:
            ok = ok & (ox < W - DX)
        delta = (K % C_IN) * sx_c + DY * sx_h + DX * sx_w
        if DIMS == 3:
            ok = ok & (oz + DZ >= 0) & (oz + DZ < D)
            delta += DZ * sx_d
        column = tl.load(x_ptr + (base + delta), mask=ok, other=0.0)
    else:
        column = tl.zeros_like(base).to(x_ptr.dtype.element_ty)
    return column


@triton.jit
def _packed_tile(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, K0: tl.constexpr,
                 WIDTH: tl.constexpr, C_IN: tl.constexpr, KSIZE: tl.constexpr, DIMS: tl.constexpr,
                 K_TOTAL: tl.constexpr):  # fmt: skip
    """The [BLOCK_M, WIDTH] input tile of columns K0 .. K0 + WIDTH - 1, joined pairwise: column
    K0 + k lands at position bit_reverse(k) (`packed_order`), the order the weight tile follows."""
    if WIDTH == 1:
        tile = _column(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, K0, C_IN, KSIZE, DIMS,
                       K_TOTAL)  # fmt: skip
    else:
        HALF: tl.constexpr = WIDTH // 2
        low = _packed_tile(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, K0, HALF, C_IN,
                           KSIZE, DIMS, K_TOTAL)  # fmt: skip
        high = _packed_tile(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, K0 + HALF, HALF,
                            C_IN, KSIZE, DIMS, K_TOTAL)  # fmt: skip
        tile = tl.join(low, high)
        if WIDTH > 2:
            tile = tl.reshape(tile, (tile.shape[0], WIDTH))
    return tile


@triton.jit
def packed_order(BLOCK_K: tl.constexpr):
    """k of each position of a _packed_tile of BLOCK_K (a power of 2) columns: position p holds
    column bit_reverse(p) (each join interleaves its halves: the low bit picks the half)."""
    p = tl.arange(0, BLOCK_K)
    k = p * 0
    bits: tl.constexpr = BLOCK_K.bit_length() - 1
    for bit in tl.static_range(bits):
        k |= ((p >> bit) & 1) << (bits - 1 - bit)
    return k


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=["x_ptr", "w_ptr", "b_ptr"])
def fused_conv_forward_packed_kernel(
    out_ptr,
    x_ptr,  # the one piece, [N, C_in, (D,) H, W], any strides
    w_ptr,  # [C_out, C_in, (k,) k, k], any strides
    b_ptr,
    D,  # 1 in 2D
    H,
    W,
    C_OUT,
    sx_n,
    sx_c,
    sx_d,  # 0 in 2D
    sx_h,
    sx_w,
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
    C_IN: tl.constexpr,
    KSIZE: tl.constexpr,
    DIMS: tl.constexpr,  # 2 or 3
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    OUT_DENSE: tl.constexpr,  # the output is a dense channels_last tensor
    OUT_ALIGNED: tl.constexpr,  # OUT_DENSE with C_OUT a multiple of 8: 16-byte aligned output rows
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A CTA owns a BLOCK_H x BLOCK_W block of one image plane: the plane, and the block's corner,
    # are scalar divisions once per CTA; a pixel's row and column inside the block are constexpr
    # divisions (shifts). No per-pixel division by the image size.
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_w = (W + BLOCK_W - 1) // BLOCK_W
    tiles_h = (H + BLOCK_H - 1) // BLOCK_H
    tile_w = pid % tiles_w
    rest = pid // tiles_w
    tile_h = rest % tiles_h
    plane = rest // tiles_h  # n * D + z
    i = tl.arange(0, BLOCK_M)
    oy = tile_h * BLOCK_H + i // BLOCK_W
    ox = tile_w * BLOCK_W + i % BLOCK_W
    m_ok = (oy < H) & (ox < W)
    offs_co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < C_OUT
    if OUT_ALIGNED:  # C_OUT % 8 == 0: the mask is constant over 8 channels, so the store vectorises
        co_ok = tl.max_constancy(co_ok, 8)
    if DIMS == 3:
        n = plane // D
        oz = plane % D
    else:
        n = plane
        oz = 0
    KD: tl.constexpr = 1 + (KSIZE - 1) * (DIMS - 2)  # depth taps: 1 in 2D
    K_TOTAL: tl.constexpr = KD * KSIZE * KSIZE * C_IN
    # The output pixel's own source element; each k adds a per-column delta (int32: the launcher
    # checked the piece's extent).
    sx_c = sx_c.to(tl.int32)
    sx_d = sx_d.to(tl.int32)
    sx_h = sx_h.to(tl.int32)
    sx_w = sx_w.to(tl.int32)
    base = n * sx_n.to(tl.int32) + oy * sx_h + ox * sx_w
    if DIMS == 3:
        base += oz * sx_d
    w_co = (offs_co.to(tl.int64) * sw_co)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    order = packed_order(BLOCK_K)
    for k0 in tl.static_range(0, K_TOTAL, BLOCK_K):
        a = _packed_tile(x_ptr, base, oy, ox, oz, m_ok, D, H, W, sx_c, sx_d, sx_h, sx_w, k0, BLOCK_K, C_IN,
                         KSIZE, DIMS, K_TOTAL)  # fmt: skip
        k = k0 + order  # the weight rows in the tile's column order
        k_ok = k < K_TOTAL
        tap = k // C_IN
        c = k % C_IN
        kz, ky, kx = tap_shifts(tap, KSIZE, DIMS)
        w_off = c * sw_c + ky * sw_kh + kx * sw_kw
        if DIMS == 3:
            w_off += kz * sw_kd
        b = tl.load(
            w_ptr + (w_off.to(tl.int64)[:, None] + w_co), mask=k_ok[:, None] & co_ok[None, :], other=0.0
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    acc = bias_and_activation(acc, b_ptr, offs_co, co_ok, slope, HAS_BIAS, ACT)

    if OUT_DENSE:  # pixel ((plane * H + y) * W + x) at pixel * C_OUT: no strides in the store
        pixel = plane.to(tl.int64) * H * W + (oy * W + ox)
        row = pixel * C_OUT
        if OUT_ALIGNED:
            row = tl.multiple_of(row, 8)
        out_off = row[:, None] + offs_co[None, :]
    else:
        out_off = strided_output_offsets(n, oz, oy, ox, offs_co, so_n, so_c, so_d, so_h, so_w, DIMS)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


def packed_k_total(weight: torch.Tensor) -> int:
    """taps x C_in: the reduction length of a convolution with this weight."""
    return weight.shape[1] * weight.shape[2] ** (weight.dim() - 2)


def packed_block_k(k_total: int) -> int:
    """One K block when the reduction fits 32 (16 at least: the dot's minimum), else blocks of 32."""
    return max(16, triton.next_power_of_2(k_total)) if k_total <= 32 else 32


def packed_forward_applies(
    pieces: Sequence[torch.Tensor], codes: Sequence[int], weight: torch.Tensor
) -> bool:
    """Whether the packed kernel takes this call: one piece read as it is (`none`), k = 1 or 3,
    1 <= taps x C_in <= MAX_PACKED_K, fp16 / bf16 / fp32; not a 1x1 over whole 16-byte channel
    vectors (a head over 32 channels: the main forward reads those in vectors, in one K block
    already). Metadata only; decide it once per kind of call (a launch plan), not per call."""
    if len(pieces) != 1 or len(codes) != 1 or codes[0] != conv_spec.NONE:
        return False
    if weight.dim() not in (4, 5) or weight.shape[2] not in (1, 3) or weight.dtype not in PACKED_DTYPES:
        return False
    if weight.shape[2] == 1 and weight.shape[1] * weight.element_size() % 16 == 0:
        return False
    return 1 <= packed_k_total(weight) <= MAX_PACKED_K


class _Plan:
    """What a call's metadata decides, prepared once (as fused_conv_forward's plan): the steady-state
    call allocates the output and launches. Never data pointers: re-read at every call."""

    __slots__ = ("out_shape", "out_format", "trivial", "kind", "slope", "pixels", "kernel_name",
                 "shape_class", "constexprs", "grid", "scalars", "out_strides", "launch",
                 "bias_relayout")  # fmt: skip


_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride


def _plan_key(pieces, codes, weight, bias, activation) -> tuple:
    """fused_conv_forward's plan key (the same fields in the same order), so a caller that built
    it already can hand it over."""
    return (
        *codes,
        activation,
        weight.shape,
        weight.stride(),
        weight.dtype,
        weight.get_device(),
        None if bias is None else bias.stride(),
        weight.dtype is torch.float32 and torch._C._get_cublas_allow_tf32(),
        *map(_SHAPE, pieces),
        *map(_STRIDE, pieces),
    )


def _make_plan(pieces, codes, weight, bias, activation) -> _Plan:
    if not packed_forward_applies(pieces, codes, weight):
        raise ValueError(
            "pieces: the packed forward takes one piece of mode 'none' with k = 1 or 3, fp16/bf16/fp32 "
            f"and 1 <= taps x C_in <= {MAX_PACKED_K}; got {len(pieces)} piece(s), codes {list(codes)}, "
            f"weight {tuple(weight.shape)} {weight.dtype} (check packed_forward_applies first)"
        )
    (piece,) = pieces
    launch_common.check_piece_extent(piece, "pieces[0]")
    plan = _Plan()
    plan.kind, plan.slope = conv_spec.parse_activation(activation)
    dims = launch_common.dims_of(piece)
    c_out, c_in = weight.shape[:2]
    k = weight.shape[2]
    # Written straight in the output's format: the element-wise loads gain nothing from a
    # channels_last copy of the input, and the store takes any strides.
    plan.out_format = conv_spec.output_memory_format(piece)
    plan.out_shape = (piece.shape[0], c_out, *piece.shape[2:])
    depth, height, width = launch_common.spatial3(plan.out_shape)
    plan.pixels = piece.shape[0] * depth * height * width
    launch_common.check_pixel_count(plan.pixels, "the output")
    plan.trivial = plan.pixels * c_out == 0
    plan.bias_relayout = bias is not None and bias.stride(0) != 1  # the kernel reads bias[co] densely
    plan.constexprs = dict(
        C_IN=c_in,
        KSIZE=k,
        DIMS=dims,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATION_CODES[plan.kind],
        PRECISION=launch_common.dot_precision(weight.dtype),
        OUT_DENSE=plan.out_format == conv_spec.channels_last_format(piece.dim()),
        OUT_ALIGNED=plan.out_format == conv_spec.channels_last_format(piece.dim()) and c_out % 8 == 0,
        BLOCK_K=packed_block_k(packed_k_total(weight)),
    )
    plan.shape_class = configs.shape_class(c_in, c_out)
    plan.kernel_name = configs.config_name("forward_packed", dims)
    planes = piece.shape[0] * depth

    def grid(meta):
        tiles = cdiv(height, meta["BLOCK_H"]) * cdiv(width, meta["BLOCK_W"])
        return (planes * tiles, cdiv(c_out, meta["BLOCK_N"]))

    plan.grid = grid
    plan.scalars = plan.out_strides = plan.launch = None  # filled by the first call
    return plan


def fused_conv_forward_packed(
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    key: tuple | None = None,
) -> torch.Tensor:
    """act(conv(piece, weight, bias, padding=k//2)) for a call `packed_forward_applies` accepts:
    conv2d for a 4-D piece, conv3d for a 5-D one. `key`: fused_conv_forward's plan key of this
    call when the caller has built it (saves building it twice).

    The operator layer has validated the call (conv_spec.check_inputs); a call the packed kernel
    does not take raises ValueError (once per kind of call: the check sits in the plan)."""
    if key is None:
        key = _plan_key(pieces, codes, weight, bias, activation)
    plans = launch_common.PLANS
    plan = plans.get(("forward_packed", key))
    if plan is None:
        plan = _make_plan(pieces, codes, weight, bias, activation)
        if len(plans) >= launch_common.MAX_PLANS:
            plans.clear()
        plans["forward_packed", key] = plan
    piece = pieces[0]
    out = launch_common.empty_output(plan.out_shape, weight, plan.out_format, strides=plan.out_strides)
    if plan.trivial:
        return out
    if bias is None:
        bias = weight  # any valid pointer: HAS_BIAS is False
    elif plan.bias_relayout:
        bias = bias.contiguous()
    if plan.scalars is None:
        plan.out_strides = out.stride()
        plan.scalars = (*launch_common.spatial3(plan.out_shape), plan.out_shape[1],
                        *launch_common.strides5(piece), *launch_common.strides5(weight),
                        *launch_common.strides5(out), float(plan.slope))  # fmt: skip
    entry = plan.launch
    if entry is None:
        args = (out, piece, weight, bias, *plan.scalars)
        rt = launch_common.runtime()
        if isinstance(rt, launch_common.InterpreterRuntime):  # no compiled kernel to keep
            launch_common.launch(fused_conv_forward_packed_kernel, plan.kernel_name, plan.shape_class,
                                 plan.grid, plan.pixels, weight.dtype, weight.device, args,
                                 plan.constexprs)  # fmt: skip
            return out
        handle, grid, tail, settled = launch_common.prepare(
            fused_conv_forward_packed_kernel, plan.kernel_name, plan.shape_class, plan.grid, plan.pixels,
            weight.dtype, weight.device, args, plan.constexprs,
        )  # fmt: skip
        entry = (rt, handle, grid, (*plan.scalars, *tail))
        if settled:  # a stand-in chosen inside a CUDA-graph capture is not kept
            plan.launch = entry
    rt, handle, grid, rest = entry
    rt.launch(handle, grid, (out, piece, weight, bias, *rest))
    return out
