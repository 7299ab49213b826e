"""The tensor-core CUDA forward in 3D (its DIMS = 3 instance), run on the CPU through its twin.

Same twin as tests/ops/test_native_cuda_twin.py (fused_conv_tc.cu compiled by the host compiler with
-DUPF_TC_TWIN, one std::thread per CUDA thread): 5-D pieces [N, C, D, H, W] in channels_last_3d and
NCDHW, every 3D resample (none, up_nearest, up_trilinear, up_trilinear_ac, 2x2x2 maxpool2), k = 1 and
3, against the fp64 reference (cat + interpolate / max_pool3d + conv3d). The kernel's 3D indexing
(depth taps in the K order, source slices, trilinear blend, 2x2x2 window, output depth stride) is
what is tested; the hardware is left for tests/ops/test_native_cuda_3d.py.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from unetpp_fast.ops import conv_spec, reference

from .test_native_cuda_twin import (  # noqa: F401  (twin: the compiled twin fixture)
    ACTIVATIONS,
    BLOCK_CHANNELS,
    DTYPE_CODES,
    TF32_TOLERANCE,
    round_to_tf32,
    twin,
)

NONE, NEAREST, TRILINEAR, TRILINEAR_AC, MAXPOOL = range(5)


def pack_weight_3d(weight: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """[C_out, C_in, k, k, k] -> [C_out, k, k, k, Kp], each piece's channels padded to a K block
    (fused_conv_tc.h); fp32 rounded to TF32."""
    c_out, _, k, _, _ = weight.shape
    block = BLOCK_CHANNELS[weight.dtype]
    taps = weight.permute(0, 2, 3, 4, 1)
    if weight.dtype == torch.float32:
        taps = round_to_tf32(taps)
    packed = torch.zeros(
        c_out, k, k, k, sum(math.ceil(c / block) * block for c in channels), dtype=weight.dtype
    )
    offset = start = 0
    for c in channels:
        packed[..., offset : offset + c] = taps[..., start : start + c]
        offset += math.ceil(c / block) * block
        start += c
    return packed.contiguous()


def run_twin_3d(lib, pieces, modes, weight, bias, activation):
    depth, height, width = conv_spec.resampled_shape(tuple(pieces[0].shape[2:]), modes[0])
    batch, c_out, k = pieces[0].shape[0], weight.shape[0], weight.shape[2]
    kind, slope = conv_spec.parse_activation(activation)
    fmt = conv_spec.output_memory_format(pieces[0])
    dtype = weight.dtype
    out = torch.full((batch, c_out, depth, height, width), float("nan"), dtype=dtype)
    out = out.contiguous(memory_format=fmt)
    weight = weight.contiguous()
    block = BLOCK_CHANNELS[dtype]
    kp = sum(math.ceil(p.shape[1] / block) * block for p in pieces)
    workspace = torch.full((c_out * k**3 * kp,), float("nan"), dtype=dtype)
    n = len(pieces)
    lib.upf_tc_twin_forward_nd.restype = ctypes.c_int
    status = lib.upf_tc_twin_forward_nd(
        DTYPE_CODES[dtype],
        3,
        n,
        (ctypes.c_void_p * n)(*[p.data_ptr() for p in pieces]),
        (ctypes.c_int64 * (5 * n))(*[s for p in pieces for s in p.stride()]),
        (ctypes.c_int * (4 * n))(*[d for p in pieces for d in p.shape[1:]]),
        (ctypes.c_int * n)(*modes),
        batch,
        depth,
        height,
        width,
        ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_void_p(workspace.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else None),
        c_out,
        k,
        ctypes.c_void_p(out.data_ptr()),
        (ctypes.c_int64 * 5)(*out.stride()),
        ACTIVATIONS[kind],
        ctypes.c_float(slope),
    )
    assert status == 0, f"launcher returned cudaError {status}"
    # The pack kernel's 3D output is the documented layout (tap = (kz, ky, kx)), padding zero-filled.
    want_packed = pack_weight_3d(weight, [p.shape[1] for p in pieces])
    assert torch.equal(workspace.view(c_out, k, k, k, kp), want_packed)
    return out


def make_pieces_3d(specs, size, batch, channels_last, generator, dtype=torch.bfloat16):
    depth, height, width = size
    pieces, modes = [], []
    for channels, mode in specs:
        if mode in (NEAREST, TRILINEAR, TRILINEAR_AC):
            shape = (depth // 2, height // 2, width // 2)
        elif mode == MAXPOOL:
            shape = (2 * depth + 1, 2 * height, 2 * width + 1)  # floor pooling drops the odd slice/column
        else:
            shape = (depth, height, width)
        piece = torch.randn(batch, channels, *shape, generator=generator).to(dtype)
        if channels_last:
            piece = piece.contiguous(memory_format=torch.channels_last_3d)
        pieces.append(piece)
        modes.append(mode)
    return pieces, modes


def check(
    lib, specs, c_out, k, size, activation, channels_last, seed, batch=1, with_bias=True, dtype=torch.bfloat16
):
    generator = torch.Generator().manual_seed(seed)
    pieces, modes = make_pieces_3d(specs, size, batch, channels_last, generator, dtype)
    c_in = sum(p.shape[1] for p in pieces)
    weight = torch.randn(c_out, c_in, k, k, k, generator=generator) / (c_in * k**3) ** 0.5
    weight = weight.to(dtype)
    bias = (torch.randn(c_out, generator=generator) * 0.1).to(dtype) if with_bias else None
    got = run_twin_3d(lib, pieces, modes, weight, bias, activation)
    bias64 = bias.double() if bias is not None else None
    want = reference.forward([p.double() for p in pieces], modes, weight.double(), bias64, activation)
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), "an output element was never written"
    assert got.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    error = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
    tolerance = TF32_TOLERANCE if dtype == torch.float32 else 1e-2
    assert error < tolerance, f"relative error {error:.2e} for {specs}, k {k}"


MODE_CASES = [
    ("none", [(32, NONE)]),
    ("nearest", [(16, NEAREST)]),
    ("trilinear", [(16, TRILINEAR)]),
    ("trilinear_ac", [(16, TRILINEAR_AC)]),
    ("maxpool", [(16, MAXPOOL)]),
    ("all_modes", [(8, NONE), (8, NEAREST), (8, TRILINEAR), (8, TRILINEAR_AC), (8, MAXPOOL)]),
]


@pytest.mark.parametrize("case", MODE_CASES[:-1], ids=[c[0] for c in MODE_CASES[:-1]])
def test_twin_3d_each_mode_matches_fp64_reference(twin, case):  # noqa: F811
    """Each mode alone on its vectorised channels_last_3d path (8 channels per 16 bytes), k = 3."""
    check(twin, case[1], 24, 3, (4, 4, 6), "leaky_relu:0.1", True, seed=11)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels_last", [True, False], ids=["ndhwc", "ncdhw"])
def test_twin_3d_all_modes_matches_fp64_reference(twin, channels_last, k):  # noqa: F811
    """Every mode in one node, both layouts (NCDHW takes the generic per-element path), k = 1 and 3."""
    check(twin, MODE_CASES[-1][1], 24, k, (4, 4, 6), "leaky_relu:0.1", channels_last, seed=7 + k)


def test_twin_3d_unet_skip_node_odd_channels_and_two_ctas(twin):  # noqa: F811
    """A 3D UNet++ skip node (two same-level pieces + a trilinear one), a C % 8 != 0 piece (the
    generic per-element path), more pixels than one 128-row CTA and a C_out past one 64-wide tile."""
    specs = [(16, NONE), (5, NONE), (24, TRILINEAR)]
    check(twin, specs, 72, 3, (4, 6, 6), "relu", True, seed=3, batch=2, with_bias=False)


@pytest.mark.parametrize("k", [1, 3])
def test_twin_3d_tf32_all_modes_matches_fp64_reference(twin, k):  # noqa: F811
    """fp32 on TF32: every 3D mode, 4- and 12-channel pieces (vectorised in fp32 only), two K blocks."""
    specs = [(4, NONE), (12, NEAREST), (20, TRILINEAR), (4, TRILINEAR_AC), (8, MAXPOOL)]
    check(twin, specs, 12, k, (4, 4, 6), "leaky_relu:0.1", True, seed=20 + k, dtype=torch.float32)
