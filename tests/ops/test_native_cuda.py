"""The CUDA C++ backend ('cuda') on a GPU: against the fp64 reference and against Triton, at
UNet++ sizes, fp32 / fp16 / bf16, forward and backward, with poisoned (NaN-filled) allocations."""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends, reference

pytestmark = pytest.mark.cuda

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)

# (name, per-piece (channels, resample), C_out, k, output size): UNet++ nodes at realistic sizes.
NODES = [
    ("encoder_x10", [(32, MAXPOOL)], 64, 3, (48, 48)),
    ("skip_x02", [(32, NONE), (32, NONE), (64, BILINEAR)], 32, 3, (96, 96)),
    ("skip_x11_nearest", [(64, NONE), (128, NEAREST)], 64, 3, (48, 48)),
    ("skip_ac_odd", [(19, NONE), (37, BILINEAR_AC)], 45, 3, (34, 30)),
    ("head_1x1", [(32, NONE)], 3, 1, (96, 96)),
    ("all_modes", [(8, NONE), (8, NEAREST), (8, BILINEAR), (8, BILINEAR_AC), (8, MAXPOOL)], 24, 3, (40, 36)),
    # The halo kernel's own paths: the RGB input (per element) and 6 x 6 images two per block.
    ("rgb_input", [(3, NONE)], 32, 3, (40, 36)),
    ("bottom_6x6_paired", [(64, NONE), (32, MAXPOOL)], 72, 3, (6, 6)),
]
# ||err|| / ||ref|| bounds against fp64: fp32 exact SIMT, fp16/bf16 tensor cores with fp32 accumulation.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison_and_exact_fp32():
    if backends.why_unusable("cuda", "cuda"):
        pytest.skip(backends.why_unusable("cuda", "cuda"))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.use_deterministic_algorithms(deterministic)


def make_node(spec, dtype, batch=2, channels_last=False, seed=0):
    _, piece_specs, c_out, k, (height, width) = spec
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pieces, modes = [], []
    for channels, mode in piece_specs:
        if mode in (NEAREST, BILINEAR, BILINEAR_AC):
            h, w = height // 2, width // 2
        elif mode == MAXPOOL:
            h, w = 2 * height + 1, 2 * width
        else:
            h, w = height, width
        piece = torch.randn(batch, channels, h, w, device="cuda", generator=gen).to(dtype)
        if channels_last:
            piece = piece.contiguous(memory_format=torch.channels_last)
        pieces.append(piece)
        modes.append(mode)
    c_in = sum(c for c, _ in piece_specs)
    weight = (torch.randn(c_out, c_in, k, k, device="cuda", generator=gen) / (c_in * k * k) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device="cuda", generator=gen).to(dtype)
    return pieces, modes, weight, bias


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in the result (unwritten or poisoned element)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def as64(tensors):
    return [t.double() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_cuda_forward_backward_vs_fp64_reference(spec, dtype, channels_last):
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last=channels_last)
    activation = "relu"
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, activation)
    ref = reference.forward(as64(pieces), modes, weight.double(), bias.double(), activation)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol

    grad = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    grads = torch.ops.unetpp_fast_C.fused_conv_backward(
        grad.to(dtype).contiguous(memory_format=out.suggest_memory_format()),
        pieces,
        modes,
        weight,
        out,
        True,
        activation,
    )
    # Same activation mask for both: the reference is given this kernel's output.
    want = reference.backward(grad, as64(pieces), modes, weight.double(), out.double(), True, activation)
    names = [f"pieces[{i}]" for i in range(len(pieces))] + ["weight", "bias"]
    for name, got, ref_grad in zip(names, grads, want):
        assert got.dtype == dtype, name
        assert rel_err(got, ref_grad) < 2 * tol, name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_cuda_fp32_on_tf32_tensor_cores(spec, channels_last):
    """torch.backends.cuda.matmul.allow_tf32 = True: fp32 runs the tensor-core kernel on TF32 (10
    mantissa bits; fp64 error about 5e-4), off: the exact SIMT kernel (about 1e-7)."""
    pieces, modes, weight, bias = make_node(spec, torch.float32, channels_last=channels_last, seed=11)
    ref = reference.forward(as64(pieces), modes, weight.double(), bias.double(), "relu")
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    assert tf32.dtype == torch.float32 and tf32.shape == ref.shape
    assert tf32.is_contiguous(memory_format=exact.suggest_memory_format())
    assert rel_err(tf32, ref) < 1e-3
    assert rel_err(exact, ref) < TOLERANCE[torch.float32]
    assert rel_err(tf32, ref) > rel_err(exact, ref), "TF32 was asked for; the exact kernel ran"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_low_precision_error_at_most_twice_pytorch(dtype):
    """flash-attention's rule: our error vs fp64 is at most twice PyTorch's own at this precision."""
    spec = NODES[1]
    pieces, modes, weight, bias = make_node(spec, dtype, seed=3)
    ref = reference.forward(as64(pieces), modes, weight.double(), bias.double(), "relu")
    torch_same_precision = reference.forward(pieces, modes, weight, bias, "relu")
    ours = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
    assert rel_err(ours, ref) <= 2 * rel_err(torch_same_precision, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_backend_matches_triton_backend(dtype):
    if backends.why_unusable("triton", "cuda"):
        pytest.skip(backends.why_unusable("triton", "cuda"))
    import unetpp_fast

    pieces, modes, weight, bias = make_node(NODES[1], dtype, seed=5)
    pieces = [p.requires_grad_() for p in pieces]
    results = {}
    for name in ("cuda", "triton"):
        out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, backend=name)
        (grad_first,) = torch.autograd.grad(out.float().square().sum(), pieces[0])
        results[name] = (out.detach(), grad_first)
    tol = 2 * TOLERANCE[dtype]
    assert rel_err(results["cuda"][0], results["triton"][0]) < tol
    assert rel_err(results["cuda"][1], results["triton"][1]) < 4 * tol


def test_cuda_public_operator_autograd_and_no_concatenation():
    import unetpp_fast

    pieces, modes, weight, bias = make_node(NODES[5], torch.float32, seed=9)
    pieces = [p.requires_grad_() for p in pieces]
    weight.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, backend="cuda")
    names = {e.name for e in prof.events()}
    assert not [n for n in names if n == "aten::cat" or n.startswith(("aten::upsample", "aten::max_pool2d"))]
    out.sum().backward()
    ref_pieces = [p.detach().double().requires_grad_() for p in pieces]
    ref_weight = weight.detach().double().requires_grad_()
    ref = reference.forward(ref_pieces, modes, ref_weight, bias.double(), "relu")
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-5
    for p, r in zip(pieces, ref_pieces):
        assert rel_err(p.grad, r.grad) < 1e-4
    assert rel_err(weight.grad, ref_weight.grad) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", NODES, ids=[n[0] for n in NODES])
def test_tensor_core_forward_matches_wmma_forward_and_repeats_bitwise(spec, dtype, monkeypatch):
    """fused_conv_tc.cu (the default for fp16 / bf16) against the first WMMA kernel
    (UNETPP_FAST_CUDA_LEGACY_FORWARD=1, read at every call), channels_last; and run-to-run identical."""
    pieces, modes, weight, bias = make_node(spec, dtype, channels_last=True, seed=11)
    forward = torch.ops.unetpp_fast_C.fused_conv_forward
    first = forward(pieces, modes, weight, bias, "relu")
    again = forward(pieces, modes, weight, bias, "relu")
    monkeypatch.setenv("UNETPP_FAST_CUDA_LEGACY_FORWARD", "1")
    legacy = forward(pieces, modes, weight, bias, "relu")
    assert torch.equal(first, again)
    assert rel_err(first, legacy) < TOLERANCE[dtype]


def test_tensor_core_forward_at_unetpp_512():
    """Many CTAs, both tile widths (C_out 32 and 64), a bilinear piece: the X0,1 and X1,1 shapes at 512^2."""
    for spec in (
        ("x01_512", [(32, NONE), (64, BILINEAR_AC)], 32, 3, (512, 512)),
        ("x11_256", [(64, NONE), (128, BILINEAR_AC)], 64, 3, (256, 256)),
    ):
        pieces, modes, weight, bias = make_node(spec, torch.bfloat16, batch=2, channels_last=True, seed=13)
        out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, "relu")
        ref = reference.forward([p.float() for p in pieces], modes, weight.float(), bias.float(), "relu")
        assert rel_err(out, ref) < TOLERANCE[torch.bfloat16], spec[0]
