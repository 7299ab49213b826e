"""The fused CUDA backward's arithmetic (csrc/cuda/fused_conv_bwd.h) on the CPU, in fp64.

csrc/cuda/fused_conv_bwd.cu compiled by the host compiler with -DUPF_BWD_TWIN runs the per-element
functions its kernels run (dgrad through each resample's adjoint, max-pool to the recomputed argmax;
split-K weight and bias gradients summed in order) over every element in double precision. Compared
with reference.backward (PyTorch autograd of cat + interpolate / max_pool + conv) in fp64: 2D and 3D,
every mode, k = 1 and 3, contiguous and channels_last strides. The GPU run is left for
tests/ops/test_native_cuda*.py (marked cuda).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unetpp_fast.ops import conv_spec, reference

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NONE, NEAREST, LINEAR, LINEAR_AC, MAXPOOL = range(5)


@pytest.fixture(scope="module")
def bwd_twin(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    source = CSRC / "cuda" / "fused_conv_bwd.cu"
    if compiler is None or not source.is_file():
        pytest.skip("needs a C++17 host compiler and the checkout's csrc/")
    library = tmp_path_factory.mktemp("bwd_twin") / "fused_conv_bwd_twin.so"
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-DUPF_BWD_TWIN", f"-I{CSRC}"]
    command += ["-x", "c++", str(source), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    lib = ctypes.CDLL(str(library))
    lib.upf_bwd_twin_f64.restype = ctypes.c_int
    return lib


def five(t: torch.Tensor) -> list[int]:
    """(n, c, d, h, w) strides; d = 0 for a 4-D tensor."""
    s = t.stride()
    return list(s) if t.dim() == 5 else [s[0], s[1], 0, s[2], s[3]]


def run_twin(lib, pieces, modes, weight, grad_pre, splits):
    volume = pieces[0].dim() == 5
    out_spatial = tuple(grad_pre.shape[2:])
    out_d = out_spatial[0] if volume else 1
    out_h, out_w = out_spatial[-2:]
    batch, c_out, k = pieces[0].shape[0], weight.shape[0], weight.shape[2]
    n = len(pieces)
    grads = [torch.full(p.shape, float("nan"), dtype=torch.float64) for p in pieces]  # poisoned, contiguous
    grad_weight = torch.full((c_out, weight[0].numel()), float("nan"), dtype=torch.float64)
    grad_bias = torch.full((c_out,), float("nan"), dtype=torch.float64)
    sizes = [[p.shape[1], p.shape[2] if volume else 1, p.shape[-2], p.shape[-1]] for p in pieces]
    weight = weight.contiguous()
    status = lib.upf_bwd_twin_f64(
        int(volume),
        n,
        (ctypes.c_void_p * n)(*[p.data_ptr() for p in pieces]),
        (ctypes.c_int64 * (5 * n))(*[s for p in pieces for s in five(p)]),
        (ctypes.c_int * (4 * n))(*[d for size in sizes for d in size]),
        (ctypes.c_int * n)(*modes),
        batch,
        out_d,
        out_h,
        out_w,
        ctypes.c_void_p(grad_pre.data_ptr()),
        (ctypes.c_int64 * 5)(*five(grad_pre)),
        ctypes.c_void_p(weight.data_ptr()),
        c_out,
        k,
        splits,
        (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads]),
        ctypes.c_void_p(grad_weight.data_ptr()),
        ctypes.c_void_p(grad_bias.data_ptr()),
    )
    assert status == 0
    return grads, grad_weight.view(weight.shape), grad_bias


def make_case(specs, out_size, c_out, k, channels_last, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    dims = len(out_size)
    pieces, modes = [], []
    for channels, mode in specs:
        if mode in (NEAREST, LINEAR, LINEAR_AC):
            size = tuple(s // 2 for s in out_size)
        elif mode == MAXPOOL:
            # floor pooling drops the odd last row
            size = tuple(2 * s + (1 if i % 2 == 0 else 0) for i, s in enumerate(out_size))
        else:
            size = tuple(out_size)
        piece = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
        if channels_last:
            piece = piece.contiguous(memory_format=conv_spec.channels_last_format(piece.dim()))
        pieces.append(piece)
        modes.append(mode)
    c_in = sum(c for c, _ in specs)
    weight = torch.randn(c_out, c_in, *[k] * dims, generator=gen, dtype=torch.float64)
    grad_pre = torch.randn(batch, c_out, *out_size, generator=gen, dtype=torch.float64)
    if channels_last:
        grad_pre = grad_pre.contiguous(memory_format=conv_spec.channels_last_format(grad_pre.dim()))
    return pieces, modes, weight, grad_pre


def check(lib, specs, out_size, c_out, k, channels_last, seed, splits=3):
    pieces, modes, weight, grad_pre = make_case(specs, out_size, c_out, k, channels_last, seed)
    grads, grad_weight, grad_bias = run_twin(lib, pieces, modes, weight, grad_pre, splits)
    want = reference.backward(grad_pre, pieces, modes, weight, None, True, "none")
    names = [f"pieces[{i}]" for i in range(len(pieces))] + ["weight", "bias"]
    for name, got, ref in zip(names, [*grads, grad_weight, grad_bias], want):
        assert got.shape == ref.shape, name
        assert not torch.isnan(got).any(), f"{name}: an element was never written"
        error = (got - ref).norm() / ref.norm().clamp_min(1e-300)
        assert error < 1e-12, f"{name}: relative error {error:.2e}"


ALL_MODES = [(3, NONE), (4, NEAREST), (2, LINEAR), (3, LINEAR_AC), (5, MAXPOOL)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bwd_twin_2d_all_modes_fp64(bwd_twin, channels_last, k):
    check(bwd_twin, ALL_MODES, (6, 8), 4, k, channels_last, seed=k)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last_3d"])
def test_bwd_twin_3d_all_modes_fp64(bwd_twin, channels_last, k):
    check(bwd_twin, ALL_MODES, (4, 4, 6), 3, k, channels_last, seed=10 + k)


@pytest.mark.parametrize("dims", [2, 3])
def test_bwd_twin_small_sources_and_ties(bwd_twin, dims):
    """1-wide sources (align_corners scale 0, clamped taps) and max-pool windows with ties: the
    first maximum gets the gradient, as max_pool2d / max_pool3d's indices say."""
    out_size = (2, 2, 2) if dims == 3 else (2, 2)
    pieces, modes, weight, grad_pre = make_case(
        [(2, LINEAR_AC), (2, LINEAR), (2, NEAREST), (3, MAXPOOL)], out_size, 2, 3, False, seed=5
    )
    pieces[3] = pieces[3].round()  # small integers: many tied window maxima
    grads, grad_weight, grad_bias = run_twin(bwd_twin, pieces, modes, weight, grad_pre, splits=1)
    want = reference.backward(grad_pre, pieces, modes, weight, None, True, "none")
    for got, ref in zip([*grads, grad_weight, grad_bias], want):
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_bwd_twin_split_count_does_not_change_the_weight_gradient_beyond_rounding(bwd_twin):
    pieces, modes, weight, grad_pre = make_case([(4, NONE), (3, LINEAR)], (6, 6), 3, 3, True, seed=21)
    one = run_twin(bwd_twin, pieces, modes, weight, grad_pre, splits=1)
    many = run_twin(bwd_twin, pieces, modes, weight, grad_pre, splits=7)
    assert torch.allclose(one[1], many[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(one[2], many[2], rtol=1e-12, atol=1e-12)
    again = run_twin(bwd_twin, pieces, modes, weight, grad_pre, splits=7)
    assert torch.equal(many[1], again[1])  # a fixed summation order: bitwise repeatable
