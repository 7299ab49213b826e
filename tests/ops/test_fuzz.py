"""Hypothesis fuzzing of every CPU-capable backend against the fp64 reference, forward and backward.

Bounded for CI; `pytest --long tests/test_fuzz.py` runs a thousand cases per backend.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference

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
