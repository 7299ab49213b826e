"""The CUDA C++ backend ('cuda') in 3D on a GPU: 5-D pieces [N, C, D, H, W], every 3D resample,
k = 1 and 3, NCDHW and channels_last_3d, fp32 / fp16 / bf16, forward and backward, against the fp64
reference, with poisoned (NaN-filled) allocations. Skipped without a GPU (marked `cuda`)."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends, reference

pytestmark = pytest.mark.cuda

NONE, NEAREST, TRILINEAR, TRILINEAR_AC, MAXPOOL = range(5)

# (name, per-piece (channels, resample), C_out, k, output size (D, H, W)): 3D UNet++ nodes (k = 32 * 2^i).
NODES = [
    ("encoder_x10", [(32, MAXPOOL)], 64, 3, (16, 16, 16)),
    ("skip_x01_trilinear", [(32, NONE), (64, TRILINEAR)], 32, 3, (16, 16, 16)),
    ("skip_x11_nearest", [(64, NONE), (64, NONE), (128, NEAREST)], 64, 3, (8, 8, 8)),
    ("skip_ac_odd", [(19, NONE), (37, TRILINEAR_AC)], 45, 3, (6, 10, 8)),
    ("head_1x1x1", [(32, NONE)], 2, 1, (16, 16, 16)),
    (
        "all_modes",
        [(8, NONE), (8, NEAREST), (8, TRILINEAR), (8, TRILINEAR_AC), (8, MAXPOOL)],
        24,
        3,
        (6, 8, 10),
    ),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison_and_exact_fp32():
    if backends.why_unusable("cuda", "cuda"):
        pytest.skip(backends.why_unusable("cuda", "cuda"))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # empty() returns NaN: unwritten outputs show
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.use_deterministic_algorithms(deterministic)


def make_node(spec, dtype, batch=2, channels_last=False, seed=0):
    _, piece_specs, c_out, k, (depth, height, width) = spec
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pieces, modes = [], []
    for channels, mode in piece_specs:
        if mode in (NEAREST, TRILINEAR, TRILINEAR_AC):
            size = (depth // 2, height // 2, width // 2)
        elif mode == MAXPOOL:
            size = (2 * depth + 1, 2 * height, 2 * width + 1)
        else:
            size = (depth, height, width)
        piece = torch.randn(batch, channels, *size, device="cuda", generator=gen).to(dtype)
        if channels_last:
            piece = piece.contiguous(memory_format=torch.channels_last_3d)
        pieces.append(piece)
        modes.append(mode)
    c_in = sum(c for c, _ in piece_specs)
    weight = torch.randn(c_out, c_in, k, k, k, device="cuda", generator=gen) / (c_in * k**3) ** 0.5
    weight = weight.to(dtype)
    bias = torch.randn(c_out, device="cuda", generator=gen).to(dtype)
    return pieces, modes, weight, bias


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the result (unwritten or poisoned element)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def as64(tensors):
    return [t.double() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "ndhwc"])
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_cuda_3d_forward_backward_vs_fp64_reference(spec, dtype, channels_last):
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last=channels_last)
    activation = "leaky_relu:0.1"
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, activation)
    ref = reference.forward(as64(pieces), modes, weight.double(), bias.double(), activation)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    want_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=want_format)
    assert rel_err(out, ref) < tol

    grad = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    grads = torch.ops.unetpp_fast_C.fused_conv_backward(
        grad.to(dtype).contiguous(memory_format=want_format), pieces, modes, weight, out, True, activation
    )
    want = reference.backward(grad, as64(pieces), modes, weight.double(), out.double(), True, activation)
    names = [f"pieces[{i}]" for i in range(len(pieces))] + ["weight", "bias"]
    assert len(grads) == len(want)
    for name, got, ref_grad in zip(names, grads, want):
        assert got.dtype == dtype and got.shape == ref_grad.shape, name
        assert rel_err(got, ref_grad) < 2 * tol, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_tensor_core_3d_matches_wmma_3d_and_repeats_bitwise(spec, dtype, monkeypatch):
    """The tensor-core kernel's DIMS = 3 instance against the WMMA kernel's
    (UNETPP_FAST_CUDA_LEGACY_FORWARD=1), channels_last_3d; and run-to-run identical."""
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last=True, seed=11)
    forward = torch.ops.unetpp_fast_C.fused_conv_forward
    first = forward(pieces, modes, weight, bias, "relu")
    again = forward(pieces, modes, weight, bias, "relu")
    monkeypatch.setenv("UNETPP_FAST_CUDA_LEGACY_FORWARD", "1")
    legacy = forward(pieces, modes, weight, bias, "relu")
    assert torch.equal(first, again)
    assert rel_err(first, legacy) < TOLERANCE[dtype]


def test_cuda_3d_public_operator_autograd_and_no_concatenation():
    import unetpp_fast

    pieces, modes, weight, bias = make_node(NODES[5], torch.float32, seed=9)
    pieces = [p.requires_grad_() for p in pieces]
    weight.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, backend="cuda")
    names = {e.name for e in prof.events()}
    assert not [n for n in names if n == "aten::cat" or n.startswith(("aten::upsample", "aten::max_pool3d"))]
    out.sum().backward()
    ref_pieces = [p.detach().double().requires_grad_() for p in pieces]
    ref_weight = weight.detach().double().requires_grad_()
    ref = reference.forward(ref_pieces, modes, ref_weight, bias.double(), "relu")
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    for p, r in zip(pieces, ref_pieces):
        assert rel_err(p.grad, r.grad) < 1e-4
    assert rel_err(weight.grad, ref_weight.grad) < 1e-4


def test_cuda_3d_at_paper_size():
    """The paper's 3D node size (64^3 patches, batch 2): many CTAs along depth, bf16 channels_last_3d."""
    spec = ("x01_64", [(32, NONE), (64, TRILINEAR)], 32, 3, (64, 64, 64))
    pieces, modes, weight, bias = make_node(spec, torch.bfloat16, batch=2, channels_last=True, seed=13)
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    ref = reference.forward([p.float() for p in pieces], modes, weight.float(), bias.float(), "relu")
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
