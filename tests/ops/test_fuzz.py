"""Hypothesis fuzzing of every CPU-capable backend against the fp64 reference, forward and backward;
in 3D (5-D pieces) every backend that declares 3D.

Bounded for CI; `pytest --long tests/test_fuzz.py` runs a thousand cases per backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference, relative_error

# Per backend: dtypes it must support on the CPU, and how many cases CI can afford (the Triton
# interpreter is slow).
BACKEND_BUDGET = {
    "reference": ((torch.float32, torch.float64), 25),
    "cpu": ((torch.float32, torch.float64), 40),
    "triton": ((torch.float32,), 12),
}


@st.composite
def conv_cases(draw, dtypes, max_side: int):
    n_pieces = draw(st.integers(1, 4))
    modes = draw(st.lists(st.sampled_from(conv_spec.RESAMPLE_MODES), min_size=n_pieces, max_size=n_pieces))
    needs_even = any(m.startswith("up_") for m in modes)
    h = draw(st.integers(1, max_side // 2)) * 2 if needs_even else draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side // 2)) * 2 if needs_even else draw(st.integers(1, max_side))
    channels = draw(st.lists(st.integers(0, 7), min_size=n_pieces, max_size=n_pieces))
    if sum(channels) == 0:
        channels[0] = 1
    return ConvCase(
        batch=draw(st.integers(0, 3)),
        channels=channels,
        modes=modes,
        out_hw=(h, w),
        c_out=draw(st.integers(1, 6)),
        k=draw(st.sampled_from((1, 3))),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(("nchw", "channels_last", "strided"))),
        activation=draw(st.sampled_from(("none", "relu", "leaky_relu:0.1"))),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("backend", sorted(BACKEND_BUDGET))
def test_backend_matches_reference_on_random_cases(backend, request):
    reason = backends.why_unusable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    dtypes, budget = BACKEND_BUDGET[backend]
    examples = 1000 if request.config.getoption("--long") else budget
    max_side = 9 if backend == "triton" else 12

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=not request.config.getoption("--long"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conv_cases(dtypes, max_side))
    def check(case):
        assert_matches_reference(case, backend)

    check()


@pytest.mark.cuda
@pytest.mark.slow  # compiles many Triton specialisations: out of the 8-minute gpu_check run
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_reference_on_random_cases(backend, request):
    reason = backends.why_unusable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    examples = 1000 if request.config.getoption("--long") else 60

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=not request.config.getoption("--long"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conv_cases((torch.float32, torch.float16, torch.bfloat16), 24))
    def check(case):
        # TF32 would make fp32 as loose as bf16; the kernels' fp32 path is compared strictly.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        assert_matches_reference(case, backend, "cuda")

    check()


# --- 3D: 5-D pieces, trilinear and 2x2x2 max-pool -------------------------------------------------


@st.composite
def conv_cases_3d(draw, max_side: int, dtypes=(torch.float32, torch.float64)):
    n_pieces = draw(st.integers(1, 3))
    modes = draw(st.lists(st.sampled_from(conv_spec.RESAMPLE_MODES_3D), min_size=n_pieces, max_size=n_pieces))
    needs_even = any(m.startswith("up_") for m in modes)

    def side():
        return draw(st.integers(1, max_side // 2)) * 2 if needs_even else draw(st.integers(1, max_side))

    channels = draw(st.lists(st.integers(0, 4), min_size=n_pieces, max_size=n_pieces))
    if sum(channels) == 0:
        channels[0] = 1
    return ConvCase(
        batch=draw(st.integers(0, 2)),
        channels=channels,
        modes=modes,
        out_hw=(side(), side(), side()),
        c_out=draw(st.integers(1, 4)),
        k=draw(st.sampled_from((1, 3))),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(("nchw", "channels_last", "strided"))),
        activation=draw(st.sampled_from(("none", "relu", "leaky_relu:0.1"))),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# 3D per backend: (dtypes, CI examples, largest side); the Triton interpreter runs 27 taps in Python.
BUDGET_3D = {
    "cpu": ((torch.float32, torch.float64), 25, 6),
    "reference": ((torch.float32, torch.float64), 25, 6),
    "triton": ((torch.float32,), 6, 4),
}


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_3d_backend_matches_reference_on_random_cases(backend, request):
    """Every CPU-capable backend that declares 3D, fuzzed against the fp64 reference."""
    if 3 not in backends.capabilities(backend).spatial_dims:
        pytest.skip(f"backend {backend!r} declares 2D only (no 3D kernels yet)")
    reason = backends.why_unusable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    dtypes, budget, max_side = BUDGET_3D[backend]
    examples = 500 if request.config.getoption("--long") else budget

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=not request.config.getoption("--long"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conv_cases_3d(max_side, dtypes))
    def check(case):
        assert_matches_reference(case, backend)

    check()


def _plain_3d(pieces, modes, weight, bias, activation):
    """The 3D definition in plain PyTorch: cat + interpolate(trilinear) + max_pool3d + conv3d."""
    ups = {
        "none": lambda t: t,
        "up_nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        "up_trilinear": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=False),
        "up_trilinear_ac": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=True),
        "maxpool2": lambda t: F.max_pool3d(t, 2),
    }
    y = F.conv3d(
        torch.cat([ups[m](p) for p, m in zip(pieces, modes)], 1), weight, bias, padding=weight.shape[-1] // 2
    )
    if activation.startswith("leaky_relu:"):
        return F.leaky_relu(y, float(activation.split(":")[1]))
    return F.relu(y) if activation == "relu" else y


def test_fuzzed_reference_3d_matches_plain_pytorch():
    """The fuzz above compares backends with the reference; this pins the reference itself in 3D."""

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(conv_cases_3d(6))
    def check(case):
        # PyTorch's resampling refuses empty tensors: the plain definition needs a batch and channels.
        channels = [max(1, c) for c in case.channels]
        case = ConvCase(
            **{**case.__dict__, "dtype": torch.float64, "batch": max(1, case.batch), "channels": channels}
        )
        pieces, weight, bias = case.make("cpu", requires_grad=False)
        out = unetpp_fast.fused_conv(
            pieces, weight, bias, resample=list(case.modes), activation=case.activation, backend="reference"
        )
        want = _plain_3d(pieces, case.modes, weight, bias, case.activation)
        assert relative_error(out, want) < 1e-12

    check()
