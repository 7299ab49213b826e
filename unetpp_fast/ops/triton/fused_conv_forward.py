"""Forward kernel: implicit-GEMM convolution of the virtual (concatenated, resampled) input.

    out[m, co] = act(bias[co] + sum_{kh, kw, piece, c} V[pixel(m) + tap - pad, c] * W[tap, c, co])

M runs over output pixels (n, y, x), N over output channels, K over (kh, kw, piece, channel
block): a K tile never straddles two pieces, and each piece is read through its own strides, so
NCHW, channels_last and strided views all work without a copy. Up to 5 pieces; unused pointer
slots repeat a valid pointer and are never read (NUM_PIECES is a compile-time constant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs, launch_common
from unetpp_fast.ops.triton.launch_common import (
    check_pixel_count,
    dot_precision,
    launch,
    mode_constexprs,
    piece_args,
)
from unetpp_fast.ops.triton.virtual_input import load_piece_tile

ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)


@triton.jit
def _accumulate_piece(
    acc,
    x_ptr,
    sn,
    sc,
    sh,
    sw,
    ph,
    pw,
    pc,
    scale_h,
    scale_w,
    w_ptr,
    w_row0,
    n,
    y,
    x,
    row_ok,
    offs_co,
    co_ok,
    C_OUT,
    MODE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc += V_piece[pixels, :] @ W[w_row0 : w_row0 + pc, co] over the piece's channel blocks."""
    for k0 in range(0, pc, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        c_ok = c < pc
        a = load_piece_tile(x_ptr, sn, sc, sh, sw, ph, pw, n, y, x, row_ok, c, c_ok, scale_h, scale_w, MODE)
        w_off = (w_row0 + c)[:, None] * C_OUT + offs_co[None, :]
        b = tl.load(w_ptr + w_off, mask=c_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def fused_conv_forward_kernel(
    out_ptr,
    w_ptr,  # weight permuted to [k * k, C_in, C_out], contiguous
    b_ptr,
    x0_ptr,
    x0_sn,
    x0_sc,
    x0_sh,
    x0_sw,
    x0_h,
    x0_w,
    x0_c,
    x0_scale_h,
    x0_scale_w,  # fmt: skip
    x1_ptr,
    x1_sn,
    x1_sc,
    x1_sh,
    x1_sw,
    x1_h,
    x1_w,
    x1_c,
    x1_scale_h,
    x1_scale_w,  # fmt: skip
    x2_ptr,
    x2_sn,
    x2_sc,
    x2_sh,
    x2_sw,
    x2_h,
    x2_w,
    x2_c,
    x2_scale_h,
    x2_scale_w,  # fmt: skip
    x3_ptr,
    x3_sn,
    x3_sc,
    x3_sh,
    x3_sw,
    x3_h,
    x3_w,
    x3_c,
    x3_scale_h,
    x3_scale_w,  # fmt: skip
    x4_ptr,
    x4_sn,
    x4_sc,
    x4_sh,
    x4_sw,
    x4_h,
    x4_w,
    x4_c,
    x4_scale_h,
    x4_scale_w,  # fmt: skip
    M,
    H,
    W,
    C_IN,
    C_OUT,
    so_n,
    so_c,
    so_h,
    so_w,
    slope,
    NUM_PIECES: tl.constexpr,
    MODE0: tl.constexpr,
    MODE1: tl.constexpr,
    MODE2: tl.constexpr,
    MODE3: tl.constexpr,
    MODE4: tl.constexpr,
    KSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
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
    ox = offs_m % W
    oy = (offs_m // W) % H
    n = offs_m // (W * H)
    PAD: tl.constexpr = KSIZE // 2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        for kw in tl.static_range(KSIZE):
            y = oy + (kh - PAD)
            x = ox + (kw - PAD)
            row_ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            row0 = (kh * KSIZE + kw) * C_IN
            acc = _accumulate_piece(
                acc,
                x0_ptr,
                x0_sn,
                x0_sc,
                x0_sh,
                x0_sw,
                x0_h,
                x0_w,
                x0_c,
                x0_scale_h,
                x0_scale_w,
                w_ptr,
                row0,
                n,
                y,
                x,
                row_ok,
                offs_co,
                co_ok,
                C_OUT,
                MODE0,
                BLOCK_K,
                PRECISION,
            )
            row0 += x0_c
            if NUM_PIECES > 1:
                acc = _accumulate_piece(
                    acc,
                    x1_ptr,
                    x1_sn,
                    x1_sc,
                    x1_sh,
                    x1_sw,
                    x1_h,
                    x1_w,
                    x1_c,
                    x1_scale_h,
                    x1_scale_w,
                    w_ptr,
                    row0,
                    n,
                    y,
                    x,
                    row_ok,
                    offs_co,
                    co_ok,
                    C_OUT,
                    MODE1,
                    BLOCK_K,
                    PRECISION,
                )
                row0 += x1_c
            if NUM_PIECES > 2:
                acc = _accumulate_piece(
                    acc,
                    x2_ptr,
                    x2_sn,
                    x2_sc,
                    x2_sh,
                    x2_sw,
                    x2_h,
                    x2_w,
                    x2_c,
                    x2_scale_h,
                    x2_scale_w,
                    w_ptr,
                    row0,
                    n,
                    y,
                    x,
                    row_ok,
                    offs_co,
                    co_ok,
                    C_OUT,
                    MODE2,
                    BLOCK_K,
                    PRECISION,
                )
                row0 += x2_c
            if NUM_PIECES > 3:
                acc = _accumulate_piece(
                    acc,
                    x3_ptr,
                    x3_sn,
                    x3_sc,
                    x3_sh,
                    x3_sw,
                    x3_h,
                    x3_w,
                    x3_c,
                    x3_scale_h,
                    x3_scale_w,
                    w_ptr,
                    row0,
                    n,
                    y,
                    x,
                    row_ok,
                    offs_co,
                    co_ok,
                    C_OUT,
                    MODE3,
                    BLOCK_K,
                    PRECISION,
                )
                row0 += x3_c
            if NUM_PIECES > 4:
                acc = _accumulate_piece(
                    acc,
                    x4_ptr,
                    x4_sn,
                    x4_sc,
                    x4_sh,
                    x4_sw,
                    x4_h,
                    x4_w,
                    x4_c,
                    x4_scale_h,
                    x4_scale_w,
                    w_ptr,
                    row0,
                    n,
                    y,
                    x,
                    row_ok,
                    offs_co,
                    co_ok,
                    C_OUT,
                    MODE4,
                    BLOCK_K,
                    PRECISION,
                )

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == ACT_RELU:
        acc = tl.maximum(acc, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        acc = tl.where(acc > 0.0, acc, acc * slope)

    out_off = n.to(tl.int64) * so_n + oy.to(tl.int64) * so_h + ox.to(tl.int64) * so_w
    out_off = out_off[:, None] + (offs_co.to(tl.int64) * so_c)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


def permute_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, k, k] -> [k * k, C_in, C_out] contiguous: K rows ordered (tap, channel)."""
    c_out, c_in, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k, c_in, c_out).contiguous()


def fused_conv_forward(
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """act(conv2d(cat(resample(pieces)), weight, bias, padding=k//2)) without materialising the input."""
    height, width = conv_spec.check_inputs(pieces, codes, weight, bias, activation)
    kind, slope = conv_spec.parse_activation(activation)
    batch = pieces[0].shape[0]
    c_out, c_in, k, _ = weight.shape
    out_format = conv_spec.output_memory_format(pieces[0])
    gpu = launch_common.on_gpu_layout(weight)
    pieces = [launch_common.kernel_layout(p) for p in pieces]
    out = launch_common.empty_output(
        (batch, c_out, height, width), weight, torch.channels_last if gpu else out_format
    )
    pixels = batch * height * width
    check_pixel_count(pixels, "the output")
    if out.numel() == 0:
        return out
    if c_in == 0:  # nothing to convolve: the output is the activated bias
        value = bias if bias is not None else torch.zeros(c_out, dtype=out.dtype, device=out.device)
        out.copy_(value.view(1, c_out, 1, 1).expand_as(out))
        return _activate_inplace(out, kind, slope).contiguous(memory_format=out_format)
    w = permute_weight(weight)

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))

    launch(
        fused_conv_forward_kernel,
        "forward",
        configs.shape_class(c_in, c_out),
        grid,
        ("M", "C_IN", "C_OUT", "NUM_PIECES", "KSIZE"),
        out,
        w,
        bias if bias is not None else w,
        *piece_args(pieces, codes),
        pixels,
        height,
        width,
        c_in,
        c_out,
        *out.stride(),
        float(slope),
        NUM_PIECES=len(pieces),
        **mode_constexprs(codes),
        KSIZE=k,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATION_CODES[kind],
        PRECISION=dot_precision(weight.dtype),
    )
    return out.contiguous(memory_format=out_format)


ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2}


def _activate_inplace(out: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    if kind == "relu":
        out.clamp_(min=0)
    elif kind == "leaky_relu":
        torch.nn.functional.leaky_relu_(out, slope)
    return out
