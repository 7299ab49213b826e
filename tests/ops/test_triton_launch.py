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
    # 2D is the D = 1 case: depth 1, depth stride 0, no depth scale.
    assert (second["depth"], second["stride_d"], second["scale_d_bits"]) == (1, 0, 0)
    assert (first["channel_offset"], second["channel_offset"]) == (0, 3)
    assert (first["mode"], second["mode"]) == (conv_spec.NONE, conv_spec.UP_BILINEAR_AC)
    # The align-corners scale travels as fp32 bits, computed in fp32 as PyTorch does.
    scale_h = struct.unpack("<f", struct.pack("<i", second["scale_h_bits"]))[0]
    expected = (torch.tensor(3.0, dtype=torch.float32) / torch.tensor(7.0, dtype=torch.float32)).item()
    assert scale_h == expected
    assert first["scale_h_bits"] == first["scale_w_bits"] == 0


def test_table_rows_describe_3d_pieces():
    a = torch.randn(2, 3, 5, 8, 6).contiguous(memory_format=torch.channels_last_3d)
    b = torch.randn(2, 4, 3, 4, 3)
    rows = launch_common.piece_rows([a, b], [conv_spec.MAXPOOL2, conv_spec.UP_BILINEAR_AC])
    first = dict(zip(launch_common.TABLE_FIELDS, rows[: launch_common.ROW]))
    second = dict(zip(launch_common.TABLE_FIELDS, rows[launch_common.ROW :]))
    fields = ("stride_n", "stride_c", "stride_d", "stride_h", "stride_w")
    assert tuple(first[f] for f in fields) == a.stride()
    assert tuple(second[f] for f in fields) == b.stride()
    assert (first["depth"], first["height"], first["width"], first["channels"]) == (5, 8, 6, 3)
    assert (second["depth"], second["channels"], second["channel_offset"]) == (3, 4, 3)
    scale_d = struct.unpack("<f", struct.pack("<i", second["scale_d_bits"]))[0]
    expected = (torch.tensor(2.0, dtype=torch.float32) / torch.tensor(5.0, dtype=torch.float32)).item()
    assert scale_d == expected
    assert first["scale_d_bits"] == 0


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (conv_spec.NONE, (6, 0, 0)),
        (conv_spec.UP_NEAREST, (6, 0, 0)),
        (conv_spec.MAXPOOL2, (0, 6, 0)),
        (conv_spec.UP_BILINEAR, (0, 0, 6)),
        (conv_spec.UP_BILINEAR_AC, (0, 0, 6)),
    ],
)
def test_table_rows_give_the_channels_to_the_read_class_of_the_mode(code, expected):
    """The forward runs one channel loop per read class on these counts: a piece's channels go to
    exactly its class (one source pixel, max-pool window, blend), 0 to the others."""
    rows = launch_common.piece_rows([torch.randn(1, 6, 4, 4)], [code])
    row = dict(zip(launch_common.TABLE_FIELDS, rows))
    assert (row["direct_channels"], row["pool_channels"], row["blend_channels"]) == expected


def test_table_cache_is_keyed_by_content_never_stale():
    a = torch.randn(1, 2, 4, 4)
    b = torch.randn(1, 2, 4, 4)
    table_a = launch_common.piece_table([a], [conv_spec.NONE])
    assert launch_common.piece_table([a], [conv_spec.NONE]) is table_a  # a hit: no new table
    table_b = launch_common.piece_table([b], [conv_spec.NONE])
    assert table_b[0].item() == b.data_ptr() != table_a[0].item()
    # Same tensor, another view (new strides): another table.
    view = a.transpose(2, 3)
    field = launch_common.TABLE_FIELDS.index
    assert launch_common.piece_table([view], [conv_spec.NONE])[field("stride_h")].item() == view.stride(2)
    # Same tensor, another mode: another table.
    assert launch_common.piece_table([a], [conv_spec.MAXPOOL2])[field("mode")].item() == conv_spec.MAXPOOL2


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


class _Recorder:
    """A compiling runtime that compiles and runs nothing: it records what would be launched."""

    name, runs_gpu_path_on_cpu = "recorder", True

    def __init__(self):
        self.compiled, self.launched = [], []

    def compile(self, kernel, args, constexprs, config):
        self.compiled.append(dict(constexprs))
        return kernel

    def launch(self, compiled, grid, args):
        self.launched.append(dict(zip(compiled.arg_names, args)))

    def bench(self, fn):
        fn()
        return 1.0

    def device_name(self, device):
        return "recorder"


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETPP_FAST_CACHE_DIR", str(tmp_path))
    runtime = _Recorder()
    previous = launch_common.set_runtime(runtime)
    yield runtime
    launch_common.set_runtime(previous)


def _rows(table: torch.Tensor) -> list[dict]:
    values = table.tolist()
    row = launch_common.ROW
    return [dict(zip(launch_common.TABLE_FIELDS, values[i : i + row])) for i in range(0, len(values), row)]


@pytest.mark.parametrize("dims", [2, 3])
def test_launch_plan_rereads_every_pointer_and_never_goes_stale(recorder, dims):
    """The per-call launch plan is keyed on metadata only: a call with new tensors of the same
    metadata launches with their addresses (table, output, weight, bias) and compiles nothing new;
    new strides, shapes or modes make a new plan whose table describes them."""
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    spatial = (4, 6, 6)[3 - dims :]
    codes = [conv_spec.NONE, conv_spec.UP_BILINEAR_AC]

    def call(pieces, weight, bias):
        out = fused_conv_forward(pieces, codes, weight, bias, "relu")
        return out, recorder.launched[-1]

    def make():
        pieces = [torch.randn(2, 4, *spatial), torch.randn(2, 4, *[s // 2 for s in spatial])]
        return pieces, torch.randn(3, 8, *[3] * dims), torch.randn(3)

    pieces, weight, bias = make()
    out, args = call(pieces, weight, bias)
    compiles = len(recorder.compiled)
    assert compiles >= 1 and recorder.compiled[0]["DIMS"] == dims
    for _ in range(2):
        pieces, weight, bias = make()
        out, args = call(pieces, weight, bias)
        assert len(recorder.compiled) == compiles  # the plan's compiled kernel, launched directly
        assert args["out_ptr"] is out and args["w_ptr"] is weight and args["b_ptr"] is bias
        rows = _rows(args["table_ptr"])
        assert [r["address"] for r in rows] == [p.data_ptr() for p in pieces]
        assert [launch_common.strides5(p)[2:] for p in pieces] == [
            (r["stride_d"], r["stride_h"], r["stride_w"]) for r in rows
        ]
    # Another view of the same storage (new strides): a new plan describing it.
    view = pieces[0].transpose(-1, -2)
    out, args = call([view, pieces[1]], weight, bias)
    assert _rows(args["table_ptr"])[0]["stride_w"] == view.stride(-1)
    assert args["so_w"] == out.stride(-1)
    # Another mode: a new plan (and table) with that mode.
    codes = [conv_spec.MAXPOOL2, conv_spec.UP_BILINEAR_AC]
    big = torch.randn(2, 4, *[2 * s for s in spatial])
    out, args = call([big, pieces[1]], weight, bias)
    assert _rows(args["table_ptr"])[0]["mode"] == conv_spec.MAXPOOL2
    assert _rows(args["table_ptr"])[0]["address"] == big.data_ptr()


def test_launch_plan_checks_alignment_per_call(recorder):
    """16-byte channel vectors (VEC > 1) depend on the addresses: a view starting one element in
    (same metadata otherwise) launches the VEC = 1 kernel. The weight is channels_last (C_in
    contiguous, as the GPU path lays it out): the forward reads it in vectors too."""
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    # 8 channels: 72 (tap, channel) pairs, past what the packed kernel takes (the main forward runs).
    weight, codes = torch.randn(3, 8, 3, 3).contiguous(memory_format=torch.channels_last), [conv_spec.NONE]
    storage = torch.randn(2 * 8 * 6 * 6 + 1)
    aligned = storage[:-1].view(2, 6, 6, 8).permute(0, 3, 1, 2)  # channels_last, channel stride 1
    shifted = storage[1:].view(2, 6, 6, 8).permute(0, 3, 1, 2)
    assert aligned.stride() == shifted.stride() and aligned.data_ptr() % 16 == 0
    fused_conv_forward([aligned], codes, weight, None, "none")
    assert recorder.launched[-1]["VEC"] == 4
    fused_conv_forward([shifted], codes, weight, None, "none")
    assert recorder.launched[-1]["VEC"] == 1
    assert _rows(recorder.launched[-1]["table_ptr"])[0]["address"] == shifted.data_ptr()
    fused_conv_forward([aligned], codes, weight, None, "none")
    assert recorder.launched[-1]["VEC"] == 4


def test_vector_width_needs_the_weight_in_channel_vectors():
    """The forward reads the weight in 16-byte vectors along C_in only when C_in is contiguous and
    every other weight stride is whole vectors; otherwise VEC = 1 whatever the pieces."""
    piece = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 8, 3, 3)
    assert launch_common.vector_width_if_aligned([piece]) == 4
    assert launch_common.vector_width_if_aligned([piece], weight) == 1  # C_in stride 9
    channels_last = weight.contiguous(memory_format=torch.channels_last)
    assert launch_common.vector_width_if_aligned([piece], channels_last) == 4
    odd_rows = torch.randn(300).as_strided((4, 8, 3, 3), (73, 1, 24, 8))  # C_out stride 73
    assert launch_common.vector_width_if_aligned([piece], odd_rows) == 1


def test_a_piece_beyond_int32_offsets_is_a_clear_error():
    """The kernels address pieces with int32 offsets: a larger piece is refused, named."""
    huge = torch.empty_strided((2, 1, 2**15, 2**16), (2**31, 1, 2**16, 1), device="meta")  # no memory
    with pytest.raises(ValueError, match=r"pieces\[1\] spans .* split the batch"):
        launch_common.piece_rows([torch.randn(1, 1, 2, 2), huge], [conv_spec.NONE, conv_spec.NONE])


def test_launch_plan_follows_the_tf32_switch(recorder):
    """fp32 dots are exact unless TF32 is allowed: flipping the switch between two calls of the
    same metadata launches the other precision (the switch is part of the plan's key)."""
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    piece, weight = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        fused_conv_forward([piece], [conv_spec.NONE], weight, None, "none")
        assert recorder.launched[-1]["PRECISION"] == "ieee"
        matmul.allow_tf32 = True
        fused_conv_forward([piece], [conv_spec.NONE], weight, None, "none")
        assert recorder.launched[-1]["PRECISION"] == "tf32"
    finally:
        matmul.allow_tf32 = saved
