"""The C++ CPU backend ('cpu') across thread counts: exact at 1, 2 and 3 threads, and parallel at
one level only: its library calls (oneDNN convolutions and their backward in fp32, GEMMs in fp64)
are the same calls whatever the thread count, so the library's own threads are the only
parallelism inside them, never nested inside the backend's parallel loops."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from unetpp_fast.ops import backends, conv_spec, reference

CPU_REASON = backends.why_unusable("cpu", "cpu")
pytestmark = pytest.mark.skipif(bool(CPU_REASON), reason=f"cpu backend unusable: {CPU_REASON}")

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)
LIBRARY_CALLS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::convolution", "aten::convolution_backward")


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


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    assert not torch.isnan(a).any(), "NaN in the result (an unwritten or poisoned element)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_pieces(specs, batch, out_size, seed, channels_last=False):
    """specs: (channels, mode) per piece; sources sized so that every piece resamples to out_size."""
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for channels, mode in specs:
        if mode in (NEAREST, BILINEAR, BILINEAR_AC):
            size = tuple(s // 2 for s in out_size)
        elif mode == MAXPOOL:
            size = tuple(2 * s + 1 for s in out_size)  # odd: the floor drops the last row/column/slice
        else:
            size = tuple(out_size)
        piece = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
        if channels_last:
            fmt = torch.channels_last if piece.dim() == 4 else torch.channels_last_3d
            piece = piece.contiguous(memory_format=fmt)
        pieces.append(piece)
    return pieces, gen


def forward_and_grads(pieces, modes, weight, bias, grad, activation):
    out = torch.ops.unetpp_fast_C.fused_conv_forward(pieces, modes, weight, bias, activation)
    grads = torch.ops.unetpp_fast_C.fused_conv_backward(grad, pieces, modes, weight, out, True, activation)
    return out, grads


# (piece specs, output size, batch, k, C_out): row counts around and above one chunk (the column
# matrix of one GEMM is bounded), so chunk boundaries fall inside images and slices and between
# them; tiny deep-level images, whose whole batch is one chunk; 2D and 3D.
CASES = {
    "2d_three_chunks_mixed_modes": ([(5, NONE), (6, BILINEAR), (5, MAXPOOL)], (70, 40), 3, 3, 8),
    "2d_deep_level_one_chunk": ([(48, NONE), (40, BILINEAR_AC)], (6, 6), 4, 3, 24),
    "2d_pointwise_nearest": ([(7, NEAREST), (9, NONE)], (66, 50), 2, 1, 5),
    "3d_chunks_inside_slices": ([(3, NONE), (3, BILINEAR), (2, MAXPOOL)], (10, 24, 22), 2, 3, 4),
    # one plain piece: in fp32 the library's convolution reads it directly, no tile
    "2d_single_plain_piece": ([(12, NONE)], (20, 18), 2, 3, 6),
    "3d_single_plain_piece": ([(3, NONE)], (6, 8, 7), 2, 3, 4),
}
CHANNELS_LAST = ("2d_three_chunks_mixed_modes", "2d_single_plain_piece", "3d_single_plain_piece")


# fp64 runs the im2col + GEMM path; fp32 oneDNN's convolution and its backward on virtual tiles
# (against the fp64 reference).
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_every_thread_count_matches_the_reference(name, threads, dtype, tol, restore_threads):
    specs, out_size, batch, k, c_out = CASES[name]
    torch.set_num_threads(threads)
    channels_last = name in CHANNELS_LAST  # strided (channels_last) pieces and output too
    pieces, gen = make_pieces(specs, batch, out_size, seed=len(name) + threads, channels_last=channels_last)
    modes = [mode for _, mode in specs]
    c_in = sum(channels for channels, _ in specs)
    kernel = (k,) * len(out_size)
    weight = torch.randn(c_out, c_in, *kernel, generator=gen, dtype=torch.float64) / (c_in * k**2) ** 0.5
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    grad = torch.randn(batch, c_out, *out_size, generator=gen, dtype=torch.float64)
    activation = "leaky_relu:0.1"

    def cast(t):  # same layout, new dtype
        return t.to(dtype, memory_format=torch.preserve_format)

    out, grads = forward_and_grads(
        [cast(p) for p in pieces], modes, cast(weight), cast(bias), cast(grad), activation
    )
    assert out.dtype == dtype
    expected = reference.forward(pieces, modes, weight, bias, activation)
    assert rel_err(out, expected) < tol
    assert out.is_contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))
    # The activation's mask from the output the backend computed: the reference sees the same one.
    want = reference.backward(grad, pieces, modes, weight, out.double(), True, activation)
    for index, (got, ref) in enumerate(zip(grads, want)):
        assert got.dtype == dtype
        assert rel_err(got, ref) < tol, f"gradient {index} at {threads} threads"
    assert torch.get_num_threads() == threads, "the backend changed the caller's thread count"


# One sample's virtual tile larger than a chunk: the fp32 path splits the sample into bands of the
# outer axis (height in 2D, depth in 3D) whose halo rows overlap; their gradients add up.
BAND_CASES = {
    "2d_bands": ([(24, NONE), (24, BILINEAR), (16, MAXPOOL)], (200, 180)),
    "3d_bands": ([(4, NONE), (4, BILINEAR_AC)], (40, 80, 80)),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(BAND_CASES))
def test_samples_split_into_bands_match_the_reference(name, threads, restore_threads):
    specs, out_size = BAND_CASES[name]
    torch.set_num_threads(threads)
    pieces, gen = make_pieces(specs, 1, out_size, seed=threads)
    modes = [mode for _, mode in specs]
    c_in = sum(channels for channels, _ in specs)
    weight = (
        torch.randn(4, c_in, *(3,) * len(out_size), generator=gen, dtype=torch.float64) / (9 * c_in) ** 0.5
    )
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    grad = torch.randn(1, 4, *out_size, generator=gen, dtype=torch.float64)
    calls = library_calls(
        lambda: forward_and_grads(
            [p.float() for p in pieces], modes, weight.float(), bias.float(), grad.float(), "relu"
        )
    )
    assert sum(n for (op, _), n in calls.items() if op == "aten::convolution") >= 2, "not split into bands"
    out, grads = forward_and_grads(
        [p.float() for p in pieces], modes, weight.float(), bias.float(), grad.float(), "relu"
    )
    assert rel_err(out, reference.forward(pieces, modes, weight, bias, "relu")) < 1e-5
    want = reference.backward(grad, pieces, modes, weight, out.double(), True, "relu")
    for index, (got, ref) in enumerate(zip(grads, want)):
        assert rel_err(got, ref) < 1e-5, f"gradient {index}"


def library_calls(fn) -> collections.Counter:
    """The GEMM and convolution calls `fn` makes, as a multiset of (op, input shapes)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return collections.Counter(
        (e.name, str(e.input_shapes)) for e in prof.events() if e.name in LIBRARY_CALLS
    )


def deep_node(dtype, batch=4):
    """A deep UNet++ node (6x6 images, 256 + 512 channels): tall, narrow GEMMs."""
    gen = torch.Generator().manual_seed(5)
    pieces = [torch.randn(batch, 256, 6, 6, generator=gen), torch.randn(batch, 512, 3, 3, generator=gen)]
    weight = torch.randn(256, 768, 3, 3, generator=gen) / 48
    bias = torch.randn(256, generator=gen)
    grad = torch.randn(batch, 256, 6, 6, generator=gen)
    return (
        [p.to(dtype) for p in pieces],
        [NONE, BILINEAR_AC],
        weight.to(dtype),
        bias.to(dtype),
        grad.to(dtype),
    )


COLUMNS = 4 * 6 * 6
# The whole batch of the deep node in one call per pass.
DEEP_NODE_CALLS = {
    torch.float32: [
        "aten::convolution [[4, 768, 8, 6], [256, 768, 3, 3], [256]",  # the tile: 6 rows + 2 halo rows
        "aten::convolution_backward [[4, 256, 6, 6], [4, 768, 8, 6], [256, 768, 3, 3]",  # both gradients
    ],
    torch.float64: [
        f"aten::mm [[256, {768 * 9}], [{768 * 9}, {COLUMNS}]",  # forward: W @ col
        f"aten::mm [[768, {256 * 9}], [{256 * 9}, {COLUMNS}]",  # input gradient: W^T @ gcol
        f"aten::mm [[256, {COLUMNS}], [{COLUMNS}, {768 * 9}]",  # weight gradient: g @ col^T
    ],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_deep_node_is_one_library_call_per_pass_at_any_thread_count(dtype, restore_threads):
    """The whole batch of a small-image node in one call per pass, the same at 1 and at 2 threads:
    no per-thread tiles that stream the weight once each."""
    pieces, modes, weight, bias, grad = deep_node(dtype)
    seen = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        forward_and_grads(pieces, modes, weight, bias, grad, "relu")  # warm-up outside the profile
        seen[threads] = library_calls(lambda: forward_and_grads(pieces, modes, weight, bias, grad, "relu"))
    assert seen[1] == seen[2]
    expected = DEEP_NODE_CALLS[dtype]
    assert sum(seen[2].values()) == len(expected), seen[2]
    calls = [f"{op} {shape}" for op, shape in seen[2]]
    for call in expected:
        assert any(c.startswith(call) for c in calls), f"{call} not among {calls}"


def test_large_node_library_calls_do_not_depend_on_the_thread_count(restore_threads):
    """A 96x96 node spans several chunks: the same calls at 1, 2 and 3 threads, so threads only ever
    split the work inside the library calls (one level of parallelism)."""
    gen = torch.Generator().manual_seed(9)
    pieces = [torch.randn(2, 32, 96, 96, generator=gen), torch.randn(2, 32, 48, 48, generator=gen)]
    modes = [NONE, BILINEAR]
    weight = torch.randn(32, 64, 3, 3, generator=gen) / 24
    bias = torch.randn(32, generator=gen)
    grad = torch.randn(2, 32, 96, 96, generator=gen)
    seen = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        seen.append(library_calls(lambda: forward_and_grads(pieces, modes, weight, bias, grad, "relu")))
    assert seen[0] == seen[1] == seen[2]
    total = sum(seen[0].values())
    assert 2 <= total <= 3 * 16, f"{total} library calls for 2 samples of {96} rows: {seen[0]}"
