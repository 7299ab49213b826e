"""Forward kernel: implicit-GEMM convolution of the virtual (concatenated, resampled) input.

    out[m, co] = act(bias[co] + sum_{piece, tap, c} V_p[pixel(m) + tap - pad, c] * W[co, off_p + c, tap])

M runs over output pixels (n, y, x), N over output channels, K over (piece, tap, channel block):
one run-time loop over the piece descriptor table (virtual_input.piece_row), so any number of
pieces and any resample modes share one compiled kernel per (k, dtype, activation, bias). The
per-(piece, tap) source offsets and interpolation weights are computed once, outside the channel
loop. Pieces and weight are read through their strides: no copy, no permuted weight.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs, launch_common
from unetpp_fast.ops.triton.launch_common import cdiv
from unetpp_fast.ops.triton.virtual_input import (
    channel_offsets,
    gather_tile,
    piece_row,
    pixel_coords,
    source_geometry,
)

ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2}

# Sizes and strides unspecialised: one compile serves every node. so_c stays specialised (1 on the GPU
# path, channels_last, so the store vectorises).
_INTS = ["NUM_PIECES", "M", "H", "W", "C_OUT", "sw_co", "sw_c", "sw_kh", "sw_kw", "so_n", "so_h", "so_w"]


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=["w_ptr", "b_ptr"])
def fused_conv_forward_kernel(
    out_ptr,
    w_ptr,  # [C_out, C_in, k, k], any strides
    b_ptr,
    table_ptr,  # int64 [NUM_PIECES, ROW]
    NUM_PIECES,
    M,
    H,
    W,
    C_OUT,
    sw_co,
    sw_c,
    sw_kh,
    sw_kw,
    so_n,
    so_c,
    so_h,
    so_w,
    slope,
    KSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    C_CONTIG: tl.constexpr,
    VEC: tl.constexpr,  # > 1: every piece 16-byte aligned in VEC-element channel vectors
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
    n, oy, ox = pixel_coords(offs_m, H, W)
    PAD: tl.constexpr = KSIZE // 2
    k_lane = tl.arange(0, BLOCK_K)
    w_co = offs_co.to(tl.int64)[None, :] * sw_co

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(NUM_PIECES):
        x_ptr, s_n, s_c, s_h, s_w, ph, pw, pc, mode, c_first, scale_h, scale_w = piece_row(
            table_ptr, p, w_ptr, VEC
        )
        for tap in range(KSIZE * KSIZE):
            kh = tap // KSIZE
            kw = tap % KSIZE
            y = oy + (kh - PAD)
            x = ox + (kw - PAD)
            row_ok = m_ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
            o00, o01, o10, o11, w00, w01, w10, w11 = source_geometry(
                n, y, x, s_n, s_h, s_w, ph, pw, scale_h, scale_w, mode, VEC
            )
            w_tap = w_ptr + w_co + (kh * sw_kh + kw * sw_kw)
            for k0 in range(0, pc, BLOCK_K):
                c = k0 + k_lane
                c_ok = c < pc
                mask = row_ok[:, None] & c_ok[None, :]
                a = gather_tile(x_ptr, o00, o01, o10, o11, w00, w01, w10, w11,
                                channel_offsets(c, s_c, C_CONTIG), mask, mode)  # fmt: skip
                b = tl.load(
                    w_tap + (c_first + c).to(tl.int64)[:, None] * sw_c,
                    mask=c_ok[:, None] & co_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == ACT_RELU:
        acc = tl.maximum(acc, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        acc = tl.where(acc > 0.0, acc, acc * slope)

    out_off = n.to(tl.int64) * so_n + oy.to(tl.int64) * so_h + ox.to(tl.int64) * so_w
    out_off = out_off[:, None] + (offs_co.to(tl.int64) * so_c)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


def fused_conv_forward(
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """act(conv2d(cat(resample(pieces)), weight, bias, padding=k//2)) without materialising the input.

    The operator layer has validated the call (conv_spec.check_inputs): nothing is re-checked here.
    """
    kind, slope = _activation(activation)
    first = pieces[0]
    batch = first.shape[0]
    height, width = conv_spec.resampled_size(first.shape[2], first.shape[3], codes[0])
    c_out, c_in, k, _ = weight.shape
    out_format = conv_spec.output_memory_format(first)
    gpu = launch_common.on_gpu_layout()
    if gpu:
        pieces = [launch_common.kernel_layout(p) for p in pieces]
    out = launch_common.empty_output(
        (batch, c_out, height, width), weight, torch.channels_last if gpu else out_format
    )
    pixels = batch * height * width
    launch_common.check_pixel_count(pixels, "the output")
    if out.numel() == 0:
        return out
    if c_in == 0:  # nothing to convolve: the output is the activated bias
        value = bias if bias is not None else torch.zeros(c_out, dtype=out.dtype, device=out.device)
        out.copy_(value.view(1, c_out, 1, 1).expand_as(out))
        return _activate_inplace(out, kind, slope).contiguous(memory_format=out_format)
    # Pieces without channels stay in the table: their channel loop runs zero times.
    table = launch_common.piece_table(pieces, codes)
    c_contig = gpu or all(p.stride(1) == 1 for p in pieces)

    def grid(meta):
        return (cdiv(pixels, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"]))

    launch_common.launch(
        fused_conv_forward_kernel,
        "forward",
        configs.shape_class(c_in, c_out),
        grid,
        pixels,
        weight.dtype,
        weight.device,
        (out, weight, weight if bias is None else bias, table, len(pieces), pixels, height, width, c_out,
         *weight.stride(), *out.stride(), float(slope)),
        dict(
            KSIZE=k,
            HAS_BIAS=bias is not None,
            ACT=ACTIVATION_CODES[kind],
            PRECISION=launch_common.dot_precision(weight.dtype),
            C_CONTIG=c_contig,
            VEC=launch_common.vector_width(pieces) if c_contig else 1,
        ),
    )  # fmt: skip
    return out if not gpu else out.contiguous(memory_format=out_format)


@functools.lru_cache(maxsize=64)
def _activation(activation: str) -> tuple[str, float]:
    return conv_spec.parse_activation(activation)


def _activate_inplace(out: torch.Tensor, kind: str, slope: float) -> torch.Tensor:
    if kind == "relu":
        out.clamp_(min=0)
    elif kind == "leaky_relu":
        torch.nn.functional.leaky_relu_(out, slope)
    return out
