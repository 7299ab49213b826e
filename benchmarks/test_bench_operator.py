"""Operator suite: every distinct UNet++ convolution, fused backends against plain PyTorch.

Backends: 'eager' (cat + interpolate/max_pool2d + conv2d + activation, what users run today),
'compile' (the same under torch.compile), and the fused operator on 'reference', 'triton',
'cuda' or 'cpu'. Each row carries the ratio to eager measured in the same run, the relative error
of the output against the fp32 plain computation, and the roofline floor of its shape.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unetpp_fast import fused_conv
from unetpp_fast.bench import roofline
from unetpp_fast.bench import timing as bench


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
    device = bench_cfg.device
    reason = bench.backend_unusable(op_backend, device)
    if reason:
        pytest.skip(f"backend {op_backend}: {reason}")
    if device.type == "cpu" and dtype_name in ("fp16", "bf16") and not bench_cfg.smoke:
        pytest.skip("low-precision convolutions are timed on GPUs only")
    dtype = bench.dtype_from_name(dtype_name)
    backward = bench_pass == "fwdbwd"
    inputs = conv_case.make_inputs(device, dtype, channels_last=layout == "cl", requires_grad=backward)
    op = _operator(op_backend, bench_cfg.compile_mode)
    step = _step(op, conv_case, inputs, backward)

    key = (conv_case, dtype_name, layout, bench_pass)
    if op_backend != bench.EAGER and key not in bench_cfg.eager_cache:
        eager_step = _step(bench.plain_fused_conv, conv_case, inputs, backward)
        stats = bench.time_callable(eager_step, device, warmup=bench_cfg.warmup, rounds=bench_cfg.rounds)
        bench_cfg.eager_cache[key] = stats.median_s

    size = conv_case.image_size
    row = {
        "suite": "operator",
        "conv": conv_case.name,
        "size": size,
        "batch": conv_case.batch,
        "node_hw": conv_case.out_hw[0],
        "pieces": [(p.channels, p.height, p.resample) for p in conv_case.pieces],
        "c_out": conv_case.out_channels,
        "backend": op_backend,
        "dtype": dtype_name,
        "layout": layout,
        "pass": bench_pass,
        "rel_err_vs_fp32": _relative_error(op, conv_case, inputs),
    }
    group = f"op {size}px b{conv_case.batch} {conv_case.name} {dtype_name} {layout} {bench_pass}"
    row = measure.run(step, group, row)

    median_s = row["median_ms"] / 1e3
    if op_backend == bench.EAGER:
        bench_cfg.eager_cache[key] = median_s
    row["ratio_vs_eager"] = bench_cfg.eager_cache[key] / median_s
    rate = ceilings.get(f"matmul_flop_per_s_{dtype_name}", ceilings["matmul_flop_per_s_fp32"])
    row.update(
        roofline.roofline_row(conv_case, dtype, median_s, ceilings["copy_bytes_per_s"], rate, backward)
    )
    row["conv"] = conv_case.name
    measure.record(row)
    assert row["median_ms"] > 0
    # fp32 may run as tf32 on GPUs (about 3e-4); bf16 operands land between 1e-3 and 1e-2
    assert row["rel_err_vs_fp32"] < (2e-3 if dtype == torch.float32 else 3e-2), row
