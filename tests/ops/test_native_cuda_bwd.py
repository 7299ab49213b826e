"""The fused CUDA backwards on a GPU: the SIMT one (csrc/cuda/fused_conv_bwd.cu,
UNETPP_FAST_CUDA_FUSED_BACKWARD=1 / simt) and the tensor-core one (fused_conv_bwd_tc.cu, the default
for the calls it takes): every gradient against the fp64 reference, poisoned allocations, bitwise
run-to-run repeatability (split-K reduced in a fixed order), and which kernels ran (profiler).
Skipped without a GPU."""

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


# The tensor-core backward: 2D, bf16 / fp16, channels_last, C % 8 == 0.
TC_NODES = [
    ("tc_auto_modes", [(16, NONE), (8, NEAREST), (24, MAXPOOL)], 40, 3, (10, 14)),
    ("tc_all_modes", [(8, NONE), (16, NEAREST), (8, LINEAR), (8, LINEAR_AC), (16, MAXPOOL)], 24, 3, (12, 8)),
    ("tc_wide", [(96, NONE), (72, MAXPOOL)], 136, 3, (17, 23)),
    ("tc_head", [(32, NONE)], 8, 1, (16, 16)),
]


def kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


def ran(names: set[str], kernel: str) -> bool:
    """Whether one of this project's kernels named `kernel` ran (cuDNN's names say dgrad / wgrad too)."""
    return any("unetpp_fast" in n and kernel in n for n in names)


@pytest.mark.parametrize("route", ["auto", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", TC_NODES, ids=[n[0] for n in TC_NODES])
def test_tc_backward_vs_fp64_reference_and_repeatable(spec, dtype, route, monkeypatch):
    monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", route)
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last=True, seed=3)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    grad = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    grad_low = grad.to(dtype).contiguous(memory_format=torch.channels_last)
    backward = torch.ops.unetpp_fast_C.fused_conv_backward
    grads = backward(grad_low, pieces, modes, weight, out, True, "relu")
    again = backward(grad_low, pieces, modes, weight, out, True, "relu")
    names = kernel_names(lambda: backward(grad_low, pieces, modes, weight, out, True, "relu"))
    # every node qualifies and every mode has a tensor-core dgrad: both routes run the TC kernels
    assert ran(names, "wgrad_kernel") and ran(names, "pack_weight_kernel"), sorted(names)
    assert ran(names, "dgrad_kernel") or ran(names, "dgrad_bilinear_kernel"), sorted(names)
    assert ran(names, "dgrad_bilinear_kernel") == any(m in (LINEAR, LINEAR_AC) for m in modes), sorted(names)
    assert not ran(names, "piece_grad_kernel") and not ran(names, "gather_virtual_input"), sorted(names)
    want = reference.backward(
        grad_low.double(), [p.double() for p in pieces], modes, weight.double(), out.double(), True, "relu"
    )
    labels = [f"pieces[{i}]" for i in range(len(pieces))] + ["weight", "bias"]
    for name, got, repeat, ref in zip(labels, grads, again, want):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert rel_err(got, ref) < 2 * TOLERANCE[torch.bfloat16], name
        assert torch.equal(got, repeat), f"{name}: not bitwise repeatable"


@pytest.mark.parametrize(
    ("dtype", "channels_last"), [(torch.bfloat16, False), (torch.float32, True)], ids=["nchw", "fp32"]
)
def test_tc_backward_not_taken_for_nchw_or_fp32(dtype, channels_last, monkeypatch):
    monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", "auto")
    backward = torch.ops.unetpp_fast_C.fused_conv_backward
    pieces, modes, weight, bias = make_node(TC_NODES[0], dtype, channels_last, seed=1)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "none")
    grad = torch.randn_like(out)
    names = kernel_names(lambda: backward(grad, pieces, modes, weight, out, True, "none"))
    assert not ran(names, "wgrad_kernel")


@pytest.mark.parametrize(
    ("route", "expected"),
    [("0", "gather_virtual_input"), ("gather", "gather_virtual_input"), ("simt", "piece_grad_kernel")],
)
def test_backward_route_env_forces_the_other_paths(route, expected, monkeypatch):
    monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", route)
    pieces, modes, weight, bias = make_node(TC_NODES[0], torch.bfloat16, True, seed=2)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    grad = torch.randn_like(out)
    backward = torch.ops.unetpp_fast_C.fused_conv_backward
    names = kernel_names(lambda: backward(grad, pieces, modes, weight, out, True, "relu"))
    assert ran(names, expected) and not ran(names, "wgrad_kernel"), sorted(names)
    want = reference.backward(
        grad.double(), [p.double() for p in pieces], modes, weight.double(), out.double(), True, "relu"
    )
    for got, ref in zip(backward(grad, pieces, modes, weight, out, True, "relu"), want):
        assert rel_err(got, ref) < 2 * TOLERANCE[torch.bfloat16]


def test_backward_route_env_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", "fast")
    pieces, modes, weight, bias = make_node(TC_NODES[3], torch.bfloat16, True)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "none")
    with pytest.raises(ValueError, match="UNETPP_FAST_CUDA_FUSED_BACKWARD"):
        grad = torch.ones_like(out)
        torch.ops.unetpp_fast_C.fused_conv_backward(grad, pieces, modes, weight, out, True, "none")


def test_tc_backward_transient_memory_is_workspace_only(monkeypatch):
    """Peak memory above the inputs and the returned gradients: the TC backward's is its packed weight
    and fp32 split-K partials (~6.5 MiB here: 44 splits), the gather path's holds the virtual input
    and its gradient (2 x 9 MiB) and cuDNN's workspace."""
    spec = ("decoder", [(32, NONE), (32, NONE), (64, LINEAR_AC)], 32, 3, (96, 96))
    pieces, modes, weight, bias = make_node(spec, torch.bfloat16, channels_last=True, seed=4, batch=4)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    grad = torch.randn_like(out)
    backward = torch.ops.unetpp_fast_C.fused_conv_backward

    def transient(route: str) -> int:
        monkeypatch.setenv("UNETPP_FAST_CUDA_FUSED_BACKWARD", route)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = backward(grad, pieces, modes, weight, out, True, "relu")
        torch.cuda.synchronize()
        kept = sum(g.untyped_storage().nbytes() for g in grads)
        return torch.cuda.max_memory_allocated() - before - kept

    virtual_bytes = 4 * 128 * 96 * 96 * 2
    tc, gather = transient("auto"), transient("gather")
    print(f"transient peak: tensor-core {tc / 2**20:.2f} MiB, gather + cuDNN {gather / 2**20:.2f} MiB")
    assert gather >= 2 * virtual_bytes, gather  # the virtual input and its gradient
    assert tc < gather / 2, (tc, gather)
