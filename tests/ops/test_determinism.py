"""Repeated runs on the same device give bitwise identical forward results and gradients."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends
from unetpp_fast.ops.testing import ConvCase, run_case

CASE = ConvCase(
    batch=2,
    channels=[3, 5, 2],
    modes=["none", "up_bilinear", "maxpool2"],
    out_hw=(6, 8),
    c_out=4,
    k=3,
    activation="relu",
    seed=11,
)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_forward_and_backward_are_bitwise_repeatable(backend):
    reason = backends.why_unusable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    out1, grads1 = run_case(CASE, backend)
    out2, grads2 = run_case(CASE, backend)
    assert not torch.isnan(out1).any()
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_forward_is_bitwise_repeatable(backend, dtype):
    reason = backends.why_unusable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    case = ConvCase(
        **{
            **CASE.__dict__,
            "dtype": dtype,
            "batch": 4,
            "out_hw": (96, 96),
            "channels": [32, 32, 64],
            "piece_hw": [],
        }
    )
    out1, _ = run_case(case, backend, "cuda", backward=False)
    out2, _ = run_case(case, backend, "cuda", backward=False)
    assert torch.equal(out1, out2)
