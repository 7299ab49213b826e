"""Host-side pieces of the Triton launchers that need neither a GPU nor the interpreter.

The descriptor table is cached by its content (so it can never describe old tensors), the tuning
key buckets the pixel count, and the stored tuning is keyed on the candidate configs too.
"""

from __future__ import annotations

import struct

import pytest
import torch

pytest.importorskip("triton")

from unetpp_fast.ops import conv_spec  # noqa: E402
from unetpp_fast.ops.triton import launch_common  # noqa: E402


def test_table_rows_describe_each_piece():
    a = torch.randn(2, 3, 8, 6)
    b = torch.randn(2, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    rows = launch_common.piece_rows([a, b], [conv_spec.NONE, conv_spec.UP_BILINEAR_AC])
    assert len(rows) == 2 * launch_common.ROW
    first = dict(zip(launch_common.TABLE_FIELDS, rows[: launch_common.ROW]))
    second = dict(zip(launch_common.TABLE_FIELDS, rows[launch_common.ROW :]))
    assert first["address"] == a.data_ptr() and second["address"] == b.data_ptr()
    assert (second["stride_n"], second["stride_c"], second["stride_h"], second["stride_w"]) == b.stride()
    assert (second["height"], second["width"], second["channels"]) == (4, 3, 5)
    assert (first["channel_offset"], second["channel_offset"]) == (0, 3)
    assert (first["mode"], second["mode"]) == (conv_spec.NONE, conv_spec.UP_BILINEAR_AC)
    # The align-corners scale travels as fp32 bits, computed in fp32 as PyTorch does.
    scale_h = struct.unpack("<f", struct.pack("<i", second["scale_h_bits"]))[0]
    expected = (torch.tensor(3.0, dtype=torch.float32) / torch.tensor(7.0, dtype=torch.float32)).item()
    assert scale_h == expected
    assert first["scale_h_bits"] == first["scale_w_bits"] == 0


def test_table_cache_is_keyed_by_content_never_stale():
    a = torch.randn(1, 2, 4, 4)
    b = torch.randn(1, 2, 4, 4)
    table_a = launch_common.piece_table([a], [conv_spec.NONE])
    assert launch_common.piece_table([a], [conv_spec.NONE]) is table_a  # a hit: no new table
    table_b = launch_common.piece_table([b], [conv_spec.NONE])
    assert table_b[0].item() == b.data_ptr() != table_a[0].item()
    # Same tensor, another view (new strides): another table.
    view = a.transpose(2, 3)
    assert launch_common.piece_table([view], [conv_spec.NONE])[3].item() == view.stride(2)
    # Same tensor, another mode: another table.
    assert launch_common.piece_table([a], [conv_spec.MAXPOOL2])[8].item() == conv_spec.MAXPOOL2


def test_pixel_buckets_are_powers_of_four():
    buckets = [launch_common.pixel_bucket(p) for p in (1, 4096, 4097, 16 * 96 * 96, 8 * 128 * 128, 2**40)]
    assert buckets == [4096, 4096, 16384, 262144, 262144, 2**28]


def test_stored_tuning_is_keyed_on_the_candidate_configs(tmp_path, monkeypatch):
    """An index stored for one config list is never applied to another."""
    from triton import Config

    class Bench:
        name, runs_gpu_path_on_cpu = "fake", True

        def __init__(self):
            self.timed = 0

        def compile(self, kernel, args, constexprs, config):
            return config

        def launch(self, compiled, grid, args):
            pass

        def bench(self, fn):
            self.timed += 1
            return float(self.timed)

        def device_name(self, device):
            return "fake"

    monkeypatch.setenv("UNETPP_FAST_CACHE_DIR", str(tmp_path))
    kernel = type("K", (), {"arg_names": ["x", "BLOCK"]})()
    first = [Config({"BLOCK": 16}), Config({"BLOCK": 32})]
    second = [Config({"BLOCK": 64}), Config({"BLOCK": 128})]
    device = torch.device("cpu")
    previous = launch_common.set_runtime(Bench())
    try:
        key = (torch.bfloat16, (("KSIZE", 3),))
        tkey = ("k", key, "memory_bound", 4096, None)
        # A new process (fresh runtime) times the first list, then re-uses it, but times the second.
        for listed, expected_timings in ((first, 2), (first, 0), (second, 2)):
            runtime = Bench()
            launch_common.set_runtime(runtime)
            index, settled = launch_common._tune(
                runtime, kernel, "k", key, tkey, listed, lambda meta: (1,), device, (1,), {}
            )
            assert runtime.timed == expected_timings
            assert settled and index == 0  # the fake timings rise: the first config is fastest
    finally:
        launch_common.set_runtime(previous)
