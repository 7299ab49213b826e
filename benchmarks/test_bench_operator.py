"""Operator suite: every distinct UNet++ convolution, fused backends against plain PyTorch.

Backends: 'eager' (cat + interpolate/max_pool2d + conv2d + activation, what users run today),
'compile' (the same under torch.compile), and the fused operator on 'reference', 'triton',
'cuda' or 'cpu'. Each row carries the ratio to eager measured in the same run, the relative error
of the output against the fp32 plain computation, the roofline floor of its shape, and `ran`:
the backend that ran the fused call (`backends.count_calls`). `test_fused_conv_3d` times the same
convolutions of a 3D UNet++ (5-D cubic pieces, 3x3x3 weights; conftest's BENCH_3D_* settings).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unetpp_fast import fused_conv
from unetpp_fast.bench import roofline
from unetpp_fast.bench import timing as bench
from unetpp_fast.ops import backends


def _operator(backend: str, compile_mode: str) -> Any:
    if backend == bench.EAGER:
        return bench.plain_fused_conv
    if backend == bench.COMPILE:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit falls back to eager silently
        return torch.compile(bench.plain_fused_conv, mode=compile_mode, dynamic=False)
    return lambda pieces, weight, bias, resample, activation: fused_conv(
        pieces, weight, bias, resample, activation, backend=backend
    )


def _step(op: Any, case: roofline.ConvCase, inputs: tuple, backward: bool) -> Any:
    pieces, codes, weight, bias = inputs
    if not backward:

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return op(pieces, weight, bias, codes, case.activation)

        return forward
    grad_out = None
    wrt = [*pieces, weight] + ([bias] if bias is not None else [])

    def forward_backward() -> Any:
        nonlocal grad_out
        out = op(pieces, weight, bias, codes, case.activation)
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
            grad_out = grad_out.contiguous(memory_format=bench.conv_spec.output_memory_format(pieces[0]))
        return torch.autograd.grad(out, wrt, grad_out)

    return forward_backward


def _relative_error(op: Any, case: roofline.ConvCase, inputs: tuple) -> float:
    pieces, codes, weight, bias = inputs
    with torch.no_grad():
        out = op(pieces, weight, bias, codes, case.activation).float()
        ref = bench.plain_fused_conv(
            [p.float() for p in pieces],
            weight.float(),
            None if bias is None else bias.float(),
            codes,
            case.activation,
        )
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def test_fused_conv(
    conv_case: roofline.ConvCase,
    dtype_name: str,
    layout: str,
    bench_pass: str,
    op_backend: str,
    bench_cfg: Any,
    measure: Any,
    ceilings: dict[str, float],
) -> None:
    _skip_unusable(op_backend, dtype_name, bench_cfg, 2)
    dtype = bench.dtype_from_name(dtype_name)
    inputs = conv_case.make_inputs(
        bench_cfg.device, dtype, channels_last=layout == "cl", requires_grad=bench_pass == "fwdbwd"
    )
    row = _measure_case(conv_case, inputs, dtype_name, layout, bench_pass, op_backend, bench_cfg, measure)
    rate = ceilings.get(f"matmul_flop_per_s_{dtype_name}", ceilings["matmul_flop_per_s_fp32"])
    median_s = row["median_ms"] / 1e3
    row.update(
        roofline.roofline_row(
            conv_case, dtype, median_s, ceilings["copy_bytes_per_s"], rate, bench_pass == "fwdbwd"
        )
    )
    row["conv"] = conv_case.name
    _finish(row, dtype, measure)


def test_fused_conv_3d(
    conv_case_3d: roofline.ConvCase,
    dtype_name_3d: str,
    layout: str,
    bench_pass: str,
    op_backend: str,
    bench_cfg: Any,
    measure: Any,
    ceilings: dict[str, float],
) -> None:
    """The same convolutions in a 3D UNet++: 5-D cubic pieces, 3x3x3 weights (BENCH_3D_*)."""
    case, dtype_name = conv_case_3d, dtype_name_3d
    _skip_unusable(op_backend, dtype_name, bench_cfg, 3)
    dtype = bench.dtype_from_name(dtype_name)
    backward = bench_pass == "fwdbwd"
    inputs = _inputs_3d(case, bench_cfg.device, dtype, layout == "cl", backward)
    row = _measure_case(case, inputs, dtype_name, layout, bench_pass, op_backend, bench_cfg, measure, 3)
    rate = ceilings.get(f"matmul_flop_per_s_{dtype_name}", ceilings["matmul_flop_per_s_fp32"])
    row.update(
        _roofline_3d(case, dtype, row["median_ms"] / 1e3, ceilings["copy_bytes_per_s"], rate, backward)
    )
    _finish(row, dtype, measure)


def _skip_unusable(op_backend: str, dtype_name: str, bench_cfg: Any, dims: int) -> None:
    reason = bench.backend_unusable(op_backend, bench_cfg.device, dims)
    if reason:
        pytest.skip(f"backend {op_backend}: {reason}")
    if bench_cfg.device.type == "cpu" and dtype_name in ("fp16", "bf16") and not bench_cfg.smoke:
        pytest.skip("low-precision convolutions are timed on GPUs only")


def _measure_case(
    case: roofline.ConvCase,
    inputs: tuple,
    dtype_name: str,
    layout: str,
    bench_pass: str,
    op_backend: str,
    bench_cfg: Any,
    measure: Any,
    dims: int = 2,
) -> dict[str, Any]:
    """Time one case on `op_backend` (and eager once per case), with the backend that really ran."""
    device = bench_cfg.device
    backward = bench_pass == "fwdbwd"
    op = _operator(op_backend, bench_cfg.compile_mode)
    step = _step(op, case, inputs, backward)
    key = (case, dims, dtype_name, layout, bench_pass)
    if op_backend != bench.EAGER and key not in bench_cfg.eager_cache:
        eager_step = _step(bench.plain_fused_conv, case, inputs, backward)
        stats = bench.time_callable(eager_step, device, warmup=bench_cfg.warmup, rounds=bench_cfg.rounds)
        bench_cfg.eager_cache[key] = stats.median_s
    with backends.count_calls() as ran:
        step()
    prefix = "3D " if dims == 3 else ""
    row = {
        "suite": "operator",
        "dims": dims,
        "conv": prefix + case.name,
        "size": case.image_size,
        "batch": case.batch,
        "node_hw": case.out_hw[0],
        "pieces": [(p.channels, p.height, p.resample) for p in case.pieces],
        "c_out": case.out_channels,
        "backend": op_backend,
        "ran": bench.calls_text(dict(ran)),
        "dtype": dtype_name,
        "layout": layout,
        "pass": bench_pass,
        "rel_err_vs_fp32": _relative_error(op, case, inputs),
    }
    group = (
        f"op{prefix.strip()} {case.image_size}px b{case.batch} {case.name} {dtype_name} {layout} {bench_pass}"
    )
    row = measure.run(step, group, row)
    median_s = row["median_ms"] / 1e3
    if op_backend == bench.EAGER:
        bench_cfg.eager_cache[key] = median_s
    row["ratio_vs_eager"] = bench_cfg.eager_cache[key] / median_s
    return row


def _finish(row: dict[str, Any], dtype: torch.dtype, measure: Any) -> None:
    measure.record(row)
    assert row["median_ms"] > 0
    # fp32 may run as tf32 on GPUs (about 3e-4); bf16 operands land between 1e-3 and 1e-2
    assert row["rel_err_vs_fp32"] < (2e-3 if dtype == torch.float32 else 3e-2), row


def _inputs_3d(
    case: roofline.ConvCase,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    requires_grad: bool,
) -> tuple[list[torch.Tensor], list[int], torch.Tensor, torch.Tensor | None]:
    """Random (pieces, codes, weight, bias) of a case in 3D: pieces [N, C, s, s, s], He-scaled weights."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    pieces = [
        rand(case.batch, p.channels, p.height, p.height, p.width).contiguous(memory_format=fmt)
        for p in case.pieces
    ]
    k = case.kernel
    weight = rand(
        case.out_channels, case.in_channels, k, k, k, scale=(2.0 / (case.in_channels * k**3)) ** 0.5
    )
    bias = rand(case.out_channels, scale=0.1) if case.bias else None
    tensors = [*pieces, weight] + ([bias] if bias is not None else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return pieces, [p.resample for p in case.pieces], weight, bias


def _roofline_3d(
    case: roofline.ConvCase,
    dtype: torch.dtype,
    measured_s: float,
    copy_bandwidth: float,
    matmul_rate: float,
    backward: bool,
) -> dict[str, Any]:
    """roofline.roofline_row's figures for the 3D case: cubic pieces and outputs, k^3 taps."""
    element_size = torch.empty((), dtype=dtype).element_size()
    side = case.out_hw[0]
    k3 = case.kernel**3
    out = case.batch * case.out_channels * side**3
    pieces = sum(case.batch * p.channels * p.height**2 * p.width for p in case.pieces)
    weight = case.out_channels * case.in_channels * k3
    bias = case.out_channels if case.bias else 0
    flops = 2 * case.batch * side**3 * case.out_channels * case.in_channels * k3 * (3 if backward else 1)
    elements = pieces + weight + bias + out
    if backward:  # as roofline.conv_min_bytes: grad_out, pieces, weight, mask read; gradients written
        elements += out + pieces + weight + (out if case.activation != "none" else 0) + pieces + weight + bias
    nbytes = elements * element_size
    floor = roofline.floor_time(flops, nbytes, copy_bandwidth, matmul_rate)
    return {
        "gflop": flops / 1e9,
        "min_mb": nbytes / 1e6,
        "flop_per_byte": flops / nbytes,
        "bound": "compute" if flops / matmul_rate >= nbytes / copy_bandwidth else "memory",
        "floor_us": floor * 1e6,
        "measured_us": measured_s * 1e6,
        "fraction_of_floor": floor / measured_s,
    }
