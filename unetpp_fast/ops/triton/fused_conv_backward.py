"""Backward of the fused convolution on the Triton kernels: host-side orchestration.

1. G = act'(out) * grad_out, [N*H*W, C_out] (output-sized).
2. Per piece: its gradient, with the resample's adjoint inside the kernel (fused_conv_input_grad).
3. Every piece's columns of the weight gradient in one launch over the piece table, split-K
   partials summed in a fixed order.
4. Bias gradient: the column sums of G, accumulated in fp32.
Nothing the size of the concatenated input or of an upsampled piece is allocated, and the weight
is read through its strides (no permuted copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.triton import configs, launch_common
from unetpp_fast.ops.triton.fused_conv_forward import ACTIVATION_CODES
from unetpp_fast.ops.triton.fused_conv_input_grad import input_grad_kernel, input_grad_up_kernel
from unetpp_fast.ops.triton.fused_conv_weight_grad import preactivation_grad_kernel, weight_grad_kernel
from unetpp_fast.ops.triton.launch_common import cdiv, interpreting, launch


def weight_grad_splits(pixels: int, c_in: int, c_out: int, taps: int) -> int:
    """How many pixel chunks the weight gradient is split into: enough programs to fill a GPU."""
    if interpreting():
        return 1
    programs = cdiv(c_out, 64) * cdiv(c_in, 64) * taps
    by_occupancy = cdiv(264, programs)  # ~2 waves on a 132-SM GPU
    by_work = max(1, pixels // 4096)  # each chunk keeps at least 4096 pixels
    return max(1, min(by_occupancy, by_work, 64))


def up_segment(block_hr: int, code: int) -> int:
    """Low-resolution pixels per program of the up-sampling input-gradient kernel (see the kernel)."""
    return block_hr // 2 if code == conv_spec.UP_NEAREST else (block_hr - 4) // 2


def fused_conv_backward(
    grad_out: torch.Tensor,
    pieces: Sequence[torch.Tensor],
    codes: Sequence[int],
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    activation: str,
) -> list[torch.Tensor]:
    """[grad_piece_0 .. grad_piece_{n-1}, grad_weight, grad_bias (empty when not has_bias)];
    4-D pieces (2D) or 5-D pieces (3D)."""
    kind, slope = conv_spec.parse_activation(activation)
    if kind != "none" and out is None:
        raise ValueError(f"activation {activation!r} needs the saved forward output `out` for its mask")
    batch, c_out = grad_out.shape[:2]
    depth, height, width = launch_common.spatial3(grad_out.shape)
    dims = launch_common.dims_of(grad_out)
    c_out_w, c_in, k = weight.shape[:3]
    if c_out != c_out_w:
        raise ValueError(f"grad_out has {c_out} channels but weight has C_out = {c_out_w}")
    pixels = batch * depth * height * width
    launch_common.check_pixel_count(pixels, "grad_out")
    taps = k**dims
    dtype, device = weight.dtype, weight.device
    formats = [conv_spec.output_memory_format(p) for p in pieces]
    gpu = launch_common.on_gpu_layout()
    kernel_format = conv_spec.channels_last_format(grad_out.dim())
    if gpu:
        pieces = [launch_common.kernel_layout(p) for p in pieces]
        grad_out = launch_common.kernel_layout(grad_out)
        out = launch_common.kernel_layout(out) if out is not None else None
    grads = [
        launch_common.empty_output(p.shape, p, kernel_format if gpu else f) for p, f in zip(pieces, formats)
    ]
    grad_bias = launch_common.empty_output((c_out if has_bias else 0,), weight)
    if pixels == 0 or c_out == 0:
        for g in grads:
            g.zero_()
        grad_bias.zero_()
        grads = [g.contiguous(memory_format=f) for g, f in zip(grads, formats)]
        return [*grads, torch.zeros_like(weight, memory_format=torch.contiguous_format), grad_bias]

    cls = configs.shape_class(c_in, c_out)
    precision = launch_common.dot_precision(dtype)
    w_strides = launch_common.strides5(weight)
    g_pre = launch_common.empty_output((pixels, c_out), weight)
    o = out if out is not None else grad_out
    launch(
        preactivation_grad_kernel,
        configs.config_name("preactivation_grad", dims),
        cls,
        lambda meta: (cdiv(pixels, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_C"])),
        pixels,
        dtype,
        device,
        (g_pre, grad_out, *launch_common.strides5(grad_out), o, *launch_common.strides5(o), pixels, depth,
         height, width, c_out, float(slope)),
        dict(ACT=ACTIVATION_CODES[kind], DIMS=dims),
    )  # fmt: skip

    # One launch per kind of piece (plain, max-pooled, up-sampled) over the pieces' table rows and
    # their gradients' rows (channel offsets counted over all pieces).
    rows = launch_common.piece_rows(pieces, codes)
    grad_rows = launch_common.piece_rows(grads, codes)
    row = launch_common.ROW
    groups: dict[str, list[int]] = {"plain": [], "pool": [], "up": []}
    for i, (piece, code) in enumerate(zip(pieces, codes)):
        if piece.shape[1] == 0:
            continue
        groups["plain" if code == conv_spec.NONE else "pool" if code == conv_spec.MAXPOOL2 else "up"].append(
            i
        )
    common = dict(
        KSIZE=k, DIMS=dims, PRECISION=precision, C_CONTIG=gpu or all(g.stride(1) == 1 for g in grads)
    )
    shared = (g_pre, weight)
    for kind, members in groups.items():
        if not members:
            continue
        table = launch_common.table_of([v for i in members for v in rows[i * row : (i + 1) * row]], device)
        gtable = launch_common.table_of(
            [v for i in members for v in grad_rows[i * row : (i + 1) * row]], device
        )
        max_c = max(pieces[i].shape[1] for i in members)
        count = len(members)
        if kind == "up":
            # Low-resolution rows (depth x height) and widths of each up-sampled piece.
            lows = [(_rows_of(pieces[i]), pieces[i].shape[-1], codes[i]) for i in members]
            launch(
                input_grad_up_kernel,
                configs.config_name("input_grad_up", dims),
                cls,
                lambda meta, lows=lows, max_c=max_c, count=count: (
                    batch * max(lr * cdiv(lw, up_segment(meta["BLOCK_HR"], code)) for lr, lw, code in lows),
                    cdiv(max_c, meta["BLOCK_C"]),
                    count,
                ),
                pixels,
                dtype,
                device,
                (gtable, table, *shared, batch, depth, height, width, *w_strides, c_out),
                common,
            )
            continue
        pool = kind == "pool"
        launch(
            input_grad_kernel,
            configs.config_name("input_grad_maxpool" if pool else "input_grad", dims),
            cls,
            lambda meta, max_c=max_c, count=count: (
                cdiv(pixels, meta["BLOCK_M"]),
                cdiv(max_c, meta["BLOCK_C"]),
                count,
            ),
            pixels,
            dtype,
            device,
            (gtable, table, *shared, pixels, depth, height, width, *w_strides, c_out),
            dict(POOL=pool, **common),
        )
        for i in members if pool else ():
            _zero_outside_windows(grads[i], grad_out.shape[2:])
    common = dict(KSIZE=k, DIMS=dims, PRECISION=precision)

    splits = weight_grad_splits(pixels, c_in, c_out, taps)
    chunk = cdiv(cdiv(pixels, splits), configs.WEIGHT_GRAD_MAX_BLOCK_P)
    chunk *= configs.WEIGHT_GRAD_MAX_BLOCK_P
    splits = cdiv(pixels, chunk)
    partials = launch_common.empty_output((splits, c_out, c_in, *[k] * dims), weight, dtype=torch.float32)
    c_contig = gpu or all(p.stride(1) == 1 for p in pieces)
    if c_in > 0:  # every piece in one launch (the input gradients' table rows); empty ones idle
        table = launch_common.table_of(rows, device)
        max_c = max(p.shape[1] for p in pieces)
        count = len(pieces)
        launch(
            weight_grad_kernel,
            configs.config_name("weight_grad", dims),
            cls,
            lambda meta: (
                cdiv(c_out, meta["BLOCK_CO"]),
                count * cdiv(max_c, meta["BLOCK_C"]),
                taps * splits,
            ),
            pixels,
            dtype,
            device,
            (partials, g_pre, table, count, max_c, pixels, depth, height, width, c_in, c_out, chunk),
            dict(C_CONTIG=c_contig, VEC=launch_common.vector_width(pieces) if c_contig else 1, **common),
        )

    summed = partials[0] if splits == 1 else partials.sum(dim=0)
    grad_weight = summed.to(dtype)
    if has_bias:
        grad_bias.copy_(torch.sum(g_pre, dim=0, dtype=torch.float32))
    if gpu:
        grads = [g.contiguous(memory_format=f) for g, f in zip(grads, formats)]
    return [*grads, grad_weight, grad_bias]


def _rows_of(piece: torch.Tensor) -> int:
    """Rows of a piece's spatial grid: H in 2D, D * H in 3D."""
    rows = 1
    for size in piece.shape[2:-1]:
        rows *= size
    return rows


def _zero_outside_windows(grad: torch.Tensor, pooled: Sequence[int]) -> None:
    """Odd sizes: the last slice along an axis of a max-pooled piece is in no window and gets no
    gradient (the kernel wrote only the 2x2(x2) windows)."""
    for axis, size in enumerate(pooled):
        covered = [slice(None), slice(None)] + [slice(0, 2 * s) for s in pooled[:axis]]
        if grad.shape[2 + axis] > 2 * size:
            grad[(*covered, slice(2 * size, None))].zero_()
