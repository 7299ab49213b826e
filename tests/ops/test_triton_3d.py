"""The Triton kernels in 3D (5-D pieces, 5-D weight) against the fp64 reference: CPU tensors under
TRITON_INTERPRET=1, or a GPU.

The same kernels as 2D (DIMS = 3: depth taps, trilinear = eight corners, 2x2x2 max-pool). Every
output buffer the kernels write is poisoned with NaN first, so an element a kernel fails to write
fails the comparison. fp32 Triton against the fp64 reference by relative norm (the kernels
accumulate in fp32). Shapes stay tiny: the interpreter runs each tile op in Python.
"""

from __future__ import annotations

import pytest
import torch

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference, relative_error

MODES_3D = conv_spec.RESAMPLE_MODES_3D
LAYOUTS = ("nchw", "channels_last", "strided")  # NCDHW, channels_last_3d, a strided view


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend():
    reason = backends.why_unusable("triton", _device())
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the Triton launchers allocate for a kernel to write starts as NaN."""
    from unetpp_fast.ops.triton import launch_common

    real = launch_common.empty_output

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(launch_common, "empty_output", poisoned)


def test_triton_declares_3d():
    assert backends.capabilities("triton").spatial_dims == (2, 3)


def _out_dhw(modes) -> tuple[int, int, int]:
    """Odd output sizes where no piece is upsampled (an upsampled piece makes them even)."""
    return (2, 4, 4) if any(m.startswith("up_") for m in modes) else (3, 3, 5)


# Every 3D resample mode (next to a plain piece) x k = 1, 3; layouts, activations, bias rotate.
SINGLE_MODE_CASES = [pytest.param(mode, k, id=f"{mode}-k{k}") for mode in MODES_3D for k in (1, 3)]


@pytest.mark.parametrize(("mode", "k"), SINGLE_MODE_CASES)
def test_each_3d_resample_mode_matches_reference(mode, k):
    index = MODES_3D.index(mode) * 2 + (k == 3)
    case = ConvCase(
        batch=(1, 2)[index % 2],
        channels=[2, 3],
        modes=["none", mode],
        out_hw=_out_dhw([mode]),
        c_out=(3, 2)[index % 2],
        k=k,
        layout=LAYOUTS[index % 3],
        activation=("none", "relu", "leaky_relu:0.1")[(index // 2) % 3],
        bias=index % 4 != 3,
        seed=300 + index,
    )
    assert_matches_reference(case, "triton", _device())


def test_four_pieces_every_kind_of_read():
    """Plain, 2x2x2 max-pooled, trilinear (align_corners) and nearest pieces in one call, odd
    channel counts, channels_last_3d: forward and every gradient."""
    modes = ["none", "maxpool2", "up_trilinear_ac", "up_nearest"]
    case = ConvCase(
        batch=1,
        channels=[3, 2, 1, 2],
        modes=modes,
        out_hw=(2, 2, 4),
        c_out=3,
        k=3,
        layout="channels_last",
        activation="relu",
        seed=41,
    )
    assert_matches_reference(case, "triton", _device())


def test_3d_several_blocks_of_channels_and_pixels():
    """More input and output channels than one interpreter block (32), several pixel blocks."""
    case = ConvCase(
        batch=2, channels=[33, 3], modes=["none", "maxpool2"], out_hw=(3, 5, 5), c_out=34, k=1, seed=9
    )
    assert_matches_reference(case, "triton", _device())


def test_3d_weight_gradient_split_over_pixel_chunks(monkeypatch):
    """The split-K weight gradient (the GPU path) sums its partials to the same result in 3D."""
    from unetpp_fast.ops.triton import fused_conv_backward

    monkeypatch.setattr(fused_conv_backward, "weight_grad_splits", lambda *args: 3)
    case = ConvCase(
        batch=2, channels=[2, 2], modes=["none", "maxpool2"], out_hw=(3, 4, 5), c_out=3, k=3, seed=5
    )
    assert_matches_reference(case, "triton", _device())


def test_3d_maxpool_ties_route_to_the_first_maximum_like_pytorch():
    """2x2x2 windows full of equal values: the gradient goes where max_pool3d sends it."""
    gen = torch.Generator().manual_seed(3)
    piece = torch.randint(0, 2, (1, 2, 5, 4, 7), generator=gen).to(_device(), torch.float32)
    weight = torch.randn(3, 2, 1, 1, 1, generator=gen).to(_device())
    grad_out = torch.randn(1, 3, 2, 2, 3, generator=gen).to(_device())
    grads = {}
    for backend in ("triton", "reference"):
        p = piece.clone().requires_grad_(True)
        out = unetpp_fast.fused_conv([p], weight, resample=["maxpool2"], activation="none", backend=backend)
        (grads[backend],) = torch.autograd.grad(out, [p], grad_out)
    assert torch.isfinite(grads["triton"]).all()
    assert ((grads["triton"] != 0) == (grads["reference"] != 0)).all()
    assert relative_error(grads["triton"], grads["reference"]) < 1e-5


def test_unetpp_3d_on_triton_equals_reference_forward_and_backward():
    """The 3D UNet++ (trilinear_ac, deep supervision) on the triton backend, training mode: every
    head and every parameter's gradient against the same model in fp64 on the reference. conv_relu
    blocks: every parameter reaches the loss (a conv bias before training-mode BatchNorm would not)."""
    torch.manual_seed(3)
    config = dict(deep_supervision=True, block="conv_relu", upsample="trilinear_ac", spatial_dims=3)
    model = unetpp_fast.UNetPlusPlus(1, 2, (2, 3, 4), **config)
    reference = unetpp_fast.UNetPlusPlus(1, 2, (2, 3, 4), **config)
    reference.load_state_dict(model.state_dict())
    reference.double()
    x = torch.randn(1, 1, 4, 4, 4)
    with unetpp_fast.use_backend("triton"):
        outs = model.to(_device())(x.to(_device()))
    with unetpp_fast.use_backend("reference"):
        want = reference(x.double())
    assert len(outs) == len(want) == 2
    grads = [torch.randn(w.shape, dtype=torch.float64) for w in want]
    for o, w in zip(outs, want):
        assert o.shape == w.shape == (1, 2, 4, 4, 4)
        assert relative_error(o, w) < 1e-4
    with unetpp_fast.use_backend("triton"):
        torch.autograd.backward(outs, [g.float().to(_device()) for g in grads])
    with unetpp_fast.use_backend("reference"):
        torch.autograd.backward(want, grads)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert relative_error(p.grad, ref_params[name].grad) < 1e-4, name
