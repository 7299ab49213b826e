"""The C++ CPU backend ('cpu') against the reference: forward, backward, gradcheck, opcheck, indexing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec, reference

CPU_REASON = backends.why_unusable("cpu", "cpu")
pytestmark = pytest.mark.skipif(bool(CPU_REASON), reason=f"cpu backend unusable: {CPU_REASON}")

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)
UPS = (NEAREST, BILINEAR, BILINEAR_AC)

# Resample patterns: every mode alone, UNet++ node shapes, 1..5 pieces, all modes together.
MODE_SETS = [
    (NONE,),
    (NEAREST,),
    (BILINEAR,),
    (BILINEAR_AC,),
    (MAXPOOL,),
    (NONE, MAXPOOL),
    (NONE, NEAREST),
    (NONE, NONE, BILINEAR),
    (NONE, NONE, NONE, BILINEAR_AC),
    (NONE, NONE, NONE, NONE, BILINEAR),
    (BILINEAR, NONE, MAXPOOL, NEAREST, BILINEAR_AC),
]
ACTIVATIONS = ["none", "relu", "leaky_relu:0.2"]


@pytest.fixture(autouse=True)
def poison_uninitialised_memory():
    """Every torch.empty (also inside the extension) is filled with NaN: an unwritten element fails."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def make_case(modes, k, batch, channels_last, dtype, seed, out_hw=None, bias=True):
    """Random pieces whose resampled sizes agree; odd channel counts; odd output size when possible."""
    gen = torch.Generator().manual_seed(seed)
    if out_hw is None:
        out_hw = (6, 8) if any(m in UPS for m in modes) else (5, 7)
    height, width = out_hw
    pieces = []
    for index, mode in enumerate(modes):
        if mode in UPS:
            h, w = height // 2, width // 2
        elif mode == MAXPOOL:
            h, w = 2 * height + index % 2, 2 * width + 1  # odd sources: the floor drops a row/column
        else:
            h, w = height, width
        piece = torch.randn(batch, 2 * index + 3, h, w, generator=gen, dtype=torch.float64).to(dtype)
        if channels_last:
            piece = piece.contiguous(memory_format=torch.channels_last)
        pieces.append(piece)
    c_in = sum(p.shape[1] for p in pieces)
    weight = (torch.randn(5, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5).to(
        dtype
    )
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return pieces, list(modes), weight, b


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert not torch.isnan(a).any(), "NaN in the result (an unwritten or poisoned element)"
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def native_forward(pieces, modes, weight, bias, activation):
    return torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, activation)


def native_backward(grad, pieces, modes, weight, out, has_bias, activation):
    return torch.ops.unetpp_fast_C.fused_conv_backward(grad, pieces, modes, weight, out, has_bias, activation)


CASES = list(itertools.product(range(len(MODE_SETS)), (1, 3), (1, 3), (False, True)))


@pytest.mark.parametrize("mode_set,k,batch,channels_last", CASES)
def test_forward_backward_match_reference_fp64(mode_set, k, batch, channels_last):
    modes = MODE_SETS[mode_set]
    activation = ACTIVATIONS[(mode_set + k + batch) % len(ACTIVATIONS)]
    has_bias = (mode_set + k) % 2 == 0
    pieces, modes, weight, bias = make_case(
        modes, k, batch, channels_last, torch.float64, seed=mode_set * 31 + k, bias=has_bias
    )
    out = native_forward(pieces, modes, weight, bias, activation)
    expected = reference.forward(pieces, modes, weight, bias, activation)
    assert rel_err(out, expected) < 1e-12
    assert out.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))

    grad = torch.randn(expected.shape, dtype=torch.float64)
    grads = native_backward(grad, pieces, modes, weight, out, has_bias, activation)
    expected_grads = reference.backward(grad, pieces, modes, weight, expected, has_bias, activation)
    assert len(grads) == len(pieces) + 2
    for index, (got, want) in enumerate(zip(grads[: len(pieces)], expected_grads)):
        assert rel_err(got, want) < 1e-12, f"grad of pieces[{index}] (mode {modes[index]})"
        assert got.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[index]))
    assert rel_err(grads[-2], expected_grads[-2]) < 1e-12, "grad_weight"
    if has_bias:
        assert rel_err(grads[-1], expected_grads[-1]) < 1e-12, "grad_bias"
    else:
        assert grads[-1].numel() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("modes", [(NONE, BILINEAR), (MAXPOOL, NONE), (NEAREST, BILINEAR_AC)])
def test_lower_precision_against_fp64_reference(dtype, tol, modes):
    pieces, modes, weight, bias = make_case(modes, 3, 2, False, dtype, seed=7)
    out = native_forward(pieces, modes, weight, bias, "relu")
    assert out.dtype == dtype
    expected = reference.forward([p.double() for p in pieces], modes, weight.double(), bias.double(), "relu")
    assert rel_err(out, expected) < tol
    grad = torch.randn(out.shape, dtype=torch.float64)
    grads = native_backward(grad.to(dtype), pieces, modes, weight, out, True, "relu")
    # The activation mask comes from the output both were given: the reference sees the same mask.
    want = reference.backward(
        grad, [p.double() for p in pieces], modes, weight.double(), out.double(), True, "relu"
    )
    for got, ref in zip(grads, want):
        assert got.dtype == dtype
        assert rel_err(got, ref) < tol


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def num_threads(request):
    """Work partitions (chunk segments, channel sets) depend on the thread count: try two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def test_bigger_unetpp_node_fp32_threads(num_threads):
    """A dense skip node: two plain pieces and a bilinear-upsampled one, split into channel sets."""
    gen = torch.Generator().manual_seed(3)
    pieces = [
        torch.randn(2, 16, 40, 36, generator=gen),
        torch.randn(2, 16, 40, 36, generator=gen),
        torch.randn(2, 32, 20, 18, generator=gen),
    ]
    modes = [NONE, NONE, BILINEAR]
    weight = torch.randn(16, 64, 3, 3, generator=gen) / 24
    bias = torch.randn(16, generator=gen)
    out = native_forward(pieces, modes, weight, bias, "relu")
    ref64 = reference.forward([p.double() for p in pieces], modes, weight.double(), bias.double(), "relu")
    assert rel_err(out, ref64) < 1e-5
    grad = torch.randn(out.shape, generator=gen)
    grads = native_backward(grad, pieces, modes, weight, out, True, "relu")
    want = reference.backward(
        grad.double(), [p.double() for p in pieces], modes, weight.double(), out.double(), True, "relu"
    )
    for got, ref in zip(grads, want):
        assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize(
    "modes,k,activation",
    [((NONE, BILINEAR), 3, "relu"), ((MAXPOOL, NEAREST), 3, "none"), ((BILINEAR_AC,), 1, "leaky_relu:0.3")],
)
def test_gradcheck_fp64(modes, k, activation):
    pieces, modes, weight, bias = make_case(modes, k, 2, False, torch.float64, seed=11, out_hw=(4, 6))
    inputs = [p.requires_grad_() for p in pieces] + [weight.requires_grad_(), bias.requires_grad_()]
    n = len(pieces)

    def fn(*args):
        return unetpp_fast.fused_conv(
            list(args[:n]), args[n], args[n + 1], resample=modes, activation=activation, backend="cpu"
        )

    with backends.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_opcheck_public_operator_on_cpu_backend():
    samples = [
        make_case((NONE, BILINEAR), 3, 2, False, torch.float32, seed=1),
        make_case((MAXPOOL, NONE), 1, 1, True, torch.float32, seed=2),
        make_case((NEAREST, BILINEAR_AC, NONE), 3, 1, False, torch.float64, seed=3, bias=False),
    ]
    torch.use_deterministic_algorithms(False)  # opcheck compares against its own runs; no poisoning needed
    with backends.use_backend("cpu"):
        for pieces, modes, weight, bias in samples:
            for requires_grad in (False, True):
                args = (
                    [p.clone().requires_grad_(requires_grad) for p in pieces],
                    modes,
                    weight.clone().requires_grad_(requires_grad),
                    None if bias is None else bias.clone().requires_grad_(requires_grad),
                    "relu",
                )
                torch.library.opcheck(torch.ops.unetpp_fast.fused_conv.default, args)


def test_public_operator_routes_to_cpu_backend_without_materialising():
    pieces, modes, weight, bias = make_case((NONE, BILINEAR, MAXPOOL), 3, 2, False, torch.float32, seed=5)
    pieces = [p.requires_grad_() for p in pieces]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with backends.use_backend("cpu"):
            out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes)
            out.sum().backward()
    names = {event.name for event in prof.events()}
    assert "unetpp_fast_C::fused_conv_forward" in names and "unetpp_fast_C::fused_conv_backward" in names
    forbidden = [n for n in names if n == "aten::cat" or n.startswith(("aten::upsample", "aten::max_pool2d"))]
    assert not forbidden, f"materialised the virtual input: {forbidden}"


# ----------------------------------------------------------------- the indexing header, via 1x1 probes
def identity_probe(piece: torch.Tensor, mode: int) -> torch.Tensor:
    """With a 1x1 identity weight the output is the resampled piece itself."""
    weight = torch.eye(piece.shape[1], dtype=piece.dtype).view(piece.shape[1], piece.shape[1], 1, 1)
    return native_forward([piece], [mode], weight, None, "none")


@pytest.mark.parametrize("mode", [NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 4)])
def test_resample_indexing_matches_pytorch(mode, dtype, size):
    if mode == MAXPOOL:
        size = (2 * size[0] + 1, 2 * size[1])
    piece = torch.randn(2, 3, *size, dtype=torch.float64).to(dtype)
    got = identity_probe(piece, mode)
    want = reference.apply_resample(piece, mode)
    # Same index and weight arithmetic in the same precision: equal up to one rounding of the sum.
    torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)


def test_maxpool_tie_breaking_and_nan_follow_pytorch():
    # Small integers make ties everywhere; a NaN in a window must win it (one channel per probe,
    # since the identity GEMM would spread a NaN across channels).
    for seed, nan_at in ((0, None), (1, (2, 3)), (2, (5, 0))):
        piece = torch.randint(0, 2, (1, 1, 6, 6), generator=torch.Generator().manual_seed(seed)).double()
        if nan_at is not None:
            piece[0, 0, nan_at[0], nan_at[1]] = float("nan")
        out = identity_probe(piece, MAXPOOL)
        torch.testing.assert_close(out, F.max_pool2d(piece, 2), equal_nan=True)
        grad = torch.randn(1, 1, 3, 3, dtype=torch.float64)
        weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        got = native_backward(grad, [piece], [MAXPOOL], weight, None, False, "none")[0]
        want = reference.resample_adjoint(grad, piece, MAXPOOL)
        assert torch.equal(got, want), "the gradient goes to the element PyTorch's max_pool2d picks"


@pytest.mark.parametrize("ky,kx", list(itertools.product(range(3), range(3))))
def test_border_taps_read_zero_padding(ky, kx):
    """A one-hot 3x3 weight shifts the virtual input: borders must read the zero padding."""
    piece = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, ky, kx] = 1.0
    for mode in (NONE, BILINEAR, MAXPOOL):
        src = piece if mode != MAXPOOL else torch.randn(1, 1, 6, 8, dtype=torch.float64)
        got = native_forward([src], [mode], weight, None, "none")
        want = reference.forward([src], [mode], weight, None, "none")
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        # The row/column the tap reads outside the image is exactly zero.
        if ky != 1:
            assert torch.all(got[..., 0 if ky == 0 else -1, :] == 0)
        if kx != 1:
            assert torch.all(got[..., :, 0 if kx == 0 else -1] == 0)


def test_bad_input_raises_clear_errors():
    pieces, modes, weight, bias = make_case((NONE, BILINEAR), 3, 1, False, torch.float32, seed=0)
    with pytest.raises(ValueError, match="resample has 1 entries"):
        native_forward(pieces, [0], weight, bias, "relu")
    with pytest.raises(ValueError, match="pieces\\[1\\] of spatial size"):
        native_forward(pieces, [0, 0], weight, bias, "relu")
    with pytest.raises(ValueError, match="activation must be"):
        native_forward(pieces, modes, weight, bias, "gelu")
    with pytest.raises(ValueError, match="C_in"):
        native_forward(pieces, modes, weight[:, :-1], bias, "relu")
    with pytest.raises(TypeError, match="dtype"):
        native_forward([pieces[0].double(), pieces[1]], modes, weight, bias, "relu")
    with pytest.raises(ValueError, match="resample\\[1\\] must be a code"):
        native_forward(pieces, [0, 7], weight, bias, "relu")
    with pytest.raises(ValueError, match="out"):
        native_backward(torch.randn(1, 5, 6, 8), pieces, modes, weight, None, True, "relu")


def test_strided_views_as_pieces():
    """Pieces that are channel slices or transposed views are read through their strides."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 9, 6, 8, generator=gen, dtype=torch.float64)
    sliced = base[:, 2:7]  # non-contiguous channel slice
    transposed = torch.randn(2, 3, 4, 3, generator=gen, dtype=torch.float64).transpose(
        2, 3
    )  # 3x4, stride_w != 1
    pieces, modes = [sliced, transposed], [NONE, BILINEAR]
    weight = torch.randn(4, 8, 3, 3, generator=gen, dtype=torch.float64)
    out = native_forward(pieces, modes, weight, None, "relu")
    assert rel_err(out, reference.forward(pieces, modes, weight, None, "relu")) < 1e-12
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = native_backward(grad, pieces, modes, weight, out, False, "relu")
    want = reference.backward(grad, pieces, modes, weight, out, False, "relu")
    for got, ref in zip(grads[:-1], want[:-1]):
        assert rel_err(got, ref) < 1e-12
