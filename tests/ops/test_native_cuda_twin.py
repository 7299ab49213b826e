"""The tensor-core CUDA forward (csrc/cuda/fused_conv_tc.cu) run on the CPU through its twin.

The kernel file is compiled by the host compiler with -DUPF_TC_TWIN: its own code (K-block cursor,
cp.async addressing and zero-fill, swizzle, ldmatrix / mma.sync fragment bookkeeping, resample
paths, epilogue) runs with one std::thread per CUDA thread and CPU versions of the warp
primitives that follow the PTX ISA's per-lane semantics (csrc/cuda/fused_conv_tc_twin.h). Only the
hardware is left for the GPU tests (tests/ops/test_native_cuda.py).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unetpp_fast.ops import conv_spec, reference

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = os.path.join(cuda_home, "include")
    source = CSRC / "cuda" / "fused_conv_tc.cu"
    if compiler is None or not os.path.isfile(os.path.join(include, "cuda_bf16.h")) or not source.is_file():
        pytest.skip("needs a C++20 host compiler, the CUDA headers and the checkout's csrc/")
    library = tmp_path_factory.mktemp("twin") / "fused_conv_tc_twin.so"
    command = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DUPF_TC_TWIN"]
    command += [f"-I{CSRC}", f"-I{include}", "-x", "c++", str(source), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 and "<barrier>" in done.stderr:
        pytest.skip("the host compiler lacks C++20 <barrier>")
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    lib.upf_tc_twin_forward_bf16.restype = ctypes.c_int
    lib.upf_tc_twin_forward.restype = ctypes.c_int
    lib.upf_tc_twin_set_halo_policy.argtypes = [ctypes.c_int]
    lib.upf_tc_twin_last_was_halo.restype = ctypes.c_int
    return lib


# The launcher's data-type codes (DType in fused_conv_kernels.h) and channels per K block (64 bytes).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 2}
BLOCK_CHANNELS = {torch.float32: 16, torch.bfloat16: 32}


def round_to_tf32(values: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32, nearest with ties away from zero (cvt.rna.tf32.f32); NaN / inf unchanged."""
    bits = values.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    special = (bits & 0x7F800000) == 0x7F800000
    return torch.where(special, bits, rounded).view(torch.float32)


def pack_weight(weight: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """[C_out, C_in, k, k] -> [C_out, k, k, Kp], each piece's channels padded to a K block (fused_conv_tc.h);
    fp32 rounded to TF32."""
    c_out, _, k, _ = weight.shape
    block = BLOCK_CHANNELS[weight.dtype]
    taps = weight.permute(0, 2, 3, 1)
    if weight.dtype == torch.float32:
        taps = round_to_tf32(taps)
    packed = torch.zeros(c_out, k, k, sum(math.ceil(c / block) * block for c in channels), dtype=weight.dtype)
    offset = start = 0
    for c in channels:
        packed[..., offset : offset + c] = taps[..., start : start + c]
        offset += math.ceil(c / block) * block
        start += c
    return packed.contiguous()


LINEAR, HALO, AUTO = 0, 1, -1  # upf_tc_twin_set_halo_policy: which 2D k = 3 kernel the launcher runs


def run_twin(lib, pieces, modes, weight, bias, activation, policy=LINEAR):
    lib.upf_tc_twin_set_halo_policy(policy)
    height, width = conv_spec.resampled_size(pieces[0].shape[2], pieces[0].shape[3], modes[0])
    batch, c_out, k = pieces[0].shape[0], weight.shape[0], weight.shape[2]
    kind, slope = conv_spec.parse_activation(activation)
    fmt = conv_spec.output_memory_format(pieces[0])
    dtype = weight.dtype
    out = torch.full((batch, c_out, height, width), float("nan"), dtype=dtype)
    out = out.contiguous(memory_format=fmt)
    weight = weight.contiguous()
    block = BLOCK_CHANNELS[dtype]
    kp = sum(math.ceil(p.shape[1] / block) * block for p in pieces)
    workspace = torch.full((c_out * k * k * kp,), float("nan"), dtype=dtype)
    n = len(pieces)
    status = lib.upf_tc_twin_forward(
        DTYPE_CODES[dtype],
        n,
        (ctypes.c_void_p * n)(*[p.data_ptr() for p in pieces]),
        (ctypes.c_int64 * (4 * n))(*[s for p in pieces for s in p.stride()]),
        (ctypes.c_int * (3 * n))(*[d for p in pieces for d in p.shape[1:]]),
        (ctypes.c_int * n)(*modes),
        batch,
        height,
        width,
        ctypes.c_void_p(weight.data_ptr()),
        ctypes.c_void_p(workspace.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else None),
        c_out,
        k,
        ctypes.c_void_p(out.data_ptr()),
        (ctypes.c_int64 * 4)(*out.stride()),
        ACTIVATIONS[kind],
        ctypes.c_float(slope),
    )
    assert status == 0, f"launcher returned cudaError {status}"
    # The pack kernel's output is the documented layout, padding zero-filled.
    assert torch.equal(workspace.view(c_out, k, k, kp), pack_weight(weight, [p.shape[1] for p in pieces]))
    return out


def make_pieces(specs, height, width, batch, channels_last, generator, dtype=torch.bfloat16):
    pieces, modes = [], []
    for channels, mode, layout in specs:
        if mode in (NEAREST, BILINEAR, BILINEAR_AC):
            h, w = height // 2, width // 2
        elif mode == MAXPOOL:
            h, w = 2 * height + 1, 2 * width  # floor pooling drops the last row
        else:
            h, w = height, width
        piece = torch.randn(batch, channels, h, w, generator=generator).to(dtype)
        if layout if layout is not None else channels_last:
            piece = piece.contiguous(memory_format=torch.channels_last)
        pieces.append(piece)
        modes.append(mode)
    return pieces, modes


# (name, [(channels, mode, channels_last or None = the case default)], C_out, k, (H, W), activation)
CASES = [
    (
        "skip_bilinear_ac",
        [(32, NONE, None), (16, NONE, None), (24, BILINEAR_AC, None)],
        40,
        3,
        (10, 12),
        "relu",
    ),
    (
        "all_modes",
        [
            (8, NONE, None),
            (8, NEAREST, None),
            (8, BILINEAR, None),
            (8, BILINEAR_AC, None),
            (16, MAXPOOL, None),
        ],
        24,
        3,
        (10, 14),
        "leaky_relu:0.1",
    ),
    ("rgb_input_generic", [(3, NONE, None)], 32, 3, (12, 10), "relu"),
    ("nchw_generic_paths", [(16, NONE, False), (8, BILINEAR, False)], 20, 3, (8, 8), "none"),
    ("wide_channels", [(72, NONE, None), (40, MAXPOOL, None)], 72, 3, (6, 7), "relu"),
    ("head_1x1", [(32, NONE, None)], 1, 1, (11, 13), "none"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_twin_matches_fp64_reference(twin, case):
    _, specs, c_out, k, (height, width), activation = case
    generator = torch.Generator().manual_seed(0)
    pieces, modes = make_pieces(specs, height, width, 2, True, generator)
    c_in = sum(p.shape[1] for p in pieces)
    weight = (torch.randn(c_out, c_in, k, k, generator=generator) / (c_in * k * k) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, generator=generator) * 0.1).to(torch.bfloat16)
    got = run_twin(twin, pieces, modes, weight, bias, activation)
    want = reference.forward([p.double() for p in pieces], modes, weight.double(), bias.double(), activation)
    assert not torch.isnan(got).any(), "an output element was never written"
    assert got.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    error = (got.double() - want).norm() / want.norm()
    assert error < 1e-2, f"relative error {error:.2e}"


@pytest.mark.parametrize("seed", range(4))
def test_twin_random_nodes(twin, seed):
    """Random piece lists, channel counts (vectorisable or not), modes, layouts, sizes, C_out and k."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    height, width = pick([4, 6, 10, 14]), pick([4, 8, 12])
    all_modes = [NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL]
    count = pick([1, 2, 3, 4])
    specs = [(pick([3, 8, 16, 24, 40, 64]), pick(all_modes), pick([None, False])) for _ in range(count)]
    c_out, k = pick([1, 8, 30, 64, 80]), pick([1, 3])
    activation = pick(["none", "relu", "leaky_relu:0.2"])
    pieces, modes = make_pieces(specs, height, width, pick([1, 2, 3]), True, rng)
    c_in = sum(p.shape[1] for p in pieces)
    weight = (torch.randn(c_out, c_in, k, k, generator=rng) / (c_in * k * k) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, generator=rng) * 0.1).to(torch.bfloat16) if seed % 2 else None
    got = run_twin(twin, pieces, modes, weight, bias, activation)
    bias64 = bias.double() if bias is not None else None
    want = reference.forward([p.double() for p in pieces], modes, weight.double(), bias64, activation)
    assert not torch.isnan(got).any(), "an output element was never written"
    error = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
    assert error < 1e-2, f"relative error {error:.2e} for {specs}, C_out {c_out}, k {k}"


def halo_case(twin, specs, c_out, height, width, batch, activation, with_bias, seed):
    """The halo kernel (fused_conv_tc_halo.cuh) forced on a channels_last node vs the fp64 reference."""
    generator = torch.Generator().manual_seed(seed)
    pieces, modes = make_pieces(specs, height, width, batch, True, generator)
    c_in = sum(p.shape[1] for p in pieces)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=generator) / (c_in * 9) ** 0.5).to(torch.bfloat16)
    bias = (torch.randn(c_out, generator=generator) * 0.1).to(torch.bfloat16) if with_bias else None
    got = run_twin(twin, pieces, modes, weight, bias, activation, policy=HALO)
    assert twin.upf_tc_twin_last_was_halo() == 1, "the launcher did not run the halo kernel"
    bias64 = bias.double() if bias is not None else None
    want = reference.forward([p.double() for p in pieces], modes, weight.double(), bias64, activation)
    assert not torch.isnan(got).any(), "an output element was never written"
    error = (got.double() - want).norm() / want.norm()
    assert error < 1e-2, f"relative error {error:.2e} for {specs}, C_out {c_out}, {height}x{width}"


# (name, pieces [(channels, mode, None)], C_out, (H, W), batch, activation, bias): sizes that are not
# multiples of the 8 x 16 block, channel counts that are not multiples of 32, C_out below / above one
# 32- or 64-wide tile (and not a multiple of 8: the element-wise epilogue).
HALO_CASES = [
    ("none_odd_size", [(40, NONE, None), (16, NONE, None)], 40, (11, 19), 2, "relu", True),
    (
        "all_modes",
        [
            (8, NONE, None),
            (8, NEAREST, None),
            (8, BILINEAR, None),
            (8, BILINEAR_AC, None),
            (16, MAXPOOL, None),
        ],
        30,
        (10, 18),
        2,
        "leaky_relu:0.1",
        True,
    ),
    ("skip_and_bilinear", [(32, NONE, None), (64, BILINEAR, None)], 32, (6, 20), 3, "relu", True),
    ("maxpool_two_n_tiles", [(72, MAXPOOL, None)], 80, (8, 16), 1, "none", False),
    ("rgb_input", [(3, NONE, None)], 32, (12, 20), 2, "relu", True),
    (
        "nchw_none_and_bilinear",
        [(16, NONE, False), (3, NONE, False), (8, BILINEAR, None)],
        24,
        (10, 18),
        2,
        "none",
        True,
    ),
    # Narrow images (W <= 7) in pairs: an odd batch leaves the last pair's right half empty.
    ("paired_6x6_odd_batch", [(64, NONE, None), (32, MAXPOOL, None)], 72, (6, 6), 3, "relu", True),
    ("paired_7x7_rgb", [(3, NONE, None), (16, MAXPOOL, None)], 30, (7, 7), 2, "none", True),
    (
        "paired_4x6_up",
        [(8, NONE, False), (24, BILINEAR_AC, None), (8, NEAREST, None)],
        16,
        (4, 6),
        4,
        "relu",
        False,
    ),
    ("bilinear_ac_nearest", [(24, BILINEAR_AC, None), (48, NEAREST, None)], 64, (14, 6), 2, "none", True),
]


@pytest.mark.parametrize("case", HALO_CASES, ids=[c[0] for c in HALO_CASES])
def test_twin_halo_matches_fp64_reference(twin, case):
    _, specs, c_out, (height, width), batch, activation, with_bias = case
    halo_case(twin, specs, c_out, height, width, batch, activation, with_bias, seed=1)


def test_twin_halo_choice(twin):
    """Auto: the halo kernel for 2D k = 3 (small images, the RGB input and NCHW `none` pieces too), the
    linear one on k = 1 and when a resampled piece is not 16-byte vectorisable."""
    generator = torch.Generator().manual_seed(5)

    def choice(specs, height, width, k, channels_last=True):
        pieces, modes = make_pieces(specs, height, width, 1, channels_last, generator)
        c_in = sum(p.shape[1] for p in pieces)
        weight = torch.randn(8, c_in, k, k, generator=generator).to(torch.bfloat16)
        run_twin(twin, pieces, modes, weight, None, "none", policy=AUTO)
        return twin.upf_tc_twin_last_was_halo()

    assert choice([(8, NONE, None)], 16, 32, 3) == 1
    assert choice([(8, NONE, None)], 6, 6, 3) == 1
    assert choice([(8, NONE, None)], 16, 32, 1) == 0
    assert choice([(8, NONE, None), (3, NONE, None)], 16, 32, 3) == 1
    assert choice([(8, NONE, False)], 16, 32, 3) == 1
    assert choice([(8, NONE, None), (8, BILINEAR, False)], 16, 32, 3) == 0
    assert choice([(8, NONE, None), (3, MAXPOOL, None)], 16, 32, 3) == 0


@pytest.mark.parametrize("seed", range(2))
def test_twin_halo_random_nodes(twin, seed):
    """Random vectorisable piece lists (every mode), sizes, C_out, batch and activation."""
    rng = torch.Generator().manual_seed(200 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    height, width = pick([4, 6, 10, 18]), pick([6, 16, 22])
    all_modes = [NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL]
    specs = [(pick([8, 16, 24, 40, 64]), pick(all_modes), None) for _ in range(pick([1, 2, 3]))]
    c_out = pick([8, 30, 64, 72])
    halo_case(
        twin, specs, c_out, height, width, pick([1, 2]), pick(["none", "relu"]), seed % 2 == 1, 300 + seed
    )


# fp32 on TF32 tensor cores (m16n8k8): K blocks of 16 channels, 16-byte chunks of 4. Channel counts
# that are multiples of 4 but not of 8 (12, 20) are vectorised in fp32 only; C_out 12 takes the
# 16-byte epilogue in fp32 only.
TF32_CASES = [
    (
        "skip_bilinear_ac",
        [(32, NONE, None), (12, NONE, None), (20, BILINEAR_AC, None)],
        40,
        3,
        (10, 12),
        "relu",
    ),
    (
        "all_modes",
        [
            (4, NONE, None),
            (8, NEAREST, None),
            (12, BILINEAR, None),
            (4, BILINEAR_AC, None),
            (20, MAXPOOL, None),
        ],
        12,
        3,
        (10, 14),
        "leaky_relu:0.1",
    ),
    ("rgb_input_generic", [(3, NONE, None)], 32, 3, (12, 10), "relu"),
    ("nchw_generic_paths", [(16, NONE, False), (6, BILINEAR, False)], 20, 3, (8, 8), "none"),
    ("head_1x1", [(36, NONE, None)], 12, 1, (11, 13), "none"),
]
# TF32 keeps 10 mantissa bits (bf16: 7): the activations truncated, the weights rounded. Measured
# about 5e-4 on these cases; bf16 operands give about 3e-3.
TF32_TOLERANCE = 1e-3


def tf32_case(twin, specs, c_out, k, height, width, batch, activation, policy, seed):
    generator = torch.Generator().manual_seed(seed)
    pieces, modes = make_pieces(specs, height, width, batch, True, generator, dtype=torch.float32)
    c_in = sum(p.shape[1] for p in pieces)
    weight = torch.randn(c_out, c_in, k, k, generator=generator) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out, generator=generator) * 0.1
    got = run_twin(twin, pieces, modes, weight, bias, activation, policy=policy)
    want = reference.forward([p.double() for p in pieces], modes, weight.double(), bias.double(), activation)
    assert not torch.isnan(got).any(), "an output element was never written"
    assert got.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    error = (got.double() - want).norm() / want.norm()
    assert error < TF32_TOLERANCE, f"relative error {error:.2e}"


@pytest.mark.parametrize("case", TF32_CASES, ids=[c[0] for c in TF32_CASES])
def test_twin_tf32_matches_fp64_reference(twin, case):
    _, specs, c_out, k, (height, width), activation = case
    tf32_case(twin, specs, c_out, k, height, width, 2, activation, LINEAR, seed=3)


@pytest.mark.parametrize("case", TF32_CASES[:3], ids=[c[0] for c in TF32_CASES[:3]])  # k = 3, vectorised
def test_twin_tf32_halo_matches_fp64_reference(twin, case):
    _, specs, c_out, k, (height, width), activation = case
    tf32_case(twin, specs, c_out, k, height, width, 2, activation, HALO, seed=4)
    assert twin.upf_tc_twin_last_was_halo() == 1, "the launcher did not run the halo kernel"


def test_twin_tf32_paired_narrow_images(twin):
    tf32_case(twin, [(64, NONE, None), (12, MAXPOOL, None)], 40, 3, 6, 6, 3, "relu", HALO, seed=5)


def test_twin_tf32_is_tf32_not_fp32(twin):
    """The MMA reads 19 bits: operands whose low 13 bits are all that differs give the same output."""
    generator = torch.Generator().manual_seed(6)
    pieces, modes = make_pieces([(16, NONE, None)], 8, 16, 1, True, generator, dtype=torch.float32)
    weight = torch.randn(8, 16, 3, 3, generator=generator)
    coarse = round_to_tf32(pieces[0]).view(torch.int32) & ~0x1FFF
    fine = coarse | 0x0FFF  # below TF32's last mantissa bit, kept under the rounding threshold
    out_coarse = run_twin(twin, [coarse.view(torch.float32)], modes, weight, None, "none")
    out_fine = run_twin(twin, [fine.view(torch.float32)], modes, weight, None, "none")
    assert torch.equal(out_coarse, out_fine)
    exact = reference.forward([fine.view(torch.float32).double()], modes, weight.double(), None, "none")
    assert not torch.allclose(out_fine.double(), exact, rtol=0, atol=1e-7), (
        "the product was not rounded at all"
    )
