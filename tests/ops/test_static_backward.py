"""The static estimate of the tensor-core fused backward (unetpp_fast/ops/static_backward.py).

The arithmetic on hand-made loop costs (CTA and trip counts, padded tile FLOPs, the floor), and the
SASS of the built extension: each backward kernel has one tensor-core hot loop fed by cp.async
(LDGSTS) and ldmatrix (LDSM) with 16 HMMA per trip (a 64 x 64 x 32 tile over 4 warps), no spills.
"""

from __future__ import annotations

import math

import pytest

from unetpp_fast.ops import conv_spec, static_backward, static_model
from unetpp_fast.ops.static_model import ConvShape

TILE_FLOPS = 2 * 64 * 64 * 32


def costs(per_trip: float = 100.0, longest: float = 300.0, outside: float = 50.0):
    return {
        name: static_backward.LoopCost(
            name, per_trip, longest, outside, TILE_FLOPS, warps=static_backward.WARPS[name]
        )
        for name in static_backward.KERNELS
    }


def shape(pieces, c_out=64, k=3, out_hw=(64, 64), batch=2):
    c_in = sum(c for c, *_ in pieces)
    flops = 2 * batch * out_hw[0] * out_hw[1] * c_out * c_in * k * k
    return ConvShape("node", batch, tuple(pieces), c_out, k, out_hw[0], out_hw[1], flops, 1)


def test_dgrad_and_wgrad_counts_follow_the_tiles():
    node = shape([(64, 64, 64, conv_spec.NONE)])
    row = static_backward.estimate_backward(node, costs())
    pixels = 2 * 64 * 64
    dgrad_ctas, trips = pixels // 64, 9 * 2  # 64 channels: one tile; C_out 64: 2 K blocks per tap
    issue = static_backward.WARPS["dgrad_kernel"] * (dgrad_ctas * trips * 100.0 + dgrad_ctas * 50.0)
    sms = min(dgrad_ctas, static_model.SMS)  # 128 CTAs keep 128 SMs busy
    issue_s = issue / (sms * static_model.ISSUE_PER_SM_PER_CLOCK * static_model.CLOCK_HZ)
    tensor_s = dgrad_ctas * trips * TILE_FLOPS / (static_model.TENSOR_FLOPS * sms / static_model.SMS)
    memory_s = (2 * pixels * 64 * 2 + 64 * 64 * 9 * 2) / static_model.HBM_BYTES_PER_S  # g, piece grad, weight
    assert row["kernels"]["dgrad[0]"] == pytest.approx(max(issue_s, tensor_s, memory_s) * 1e3, rel=1e-6)
    splits = static_backward.wgrad_splits(node)
    assert splits == min(math.ceil(264 / 3), math.ceil(2 * 64 * 2 / 8))  # 3 kernel rows; 2 segments per row
    assert row["splits"] == splits and row["qualifies"]
    assert row["floor_ms"] == pytest.approx(2 * node.flops / static_model.TENSOR_FLOPS * 1e3)
    assert row["estimate_ms"] == pytest.approx(sum(row["kernels"].values()), rel=1e-3)


def test_resampled_channels_cost_the_longer_wgrad_path():
    plain = static_backward.estimate_backward(shape([(64, 64, 64, conv_spec.NONE)]), costs())
    pooled = static_backward.estimate_backward(shape([(64, 128, 128, conv_spec.MAXPOOL2)]), costs())
    assert pooled["issue_ms"] > plain["issue_ms"]
    bilinear = static_backward.estimate_backward(shape([(64, 32, 32, conv_spec.UP_BILINEAR_AC)]), costs())
    assert "dgrad[0]" in bilinear["kernels"] and bilinear["tensor_ms"] > plain["tensor_ms"]  # support rows


def test_channel_counts_off_the_vector_width_do_not_qualify():
    row = static_backward.estimate_backward(shape([(3, 64, 64, conv_spec.NONE)], c_out=32), costs())
    assert not row["qualifies"]


def test_the_built_kernels_hot_loops_are_cp_async_ldmatrix_mma():
    from unetpp_fast.ops.kernel_resources import extension_library_path, find_cuobjdump, kernel_resources
    from unetpp_fast.ops.sass import disassemble, hot_loops, parse_sass

    library, tool = extension_library_path(), find_cuobjdump()
    if library is None or tool is None:
        pytest.skip("needs the built extension and cuobjdump")
    try:
        text = disassemble(library, tool, "sm_90")
    except RuntimeError as error:
        pytest.skip(f"no sm_90 code in the extension: {error}")
    if "dgrad_kernel" not in text:
        pytest.skip("the extension was built without CUDA kernels")
    found = static_backward.kernel_costs(text)
    assert set(found) == set(static_backward.KERNELS)
    for name, cost in found.items():  # the k = 3 wgrad runs 3 taps' MMAs per trip
        assert cost.tensor_flops_per_trip == TILE_FLOPS * (3 if name == "wgrad_kernel_k3" else 1), cost
    for function in parse_sass(text):
        # wgrad: 4 warps of 32 x 32, 16 HMMA per tap, A's LDSM shared by the taps
        if "12wgrad_kernel" in function.name:
            (loop,) = hot_loops(function)
            taps = loop.counts["tensor"] // 16
            assert taps in (1, 3) and loop.counts["tensor"] == 16 * taps, loop
            assert loop.counts["ldgsts"] > 0 and loop.counts["ldsm"] == 8 + 4 * (taps - 1), loop
        elif "12dgrad_kernel" in function.name or "21dgrad_bilinear_kernel" in function.name:
            (loop,) = hot_loops(function)  # 2 warps of 64 x 32: 32 HMMA, 8 + 4 LDSM (A, B) per K block
            assert loop.counts["tensor"] == 32 and loop.counts["ldsm"] == 12, loop
            assert loop.counts["ldgsts"] > 0, loop
    spills = [r for r in kernel_resources(library) if "grad" in r.kernel and r.local_bytes > 0]
    assert not spills, spills


def test_backward_estimate_command_sums_the_network(capsys):
    from unetpp_fast.bench import static_estimate
    from unetpp_fast.ops.kernel_resources import extension_library_path, find_cuobjdump

    if extension_library_path() is None or find_cuobjdump() is None:
        pytest.skip("needs the built extension and cuobjdump")
    assert static_estimate.main(["--backward"]) == 0
    text = capsys.readouterr().out
    report = static_estimate.backward_report()
    for result in report["results"]:
        rows = result["rows"]
        assert result["estimate_ms"] == pytest.approx(sum(r["count"] * r["estimate_ms"] for r in rows))
        assert all(r["estimate_ms"] >= r["floor_ms"] > 0 for r in rows)
        assert f"## {result['size']}x{result['size']}, batch {result['batch']}" in text
    # the RGB input (3 channels) does not take the fused backward, and the report says so
    assert "| X0,0.conv1 (input) | 1 |" in text and "gather + cuDNN" in text


def test_a_wgrad_tile_with_any_resampled_channel_costs_the_longest_path():
    """Every wgrad warp holds all 8 chunks of its 64-channel tile: one resampled chunk makes the whole
    tile take the longest path (no apportioning by channels)."""
    up = conv_spec.UP_BILINEAR_AC
    mixed = shape([(32, 64, 64, conv_spec.NONE), (64, 32, 32, up)])  # tiles [32 + 32 up], [32 up + pad]
    split = shape([(64, 64, 64, conv_spec.NONE), (64, 32, 32, up)])  # tiles [64 plain], [64 up]
    assert static_backward._plain_channel_tiles(mixed) == 0
    assert static_backward._plain_channel_tiles(split) == 1
    assert static_backward._plain_channel_tiles(shape([(128, 64, 64, conv_spec.NONE)])) == 2
    assert static_backward._plain_channel_tiles(shape([(8, 64, 64, conv_spec.UP_NEAREST)])) == 1
    many = costs(per_trip=100.0, longest=10_000.0)  # the issue time decides
    plain_wgrad = static_backward.estimate_backward(split, many)["kernels"]["wgrad"]
    mixed_wgrad = static_backward.estimate_backward(mixed, many)["kernels"]["wgrad"]
    assert mixed_wgrad > 1.5 * plain_wgrad  # same tile count, both tiles on the long path
