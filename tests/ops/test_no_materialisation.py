"""The fused backends never materialise the concatenation or a resampled piece, forward or backward.

A TorchDispatchMode sees the custom operator as one call, so it could not catch an operator that
concatenates internally; torch.profiler records the nested aten ops and every allocation.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import unetpp_fast
from unetpp_fast.ops import backends

FORBIDDEN_OPS = ("aten::cat", "aten::upsample", "aten::_upsample", "aten::max_pool2d", "aten::im2col")


def _largest_allocation(events) -> int:
    """The most memory any one op allocated itself (not counting its children)."""
    return max((e.self_cpu_memory_usage for e in events), default=0)


def _node_inputs(size: int = 8):
    """A dense skip node: thin full-resolution pieces and a wide one upsampled on the fly."""
    torch.manual_seed(0)
    x00 = torch.randn(2, 4, size, size, requires_grad=True)
    x10 = torch.randn(2, 40, size // 2, size // 2, requires_grad=True)
    x01 = torch.randn(2, 4, size, size, requires_grad=True)
    weight = torch.randn(8, 48, 3, 3, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    return [x00, x01, x10], ["none", "none", "up_bilinear_ac"], weight, bias


# The C++ backend works through bounded tiles of the virtual input (at most kChunkBytes = 8 MiB, in
# csrc/cpu/fused_conv_cpu.cpp): at 256x256 the upsampled piece (21 MB) is larger than any tile, so a
# materialised piece (or the whole virtual input) would stand out. The Triton interpreter is too
# slow for large sizes and allocates no tile at all.
@pytest.mark.parametrize("backend, size", [("cpu", 256), ("triton", 8)])
def test_fused_backend_runs_no_cat_resample_or_large_allocation(backend, size):
    reason = backends.why_unusable(backend, "cpu")
    if reason:
        pytest.skip(reason)
    pieces, modes, weight, bias = _node_inputs(size)
    itemsize = pieces[0].element_size()
    n, _, h, w = pieces[0].shape
    # Anything this large could only be the upsampled wide piece (or the whole virtual input).
    upsampled_bytes = n * pieces[2].shape[1] * h * w * itemsize
    with unetpp_fast.use_backend(backend):
        unetpp_fast.fused_conv(pieces, weight, bias, resample=modes)  # warm-up: compile, load
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes)
            out.backward(torch.randn_like(out))
    events = prof.events()
    names = {e.name for e in events}
    assert not [name for name in names if name.startswith(FORBIDDEN_OPS)], sorted(names)
    largest = _largest_allocation(events)
    assert largest < upsampled_bytes, (
        f"an allocation of {largest} B >= the upsampled piece ({upsampled_bytes} B)"
    )


def test_reference_backend_is_seen_materialising():
    """The same check catches the reference backend, so it can fail."""
    pieces, modes, weight, bias = _node_inputs()
    with unetpp_fast.use_backend("reference"):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes)
            out.backward(torch.randn_like(out))
    names = {e.name for e in prof.events()}
    assert "aten::cat" in names and any(n.startswith("aten::upsample") for n in names)
    n, _, h, w = pieces[0].shape
    assert _largest_allocation(prof.events()) >= n * pieces[2].shape[1] * h * w * pieces[0].element_size()
