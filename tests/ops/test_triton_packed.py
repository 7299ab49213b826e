"""The packed forward (im2col packed into K, for few input channels) against the fp64 reference.

CPU tensors under TRITON_INTERPRET=1 (or a GPU). Every output the launcher allocates starts as
NaN, so an element the kernel fails to write fails the comparison. The launcher is called
directly (fused_conv_forward routes to it once wired); the launch plan is checked with a
recording runtime: one compile, every pointer re-read per call, a new plan per new metadata.
"""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.testing import TOLERANCE, ConvCase, reference_of, relative_error
from unetpp_fast.ops.triton import launch_common
from unetpp_fast.ops.triton.fused_conv_forward_packed import (
    MAX_PACKED_K,
    fused_conv_forward_packed,
    packed_block_k,
    packed_forward_applies,
)

NONE = [conv_spec.NONE]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launcher allocates for the kernel to write starts as NaN."""
    real = launch_common.empty_output

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(launch_common, "empty_output", poisoned)


def _weight_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The weight as stored: dense, channels_last (C_in contiguous) or a non-contiguous view."""
    if layout == "channels_last":
        return weight.contiguous(memory_format=conv_spec.channels_last_format(weight.dim()))
    if layout == "strided":
        wide = torch.empty(weight.shape[0], 2 * weight.shape[1], *weight.shape[2:]).to(weight)
        view = wide[:, 1::2]
        view.copy_(weight)
        return view
    return weight


def _check(case: ConvCase, weight_layout: str = "dense") -> torch.Tensor:
    if backends.why_unusable("triton", _device()):
        pytest.skip(backends.why_unusable("triton", _device()))
    pieces, weight, bias = case.make(_device(), requires_grad=False)
    weight = _weight_layout(weight, weight_layout)
    assert packed_forward_applies(pieces, NONE, weight)
    out = fused_conv_forward_packed(pieces, NONE, weight, bias, case.activation)
    want, _ = reference_of(case, backward=False)
    err = relative_error(out, want)
    assert err <= TOLERANCE[case.dtype], f"relative error {err:.3g} for {case}, weight {weight_layout}"
    assert out.dtype == case.dtype
    assert out.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    return out


# (channels, k, out size): the RGB input conv, k = 1, one channel, two K blocks (K 63, 61, 33).
# The other knobs (batch, C_out, activation, bias, weight layout) rotate with the index.
CASES_2D = [
    pytest.param(0, 3, 3, (5, 7), id="rgb-k3-odd"),
    pytest.param(1, 3, 1, (6, 4), id="rgb-k1"),
    pytest.param(2, 1, 3, (4, 9), id="c1-k3"),
    pytest.param(3, 7, 3, (5, 5), id="c7-k3-K63"),
    pytest.param(4, 61, 1, (3, 5), id="c61-k1-K61"),
    pytest.param(5, 33, 1, (4, 3), id="c33-k1-K33"),
]


@pytest.mark.parametrize(("index", "channels", "k", "out_hw"), CASES_2D)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_2d_matches_reference(index, channels, k, out_hw, layout):
    case = ConvCase(
        batch=(1, 3)[index % 2],
        channels=[channels],
        modes=["none"],
        out_hw=out_hw,
        c_out=(5, 32, 3)[index % 3],
        k=k,
        layout=layout,
        activation=("relu", "none", "leaky_relu:0.1")[index % 3],
        bias=index % 4 != 3,
        seed=index,
    )
    _check(case, weight_layout=("dense", "channels_last", "strided")[index % 3])


# bf16 on a GPU only: the interpreter's bf16 dot is wrong (as in test_triton_interpret.py).
DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.cuda), torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_layout", ["dense", "channels_last", "strided"])
def test_dtypes_and_weight_layouts(dtype, weight_layout):
    case = ConvCase(
        batch=2, channels=[3], modes=["none"], out_hw=(7, 6), c_out=6, k=3, dtype=dtype,
        layout="channels_last", activation="leaky_relu:0.2", seed=7,
    )  # fmt: skip
    _check(case, weight_layout)


def test_several_pixel_and_channel_tiles():
    """More pixels than one BLOCK_M (a partial last tile) and more output channels than one BLOCK_N."""
    case = ConvCase(batch=3, channels=[3], modes=["none"], out_hw=(9, 11), c_out=45, k=3, seed=11)
    _check(case)


# 3D: the 3D UNet++ input conv (1 channel, 27 taps), two channels (K 54, two blocks), k = 1.
CASES_3D = [
    pytest.param(1, 3, (3, 4, 5), "nchw", id="c1-k3"),
    pytest.param(2, 3, (4, 3, 3), "channels_last", id="c2-k3-K54"),
    pytest.param(3, 1, (2, 3, 5), "strided", id="c3-k1"),
    pytest.param(1, 3, (3, 3, 3), "strided", id="c1-k3-strided"),
]


@pytest.mark.parametrize(("channels", "k", "out_dhw", "layout"), CASES_3D)
def test_3d_matches_reference(channels, k, out_dhw, layout):
    case = ConvCase(
        batch=2, channels=[channels], modes=["none"], out_hw=out_dhw, c_out=4, k=k, layout=layout,
        activation="relu", bias=channels != 2, seed=3 + channels,
    )  # fmt: skip
    _check(case, weight_layout="channels_last" if channels == 2 else "dense")


def test_applies_only_to_one_plain_piece_with_a_small_reduction():
    x = torch.randn(1, 3, 4, 4)
    w3 = torch.randn(8, 3, 3, 3)
    assert packed_forward_applies([x], NONE, w3)
    assert not packed_forward_applies([x], [conv_spec.UP_NEAREST], w3)  # a resampled piece
    assert not packed_forward_applies([x, x], NONE * 2, torch.randn(8, 6, 3, 3))  # two pieces
    assert packed_forward_applies([torch.randn(1, 7, 4, 4)], NONE, torch.randn(8, 7, 3, 3))  # K 63
    assert not packed_forward_applies([torch.randn(1, 8, 4, 4)], NONE, torch.randn(8, 8, 3, 3))  # K 72
    assert not packed_forward_applies([torch.randn(1, 65, 4, 4)], NONE, torch.randn(8, 65, 1, 1))  # K 65
    assert MAX_PACKED_K == 64
    # 1x1 over whole 16-byte channel vectors (a head): the main forward's vector loads do better.
    assert not packed_forward_applies([torch.randn(1, 32, 4, 4)], NONE, torch.randn(1, 32, 1, 1))
    assert not packed_forward_applies([torch.randn(1, 8, 4, 4).half()], NONE, torch.randn(1, 8, 1, 1).half())
    assert packed_forward_applies([torch.randn(1, 12, 4, 4).half()], NONE, torch.randn(1, 12, 1, 1).half())
    assert not packed_forward_applies([torch.randn(1, 3, 4, 4)], NONE, torch.randn(8, 3, 5, 5))  # k = 5
    assert not packed_forward_applies([x], NONE, w3.double())
    assert not packed_forward_applies([torch.randn(1, 0, 4, 4)], NONE, torch.randn(8, 0, 3, 3))  # K 0
    x3 = torch.randn(1, 1, 4, 4, 4)
    assert packed_forward_applies([x3], NONE, torch.randn(8, 1, 3, 3, 3))  # 27 taps
    assert packed_forward_applies([x3], NONE, torch.randn(8, 2, 3, 3, 3))  # K 54
    assert not packed_forward_applies([x3], NONE, torch.randn(8, 3, 3, 3, 3))  # K 81


def test_block_k_covers_the_reduction_in_one_or_two_blocks():
    assert [packed_block_k(k) for k in (1, 3, 16, 17, 27, 32)] == [16, 16, 16, 32, 32, 32]
    assert [packed_block_k(k) for k in (33, 54, 64)] == [32, 32, 32]


def test_a_call_it_does_not_take_is_a_clear_error():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"pieces: the packed forward takes one piece of mode 'none'"):
        fused_conv_forward_packed([x], [conv_spec.MAXPOOL2], torch.randn(4, 3, 3, 3), None, "none")


def test_an_empty_batch_gives_an_empty_output():
    out = fused_conv_forward_packed([torch.randn(0, 3, 4, 4)], NONE, torch.randn(4, 3, 3, 3), None, "relu")
    assert out.shape == (0, 4, 4, 4)


class _Recorder:
    """A compiling runtime that compiles and runs nothing: it records what would be launched."""

    name, runs_gpu_path_on_cpu = "recorder", True

    def __init__(self):
        self.compiled, self.launched = [], []

    def compile(self, kernel, args, constexprs, config):
        self.compiled.append(dict(constexprs, **config.kwargs))
        return kernel

    def launch(self, compiled, grid, args):
        assert len(args) == len(compiled.arg_names) and len(grid) == 3
        self.launched.append(dict(zip(compiled.arg_names, args), grid=grid))

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


@pytest.mark.parametrize("dims", [2, 3])
def test_launch_plan_rereads_every_pointer_and_never_goes_stale(recorder, dims):
    """The plan is keyed on metadata only: new tensors of the same metadata launch with their own
    addresses and compile nothing new; new strides make a new plan with those strides."""
    spatial = (5, 6, 7)[3 - dims :]
    channels = 3 if dims == 2 else 2  # K 27 / 54: one block of 32 / two

    def make():
        return torch.randn(2, channels, *spatial), torch.randn(8, channels, *[3] * dims), torch.randn(8)

    piece, weight, bias = make()
    fused_conv_forward_packed([piece], NONE, weight, bias, "relu")
    assert len(recorder.compiled) == 1
    first = recorder.compiled[0]
    assert (first["DIMS"], first["C_IN"], first["KSIZE"], first["BLOCK_K"]) == (dims, channels, 3, 32)
    for _ in range(2):
        piece, weight, bias = make()
        out = fused_conv_forward_packed([piece], NONE, weight, bias, "relu")
        args = recorder.launched[-1]
        assert len(recorder.compiled) == 1
        assert args["out_ptr"] is out and args["x_ptr"] is piece and args["w_ptr"] is weight
        assert args["b_ptr"] is bias
        # One CTA per BLOCK_H x BLOCK_W block of each (image, depth) plane.
        planes = 2 * (spatial[0] if dims == 3 else 1)
        blocks = -(-spatial[-2] // first["BLOCK_H"]) * -(-spatial[-1] // first["BLOCK_W"])
        assert args["grid"] == (planes * blocks, 1, 1)
    view = piece.transpose(-1, -2)  # same storage, new strides (and shape): a new plan
    out = fused_conv_forward_packed([view], NONE, weight, bias, "relu")
    args = recorder.launched[-1]
    assert (args["sx_h"], args["sx_w"]) == (view.stride(-2), view.stride(-1))
    assert args["so_w"] == out.stride(-1) and args["x_ptr"] is view


def test_a_caller_can_hand_over_the_main_forwards_plan_key(recorder):
    """fused_conv_forward builds the same metadata key: handed over, it finds the same plan (no new
    compile) and launches with the call's own tensors."""
    from unetpp_fast.ops.triton import fused_conv_forward as main

    piece, weight, bias = torch.randn(2, 3, 5, 6), torch.randn(8, 3, 3, 3), torch.randn(8)
    fused_conv_forward_packed([piece], NONE, weight, bias, "relu")
    key = main._plan_key([piece], NONE, weight, bias, "relu")
    other = torch.randn(2, 3, 5, 6)
    out = fused_conv_forward_packed([other], NONE, weight, bias, "relu", key=key)
    assert len(recorder.compiled) == 1
    assert recorder.launched[-1]["x_ptr"] is other and recorder.launched[-1]["out_ptr"] is out


def test_launch_plan_follows_the_tf32_switch(recorder):
    piece, weight = torch.randn(1, 3, 4, 4), torch.randn(4, 3, 3, 3)
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        fused_conv_forward_packed([piece], NONE, weight, None, "none")
        assert recorder.launched[-1]["PRECISION"] == "ieee"
        matmul.allow_tf32 = True
        fused_conv_forward_packed([piece], NONE, weight, None, "none")
        assert recorder.launched[-1]["PRECISION"] == "tf32"
    finally:
        matmul.allow_tf32 = saved
