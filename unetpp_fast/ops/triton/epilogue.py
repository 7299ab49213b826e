"""The forward kernels' epilogue: bias and activation on the fp32 accumulator, and the output's
element offsets when it is not a dense channels_last tensor. Shared by the main forward and the
packed forward, so the two cannot differ in what they apply."""

from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2}


@triton.jit
def bias_and_activation(acc, b_ptr, offs_co, co_ok, slope, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """act(acc + bias[co]) in fp32 (`slope`: leaky_relu's negative slope)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == ACT_RELU:
        acc = tl.maximum(acc, 0.0)
    elif ACT == ACT_LEAKY_RELU:
        acc = tl.where(acc > 0.0, acc, acc * slope)
    return acc


@triton.jit
def strided_output_offsets(n, oz, oy, ox, offs_co, so_n, so_c, so_d, so_h, so_w, DIMS: tl.constexpr):
    """[pixels, channels] int64 element offsets of an output of any strides (oz unused in 2D)."""
    out_off = n.to(tl.int64) * so_n + oy.to(tl.int64) * so_h + ox.to(tl.int64) * so_w
    if DIMS == 3:
        out_off += oz.to(tl.int64) * so_d
    return out_off[:, None] + (offs_co.to(tl.int64) * so_c)[None, :]
