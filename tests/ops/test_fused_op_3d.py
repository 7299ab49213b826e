"""The operator in 3D: 5-D pieces [N, C, D, H, W], a 5-D weight, trilinear / 2x2x2 resamples.

Compared in fp64 with the definition written in plain PyTorch (cat + interpolate(trilinear) +
max_pool3d + conv3d), forward and every gradient; gradcheck, opcheck, fuzzing, backend selection.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops import flops as _flops  # noqa: F401  (registers the FLOP formula)
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference, relative_error

MODES_3D = conv_spec.RESAMPLE_MODES_3D
OUT_DHW = (2, 4, 6)


def _piece(batch, channels, mode, channels_last=False, grad=True):
    """A random fp64 piece whose size after `mode` is OUT_DHW; max-pooled pieces have odd sizes."""
    if mode == "maxpool2":
        size = [2 * s + 1 for s in OUT_DHW]
    elif mode != "none":
        size = [s // 2 for s in OUT_DHW]
    else:
        size = list(OUT_DHW)
    t = torch.randn(batch, channels, *size, dtype=torch.float64)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last_3d)
    return t.requires_grad_(grad)


def _plain(pieces, modes, weight, bias, activation):
    """The 3D definition, written independently of the package."""
    ups = {
        "none": lambda t: t,
        "up_nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        "up_trilinear": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=False),
        "up_trilinear_ac": lambda t: F.interpolate(t, scale_factor=2, mode="trilinear", align_corners=True),
        "maxpool2": lambda t: F.max_pool3d(t, 2),
    }
    x = torch.cat([ups[m](p) for p, m in zip(pieces, modes)], 1)
    y = F.conv3d(x, weight, bias, padding=weight.shape[-1] // 2)
    if activation.startswith("leaky_relu:"):
        return F.leaky_relu(y, float(activation.split(":")[1]))
    return {"none": y, "relu": F.relu(y)}[activation]


@pytest.mark.parametrize("modes", [[m] for m in MODES_3D] + [list(MODES_3D)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_3d_matches_plain_pytorch_forward_and_every_gradient(modes, k, channels_last):
    torch.manual_seed(len(modes) * 10 + k + 100 * channels_last)
    channels = [3, 2, 2, 4, 1][: len(modes)]
    pieces = [_piece(2, c, m, channels_last) for c, m in zip(channels, modes)]
    weight = torch.randn(4, sum(channels), k, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    activation = "leaky_relu:0.2" if k == 3 else "relu"
    out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, activation=activation)
    want = _plain(pieces, modes, weight, bias, activation)
    assert out.shape == (2, 4, *OUT_DHW)
    assert relative_error(out, want) < 1e-12
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*pieces, weight, bias], grad)
    expected = torch.autograd.grad(want, [*pieces, weight, bias], grad)
    for index, (g, w) in enumerate(zip(got, expected)):
        assert g.shape == w.shape
        assert relative_error(g, w) < 1e-10, f"gradient {index}"
    for g, p in zip(got, pieces):  # gradients take each piece's own memory format
        assert g.is_contiguous(memory_format=conv_spec.output_memory_format(p))


def test_codes_and_names_mean_the_same_in_3d():
    pieces = [_piece(1, 2, "up_trilinear", grad=False)]
    weight = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    by_name = unetpp_fast.fused_conv(pieces, weight, resample=["up_trilinear_ac"])
    by_code = unetpp_fast.fused_conv(pieces, weight, resample=[conv_spec.UP_BILINEAR_AC])
    raw = torch.ops.unetpp_fast.fused_conv(pieces, [3], weight, None, "relu")
    assert torch.equal(by_name, by_code) and torch.equal(by_name, raw)


def test_gradcheck_3d_all_modes():
    torch.manual_seed(0)
    small = (2, 2, 2)
    sizes = {"none": small, "maxpool2": (5, 4, 5)}
    pieces = [
        torch.randn(1, 1, *sizes.get(m, (1, 1, 1)), dtype=torch.float64, requires_grad=True) for m in MODES_3D
    ]
    weight = torch.randn(2, 5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        *ps, w, b = args
        return unetpp_fast.fused_conv(ps, w, b, resample=list(MODES_3D), activation="leaky_relu:0.1")

    assert torch.autograd.gradcheck(fn, (*pieces, weight, bias))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_3d(requires_grad, channels_last):
    torch.manual_seed(1)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    pieces = [
        torch.randn(2, 3, 2, 4, 4).to(memory_format=fmt).requires_grad_(requires_grad),
        torch.randn(2, 2, 1, 2, 2).to(memory_format=fmt).requires_grad_(requires_grad),
        torch.randn(2, 2, 5, 8, 9).to(memory_format=fmt).requires_grad_(requires_grad),
    ]
    weight = torch.randn(4, 7, 3, 3, 3, requires_grad=requires_grad)
    bias = torch.randn(4, requires_grad=requires_grad)
    opcheck(torch.ops.unetpp_fast.fused_conv.default, (pieces, [0, 2, 4], weight, bias, "relu"))


def test_fake_tensor_shape_and_format_3d():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(2, 3, 4, 6, 6).contiguous(memory_format=torch.channels_last_3d)
        b = torch.empty(2, 2, 2, 3, 3)
        w = torch.empty(5, 5, 3, 3, 3)
        out = torch.ops.unetpp_fast.fused_conv([a, b], [0, 1], w, None, "relu")
    assert out.shape == (2, 5, 4, 6, 6)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_compile_fullgraph_3d():
    torch.manual_seed(2)
    a = torch.randn(1, 2, 2, 4, 4, requires_grad=True)
    b = torch.randn(1, 2, 1, 2, 2, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, 3, requires_grad=True)

    def fn(a, b, w):
        return unetpp_fast.fused_conv([a, b], w, resample=["none", "up_trilinear"]).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(a, b, w)
    got_grads = torch.autograd.grad(got, [a, b, w])
    want = fn(a, b, w)
    want_grads = torch.autograd.grad(want, [a, b, w])
    assert torch.allclose(got, want)
    for g, e in zip(got_grads, want_grads):
        assert torch.allclose(g, e, atol=1e-5)


def test_forward_ad_jvp_3d_with_maxpool():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 4, 4, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
    tx, tw = torch.randn_like(x), torch.randn_like(w)

    def fused(x, w):
        return unetpp_fast.fused_conv([x], w, resample=["maxpool2"], activation="leaky_relu:0.1")

    def plain(x, w):
        return F.leaky_relu(F.conv3d(F.max_pool3d(x, 2), w, padding=1), 0.1)

    _, got = torch.func.jvp(fused, (x, w), (tx, tw))
    _, want = torch.func.jvp(plain, (x, w), (tx, tw))
    assert relative_error(got, want) < 1e-10


def test_every_backend_declares_3d_and_runs_it():
    for name in ("reference", "cpu", "cuda", "triton"):
        assert backends.capabilities(name).spatial_dims == (2, 3), name
    x = torch.randn(1, 2, 2, 4, 4)
    w = torch.randn(3, 2, 3, 3, 3)
    want = F.relu(F.conv3d(x, w, padding=1))
    for name in backends.available_backends("cpu"):
        assert relative_error(unetpp_fast.fused_conv([x], w, backend=name), want) < 1e-5, name
    assert relative_error(unetpp_fast.fused_conv([x], w), want) < 1e-5


def test_degenerate_shapes_3d():
    x = torch.randn(2, 0, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 0, 3, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = unetpp_fast.fused_conv([x], w, b, activation="none")
    assert out.shape == (2, 3, 2, 4, 4)
    assert torch.equal(out, b.detach().reshape(1, 3, 1, 1, 1).expand_as(out))
    out.sum().backward()
    assert torch.equal(b.grad, torch.full((3,), 2.0 * 2 * 4 * 4))
    empty = unetpp_fast.fused_conv([torch.randn(0, 2, 2, 4, 4)], torch.randn(3, 2, 1, 1, 1))
    assert empty.shape == (0, 3, 2, 4, 4)


def test_flops_3d_equal_conv3d_on_the_materialised_input():
    x = torch.randn(1, 4, 4, 6, 6)
    skip = torch.randn(1, 2, 2, 3, 3)
    w = torch.randn(5, 6, 3, 3, 3)
    with FlopCounterMode(display=False) as fused:
        unetpp_fast.fused_conv([x, skip], w, resample=["none", "up_trilinear"])
    virtual = torch.cat([x, F.interpolate(skip, scale_factor=2, mode="trilinear")], 1)
    with FlopCounterMode(display=False) as plain:
        F.conv3d(virtual, w, padding=1)
    assert fused.get_total_flops() == plain.get_total_flops() == 2 * 5 * 6 * 27 * 4 * 6 * 6


# --- the C++ CPU backend in 3D (one code path with 2D: D = 1 is the 2D case) ----------------------


def _cpu_or_skip() -> None:
    reason = backends.why_unusable("cpu", "cpu")
    if reason:
        pytest.skip(f"native 'cpu' backend: {reason}")


@pytest.mark.parametrize("modes", [[m] for m in MODES_3D] + [list(MODES_3D)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_3d_matches_reference_all_modes(modes, k, layout, dtype):
    _cpu_or_skip()
    case = ConvCase(
        batch=2,
        channels=[3, 2, 1, 2, 2][: len(modes)],
        modes=modes,
        out_hw=(2, 4, 6),
        c_out=3,
        k=k,
        dtype=dtype,
        layout=layout,
        activation="leaky_relu:0.1",
        seed=len(modes) + 10 * k,
    )
    assert_matches_reference(case, "cpu")


def test_cpu_backend_3d_half_precision_computes_in_fp32():
    _cpu_or_skip()
    for dtype in (torch.float16, torch.bfloat16):
        case = ConvCase(2, [2, 3], ["none", "up_trilinear"], (2, 4, 4), 3, 3, dtype=dtype, seed=3)
        assert_matches_reference(case, "cpu")


def test_cpu_backend_3d_gradcheck_and_opcheck():
    _cpu_or_skip()
    torch.manual_seed(7)
    pieces = [
        torch.randn(1, 1, 2, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 1, 1, 1, 1, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 1, 1, 1, 1, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 1, 5, 4, 5, dtype=torch.float64, requires_grad=True),
    ]
    modes = ["none", "up_nearest", "up_trilinear_ac", "maxpool2"]
    weight = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        *ps, w, b = args
        return unetpp_fast.fused_conv(ps, w, b, resample=modes, activation="leaky_relu:0.1", backend="cpu")

    assert torch.autograd.gradcheck(fn, (*pieces, weight, bias))
    with unetpp_fast.use_backend("cpu"):
        opcheck(torch.ops.unetpp_fast.fused_conv.default, (pieces, [0, 1, 3, 4], weight, bias, "relu"))


def test_cpu_backend_3d_maxpool_nan_and_ties_follow_pytorch():
    _cpu_or_skip()
    x = torch.zeros(1, 2, 4, 4, 4, dtype=torch.float64)  # ties everywhere: the first wins
    x[0, 0, 1, 0, 1] = float("nan")  # NaN wins its window
    x[0, 1, 3, 3, 2] = 5.0
    x.requires_grad_(True)
    w = torch.randn(2, 2, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    got = unetpp_fast.fused_conv([x], w, resample=["maxpool2"], activation="none", backend="cpu")
    want = F.conv3d(F.max_pool3d(x, 2), w)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(got, [x], g)
    (wx,) = torch.autograd.grad(want, [x], g)
    assert torch.equal(gx.isnan(), wx.isnan()) and torch.equal(gx.nan_to_num(), wx.nan_to_num())


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda: ([torch.randn(1, 2, 2, 4, 4), torch.randn(1, 1, 4, 4)], [0, 0]), r"pieces\[1\] must be 5-D"),
        (lambda: ([torch.randn(1, 3, 1, 4, 4)], [4]), r"output spatial size would be 0x2x2"),
        (
            lambda: ([torch.randn(1, 1, 2, 4, 4), torch.randn(1, 2, 1, 2, 3)], [0, 2]),
            r"'up_trilinear' becomes 2x4x6",
        ),
    ],
)
def test_cpu_operator_refuses_bad_3d_input(args, message):
    _cpu_or_skip()
    pieces, codes = args()
    with pytest.raises(ValueError, match=message):
        torch.ops.unetpp_fast_C.fused_conv_forward(pieces, codes, torch.randn(2, 3, 3, 3, 3), None, "relu")
