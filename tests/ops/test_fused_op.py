"""The operator's registration, semantics, autograd and backend selection (reference backend)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec

MODES = conv_spec.RESAMPLE_MODES


def _piece(batch: int, channels: int, size: int, mode: str, dtype=torch.float64, grad=False) -> torch.Tensor:
    """A random piece whose size after `mode` is (size, size + 2); maxpool pieces have odd sizes."""
    height, width = size, size + 2
    if mode == "maxpool2":
        height, width = 2 * height + 1, 2 * width + 1
    elif mode != "none":
        height, width = height // 2, width // 2
    return torch.randn(batch, channels, height, width, dtype=dtype).requires_grad_(grad)


def _plain(pieces, modes, weight, bias, activation):
    """The definition, written independently of the package."""
    ups = {
        "none": lambda t: t,
        "up_nearest": lambda t: F.interpolate(t, scale_factor=2, mode="nearest"),
        "up_bilinear": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False),
        "up_bilinear_ac": lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True),
        "maxpool2": lambda t: F.max_pool2d(t, 2),
    }
    x = torch.cat([ups[m](p) for p, m in zip(pieces, modes)], 1)
    y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)
    return {"none": y, "relu": F.relu(y), "leaky_relu:0.2": F.leaky_relu(y, 0.2)}[activation]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("modes", [["none"], ["none", "up_bilinear_ac"], ["maxpool2"], list(MODES)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu:0.2"])
def test_reference_matches_definition_forward_and_backward(modes, k, activation):
    torch.manual_seed(len(modes) * 10 + k)
    channels = [3, 5, 2, 4, 1][: len(modes)]
    pieces = [_piece(2, c, 8, m, grad=True) for c, m in zip(channels, modes)]
    weight = torch.randn(6, sum(channels), k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    with unetpp_fast.use_backend("reference"):
        out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, activation=activation)
    expected = _plain(pieces, modes, weight, bias, activation)
    assert _rel(out, expected) < 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [*pieces, weight, bias], grad)
    want = torch.autograd.grad(expected, [*pieces, weight, bias], grad)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-10


def test_gradcheck_reference_all_modes():
    torch.manual_seed(0)
    pieces = [_piece(1, 2, 4, m, grad=True) for m in MODES]
    weight = torch.randn(3, 10, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        *ps, w, b = args
        return unetpp_fast.fused_conv(
            ps, w, b, resample=list(MODES), activation="leaky_relu:0.1", backend="reference"
        )

    assert torch.autograd.gradcheck(fn, (*pieces, weight, bias))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(requires_grad, channels_last):
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pieces = [
        torch.randn(2, 3, 6, 6).to(memory_format=fmt).requires_grad_(requires_grad),
        torch.randn(2, 4, 3, 3).to(memory_format=fmt).requires_grad_(requires_grad),
    ]
    weight = torch.randn(5, 7, 3, 3, requires_grad=requires_grad)
    bias = torch.randn(5, requires_grad=requires_grad)
    with unetpp_fast.use_backend("reference"):
        opcheck(torch.ops.unetpp_fast.fused_conv.default, (pieces, [0, 2], weight, bias, "relu"))


def test_output_takes_first_piece_memory_format():
    a = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    b = torch.randn(2, 4, 6, 6)
    w = torch.randn(5, 7, 3, 3)
    out = unetpp_fast.fused_conv([a, b], w, backend="reference")
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out = unetpp_fast.fused_conv([b, a], w[:, [3, 4, 5, 6, 0, 1, 2]], backend="reference")
    assert out.is_contiguous()


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(2)
    pieces = [torch.randn(1, 3, 8, 8, requires_grad=True), torch.randn(1, 2, 4, 4, requires_grad=True)]
    weight = torch.randn(4, 5, 3, 3, requires_grad=True)

    def fn(a, b, w):
        return unetpp_fast.fused_conv([a, b], w, resample=["none", "up_nearest"]).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with unetpp_fast.use_backend("reference"):
        got = compiled(*pieces, weight)
        got_grads = torch.autograd.grad(got, [*pieces, weight])
        want = fn(*pieces, weight)
        want_grads = torch.autograd.grad(want, [*pieces, weight])
    assert torch.allclose(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5)


def test_autocast_follows_autocast_dtype():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unetpp_fast.fused_conv([x], w, backend="reference")
    assert out.dtype == torch.bfloat16
    ref = F.relu(F.conv2d(x, w, padding=1))
    assert _rel(out.float(), ref) < 2e-2


def test_empty_batch_gives_empty_output_and_gradients():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    out = unetpp_fast.fused_conv([x], w, backend="reference")
    assert out.shape == (0, 4, 8, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad is not None and torch.all(w.grad == 0)


def test_zero_channel_piece_is_accepted():
    torch.manual_seed(3)
    a, empty = torch.randn(1, 3, 6, 6), torch.randn(1, 0, 3, 3)
    w = torch.randn(2, 3, 3, 3)
    out = unetpp_fast.fused_conv([a, empty], w, resample=["none", "up_bilinear"], backend="reference")
    assert _rel(out, F.relu(F.conv2d(a, w, padding=1))) < 1e-6


def test_non_contiguous_inputs_are_handled():
    torch.manual_seed(4)
    base = torch.randn(1, 6, 10, 10)
    a = base[:, ::2, 1:9, 1:9]  # strided channel and spatial views
    w = torch.randn(2, 3, 3, 3)
    out = unetpp_fast.fused_conv([a], w, backend="reference")
    assert _rel(out, F.relu(F.conv2d(a.contiguous(), w, padding=1))) < 1e-6


class TestBackendSelection:
    def test_reference_is_always_available(self):
        assert "reference" in unetpp_fast.available_backends("cpu")

    def test_auto_never_picks_triton_for_cpu_tensors(self):
        assert backends.resolve_name("cpu", "auto") in ("cpu", "reference")

    def test_context_manager_and_env_var(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        assert backends.requested_backend() == "reference"
        with unetpp_fast.use_backend("auto"):
            assert backends.requested_backend() == "auto"
        assert backends.requested_backend() == "reference"

    def test_forcing_an_unusable_backend_raises(self):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested for cpu tensors"):
            unetpp_fast.fused_conv([torch.randn(1, 1, 4, 4)], torch.randn(1, 1, 3, 3), backend="cuda")

    def test_bad_env_var_names_the_variable(self, monkeypatch):
        monkeypatch.setenv(backends.ENV_VAR, "fastest")
        with pytest.raises(ValueError, match="UNETPP_FAST_BACKEND"):
            unetpp_fast.fused_conv([torch.randn(1, 1, 4, 4)], torch.randn(1, 1, 3, 3))

    def test_unknown_backend_name(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            with unetpp_fast.use_backend("gpu"):
                pass


# --- issue 13, item 2: forward-mode AD and torch.func transforms -------------------------------

TRANSFORM_BACKENDS = ["reference", "cpu"]


def _needs(name: str) -> None:
    if name not in backends.available_backends("cpu"):
        pytest.skip(f"backend {name} unavailable")


def _transform_case(seed: int):
    torch.manual_seed(seed)
    pieces = [_piece(1, 2, 4, m) for m in ("none", "maxpool2", "up_bilinear")]
    weight = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    return pieces, ["none", "maxpool2", "up_bilinear"], weight, bias


@pytest.mark.parametrize("name", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu:0.2"])
def test_func_jvp_matches_conv2d(name, activation):
    _needs(name)
    pieces, modes, weight, bias = _transform_case(5)
    tangents = [torch.randn_like(p) for p in pieces] + [torch.randn_like(weight), torch.randn_like(bias)]

    def fused(*args):
        *ps, w, b = args
        return unetpp_fast.fused_conv(ps, w, b, resample=modes, activation=activation, backend=name)

    def plain(*args):
        *ps, w, b = args
        return _plain(ps, modes, w, b, activation)

    primals = (*pieces, weight, bias)
    out, tangent = torch.func.jvp(fused, primals, tuple(tangents))
    want_out, want_tangent = torch.func.jvp(plain, primals, tuple(tangents))
    assert _rel(out, want_out) < 1e-12
    assert want_tangent.abs().max() > 0.1
    assert _rel(tangent, want_tangent) < 1e-12


@pytest.mark.parametrize("name", TRANSFORM_BACKENDS)
def test_forward_ad_dual_tensors(name):
    import torch.autograd.forward_ad as fwAD

    _needs(name)
    pieces, modes, weight, bias = _transform_case(6)
    t_weight, t_piece = torch.randn_like(weight), torch.randn_like(pieces[1])
    with fwAD.dual_level():
        w_dual = fwAD.make_dual(weight, t_weight)
        p_dual = fwAD.make_dual(pieces[1], t_piece)
        out = unetpp_fast.fused_conv(
            [pieces[0], p_dual, pieces[2]], w_dual, bias, resample=modes, backend=name
        )
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    _, want = torch.func.jvp(
        lambda p, w: _plain([pieces[0], p, pieces[2]], modes, w, bias, "relu"),
        (pieces[1], weight),
        (t_piece, t_weight),
    )
    assert _rel(tangent, want) < 1e-12


@pytest.mark.parametrize("name", TRANSFORM_BACKENDS)
def test_func_grad_jacrev_jacfwd_vmap(name):
    _needs(name)
    pieces, modes, weight, bias = _transform_case(7)

    def fused(w):
        return unetpp_fast.fused_conv(
            pieces, w, bias, resample=modes, activation="leaky_relu:0.2", backend=name
        )

    def plain(w):
        return _plain(pieces, modes, w, bias, "leaky_relu:0.2")

    assert (
        _rel(
            torch.func.grad(lambda w: fused(w).square().sum())(weight),
            torch.func.grad(lambda w: plain(w).square().sum())(weight),
        )
        < 1e-12
    )
    want = torch.func.jacrev(plain)(weight)
    assert _rel(torch.func.jacrev(fused)(weight), want) < 1e-12
    assert _rel(torch.func.jacfwd(fused)(weight), want) < 1e-12
    batch = torch.randn(3, *weight.shape, dtype=torch.float64)
    assert _rel(torch.func.vmap(fused)(batch), torch.func.vmap(plain)(batch)) < 1e-12


# --- issue 13, item 8: degenerate channel counts, one rule on every backend and the fake ----------

DEGENERATE_BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("name", DEGENERATE_BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_zero_input_channels_give_activation_of_bias(name, with_bias):
    _needs(name)
    torch.manual_seed(8)
    x = torch.randn(2, 0, 4, 5, requires_grad=True)
    w = torch.randn(3, 0, 3, 3, requires_grad=True)
    b = torch.tensor([0.5, -1.0, 2.0], requires_grad=True) if with_bias else None
    out = unetpp_fast.fused_conv([x], w, b, activation="leaky_relu:0.1", backend=name)
    expected = F.leaky_relu(b if with_bias else torch.zeros(3), 0.1).reshape(1, 3, 1, 1).expand(2, 3, 4, 5)
    assert out.shape == (2, 3, 4, 5) and torch.equal(out, expected)
    fake = torch.ops.unetpp_fast.fused_conv.default([x.to("meta")], [0], w.to("meta"), None, "relu")
    assert fake.shape == out.shape
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, w] + ([b] if with_bias else []), grad)
    assert grads[0].shape == x.shape and grads[1].shape == w.shape
    if with_bias:
        slope = torch.where(b > 0, 1.0, 0.1).detach()
        assert torch.allclose(grads[2], (grad.sum(dim=(0, 2, 3)) * slope))


@pytest.mark.parametrize("name", DEGENERATE_BACKENDS)
def test_zero_output_channels_give_an_empty_output(name):
    _needs(name)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(0, 3, 3, 3, requires_grad=True)
    b = torch.randn(0, requires_grad=True)
    out = unetpp_fast.fused_conv([x], w, b, backend=name)
    assert out.shape == (2, 0, 4, 4)
    assert (
        torch.ops.unetpp_fast.fused_conv.default([x.to("meta")], [0], w.to("meta"), None, "relu").shape
        == out.shape
    )
    gx, gw, gb = torch.autograd.grad(out.sum(), [x, w, b], allow_unused=True)
    assert torch.equal(gx, torch.zeros_like(x)) and gw.shape == w.shape and gb.shape == (0,)


# --- issue 13, item 9: one activation grammar, Python and C++ -----------------------------------

ACCEPTED = [
    "leaky_relu:0.1",
    "leaky_relu:1",
    "leaky_relu:2.",
    "leaky_relu:.5",
    "leaky_relu:1e-3",
    "leaky_relu:1E+2",
    "leaky_relu:0.30000000000000004",
    "leaky_relu:5e-324",  # subnormal: both parsers round it the same way
    "leaky_relu:00.5",
]
REJECTED = [
    "leaky_relu:0.1 ",
    " leaky_relu:0.1",
    "leaky_relu: 0.1",
    "leaky_relu:1_0",
    "leaky_relu:\u0661",
    "leaky_relu:+0.1",
    "leaky_relu:-0.1",
    "leaky_relu:0",
    "leaky_relu:inf",
    "leaky_relu:nan",
    "leaky_relu:1e999",
    "leaky_relu:1e-400",  # underflows to zero in both
    "leaky_relu:0x1p-3",
    "leaky_relu:.",
    "leaky_relu:1e",
    "leaky_relu:",
    "leaky_relu:0.1\n",
    "Relu",
    "leaky_relu:1,5",
]


@pytest.mark.parametrize("activation", ACCEPTED)
def test_grammar_accepts_the_same_in_python_and_cpp(activation):
    slope = conv_spec.parse_activation(activation)[1]
    assert slope == float(activation.split(":")[1])
    _needs("cpu")
    x, w = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    got = torch.ops.unetpp_fast_C.fused_conv_forward([x], [0], w, None, activation)
    assert _rel(got, F.leaky_relu(F.conv2d(x, w, padding=1), slope)) < 1e-12


@pytest.mark.parametrize("activation", REJECTED)
def test_grammar_rejects_the_same_in_python_and_cpp(activation):
    with pytest.raises(ValueError, match="activation must be"):
        conv_spec.parse_activation(activation)
    _needs("cpu")
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="activation must be"):
        torch.ops.unetpp_fast_C.fused_conv_forward([x], [0], w, None, activation)


# --- issue 13, item 10: autocast leaves float64 alone, as for F.conv2d --------------------------


def test_autocast_leaves_float64_alone():
    torch.manual_seed(9)
    x, w = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unetpp_fast.fused_conv([x], w, backend="reference")
        assert F.conv2d(x, w, padding=1).dtype == torch.float64  # autocast's own rule
    assert out.dtype == torch.float64
    assert _rel(out, F.relu(F.conv2d(x, w, padding=1))) < 1e-12
