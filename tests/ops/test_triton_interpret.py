"""The Triton kernels against the fp64 reference: CPU tensors under TRITON_INTERPRET=1, or a GPU.

Every output buffer the kernels write is poisoned with NaN first, so an element a kernel fails to
write fails the comparison. Shapes stay tiny: the interpreter runs each tile op in Python.
"""

from __future__ import annotations

import pytest
import torch

import unetpp_fast
from unetpp_fast.ops import backends, conv_spec
from unetpp_fast.ops.testing import ConvCase, assert_matches_reference, reference_of, relative_error, run_case

MODES = conv_spec.RESAMPLE_MODES


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


def _out_hw(modes, odd: bool) -> tuple[int, int]:
    """Odd output sizes where no piece is upsampled (an upsampled piece makes it even)."""
    if any(m.startswith("up_") for m in modes) or not odd:
        return 6, 4
    return 5, 7


# Every resample mode (next to a plain piece) x k = 1, 3; the other knobs rotate through the cases.
SINGLE_MODE_CASES = [pytest.param(mode, k, id=f"{mode}-k{k}") for mode in MODES for k in (1, 3)]


@pytest.mark.parametrize(("mode", "k"), SINGLE_MODE_CASES)
def test_each_resample_mode_matches_reference(mode, k):
    index = MODES.index(mode) * 2 + (k == 3)
    case = ConvCase(
        batch=(1, 3)[index % 2],
        channels=[3, 5],
        modes=["none", mode],
        out_hw=_out_hw([mode], odd=True),
        c_out=(5, 3)[index % 2],
        k=k,
        layout=("nchw", "channels_last")[(index // 2) % 2],
        activation=("none", "relu", "leaky_relu:0.1")[index % 3],
        bias=index % 4 != 3,
        seed=index,
    )
    assert_matches_reference(case, "triton", _device())


@pytest.mark.parametrize("num_pieces", [1, 2, 3, 4, 5])
def test_one_to_five_pieces(num_pieces):
    modes = ["none", "up_bilinear", "maxpool2", "up_nearest", "up_bilinear_ac"][:num_pieces]
    case = ConvCase(
        batch=(1, 3)[num_pieces % 2],
        channels=[3, 2, 5, 1, 4][:num_pieces],
        modes=modes,
        out_hw=_out_hw(modes, odd=True),
        c_out=3,
        k=3,
        layout=("channels_last", "nchw")[num_pieces % 2],
        activation="relu",
        seed=100 + num_pieces,
    )
    assert_matches_reference(case, "triton", _device())


def test_several_blocks_in_every_dimension():
    """More pixels, input channels and output channels than one block of the interpreter config."""
    case = ConvCase(
        batch=3,
        channels=[37, 6],
        modes=["none", "up_bilinear_ac"],
        out_hw=(8, 6),
        c_out=35,
        k=3,
        activation="leaky_relu",
        seed=7,
    )
    assert_matches_reference(case, "triton", _device())


def test_strided_views_are_read_through_their_strides():
    case = ConvCase(
        batch=2,
        channels=[4, 3],
        modes=["maxpool2", "none"],
        out_hw=(5, 6),
        c_out=4,
        k=3,
        layout="strided",
        seed=11,
    )
    assert_matches_reference(case, "triton", _device())


def test_weight_gradient_split_over_pixel_chunks(monkeypatch):
    """The split-K weight gradient (the GPU path) sums its partials to the same result."""
    from unetpp_fast.ops.triton import fused_conv_backward

    monkeypatch.setattr(fused_conv_backward, "weight_grad_splits", lambda *args: 3)
    case = ConvCase(
        batch=3, channels=[3, 2], modes=["none", "up_nearest"], out_hw=(8, 10), c_out=4, k=3, seed=5
    )
    assert_matches_reference(case, "triton", _device())


def test_maxpool_ties_route_to_the_first_maximum_like_pytorch():
    """Windows full of equal values: the gradient goes where PyTorch's max_pool2d sends it."""
    gen = torch.Generator().manual_seed(3)
    piece = torch.randint(0, 2, (2, 3, 7, 9), generator=gen).to(_device(), torch.float32)
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(_device())
    grad_out = torch.randn(2, 4, 3, 4, generator=gen).to(_device())
    grads = {}
    for backend in ("triton", "reference"):
        p = piece.clone().requires_grad_(True)
        out = unetpp_fast.fused_conv([p], weight, resample=["maxpool2"], activation="none", backend=backend)
        (grads[backend],) = torch.autograd.grad(out, [p], grad_out)
    assert torch.isfinite(grads["triton"]).all()
    assert ((grads["triton"] != 0) == (grads["reference"] != 0)).all()
    assert relative_error(grads["triton"], grads["reference"]) < 1e-5


def _pytorch_error(case: ConvCase, ref_out, ref_grads):
    """PyTorch's own error at the case's precision (the reference backend run in that dtype)."""
    out, grads = run_case(case, "reference", _device())
    return [relative_error(out, ref_out)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)]


LOW_PRECISION_CASES = [
    pytest.param(torch.float16, mode, id=f"fp16-{mode}") for mode in ("up_bilinear", "maxpool2", "up_nearest")
] + [pytest.param(torch.bfloat16, "up_bilinear_ac", id="bf16-up_bilinear_ac", marks=pytest.mark.cuda)]


@pytest.mark.parametrize(("dtype", "mode"), LOW_PRECISION_CASES)
def test_low_precision_error_at_most_twice_pytorchs(dtype, mode):
    """fp16 (bf16 on a GPU only: the interpreter's bf16 dot is wrong): error <= 2x PyTorch's + eps."""
    case = ConvCase(
        batch=2,
        channels=[6, 5],
        modes=["none", mode],
        out_hw=_out_hw([mode], odd=True),
        c_out=5,
        k=3,
        dtype=dtype,
        activation="relu",
        seed=21,
    )
    ref_out, ref_grads = reference_of(case)
    torch_errors = _pytorch_error(case, ref_out, ref_grads)
    out, grads = run_case(case, "triton", _device())
    assert out.dtype == dtype
    names = ["out"] + [f"pieces[{i}]" for i in range(2)] + ["weight", "bias"]
    for name, got, want, torch_error in zip(names, [out, *grads], [ref_out, *ref_grads], torch_errors):
        err = relative_error(got, want)
        assert err <= 2 * torch_error + 1e-4, f"{name}: triton {err:.3g} vs PyTorch {torch_error:.3g}"


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_with_triton_forced(requires_grad):
    gen = torch.Generator().manual_seed(0)
    device = _device()
    pieces = [
        torch.randn(2, 3, 4, 4, generator=gen).to(device),
        torch.randn(2, 2, 2, 2, generator=gen).to(device),
    ]
    weight = torch.randn(3, 5, 3, 3, generator=gen).to(device)
    bias = torch.randn(3, generator=gen).to(device)
    for t in [*pieces, weight, bias]:
        t.requires_grad_(requires_grad)
    args = (pieces, [conv_spec.NONE, conv_spec.UP_BILINEAR], weight, bias, "relu")
    with unetpp_fast.use_backend("triton"):
        torch.library.opcheck(torch.ops.unetpp_fast.fused_conv.default, args)


@pytest.mark.parametrize("num_pieces", [6, 7])
def test_six_and_seven_pieces_from_the_descriptor_table(num_pieces):
    """A depth-5 UNet++ node reads 6 pieces (X[0,4]: five plain + one up-sampled); the table has no
    upper limit. Every mode, odd channel counts, forward and all gradients against fp64."""
    modes = ["none", "maxpool2", "up_bilinear_ac", "none", "up_nearest", "up_bilinear", "none"][:num_pieces]
    case = ConvCase(
        batch=2,
        channels=[3, 2, 5, 1, 4, 2, 3][:num_pieces],
        modes=modes,
        out_hw=_out_hw(modes, odd=False),
        c_out=3,
        k=3,
        layout=("nchw", "channels_last")[num_pieces % 2],
        activation="relu",
        seed=200 + num_pieces,
    )
    assert_matches_reference(case, "triton", _device())


def test_whole_vector_pieces_take_the_vector_hint_path():
    """channels_last pieces whose channels fill 16-byte vectors: the forward compiles with VEC > 1
    (alignment hints; a no-op in the interpreter, but the same code path and table)."""
    from unetpp_fast.ops.triton import launch_common

    modes = ["none", "up_bilinear_ac", "maxpool2"]
    case = ConvCase(
        batch=2,
        channels=[4, 8, 4],
        modes=modes,
        out_hw=_out_hw(modes, odd=False),
        c_out=5,
        k=3,
        layout="channels_last",
        activation="relu",
        seed=31,
    )
    pieces = [torch.randn(2, c, 4, 4).contiguous(memory_format=torch.channels_last) for c in (4, 8)]
    assert launch_common.vector_width(pieces) == 4  # fp32: 4 elements per 16 bytes
    assert launch_common.vector_width([torch.randn(1, 3, 4, 4)]) == 1
    assert_matches_reference(case, "triton", _device())


def test_depth5_unetpp_on_triton_equals_reference():
    """The whole depth-5 network (6-piece nodes) on the triton backend, eval (folded BatchNorm)."""
    torch.manual_seed(5)
    model = unetpp_fast.UNetPlusPlus(3, 2, (2, 2, 2, 2, 2, 2), deep_supervision=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with unetpp_fast.use_backend("triton"):
            out = model.to(_device())(x.to(_device())).cpu()
        with unetpp_fast.use_backend("reference"):
            ref = model.double().cpu()(x.double())
    assert out.shape == ref.shape == (1, 2, 32, 32)
    assert relative_error(out.double(), ref) < 1e-5


def test_pixel_limit_is_a_clear_error():
    from unetpp_fast.ops.triton.launch_common import MAX_PIXELS, check_pixel_count

    check_pixel_count(MAX_PIXELS, "x")
    with pytest.raises(ValueError, match="split the batch"):
        check_pixel_count(MAX_PIXELS + 1, "the output")


def test_cpu_needs_the_interpreter(monkeypatch):
    from unetpp_fast.ops.triton import backend as backend_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend_triton.why_unusable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_triton.why_unusable(torch.device("cpu")) == ""


# Realistic sizes on a GPU: a level-0 dense node at 96^2 and 512^2, and a deep node.
GPU_CASES = [
    pytest.param(ConvCase(2, [32, 32, 64], ["none", "none", "up_bilinear"], (96, 96), 32, 3), id="l0-96"),
    pytest.param(ConvCase(2, [32, 64], ["none", "up_nearest"], (512, 512), 32, 3), id="l0-512"),
    pytest.param(ConvCase(2, [128, 256], ["none", "up_bilinear_ac"], (24, 24), 128, 3), id="deep-24"),
    pytest.param(ConvCase(2, [64], ["maxpool2"], (48, 48), 128, 3, layout="channels_last"), id="down-48"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_realistic_sizes(case, dtype):
    case = ConvCase(**{**case.__dict__, "dtype": dtype, "piece_hw": []})
    if dtype == torch.float32:
        assert_matches_reference(case, "triton", "cuda")
        return
    ref_out, ref_grads = reference_of(case)
    torch_errors = _pytorch_error(case, ref_out, ref_grads)
    out, grads = run_case(case, "triton", "cuda")
    for got, want, torch_error in zip([out, *grads], [ref_out, *ref_grads], torch_errors):
        assert relative_error(got, want) <= 2 * torch_error + 1e-4
