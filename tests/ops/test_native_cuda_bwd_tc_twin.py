"""The tensor-core fused backward (csrc/cuda/fused_conv_bwd_tc.cu) run on the CPU by its twin.

The kernel file compiled by the host compiler with -DUPF_BWD_TC_TWIN runs its own code (tiling,
cp.async zero-fill, ldmatrix / ldmatrix.trans fragments, mma.sync m16n8k16 bf16 with fp32
accumulation, the dgrad epilogues of none / up_nearest / maxpool2, the wgrad's on-the-fly virtual
input, the split-K partials and their ordered reduction; up_bilinear(_ac): the GEMM over a source
block's support and the weighted gather) with one std::thread per CUDA thread
(csrc/cuda/tc_primitives.cuh). Compared with reference.backward in fp64 on the same bf16 inputs,
by relative norm (bf16 outputs: ~2^-9 rounding), every output poisoned with NaN first. Only the
hardware (timing, real cp.async asynchrony) is left to tests/ops/test_native_cuda_bwd.py (marked cuda).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unetpp_fast.ops import reference

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NONE, NEAREST, LINEAR, LINEAR_AC, MAXPOOL = range(5)
TOLERANCE = 1e-2  # bf16 outputs and bf16 virtual-input values: errors ~4e-3; a wrong index gives O(1)


@pytest.fixture(scope="module")
def tc_twin(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    include = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    source = CSRC / "cuda" / "fused_conv_bwd_tc.cu"
    if compiler is None or not os.path.isfile(os.path.join(include, "cuda_bf16.h")) or not source.is_file():
        pytest.skip("needs a C++20 host compiler, the CUDA headers and the checkout's csrc/")
    library = tmp_path_factory.mktemp("bwd_tc_twin") / "fused_conv_bwd_tc_twin.so"
    command = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DUPF_BWD_TC_TWIN"]
    command += [f"-I{CSRC}", f"-I{include}", "-x", "c++", str(source), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 and "barrier" in done.stderr:
        pytest.skip("the host compiler lacks C++20 <barrier>")
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    lib.upf_bwd_tc_twin_bf16.restype = ctypes.c_int
    return lib


def five(t: torch.Tensor) -> list[int]:
    s = t.stride()
    return [s[0], s[1], 0, s[2], s[3]]


def run_twin(lib, pieces, modes, weight, grad_pre, splits):
    n = len(pieces)
    batch, c_out, k = pieces[0].shape[0], weight.shape[0], weight.shape[2]
    out_h, out_w = grad_pre.shape[2:]
    nan = float("nan")
    grads = [torch.full_like(p, nan) for p in pieces]  # channels_last like the pieces, poisoned
    for g, p, mode in zip(grads, pieces, modes):
        if mode == MAXPOOL and (p.shape[2] != 2 * out_h or p.shape[3] != 2 * out_w):
            g.zero_()  # floor pooling's dropped rows: the caller zero-fills (fused_conv_bwd_tc.h)
    grad_weight = torch.full((c_out, weight[0].numel()), nan, dtype=torch.bfloat16)
    grad_bias = torch.full((c_out,), nan, dtype=torch.bfloat16)
    weight = weight.contiguous()
    status = lib.upf_bwd_tc_twin_bf16(
        n,
        (ctypes.c_void_p * n)(*[p.data_ptr() for p in pieces]),
        (ctypes.c_int64 * (5 * n))(*[s for p in pieces for s in five(p)]),
        (ctypes.c_int * (3 * n))(*[d for p in pieces for d in (p.shape[1], p.shape[2], p.shape[3])]),
        (ctypes.c_int * n)(*modes),
        batch,
        out_h,
        out_w,
        ctypes.c_void_p(grad_pre.data_ptr()),
        (ctypes.c_int64 * 5)(*five(grad_pre)),
        ctypes.c_void_p(weight.data_ptr()),
        c_out,
        k,
        splits,
        (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads]),
        (ctypes.c_int64 * (5 * n))(*[s for g in grads for s in five(g)]),
        ctypes.c_void_p(grad_weight.data_ptr()),
        ctypes.c_void_p(grad_bias.data_ptr()),
    )
    assert status == 0, f"the twin refused the call (status {status})"
    return grads, grad_weight.view(weight.shape), grad_bias


def make_case(specs, out_size, c_out, k, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    pieces, modes = [], []
    for channels, mode in specs:
        if mode in (NEAREST, LINEAR, LINEAR_AC):
            size = tuple(s // 2 for s in out_size)
        elif mode == MAXPOOL:
            size = (2 * out_size[0] + 1, 2 * out_size[1])  # floor pooling drops the odd last row
        else:
            size = tuple(out_size)
        piece = torch.randn(batch, channels, *size, generator=gen).to(torch.bfloat16)
        pieces.append(piece.contiguous(memory_format=torch.channels_last))
        modes.append(mode)
    c_in = sum(c for c, _ in specs)
    weight = (torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5).to(torch.bfloat16)
    grad_pre = torch.randn(batch, c_out, *out_size, generator=gen).to(torch.bfloat16)
    return pieces, modes, weight, grad_pre.contiguous(memory_format=torch.channels_last)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(lib, specs, out_size, c_out, k, seed, splits=3):
    pieces, modes, weight, grad_pre = make_case(specs, out_size, c_out, k, seed)
    grads, grad_weight, grad_bias = run_twin(lib, pieces, modes, weight, grad_pre, splits)
    want = reference.backward(
        grad_pre.double(), [p.double() for p in pieces], modes, weight.double(), None, True, "none"
    )
    for i, (got, ref, mode) in enumerate(zip(grads, want, modes)):
        assert not torch.isnan(got).any(), f"pieces[{i}] (mode {mode}): an element was never written"
        error = rel_err(got, ref)
        assert error < TOLERANCE, f"pieces[{i}] (mode {mode}): relative error {error:.2e}"
    for name, got, ref in (("weight", grad_weight, want[-2]), ("bias", grad_bias, want[-1])):
        assert not torch.isnan(got).any(), f"{name}: an element was never written"
        assert rel_err(got, ref) < TOLERANCE, f"{name}: relative error {rel_err(got, ref):.2e}"
    return grads, grad_weight, grad_bias


ALL_MODES = [(8, NONE), (16, NEAREST), (8, LINEAR), (8, LINEAR_AC), (24, MAXPOOL)]


@pytest.mark.parametrize("k", [1, 3])
def test_bwd_tc_twin_all_modes(tc_twin, k):
    """Every mode in one call; C_out = 24 and C_in = 64 not multiples of 32 per piece; 120 rows."""
    check(tc_twin, ALL_MODES, (6, 10), 24, k, seed=k)


def test_bwd_tc_twin_several_tiles_odd_size(tc_twin):
    """Odd output size (none + max-pool only: upsampling gives even sizes), C_in = 72 and C_out = 72
    span two 64-wide tiles, 2 x 9 x 7 = 126 pixels span two M tiles and an uneven split-K."""
    check(tc_twin, [(40, NONE), (32, MAXPOOL)], (9, 7), 72, 3, seed=7, splits=2)


def test_bwd_tc_twin_nearest_many_source_pixels(tc_twin):
    """up_nearest with more than one CTA of (source pixel, child) rows: 2 x 5 x 4 x 4 = 160 rows."""
    check(tc_twin, [(8, NEAREST), (16, NONE)], (10, 8), 16, 3, seed=11, splits=1)


@pytest.mark.parametrize("mode", [LINEAR, LINEAR_AC], ids=["bilinear", "bilinear_ac"])
def test_bwd_tc_twin_bilinear_several_source_blocks(tc_twin, mode):
    """Sources 5 x 11 (two 4-row and two 8-column blocks, partial ones), 72 channels (two tiles)."""
    check(tc_twin, [(72, mode), (8, NONE)], (10, 22), 16, 3, seed=13, splits=2)


def test_bwd_tc_twin_max_pool_ties_go_to_the_first_maximum(tc_twin):
    pieces, modes, weight, grad_pre = make_case([(16, MAXPOOL)], (4, 6), 8, 3, seed=5)
    pieces[0] = pieces[0].round().clamp(-1, 1).contiguous(memory_format=torch.channels_last)  # many ties
    grads, _, _ = run_twin(tc_twin, pieces, modes, weight, grad_pre, splits=1)
    want = reference.backward(
        grad_pre.double(), [p.double() for p in pieces], modes, weight.double(), None, True, "none"
    )
    assert rel_err(grads[0], want[0]) < TOLERANCE
    # exactly one (the first) position of every window carries the gradient
    nonzero_where_reference_is_zero = (grads[0] != 0) & (want[0] == 0)
    assert not nonzero_where_reference_is_zero.any()


def test_bwd_tc_twin_is_bitwise_repeatable(tc_twin):
    specs = [(8, NONE), (8, NEAREST), (16, MAXPOOL)]
    pieces, modes, weight, grad_pre = make_case(specs, (6, 6), 16, 3, seed=3)
    first = run_twin(tc_twin, pieces, modes, weight, grad_pre, splits=3)
    again = run_twin(tc_twin, pieces, modes, weight, grad_pre, splits=3)
    for a, b in zip([*first[0], first[1], first[2]], [*again[0], again[1], again[2]]):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
