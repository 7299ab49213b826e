"""The fused CUDA backward (csrc/cuda/fused_conv_bwd.cu, UNETPP_FAST_CUDA_FUSED_BACKWARD=1) on a GPU:
every gradient against the fp64 reference in 2D and 3D, both layouts, poisoned allocations, and
bitwise run-to-run repeatability (split-K reduced in a fixed order). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends, reference

pytestmark = pytest.mark.cuda

NONE, NEAREST, LINEAR, LINEAR_AC, MAXPOOL = range(5)
NODES = [
    ("2d_all_modes", [(8, NONE), (8, NEAREST), (8, LINEAR), (8, LINEAR_AC), (8, MAXPOOL)], 24, 3, (10, 12)),
    ("2d_skip", [(32, NONE), (64, LINEAR)], 32, 3, (32, 32)),
    ("2d_head", [(32, NONE)], 3, 1, (16, 16)),
    ("3d_all_modes", [(8, NONE), (8, NEAREST), (8, LINEAR), (8, LINEAR_AC), (8, MAXPOOL)], 16, 3, (4, 6, 8)),
    ("3d_encoder", [(16, MAXPOOL)], 32, 3, (8, 8, 8)),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fused_backward_and_poison(monkeypatch):
    if backends.why_unusable("cuda", "cuda"):
        pytest.skip(backends.why_unusable("cuda", "cuda"))
    monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", "1")
    torch.utils.deterministic.fill_uninitialized_memory = True
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # empty() returns NaN: unwritten outputs show
    yield
    torch.use_deterministic_algorithms(deterministic)


def make_node(spec, dtype, channels_last, seed=0, batch=2):
    _, piece_specs, c_out, k, out_size = spec
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pieces, modes = [], []
    for channels, mode in piece_specs:
        if mode in (NEAREST, LINEAR, LINEAR_AC):
            size = tuple(s // 2 for s in out_size)
        elif mode == MAXPOOL:
            size = tuple(2 * s + 1 for s in out_size)
        else:
            size = tuple(out_size)
        piece = torch.randn(batch, channels, *size, device="cuda", generator=gen).to(dtype)
        if channels_last:
            fmt = torch.channels_last_3d if piece.dim() == 5 else torch.channels_last
            piece = piece.contiguous(memory_format=fmt)
        pieces.append(piece)
        modes.append(mode)
    c_in = sum(c for c, _ in piece_specs)
    dims = len(out_size)
    weight = torch.randn(c_out, c_in, *[k] * dims, device="cuda", generator=gen) / (c_in * k**dims) ** 0.5
    bias = torch.randn(c_out, device="cuda", generator=gen)
    return pieces, modes, weight.to(dtype), bias.to(dtype)


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the result (unwritten or poisoned element)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_fused_backward_vs_fp64_reference_and_repeatable(spec, dtype, channels_last):
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    grad = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    grad_low = grad.to(dtype).contiguous(memory_format=out.suggest_memory_format())
    backward = torch.ops.unetpp_fast_C.fused_conv_backward
    grads = backward(grad_low, pieces, modes, weight, out, True, "relu")
    again = backward(grad_low, pieces, modes, weight, out, True, "relu")
    want = reference.backward(
        grad_low.double(), [p.double() for p in pieces], modes, weight.double(), out.double(), True, "relu"
    )
    names = [f"pieces[{i}]" for i in range(len(pieces))] + ["weight", "bias"]
    for name, got, repeat, ref in zip(names, grads, again, want):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert rel_err(got, ref) < 2 * TOLERANCE[dtype], name
        assert torch.equal(got, repeat), f"{name}: not bitwise repeatable"
