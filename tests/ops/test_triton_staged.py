"""The staged Triton forward (each channel block staged once per pixel block on its halo, in a
per-CTA scratch slot; fused_conv_forward_staged.py) against the fp64 reference.

CPU tensors under TRITON_INTERPRET=1 with UNETPP_FAST_TRITON_STAGED=1 (on a GPU, where it is the
default for the calls it takes, the same tests run on CUDA tensors: gpu_check.sh's parity step),
through the forward's own launcher: every output it allocates starts as
NaN, so an element the kernel fails to write fails the comparison. The interpreter runs two
persistent CTAs per output-channel tile over 4 x 8 pixel blocks: most cases loop over several
blocks per CTA and cross block edges.
"""

from __future__ import annotations

import pytest
import torch

from unetpp_fast.ops import backends, conv_spec, reference
from unetpp_fast.ops.triton import fused_conv_forward_staged as staged
from unetpp_fast.ops.triton import launch_common
from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = (
    conv_spec.NONE,
    conv_spec.UP_NEAREST,
    conv_spec.UP_BILINEAR,
    conv_spec.UP_BILINEAR_AC,
    conv_spec.MAXPOOL2,
)
CHANNELS_LAST = torch.channels_last
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def staged_everywhere(monkeypatch):
    """The staged kernel wherever it applies (the interpreter included), outputs poisoned, plans
    made afresh (the switch is read when a plan is made)."""
    if backends.why_unusable("triton", DEVICE):
        pytest.skip(backends.why_unusable("triton", DEVICE))
    monkeypatch.setenv(staged.STAGED_ENV, "1")
    real = launch_common.empty_output

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(launch_common, "empty_output", poisoned)
    launch_common.PLANS.clear()
    yield
    launch_common.PLANS.clear()


def _pieces(specs, height, width, batch, generator, dtype=torch.float32, layout=CHANNELS_LAST):
    pieces = []
    for channels, mode in specs:
        if mode in conv_spec.UPSAMPLING_MODES:
            size = (height // 2, width // 2)
        elif mode == MAXPOOL:
            size = (2 * height + 1, 2 * width)  # floor pooling drops the last row
        else:
            size = (height, width)
        piece = torch.randn(batch, channels, *size, generator=generator).to(DEVICE, dtype)
        pieces.append(piece.contiguous(memory_format=layout))
    return pieces


def _plan_of(codes):
    """The launch plan the last call made (the only one: the fixture clears them)."""
    (plan,) = [p for key, p in launch_common.PLANS.items() if key[0] == "forward"]
    return plan


def _run(
    specs, c_out, height, width, batch, activation="relu", with_bias=True, seed=0, dtype=torch.float32, k=3
):
    generator = torch.Generator().manual_seed(seed)
    pieces = _pieces(specs, height, width, batch, generator, dtype)
    codes = [mode for _, mode in specs]
    c_in = sum(c for c, _ in specs)
    weight = (torch.randn(c_out, c_in, k, k, generator=generator) / (k * k * c_in) ** 0.5).to(DEVICE, dtype)
    weight = weight.contiguous(memory_format=CHANNELS_LAST)
    bias = (torch.randn(c_out, generator=generator) * 0.1).to(DEVICE, dtype) if with_bias else None
    out = fused_conv_forward(pieces, codes, weight, bias, activation)
    want = reference.forward(
        [p.double() for p in pieces],
        codes,
        weight.double(),
        None if bias is None else bias.double(),
        activation,
    )
    return out, want, pieces, codes


# (id, pieces [(C, mode)], C_out, H, W, batch, activation, bias): UNet++ node kinds and edges: partial
# pixel blocks, channel counts that are not whole 32-channel blocks, C_out over one 32-wide tile
# (and not a multiple of it), every mode, several pieces.
CASES = [
    pytest.param([(32, NONE), (64, BILINEAR_AC)], 32, 10, 18, 2, "relu", True, id="skip-node-x01"),
    pytest.param(
        [(16, NONE), (16, NONE), (24, BILINEAR_AC)], 40, 10, 14, 1, "leaky_relu:0.1", True, id="x02-odd"
    ),
    pytest.param([(32, MAXPOOL)], 64, 6, 6, 3, "relu", False, id="encoder-maxpool-6x6"),
    pytest.param([(40, NONE)], 24, 7, 11, 2, "none", True, id="conv2-partial-blocks"),
    pytest.param(
        [(8, NONE), (8, NEAREST), (8, BILINEAR), (8, BILINEAR_AC), (16, MAXPOOL)],
        20,
        6,
        10,
        2,
        "relu",
        True,
        id="every-mode",
    ),
]


@pytest.mark.parametrize(("specs", "c_out", "height", "width", "batch", "activation", "with_bias"), CASES)
def test_staged_forward_matches_fp64_reference(specs, c_out, height, width, batch, activation, with_bias):
    out, want, pieces, codes = _run(specs, c_out, height, width, batch, activation, with_bias)
    assert _plan_of(codes).staged is not None, "the launcher did not take the staged kernel"
    assert not torch.isnan(out).any(), "an output element was never written"
    assert out.is_contiguous(memory_format=CHANNELS_LAST)
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-5, f"relative error {error:.2e}"


def test_staged_forward_1x1_head():
    """A deep-supervision head (1x1, one output channel): the block itself is staged, one tap."""
    out, want, _, codes = _run([(32, NONE)], 1, 10, 14, 2, "none", True, seed=7, k=1)
    assert _plan_of(codes).staged is not None
    assert not torch.isnan(out).any()
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 1e-5, f"relative error {error:.2e}"


def test_staged_forward_fp16():
    out, want, *_ = _run([(16, NONE), (32, BILINEAR_AC)], 32, 8, 12, 2, dtype=torch.float16, seed=3)
    assert out.dtype == torch.float16 and not torch.isnan(out).any()
    error = ((out.double() - want).norm() / want.norm()).item()
    assert error < 5e-3, f"relative error {error:.2e}"


def test_staged_forward_propagates_nan_through_the_pool_window():
    """max_pool2d propagates NaN: a NaN in one window reaches exactly the outputs whose 3x3
    neighbourhood covers that pooled pixel."""
    generator = torch.Generator().manual_seed(4)
    (piece,) = _pieces([(16, MAXPOOL)], 6, 8, 1, generator)
    piece[0, 3, 5, 9] = float("nan")  # pooled pixel (2, 4)
    weight = torch.randn(8, 16, 3, 3, generator=generator).to(DEVICE).contiguous(memory_format=CHANNELS_LAST)
    out = fused_conv_forward([piece], [MAXPOOL], weight, None, "none")
    want = reference.forward([piece.double()], [MAXPOOL], weight.double(), None, "none")
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.allclose(out.double()[finite], want[finite], rtol=1e-5, atol=1e-5)


def test_the_launcher_takes_the_staged_kernel_only_where_it_applies(monkeypatch):
    generator = torch.Generator().manual_seed(5)

    def staged_for(pieces, codes, weight):
        launch_common.PLANS.clear()
        fused_conv_forward(pieces, codes, weight, None, "none")
        return _plan_of(codes).staged is not None

    pieces = _pieces([(16, NONE)], 6, 8, 1, generator)
    weight = torch.randn(8, 16, 3, 3, generator=generator).to(DEVICE)
    assert staged_for(pieces, [NONE], weight.contiguous(memory_format=CHANNELS_LAST))
    assert staged_for(
        pieces, [NONE], torch.randn(8, 16, 1, 1, device=DEVICE).contiguous(memory_format=CHANNELS_LAST)
    )  # heads
    three_d = [torch.randn(1, 16, 4, 6, 8, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)]
    weight_3d = torch.randn(8, 16, 3, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    assert not staged_for(three_d, [NONE], weight_3d)
    nchw = [p.contiguous() for p in pieces]
    # Channels not contiguous: the GPU path copies the pieces channels_last first, the interpreter not.
    assert staged_for(nchw, [NONE], weight.contiguous()) == launch_common.on_gpu_layout()
    odd = _pieces([(6, NONE)], 6, 8, 1, generator)  # no whole 16-byte channel vectors
    assert not staged_for(
        odd, [NONE], torch.randn(8, 6, 3, 3, device=DEVICE).contiguous(memory_format=CHANNELS_LAST)
    )
    monkeypatch.setenv(staged.STAGED_ENV, "0")
    assert not staged_for(pieces, [NONE], weight.contiguous(memory_format=CHANNELS_LAST))
    monkeypatch.setenv(staged.STAGED_ENV, "auto")  # the GPU path only: not under the interpreter
    auto = staged_for(pieces, [NONE], weight.contiguous(memory_format=CHANNELS_LAST))
    assert auto == launch_common.on_gpu_layout()


def test_a_misaligned_call_falls_back_to_the_main_forward():
    """A piece whose address is not 16-byte aligned (a view one element in) is read element-wise by
    the main kernel for that call; the result stays right."""
    generator = torch.Generator().manual_seed(6)
    storage = torch.randn(1 * 6 * 8 * 16 + 1, generator=generator).to(DEVICE)
    piece = storage[1:].view(1, 6, 8, 16).permute(0, 3, 1, 2)  # channels_last, address + 4 bytes
    weight = torch.randn(8, 16, 3, 3, generator=generator).to(DEVICE).contiguous(memory_format=CHANNELS_LAST)
    out = fused_conv_forward([piece], [NONE], weight, None, "none")
    assert _plan_of([NONE]).staged is not None  # the plan takes it; this call's address does not
    want = reference.forward([piece.double()], [NONE], weight.double(), None, "none")
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5


def test_a_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv(staged.STAGED_ENV, "yes")
    with pytest.raises(ValueError, match=staged.STAGED_ENV):
        staged.staged_mode()


def test_scratch_serves_every_config_and_grid():
    """The scratch covers the largest slot of every config times the grid's CTAs, and stays about
    `programs` slots however many output-channel tiles: wide C_out does not multiply it."""
    from unetpp_fast.ops.triton import configs

    candidates = configs.gpu_configs("forward_staged", "compute_bound", arch=90)
    programs = 264
    largest_slot = (
        max(staged.halo_rows(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["SUB"]) for c in candidates)
        * staged.BLOCK_K
    )
    for c_out in (72, 512):
        elements = staged.scratch_elements(candidates, c_out, programs)
        assert elements <= (programs + 8) * largest_slot  # one more CTA per tile at most (rounding)
        for config in candidates:
            kw = config.kwargs
            grid = staged.staged_grid(16, 24, 24, c_out, programs)(kw)
            slot = staged.halo_rows(kw["BLOCK_H"], kw["BLOCK_W"], kw["SUB"]) * staged.BLOCK_K
            assert grid[1] == -(-c_out // kw["BLOCK_N"]) and grid[0] >= 1
            assert grid[0] * grid[1] * slot <= elements
