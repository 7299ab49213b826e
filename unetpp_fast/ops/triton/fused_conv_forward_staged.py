"""Staged forward kernel: each channel block of the virtual input is built ONCE per output tile, on
the tile's halo, and the nine taps of a 3x3 convolution read it from there.

The main forward (fused_conv_forward.py) gathers its A tile per (tap, channel block): an upsampled
piece is blended, and a max-pooled one reduced, nine times per pixel, each tap's rows carry their
own addresses and padding masks. Here a CTA owns a BLOCK_H x BLOCK_W block of output pixels of one
image; per 32-channel block of a piece it

  1. stages the piece on the block's (BLOCK_H + 2) x (BLOCK_W + 2) halo: the source pixel (`none`,
     `up_nearest`), the 2x2 maximum (`maxpool2`, NaN-propagating) or the bilinear blend in fp32
     rounded to the piece's dtype (`up_bilinear(_ac)`, as a materialised interpolate), zero outside
     the image and past the piece's channels: once per halo pixel, SUB halo pixels per trip;
  2. runs the nine taps: the A tile of tap (ky, kx) is the halo at a scalar offset, read without a
     mask (the halo holds the padding), against the tap's weights.

Triton has no user-managed shared memory, so the halo lives in a scratch slot in global memory that
belongs to one CTA: the grid is persistent (about CTAS_PER_SM CTAs per SM, all output-channel tiles
together, each looping over pixel blocks), so the scratch is a few MB and stays in L2; two
barriers per block order the slot's writes and reads among the CTA's threads. Pieces come from the
main forward's descriptor table (any number, every 2D mode); the epilogue (bias, activation) is its.

It takes 2D 3x3 and 1x1 calls (1x1, the heads: the block itself is staged and read by one tap) on
the GPU path whose pieces and weight are read in 16-byte channel vectors (channels_last, C a multiple
of 8 in 16-bit types): UNet++ past its input convolution.
UNETPP_FAST_TRITON_STAGED: unset / "auto" on the GPU path only, "0" never, "1" also under the
interpreter (how the tests run it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from unetpp_fast.ops.triton import launch_common
from unetpp_fast.ops.triton.epilogue import bias_and_activation
from unetpp_fast.ops.triton.virtual_input import (
    class_channels,
    direct_offsets,
    nan_max,
    piece_row,
    pool_offsets,
    source_geometry,
    window_steps,
)

STAGED_ENV = "UNETPP_FAST_TRITON_STAGED"
BLOCK_K = 32  # channels per staged block: one scratch row per halo pixel holds BLOCK_K elements
CTAS_PER_SM = 2  # persistent CTAs per SM (all output-channel tiles together): one scratch slot each
STAGED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Sizes and strides unspecialised: one compile serves every node.
_INTS = ["NUM_PIECES", "N", "H", "W", "C_OUT", "sw_co", "sw_kh", "sw_kw"]


@triton.jit
def _stage_rows(x_ptr, st_ptrs, n, gy, gx, inside, r_ok, c0, pc, s_n, s_h, s_w, ph, pw, scale_h, scale_w,
                mode, READ: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """Channels [c0, c0 + BLOCK_K) of a piece at halo pixels (gy, gx) into their scratch rows, by read
    class READ: 0 one source pixel (none / up_nearest), 1 the 2x2 max-pool window, 2 the bilinear
    blend (fp32, rounded to the piece's dtype). Zero outside the image and past the piece."""
    k = tl.arange(0, st_ptrs.shape[1])
    mask = inside[:, None] & ((c0 + k) < pc)[None, :]
    chan = (tl.multiple_of(c0, VEC) + k)[None, :]
    zero = gy * 0
    if READ == 0:
        off = direct_offsets(n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, mode, VEC, 2)
        value = tl.load(x_ptr + off[:, None] + chan, mask=mask, other=0.0)
    elif READ == 1:
        first = x_ptr + pool_offsets(n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, VEC, 2)[:, None] + chan
        d_w, d_h, _ = window_steps(s_w, s_h, s_n * 0, VEC)
        top = nan_max(tl.load(first, mask=mask, other=0.0), tl.load(first + d_w, mask=mask, other=0.0))
        low = first + d_h
        low = nan_max(tl.load(low, mask=mask, other=0.0), tl.load(low + d_w, mask=mask, other=0.0))
        value = nan_max(top, low)
    else:
        (o00, o01, o10, o11, _, _, _, _, w00, w01, w10, w11, _, _, _, _) = source_geometry(
            n, zero, gy, gx, s_n, s_n * 0, s_h, s_w, zero + 1, ph, pw, 0.0, scale_h, scale_w, mode,
            VEC, 2, True,
        )  # fmt: skip
        value = w00[:, None] * tl.load(x_ptr + o00[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w01[:, None] * tl.load(x_ptr + o01[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w10[:, None] * tl.load(x_ptr + o10[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
        value += w11[:, None] * tl.load(x_ptr + o11[:, None] + chan, mask=mask, other=0.0).to(tl.float32)
    tl.store(st_ptrs, value.to(st_ptrs.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _stage_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h, scale_w, mode,
                 halo_pixels, HALO_W: tl.constexpr, PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                 SUB: tl.constexpr, READ: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """One channel block of a piece on the tile's halo (PAD pixels around the block), SUB halo pixels
    per trip (`halo_pixels` a run-time bound: one loop per read class, its registers bounded by SUB)."""
    k = tl.arange(0, BLOCK_K)
    for part in range(0, halo_pixels, SUB):
        r = part + tl.arange(0, SUB)
        hy = r // HALO_W  # a constexpr divisor: a multiply
        hx = r - hy * HALO_W
        r_ok = r < halo_pixels
        gy = y0 - PAD + hy
        gx = x0 - PAD + hx
        inside = r_ok & (gy >= 0) & (gy < H) & (gx >= 0) & (gx < W)
        st_ptrs = slot + (r * BLOCK_K)[:, None] + k[None, :]
        _stage_rows(x_ptr, st_ptrs, n, gy, gx, inside, r_ok, c0, pc, s_n, s_h, s_w, ph, pw, scale_h, scale_w,
                    mode, READ, VEC)  # fmt: skip


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=["w_ptr", "b_ptr"])
def fused_conv_forward_staged_kernel(
    out_ptr,  # [N, C_out, H, W] channels_last, dense: pixel * C_OUT + co
    w_ptr,  # [C_out, C_in, 3, 3] with C_in contiguous (channels_last)
    b_ptr,
    table_ptr,  # int64 [NUM_PIECES, ROW]: the main forward's piece table
    scratch_ptr,  # one slot of HALO x BLOCK_K elements per CTA of the grid
    NUM_PIECES,
    N,
    H,
    W,
    C_OUT,
    sw_co,
    sw_kh,
    sw_kw,
    slope,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    KSIZE: tl.constexpr,  # 3, or 1 (the heads: the "halo" is the block itself)
    VEC: tl.constexpr,  # elements per 16-byte vector: pieces and weight read in whole vectors
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SUB: tl.constexpr,
):
    PAD: tl.constexpr = KSIZE // 2
    HALO_W: tl.constexpr = BLOCK_W + 2 * PAD
    HALO_PIXELS: tl.constexpr = (BLOCK_H + 2 * PAD) * HALO_W
    HALO: tl.constexpr = (HALO_PIXELS + SUB - 1) // SUB * SUB  # scratch rows per slot
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    i = tl.arange(0, BLOCK_H * BLOCK_W)
    iy = i // BLOCK_W
    ix = i % BLOCK_W
    k = tl.arange(0, BLOCK_K)
    offs_co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < C_OUT
    # This CTA's slot: no other CTA of the grid reads or writes it.
    slot = scratch_ptr + (tl.program_id(1) * programs + pid).to(tl.int64) * (HALO * BLOCK_K)
    a_rows = slot + ((iy * HALO_W + ix) * BLOCK_K)[:, None] + k[None, :]  # tap (ky, kx) = (0, 0)
    w_co = offs_co.to(tl.int64) * sw_co
    w_co = tl.multiple_of(w_co, VEC)  # the launcher checked: every weight stride but C_in's in vectors
    w_tile = w_co[None, :] + k[:, None]
    # A bound the compiler cannot fold (N < 0 never holds) keeps each read class's staging one loop,
    # however few its trips: registers bounded by SUB, and the same SASS shape for the static model.
    halo_pixels = HALO_PIXELS + (N < 0).to(tl.int32) * (1 << 20)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    for tile in range(pid, N * tiles_h * tiles_w, programs):  # persistent over the pixel blocks
        tx = tile % tiles_w
        rest = tile // tiles_w
        ty = rest % tiles_h
        n = rest // tiles_h
        y0 = ty * BLOCK_H
        x0 = tx * BLOCK_W
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), dtype=tl.float32)
        for p in range(NUM_PIECES):
            x_ptr, s_n, _, _, s_h, s_w, _, ph, pw, pc, mode, c_first, _, scale_h, scale_w = piece_row(
                table_ptr, p, w_ptr, VEC, 2
            )
            n_direct, n_pool, _ = class_channels(table_ptr, p, VEC)
            w_piece = w_ptr + c_first
            for c0 in range(0, pc, BLOCK_K):
                tl.debug_barrier()  # every tap of the previous block has read the slot
                if n_direct > 0:
                    _stage_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                 scale_w, mode, halo_pixels, HALO_W, PAD, BLOCK_K, SUB, 0, VEC)  # fmt: skip
                elif n_pool > 0:
                    _stage_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                 scale_w, mode, halo_pixels, HALO_W, PAD, BLOCK_K, SUB, 1, VEC)  # fmt: skip
                else:
                    _stage_block(x_ptr, slot, n, y0, x0, H, W, c0, pc, s_n, s_h, s_w, ph, pw, scale_h,
                                 scale_w, mode, halo_pixels, HALO_W, PAD, BLOCK_K, SUB, 2, VEC)  # fmt: skip
                tl.debug_barrier()  # the block is in the slot for every thread
                b_mask = ((c0 + k) < pc)[:, None] & co_ok[None, :]
                w_block = w_piece + c0
                for tap in tl.static_range(KSIZE * KSIZE):  # unrolled: each tap's shift a constant offset
                    # The halo holds the padding: no mask.
                    a = tl.load(a_rows + ((tap // KSIZE) * HALO_W + tap % KSIZE) * BLOCK_K)
                    w_tap = tl.multiple_of(w_block + ((tap // KSIZE) * sw_kh + (tap % KSIZE) * sw_kw), 16)
                    b = tl.load(w_tap + w_tile, mask=b_mask, other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
        acc = bias_and_activation(acc, b_ptr, offs_co, co_ok, slope, HAS_BIAS, ACT)
        oy = y0 + iy
        ox = x0 + ix
        pixel = (n * H + oy).to(tl.int64) * W + ox
        out_off = (pixel * C_OUT)[:, None] + offs_co[None, :]
        out_mask = ((oy < H) & (ox < W))[:, None] & co_ok[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def staged_mode() -> str:
    """UNETPP_FAST_TRITON_STAGED: 'auto' (unset), '0' or '1'; anything else raises."""
    value = os.environ.get(STAGED_ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "1"):
        return value
    raise ValueError(f"environment variable {STAGED_ENV} must be 'auto', '0' or '1', got {value!r}")


def staged_forward_applies(
    pieces: Sequence[torch.Tensor], codes: Sequence[int], weight: torch.Tensor, vec: int
) -> bool:
    """Whether the staged kernel takes this call (metadata only; decided once per launch plan):
    2D, k = 3 or 1, fp16 / bf16 / fp32, pieces and weight as the kernel reads them (`vec` > 1: channels
    contiguous, every channel count and stride in whole 16-byte vectors); by STAGED_ENV on the GPU
    path ('auto') or everywhere ('1'). The call's addresses must be 16-byte aligned too (checked per
    call by the caller, which falls back to the main forward otherwise)."""
    mode = staged_mode()
    if mode == "0" or (mode == "auto" and not launch_common.on_gpu_layout()):
        return False
    if weight.dim() != 4 or weight.shape[2] not in (1, 3) or weight.dtype not in STAGED_DTYPES:
        return False
    if vec <= 1 or weight.stride(1) != 1 or any(p.stride(1) != 1 for p in pieces):
        return False
    return len(pieces) == len(codes) and all(p.dim() == 4 for p in pieces)


@functools.lru_cache(maxsize=16)
def _sm_count(device_type: str, index: int | None) -> int:
    """SMs of a CUDA device; 132 (the H200) for any other device: a stubbed runtime on the CPU
    (benchmarks/host_path.py) stands for the GPU the kernels are designed for."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else 0).multi_processor_count
    return 132


def staged_config_name(ksize: int) -> str:
    """The config list (and tuning) name of the kernel's 3x3 or 1x1 instance."""
    return "forward_staged" if ksize == 3 else "forward_staged_1x1"


def max_programs(device: torch.device) -> int:
    """Persistent CTAs of a launch, all output-channel tiles together: CTAS_PER_SM per SM (the
    interpreter: 2). The scratch holds one slot per CTA, so it stays this size however wide C_out."""
    if launch_common.interpreting():
        return 2
    return CTAS_PER_SM * _sm_count(device.type, device.index)


def halo_rows(block_h: int, block_w: int, sub: int, ksize: int = 3) -> int:
    """Scratch rows of one slot: the halo rounded up to whole SUB-pixel staging trips."""
    pad = ksize // 2
    return -(-((block_h + 2 * pad) * (block_w + 2 * pad)) // sub) * sub


def _programs_per_tile(programs: int, channel_tiles: int) -> int:
    """Persistent CTAs per output-channel tile: `programs` shared out, at least one per tile."""
    return max(1, -(-programs // channel_tiles))


def scratch_elements(candidates, c_out: int, programs: int, ksize: int = 3) -> int:
    """Elements of a scratch that serves every config of `candidates` (configs.Config-like, with
    BLOCK_H, BLOCK_W, BLOCK_N, SUB) under `staged_grid`: the largest slot times the most CTAs."""
    largest = 0
    for config in candidates:
        kw = config.kwargs
        tiles = -(-c_out // kw["BLOCK_N"])
        ctas = _programs_per_tile(programs, tiles) * tiles
        slot = halo_rows(kw["BLOCK_H"], kw["BLOCK_W"], kw["SUB"], ksize) * BLOCK_K
        largest = max(largest, ctas * slot)
    return largest


def staged_grid(batch: int, height: int, width: int, c_out: int, programs: int):
    """The launch grid of a config: (persistent CTAs per output-channel tile, output-channel tiles),
    about `programs` CTAs in all."""

    def grid(meta):
        blocks = batch * -(-height // meta["BLOCK_H"]) * -(-width // meta["BLOCK_W"])
        tiles = -(-c_out // meta["BLOCK_N"])
        return (min(blocks, _programs_per_tile(programs, tiles)), tiles)

    return grid
