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
