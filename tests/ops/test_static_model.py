"""The static performance model: SASS parsing on kernels whose counts are known, and the estimator on CPU.

CI: a checked-in SASS snippet (exact counts and paths), a tiny hand-written .cu compiled with
nvcc for sm_90 (skipped without nvcc), the arithmetic of one estimate, and the UNet++ report from
the built extension's CUDA cubins, the Triton forward's per-class loops on a synthetic snippet.
`pytest --long` also AOT-compiles the Triton forward (VEC 8 and VEC 1, first config per shape
class) and estimates it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from unetpp_fast.ops import conv_spec, sass, static_model
from unetpp_fast.ops.kernel_resources import extension_library_path, find_cuobjdump

# A hot loop [0x40, 0x160] inside an outer loop [0x30, 0x170]: per trip either the cp.async path
# (0x60-0x80) or the resample path (0x90-0xd0), then a barrier, LDSM and two HMMA, and a guard
# (0x130) that may skip one instruction. The tail `BRA 0x190` is the usual self-loop after EXIT.
SNIPPET = """
\tcode for sm_90
\t\tFunction : toy_kernel
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
                                                                          /* 0x000fe40000000f00 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;    /* 0x000000100000780c */
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;                /* 0x0000000102027810 */
        /*0040*/                   ISETP.NE.AND P1, PT, R3, RZ, PT ;      /* 0x000000ff0300720c */
        /*0050*/               @P1 BRA 0x90 ;                             /* 0x0000000000101947 */
        /*0060*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R4+0x800], desc[UR4][R6.64+0x10] ;
        /*0080*/                   BRA 0xe0 ;                             /* 0x0000000000147947 */
        /*0090*/                   LDG.E R8, desc[UR4][R6.64] ;
        /*00a0*/                   FMUL R8, R8, 0.25 ;
        /*00b0*/                   FADD R8, R8, R9 ;
        /*00c0*/                   F2FP.BF16.F32.PACK_AB R8, R8, R8 ;
        /*00d0*/                   STS [R4], R8 ;
        /*00e0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00f0*/                   LDSM.16.M88.4 R12, [R10] ;
        /*0100*/                   HMMA.16816.F32.BF16 R16, R12, R14, R16 ;
        /*0110*/                   HMMA.16816.F32.BF16 R20, R12, R15, R20 ;
        /*0120*/                   ISETP.NE.AND P2, PT, R5, RZ, PT ;
        /*0130*/              @!P2 BRA 0x150 ;
        /*0140*/                   IADD3 R5, R5, -0x1, RZ ;
        /*0150*/                   ISETP.LT.AND P3, PT, R2, R7, PT ;
        /*0160*/               @P3 BRA 0x40 ;
        /*0170*/               @P0 BRA 0x30 ;
        /*0180*/                   EXIT ;
        /*0190*/                   BRA 0x190;
        /*01a0*/                   NOP;
"""


def test_parser_on_a_known_snippet():
    (function,) = sass.parse_sass(SNIPPET)
    assert function.name == "toy_kernel"
    assert len(function.instructions) == 27
    found = sass.loops(function)
    assert [(loop.head, loop.latch) for loop in found] == [(0x30, 0x170), (0x40, 0x160), (0x190, 0x190)]
    (hot,) = sass.hot_loops(function)  # the innermost loop with tensor-core instructions
    assert (hot.head, hot.latch) == (0x40, 0x160)
    assert hot.static_instructions == 19
    assert hot.counts["tensor"] == 2 and hot.counts["ldgsts"] == 2 and hot.counts["ldsm"] == 1
    assert hot.counts["ldg"] == 1 and hot.counts["sts"] == 1 and hot.counts["bar"] == 1
    assert hot.counts["branch"] == 4
    assert hot.tensor_opcodes == {"HMMA.16816.F32.BF16": 2}
    # The `none` path: the most LDGSTS, then the fewest instructions (the guard at 0x130 taken).
    assert hot.min_path == 13
    assert hot.min_path_counts["ldgsts"] == 2 and hot.min_path_counts["ldg"] == 0
    # The longest path: the resample branch and the guard's fall-through.
    assert hot.max_path == 16
    assert hot.max_path_counts["ldg"] == 1 and hot.max_path_counts["ldgsts"] == 0
    assert hot.shortest_path == 13  # here the cp.async path is also the plain shortest one
    assert sass.loop_tensor_flops_per_warp(hot) == 2 * 2 * 16 * 8 * 16
    # Outside the hot loop, one path: 0x0-0x30 before it, then 0x170 (the outer back edge) and EXIT.
    assert sass.outside_path(function, [hot]) == 6


def test_element_load_path():
    """The longest path through a sub-word global load (an inline per-element loader): the resample
    branch of the snippet once its load is 16-bit; none in the original (a 32-bit load)."""
    (function,) = sass.parse_sass(SNIPPET)
    (hot,) = sass.hot_loops(function)
    assert hot.element_path == 0 and hot.element_path_counts == {}
    (function,) = sass.parse_sass(SNIPPET.replace("LDG.E R8", "LDG.E.U16 R8"))
    (hot,) = sass.hot_loops(function)
    assert hot.element_path == 16 and hot.element_path_counts["ldg"] == 1
    assert hot.element_path_counts["ldgsts"] == 0  # not through the cp.async branch


def test_packed_max_path():
    """The longest path through a packed max (a max-pool block's path): 0 when the loop has none."""
    (function,) = sass.parse_sass(SNIPPET)
    (hot,) = sass.hot_loops(function)
    assert sass.path_through(function, hot, sass.is_packed_max) == (0, {})
    (function,) = sass.parse_sass(SNIPPET.replace("FMUL R8, R8, 0.25", "HMNMX2.BF16_V2.NAN R8, R8, R9"))
    (hot,) = sass.hot_loops(function)
    length, counts = sass.path_through(function, hot, sass.is_packed_max)
    assert length == 16 and counts["ldg"] == 1 and counts["ldgsts"] == 0


# The Triton forward's shape: a piece loop [0x20, 0x200] around a tap loop [0x30, 0x1e0] around three
# guarded channel loops, in source order direct [0x60, 0x90] (4 per trip), max-pool [0xc0, 0x110]
# (6, the packed max) and blend [0x150, 0x1c0] (8, after one set-up instruction at 0x140).
CLASS_LOOPS_SNIPPET = """
\tcode for sm_90
\t\tFunction : toy_forward
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0040*/                   ISETP.NE.AND P1, PT, R4, RZ, PT ;
        /*0050*/              @!P1 BRA 0xa0 ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ;
        /*0070*/                   HMMA.16816.F32.BF16 R16, R12, R14, R16 ;
        /*0080*/                   ISETP.LT.AND P2, PT, R5, R7, PT ;
        /*0090*/               @P2 BRA 0x60 ;
        /*00a0*/                   ISETP.NE.AND P1, PT, R8, RZ, PT ;
        /*00b0*/              @!P1 BRA 0x120 ;
        /*00c0*/                   LDG.E R8, desc[UR4][R6.64] ;
        /*00d0*/                   HMNMX2.BF16_V2.NAN R8, R8, R9 ;
        /*00e0*/                   STS [R4], R8 ;
        /*00f0*/                   HMMA.16816.F32.BF16 R16, R12, R14, R16 ;
        /*0100*/                   ISETP.LT.AND P2, PT, R5, R7, PT ;
        /*0110*/               @P2 BRA 0xc0 ;
        /*0120*/                   ISETP.NE.AND P1, PT, R9, RZ, PT ;
        /*0130*/              @!P1 BRA 0x1d0 ;
        /*0140*/                   FMUL R10, R10, 0.25 ;
        /*0150*/                   LDG.E R8, desc[UR4][R6.64] ;
        /*0160*/                   FMUL R8, R8, 0.25 ;
        /*0170*/                   FADD R8, R8, R9 ;
        /*0180*/                   STS [R4], R8 ;
        /*0190*/                   HMMA.16816.F32.BF16 R16, R12, R14, R16 ;
        /*01a0*/                   FFMA R8, R8, R9, R10 ;
        /*01b0*/                   ISETP.LT.AND P2, PT, R5, R7, PT ;
        /*01c0*/               @P2 BRA 0x150 ;
        /*01d0*/                   ISETP.LT.AND P3, PT, R3, 0x9, PT ;
        /*01e0*/               @P3 BRA 0x30 ;
        /*01f0*/                   ISETP.LT.AND P4, PT, R2, R11, PT ;
        /*0200*/               @P4 BRA 0x20 ;
        /*0210*/                   EXIT ;
        /*0220*/                   BRA 0x220;
"""


def test_code_around_a_hot_loop():
    """The enclosing loop's code per trip outside the hot loop: head -> hot-loop head, exit -> latch."""
    (function,) = sass.parse_sass(SNIPPET)
    (hot,) = sass.hot_loops(function)
    assert [(loop.head, loop.latch) for loop in sass.enclosing_loops(function, hot)] == [(0x30, 0x170)]
    assert sass.code_around(function, hot) == 2  # IADD3 at 0x30, the outer back edge at 0x170
    (function,) = sass.parse_sass(CLASS_LOOPS_SNIPPET)
    direct, pool, blend = sass.hot_loops(function)
    nesting = [(loop.head, loop.latch) for loop in sass.enclosing_loops(function, pool)]
    assert nesting == [(0x30, 0x1E0), (0x20, 0x200)]  # tap loop, then piece loop
    # direct: 0x30-0x50 | 0xa0 0xb0 0x120 0x130 0x1d0 0x1e0 (the other loops' guards skip them)
    assert sass.code_around(function, direct) == 3 + 6
    assert sass.code_around(function, pool) == 5 + 4  # 0x30 0x40 0x50 0xa0 0xb0 | 0x120 0x130 0x1d0 0x1e0
    assert sass.code_around(function, blend) == 8 + 2  # ... 0x130, the set-up at 0x140 | 0x1d0 0x1e0


def test_triton_class_loops_charged_in_source_order():
    """Issue 12: the forward's three channel loops cost direct -> none, max-pool -> maxpool2, blend ->
    up, each its own loop; each piece pays taps x its class's code around its loop."""
    from unetpp_fast.ops import static_kernels

    (function,) = sass.parse_sass(CLASS_LOOPS_SNIPPET)
    loops = sass.hot_loops(function)
    modes, per_piece = static_kernels.triton_class_costs(function, loops, 9)
    assert {mode: cost.instructions for mode, cost in modes.items()} == {
        "none": 4,
        "maxpool2": 6,
        "up": 8,
        "any": 8,
    }
    assert modes["maxpool2"].counts["ldg"] == 1 and modes["none"].counts["ldgsts"] == 1
    assert per_piece == {"none": 9 * 9, "maxpool2": 9 * 9, "up": 9 * 10}
    # The packed max outside the second loop: the order cannot be trusted, no estimate.
    (unpooled,) = sass.parse_sass(CLASS_LOOPS_SNIPPET.replace("HMNMX2.BF16_V2.NAN", "FMUL"))
    with pytest.raises(RuntimeError, match="order"):
        static_kernels.triton_class_costs(unpooled, sass.hot_loops(unpooled), 9)
    with pytest.raises(RuntimeError, match="3"):
        static_kernels.triton_class_costs(function, loops[:2], 9)
    # No tap loop (k = 1 folds it away): the piece loop encloses the channel loops, one tap per piece.
    (folded,) = sass.parse_sass(CLASS_LOOPS_SNIPPET.replace("@P3 BRA 0x30", "@P3 BRA 0x1f0"))
    _, per_piece = static_kernels.triton_class_costs(folded, sass.hot_loops(folded), 1)
    assert per_piece["up"] == 9 + 4  # 0x20 0x30 ... 0x140 | 0x1d0 0x1e0 0x1f0 0x200
    # The same nesting at k = 3: each channel loop runs over every tap of the piece (the tap decoded
    # per trip), so the code around it is paid once per piece, not per tap; its trips stay
    # taps x ceil(C_p / BLOCK_K) (k_blocks).
    modes, per_piece = static_kernels.triton_class_costs(folded, sass.hot_loops(folded), 9)
    assert per_piece == {"none": 4 + 8, "maxpool2": 6 + 6, "up": 9 + 4}  # each once, not 9 times
    assert modes["none"].instructions == 4 and modes["up"].instructions == 8
    shape = _shape([(32, 128, 128, conv_spec.NONE), (64, 64, 64, conv_spec.UP_BILINEAR_AC)])
    assert static_model.k_blocks(shape, _model(block_k=32)) == {"none": 9 * 1, "up": 9 * 2}
    # Three loops deep: a structure the model does not know.
    (deep,) = sass.parse_sass(CLASS_LOOPS_SNIPPET.replace("EXIT", "@P0 BRA 0x10"))  # a loop around it all
    with pytest.raises(RuntimeError, match="nested 3 deep"):
        static_kernels.triton_class_costs(deep, sass.hot_loops(deep), 9)


def test_tensor_instruction_flops():
    assert sass.tensor_flops("HMMA.16816.F32.BF16") == (2 * 16 * 8 * 16, "warp")
    assert sass.tensor_flops("HMMA.1688.F32.TF32") == (2 * 16 * 8 * 8, "warp")
    assert sass.tensor_flops("HGMMA.64x32x16.F32.BF16") == (2 * 64 * 32 * 16, "warpgroup")
    assert sass.tensor_flops("HGMMA.64x128x16.F32.BF16.gsb0") == (2 * 64 * 128 * 16, "warpgroup")


TOY_CU = r"""
// Per trip of its one loop: 1 cp.async (LDGSTS), 1 barrier, 2 mma.sync m16n8k16 bf16 (HMMA.16816.F32.BF16).
__global__ void toy_kernel(const uint4* src, float* out, int n) {
  __shared__ uint4 tile[128];
  float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
  unsigned a = threadIdx.x;
#pragma unroll 1
  for (int i = 0; i < n; ++i) {
    unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(&tile[threadIdx.x]));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src + i * 128 + threadIdx.x));
    asm volatile("cp.async.wait_all;\n" ::);
    __syncthreads();
    a ^= reinterpret_cast<const unsigned*>(tile)[(threadIdx.x + i) % 512];
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%4,%4,%4}, {%4,%4},"
                 " {%0,%1,%2,%3};\n" : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3) : "r"(a));
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%4,%4,%4}, {%4,%4},"
                 " {%0,%1,%2,%3};\n" : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3) : "r"(a + 1));
  }
  out[threadIdx.x] = c0 + c1 + c2 + c3;
}
"""


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.isfile(path) else shutil.which("nvcc")


def test_parser_on_a_compiled_kernel(tmp_path):
    nvcc, tool = _nvcc(), find_cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("needs nvcc and cuobjdump")
    source = tmp_path / "toy.cu"
    source.write_text(TOY_CU)
    cubin = tmp_path / "toy.cubin"
    subprocess.run(
        [nvcc, "-cubin", "-arch=sm_90", "-O3", "-o", str(cubin), str(source)], check=True, timeout=300
    )
    (function,) = sass.parse_sass(sass.disassemble(str(cubin), tool))
    (hot,) = sass.hot_loops(function)
    assert hot.tensor_opcodes == {"HMMA.16816.F32.BF16": 2}
    assert hot.counts["ldgsts"] == 1 and hot.counts["bar"] == 1 and hot.counts["local"] == 0
    assert hot.min_path == hot.max_path == hot.static_instructions  # a straight-line body
    assert hot.counts["branch"] == 1  # the back edge


def _model(**overrides) -> static_model.KernelModel:
    cost = static_model.ModeCost(100.0, {"tensor": 8.0})
    fields = dict(
        backend="test",
        kernel="toy",
        config="M128,N64,K32 w4",
        block_m=128,
        block_n=64,
        block_k=32,
        warps=4,
        k_blocking="per_piece",
        modes={"none": cost, "up": static_model.ModeCost(300.0, {"tensor": 8.0}), "any": cost},
        overhead=0.0,
    )
    fields.update(overrides)
    return static_model.KernelModel(**fields)


def _shape(pieces, out_channels=64, batch=1, size=128) -> static_model.ConvShape:
    c_in = sum(p[0] for p in pieces)
    flops = 2 * batch * size * size * out_channels * c_in * 9
    nbytes = 2 * (
        sum(batch * c * h * w for c, h, w, _ in pieces)
        + out_channels * c_in * 9
        + batch * out_channels * size * size
    )
    return static_model.ConvShape("toy", batch, tuple(pieces), out_channels, 3, size, size, flops, nbytes)


def test_estimate_arithmetic():
    shape = _shape([(64, 128, 128, conv_spec.NONE), (32, 64, 64, conv_spec.UP_BILINEAR_AC)])
    row = static_model.estimate(shape, _model())
    ctas = (128 * 128 // 128) * 1
    trips_none, trips_up = 9 * 2, 9 * 1
    assert row["ctas"] == ctas and row["k_trips_per_cta"] == trips_none + trips_up
    instructions = (trips_none * 100 + trips_up * 300) * 4 * ctas
    issue = instructions / (min(ctas, 132) * 4 * 1.98e9)
    assert math.isclose(row["issue_ms"], issue * 1e3)
    tile_flops = 2 * 128 * 64 * 32 * (trips_none + trips_up) * ctas
    assert math.isclose(row["tensor_ms"], tile_flops / (990e12 * ctas / 132) * 1e3)
    assert math.isclose(row["memory_ms"], shape.min_bytes / 4.8e12 * 1e3)
    assert row["bound"] == "issue" and row["estimate_ms"] == row["issue_ms"]
    assert row["estimate_low_ms"] <= row["estimate_ms"]
    floor = max(shape.flops / 990e12, shape.min_bytes / 4.8e12) * 1e3
    assert math.isclose(row["floor_ms"], floor) and math.isclose(row["ratio"], row["estimate_ms"] / floor)
    # A flat-K kernel apportions its K blocks by channels.
    flat = static_model.k_blocks(shape, _model(k_blocking="flat"))
    assert flat == {"none": 18, "up": 9}


def test_estimate_charges_per_piece_code_by_class():
    """Code outside the hot loops: `overhead` once per CTA plus `piece_overhead` per piece of its class."""
    shape = _shape(
        [
            (64, 128, 128, conv_spec.NONE),
            (32, 128, 128, conv_spec.NONE),
            (32, 64, 64, conv_spec.UP_BILINEAR_AC),
        ]
    )
    bare = static_model.estimate(shape, _model(overhead=50.0))
    model = _model(overhead=50.0, piece_overhead={"none": 90.0, "maxpool2": 1e6, "up": 180.0})
    row = static_model.estimate(shape, model)
    assert row["overhead_instr_per_cta"] == 50.0 + 2 * 90.0 + 180.0
    assert row["hot_loop_instr_per_trip"] == bare["hot_loop_instr_per_trip"]
    extra = (2 * 90.0 + 180.0) * 4 * row["ctas"] / (row["ctas"] * 4 * 1.98e9)
    assert math.isclose(row["issue_ms"] - bare["issue_ms"], extra * 1e3)


def test_triton_candidates_follow_the_launchers_vector_width():
    """C % 8 != 0 (the RGB input) runs the VEC 1 kernel with its own configs; else VEC 8."""
    from unetpp_fast.bench import static_estimate
    from unetpp_fast.ops import static_kernels

    rgb = _shape([(3, 96, 96, conv_spec.NONE)], out_channels=32, size=96)
    level0 = _shape([(32, 96, 96, conv_spec.NONE), (64, 48, 48, conv_spec.UP_BILINEAR_AC)], out_channels=32)
    assert static_kernels.triton_vector_width(rgb) == 1 and static_kernels.triton_vector_width(level0) == 8
    models = {
        3: [
            ("memory_bound", _model(config="v8 a", vector_width=8)),
            ("compute_bound", _model(config="v8 b", vector_width=8)),
            ("memory_bound", _model(config="v1", vector_width=1)),
        ],
        1: [("memory_bound", _model(config="head v8", vector_width=8))],
    }
    assert [m.config for m in static_estimate._candidates("triton", models, rgb)] == ["v1"]
    assert [m.config for m in static_estimate._candidates("triton", models, level0)] == ["v8 a"]
    head = static_model.ConvShape("head", 1, ((32, 8, 8, conv_spec.NONE),), 1, 1, 8, 8, 1, 1)
    assert [m.config for m in static_estimate._candidates("triton", models, head)] == ["head v8"]
    odd_head = static_model.ConvShape("head", 1, ((3, 8, 8, conv_spec.NONE),), 1, 1, 8, 8, 1, 1)
    assert [m.config for m in static_estimate._candidates("triton", models, odd_head)] == [
        "v1"
    ]  # k = 3 stand-in


def test_triton_candidates_take_the_packed_forward_where_it_applies():
    """The RGB input (one plain 3-channel piece, 3x3) runs the packed forward when a model of it was
    compiled for C_in 3; no other node does (two pieces, C_in 32, a 1x1 head over 32 channels)."""
    from unetpp_fast.bench import static_estimate
    from unetpp_fast.ops import static_kernels

    rgb = _shape([(3, 96, 96, conv_spec.NONE)], out_channels=32, size=96)
    level0 = _shape([(32, 96, 96, conv_spec.NONE), (64, 48, 48, conv_spec.UP_BILINEAR_AC)], out_channels=32)
    plain32 = _shape([(32, 96, 96, conv_spec.NONE)], out_channels=32, size=96)
    head = static_model.ConvShape("head", 1, ((32, 8, 8, conv_spec.NONE),), 1, 1, 8, 8, 1, 1)
    assert static_kernels.triton_packed_applies(rgb)
    assert not any(static_kernels.triton_packed_applies(s) for s in (level0, plain32, head))
    packed = dict(k_blocking="flat", spatial_block=(8, 16), block_m=128, block_n=32)
    models = {
        3: [
            ("memory_bound", _model(config="v8", vector_width=8)),
            ("memory_bound", _model(config="v1", vector_width=1)),
            ("memory_bound", _model(config="packed c3", packed_channels=3, **packed)),
            ("memory_bound", _model(config="packed c1", packed_channels=1, **packed)),
        ],
        1: [("memory_bound", _model(config="head v8", vector_width=8))],
    }
    assert [m.config for m in static_estimate._candidates("triton", models, rgb)] == ["packed c3"]
    assert [m.config for m in static_estimate._candidates("triton", models, level0)] == ["v8"]
    assert [m.config for m in static_estimate._candidates("triton", models, plain32)] == ["v8"]
    assert [m.config for m in static_estimate._candidates("triton", models, head)] == ["head v8"]
    # No packed model of the node's C_in: the main forward's VEC 1 kernel, as before.
    models[3] = [item for item in models[3] if item[1].config != "packed c3"]
    assert [m.config for m in static_estimate._candidates("triton", models, rgb)] == ["v1"]


def test_triton_candidates_take_the_staged_forward_where_it_applies():
    """2D 3x3 and 1x1 nodes read in 16-byte vectors run the staged forward (its models, of the
    node's shape class and kernel size); the RGB input stays on the packed forward, odd channel
    counts on the main forward's VEC 1 kernel."""
    from unetpp_fast.bench import static_estimate
    from unetpp_fast.ops import static_kernels

    rgb = _shape([(3, 96, 96, conv_spec.NONE)], out_channels=32, size=96)
    level0 = _shape([(32, 96, 96, conv_spec.NONE), (64, 48, 48, conv_spec.UP_BILINEAR_AC)], out_channels=32)
    odd = _shape([(12, 96, 96, conv_spec.NONE)], out_channels=32, size=96)
    head = static_model.ConvShape("head", 1, ((32, 8, 8, conv_spec.NONE),), 1, 1, 8, 8, 1, 1)
    assert static_kernels.triton_staged_applies(level0) and static_kernels.triton_staged_applies(head)
    assert not static_kernels.triton_staged_applies(rgb) and not static_kernels.triton_staged_applies(odd)
    staged = dict(k_blocking="per_chunk", spatial_block=(16, 32), block_m=512, block_n=32, staged=True)
    packed = dict(k_blocking="flat", spatial_block=(8, 16), block_m=128, block_n=32)
    models = {
        3: [
            ("memory_bound", _model(config="v8", vector_width=8)),
            ("memory_bound", _model(config="v1", vector_width=1)),
            ("memory_bound", _model(config="packed c3", packed_channels=3, **packed)),
            ("memory_bound", _model(config="staged a", vector_width=8, taps_per_trip=9, **staged)),
            ("compute_bound", _model(config="staged b", vector_width=8, taps_per_trip=9, **staged)),
        ],
        1: [
            ("memory_bound", _model(config="head v8", vector_width=8)),
            ("memory_bound", _model(config="staged 1x1", vector_width=8, **staged)),
        ],
    }
    assert [m.config for m in static_estimate._candidates("triton", models, level0)] == ["staged a"]
    assert [m.config for m in static_estimate._candidates("triton", models, head)] == ["staged 1x1"]
    assert [m.config for m in static_estimate._candidates("triton", models, rgb)] == ["packed c3"]
    assert [m.config for m in static_estimate._candidates("triton", models, odd)] == ["v1"]


_STAGED_MODEL_SCRIPT = """
import json
from unetpp_fast.ops import static_kernels
from unetpp_fast.ops.kernel_resources import find_cuobjdump
from unetpp_fast.ops.triton import aot, configs
spec = next(s for s in aot.kernel_specs(dims=(2,)) if s.name == "forward_staged")
(config,) = configs.gpu_configs("forward_staged", "memory_bound", arch=90)
source = static_kernels._triton_source_hash()
m = static_kernels.triton_staged_model(spec, config, find_cuobjdump(), source)
print(json.dumps(dict(
    staged=m.staged, k_blocking=m.k_blocking, taps=m.taps_per_trip, block=list(m.spatial_block),
    expected=[config.kwargs["BLOCK_H"], config.kwargs["BLOCK_W"]], check=m.flops_check,
    local=m.local_bytes, modes=[m.modes[k].instructions for k in ("none", "maxpool2", "up")],
    overhead=m.overhead, piece=m.piece_overhead["none"],
)))
"""


def test_triton_staged_model_reads_its_sass(tmp_path):
    """The staged forward's model from its real sm_90 SASS (one AOT compile, in a process without
    TRITON_INTERPRET): three staging loops in the block loop (direct < max-pool window < blend), the
    9 taps' MMAs per trip matching the tile, no spills, per-pixel-block and per-piece code outside."""
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["UNETPP_FAST_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-P", "-c", _STAGED_MODEL_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    model = json.loads(done.stdout.strip().splitlines()[-1])
    assert model["staged"] and model["k_blocking"] == "per_chunk" and model["taps"] == 9
    assert model["block"] == model["expected"]
    assert model["check"] == "", model["check"]
    assert model["local"] == 0
    none, pool, up = model["modes"]
    assert 0 < none < pool < up
    assert model["overhead"] > 0 and model["piece"] > 0


def test_estimate_arithmetic_packed_blocks():
    """The packed forward: 'flat' K blocks (ceil(taps x C_in / BLOCK_K) trips, one here), CTAs of
    8 x 16 pixels of one image, every instruction of the kernel charged to its one trip."""
    rgb = _shape([(3, 96, 96, conv_spec.NONE)], out_channels=32, batch=2, size=96)
    cost = static_model.ModeCost(1000.0, {"tensor": 4.0})
    model = _model(
        k_blocking="flat", spatial_block=(8, 16), block_m=128, block_n=32, modes={"none": cost, "any": cost},
        packed_channels=3,
    )  # fmt: skip
    row = static_model.estimate(rgb, model)
    ctas = 2 * (96 // 8) * (96 // 16)
    assert row["ctas"] == ctas and row["k_trips_per_cta"] == 1
    issue = 1000.0 * 4 * ctas / (min(ctas, 132) * 4 * 1.98e9)
    assert math.isclose(row["issue_ms"], issue * 1e3)
    assert math.isclose(row["tensor_ms"], 2 * 128 * 32 * 32 * ctas / (990e12 * min(ctas, 132) / 132) * 1e3)
    wide = _shape([(7, 96, 96, conv_spec.NONE)], out_channels=32, size=96)  # K 63: two blocks
    assert static_model.k_blocks(wide, model) == {"none": 2}


def test_packed_forward_model_from_its_sass(tmp_path):
    """The packed forward compiled for sm_90 (RGB, 3x3, its first config): no K loop, so its
    model charges every instruction of the kernel (all but NOPs) to its one K block; the MMAs
    are one BLOCK_M x BLOCK_N x BLOCK_K tile per CTA; no spills."""
    pytest.importorskip("triton")
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump")
    # Compiled in a process of its own: this one runs Triton's interpreter (TRITON_INTERPRET=1).
    script = """
import dataclasses, json
from unetpp_fast.ops import static_kernels
from unetpp_fast.ops.kernel_resources import find_cuobjdump
from unetpp_fast.ops.triton import aot, configs
spec = next(s for s in aot.kernel_specs(dims=(2,)) if s.name == "forward_packed")
_, config = configs.all_gpu_configs("forward_packed", arch=90)[0]
model = static_kernels.triton_packed_model(spec, config, find_cuobjdump(), "test")
print(json.dumps(dict(dataclasses.asdict(model), spec=spec.constexprs, config=config.kwargs)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), UNETPP_FAST_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    model = json.loads(done.stdout.strip().splitlines()[-1])
    assert model["spec"]["C_IN"] == 3 and model["spec"]["BLOCK_K"] == 32
    (path,) = (tmp_path / "cache").glob("sass/*.json")
    (function,) = sass.parse_sass(json.loads(path.read_text())["sass"])
    assert sass.hot_loops(function) == []
    every = sum(1 for inst in function.instructions if inst.base != "NOP")
    assert model["modes"]["none"]["instructions"] == every and model["overhead"] == 0.0
    assert model["flops_check"] == "" and model["local_bytes"] == 0
    assert model["k_blocking"] == "flat" and model["packed_channels"] == 3
    assert model["block_m"] == model["config"]["BLOCK_H"] * model["config"]["BLOCK_W"]


def test_estimate_arithmetic_per_chunk_halo_blocks():
    """A kernel that stages a 32-channel chunk once and runs the 9 taps from shared memory: one trip
    per chunk (not per tap x chunk), 9 taps of MMAs per trip, CTAs = 8 x 16 blocks per image."""
    shape = _shape([(64, 20, 20, conv_spec.NONE), (32, 10, 10, conv_spec.UP_BILINEAR)], batch=3, size=20)
    model = _model(k_blocking="per_chunk", taps_per_trip=9, spatial_block=(8, 16), overhead=50.0)
    row = static_model.estimate(shape, model)
    ctas = 3 * math.ceil(20 / 8) * math.ceil(20 / 16) * 1  # 3 images x 3 x 2 blocks x 1 channel tile
    trips_none, trips_up = 2, 1  # ceil(64 / 32), ceil(32 / 32): no tap factor
    assert static_model.k_blocks(shape, model) == {"none": trips_none, "up": trips_up}
    assert row["ctas"] == ctas and row["k_trips_per_cta"] == trips_none + trips_up
    instructions = (
        (trips_none * 100 + trips_up * 300 + 50.0) * 4 * ctas
    )  # stage + taps per trip, overhead per CTA
    assert math.isclose(row["issue_ms"], instructions / (ctas * 4 * 1.98e9) * 1e3)
    tile_flops = 2 * 128 * 64 * 32 * 9 * (trips_none + trips_up) * ctas
    assert math.isclose(row["tensor_ms"], tile_flops / (990e12 * ctas / 132) * 1e3)
    # Images at most `paired_width` wide share a block in pairs: 3 images of 6 x 6 -> 2 blocks.
    small = _shape([(64, 6, 6, conv_spec.NONE)], batch=3, size=6)
    assert static_model.cta_count(small, model) == 3
    paired = _model(k_blocking="per_chunk", spatial_block=(8, 16), paired_width=7)
    assert static_model.cta_count(small, paired) == 2
    # The same K as the per-tap kernel: 9 trips of 1 tap each do the MMAs of 1 trip of 9 taps.
    per_tap = static_model.estimate(shape, _model(spatial_block=(8, 16)))
    assert per_tap["k_trips_per_cta"] == 9 * row["k_trips_per_cta"]
    assert math.isclose(per_tap["tile_gflop"], row["tile_gflop"])


def test_cuda_halo_selection_mirrors_the_launcher():
    from unetpp_fast.ops import static_kernels

    plain = _shape([(64, 6, 6, conv_spec.NONE)], size=6)
    rgb = _shape([(3, 96, 96, conv_spec.NONE)], size=96)
    odd_pool = _shape([(64, 96, 96, conv_spec.NONE), (3, 192, 192, conv_spec.MAXPOOL2)], size=96)
    assert static_kernels.cuda_halo_applies(plain) and static_kernels.cuda_halo_applies(rgb)
    assert not static_kernels.cuda_halo_applies(odd_pool)  # a resampled piece needs C % 8 == 0
    head = static_model.ConvShape("head", 1, ((32, 8, 8, conv_spec.NONE),), 1, 1, 8, 8, 1, 1)
    assert not static_kernels.cuda_halo_applies(head)
    linear = [_model(block_n=32), _model(block_n=64)]
    halo = [
        _model(block_n=n, k_blocking="per_chunk", taps_per_trip=9, spatial_block=(8, 16), paired_width=w)
        for n, w in ((32, 0), (64, 0), (32, 7))
    ]
    models = {3: linear + halo}
    assert static_kernels.cuda_select(models, 3, 64, plain) is halo[2]  # 6 x 6: the paired instance
    wide = _shape([(64, 24, 24, conv_spec.NONE)], size=24)
    assert static_kernels.cuda_select(models, 3, 64, wide) is halo[1]
    assert static_kernels.cuda_select(models, 3, 32, rgb) is halo[0]
    assert static_kernels.cuda_select(models, 3, 32, odd_pool) is linear[0]
    assert static_kernels.cuda_select(models, 3, 64) is linear[1]  # no shape: the linear kernel


def test_best_estimate_and_summary():
    shape = _shape([(64, 128, 128, conv_spec.NONE)])
    slow = _model(config="slow", modes={"any": static_model.ModeCost(1000.0, {})})
    fast = _model(config="fast", modes={"any": static_model.ModeCost(10.0, {})})
    row = static_model.best_estimate(shape, [slow, fast])
    assert row["config"] == "fast"
    total = static_model.summarize([row, row])
    assert math.isclose(total["estimate_ms"], 2 * row["estimate_ms"]) and total["nodes"] == 2


def test_mode_costs_without_cp_async_take_the_longest_path():
    (function,) = sass.parse_sass(SNIPPET.replace("LDGSTS.E.BYPASS.128", "LDG.E.128"))
    costs = static_model.mode_costs_from_loops(sass.hot_loops(function), ("any",))
    assert costs["none"].instructions == costs["up"].instructions == 16
    (function,) = sass.parse_sass(SNIPPET)
    costs = static_model.mode_costs_from_loops(sass.hot_loops(function), ("any",))
    assert (costs["none"].instructions, costs["up"].instructions) == (13, 16)


def test_unetpp_report_from_the_cuda_cubins():
    if extension_library_path() is None or find_cuobjdump() is None:
        pytest.skip("needs the built extension and cuobjdump")
    from unetpp_fast.bench import static_estimate

    models = static_estimate.load_models(["cuda"])
    if isinstance(models["cuda"], str):
        pytest.skip(f"extension without CUDA kernels: {models['cuda']}")
    report = static_estimate.build_report(models)
    assert {(r["backend"], r["size"]) for r in report["results"]} == {("cuda", 96), ("cuda", 512)}
    for result in report["results"]:
        assert sum(row["count"] for row in result["rows"]) == 34  # convolutions of the L4 forward
        for row in result["rows"]:
            assert row["estimate_ms"] >= row["floor_ms"] * (1 - 1e-9)  # the floor bounds every estimate
            assert row["bound"] in ("issue", "tensor", "memory")
        assert result["model"]["estimate_ms"] >= result["model"]["floor_ms"]
    for kernel in report["kernels"]["cuda"]:
        assert kernel["flops_check"] == "", kernel["flops_check"]  # tile table matches the SASS MMAs
        assert kernel["local_bytes"] == 0
    text = static_estimate.format_markdown(report)
    assert "not a measurement" in text and "Blind spots" in text


def test_cuda_forward_sass_uses_cp_async_ldmatrix_and_mma():
    """Issue 12's bar for the CUDA forward: LDGSTS and LDSM (or HGMMA) in the hot loop, no spills."""
    library, tool = extension_library_path(), find_cuobjdump()
    if library is None or tool is None:
        pytest.skip("needs the built extension and cuobjdump")
    from unetpp_fast.ops import static_kernels

    try:
        models = static_kernels.cuda_forward_models(library)
    except RuntimeError as error:
        pytest.skip(f"extension without CUDA kernels: {error}")
    variants = [m for per_k in models.values() for m in per_k]
    assert {m.block_n for m in variants} == {32, 64} and set(models) == {1, 3}
    for model in variants:
        counts = model.modes["none"].counts
        assert counts["ldgsts"] > 0 and counts["ldsm"] > 0 and counts["tensor"] > 0, model.kernel
        assert model.local_bytes == 0 and counts["local"] == 0, model.kernel
        assert model.flops_check == "", model.flops_check
        # A plain piece's K block: its cp.async path, far shorter than a resampled block's.
        assert model.modes["none"].instructions < model.modes["up"].instructions
    # The halo kernel (2D k = 3): a trip = one chunk staged once + its 9 taps (the FLOPs check above
    # holds with 9 taps per trip), per-mode paths, and an inline per-element path for the RGB input.
    halo = [m for m in models[3] if m.spatial_block]
    assert {(m.block_n, m.paired_width) for m in halo} == {(32, 0), (64, 0), (32, 7)}
    for model in halo:
        assert model.taps_per_trip == 9 and model.k_blocking == "per_chunk"
        assert (
            model.modes["none"].instructions
            < model.modes["maxpool2"].instructions
            < model.modes["up"].instructions
        )
        assert model.modes["generic"].counts["ldg"] > 0
        assert model.modes["none"].counts["tensor"] == 9 * 2 * model.block_n * model.block_m / (
            16 * 8 * model.warps
        )


def test_cuda_forward_sass_3d_instance_and_template_names():
    """The tensor-core kernel's DIMS = 3 instance (3D) keeps cp.async, ldmatrix and mma in its hot
    loop without spills; the estimate (2D UNet++) reads the DIMS = 2 instance only."""
    from unetpp_fast.ops import static_kernels

    match = static_kernels._TEMPLATE.match("fused_conv_fwd_tc_kernel<__nv_bfloat16, 64, 3, 2>")
    assert match is not None and match.group(3, 4, 5) == ("64", "3", "2")
    match = static_kernels._TEMPLATE.match("fused_conv_fwd_wmma_kernel<__half, 3>")
    assert match is not None and match.group(3) == "3" and match.group(5) is None
    library, tool = extension_library_path(), find_cuobjdump()
    if library is None or tool is None:
        pytest.skip("needs the built extension and cuobjdump")
    try:
        models = static_kernels.cuda_forward_models(library, spatial_dims=3)
    except RuntimeError as error:
        pytest.skip(f"extension without 3D CUDA kernels: {error}")
    variants = [m for per_k in models.values() for m in per_k]
    assert {m.block_n for m in variants} == {32, 64} and set(models) == {1, 3}
    for model in variants:
        assert model.kernel.endswith(", 3>"), model.kernel
        counts = model.modes["none"].counts
        assert counts["ldgsts"] > 0 and counts["ldsm"] > 0 and counts["tensor"] > 0, model.kernel
        assert model.local_bytes == 0 and counts["local"] == 0, model.kernel
        assert model.flops_check == "", model.flops_check


def test_estimate_command_with_triton(request, tmp_path):
    if not request.config.getoption("--long"):
        pytest.skip("AOT-compiles the Triton forward (minutes): pytest --long")
    pytest.importorskip("triton")
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), UNETPP_FAST_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-P", "-m", "unetpp_fast.kernel_resources", "--estimate", "--json", "--quick"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3000, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert isinstance(report["kernels"]["triton"], list), report["kernels"]["triton"]
    triton_results = [r for r in report["results"] if r["backend"] == "triton"]
    assert len(triton_results) == 2
    for result in triton_results:
        assert all(row["estimate_ms"] >= row["floor_ms"] * (1 - 1e-9) for row in result["rows"])
        # The launcher's kernels: the packed forward for the RGB input only, VEC 8 elsewhere.
        for row in result["rows"]:
            if row["node"].startswith("X0,0.conv1"):
                assert row["kernel"].startswith("fused_conv_forward_packed_kernel"), row
            else:
                assert row["kernel"].endswith("VEC=8"), row
    kernels = report["kernels"]["triton"]
    assert {k["vector_width"] for k in kernels} == {0, 1, 8}
    packed = [k for k in kernels if k["packed_channels"]]
    assert packed and all(k["flops_check"] == "" and k["local_bytes"] == 0 for k in packed)
    for kernel in (k for k in kernels if not k["packed_channels"]):
        assert kernel["flops_check"] == "", kernel["flops_check"]
        cost = {mode: kernel["modes"][mode]["instructions"] for mode in ("none", "maxpool2", "up", "any")}
        assert cost["none"] < min(cost["maxpool2"], cost["up"]) and cost["any"] == max(cost.values())
        # k = 3 (--quick): each class's code around its channel loop, once per tap where a tap loop
        # encloses it (nested 2 deep), once per piece where the piece loop does (1 deep).
        per_piece = kernel["piece_overhead"]
        assert set(per_piece) == {"none", "maxpool2", "up"}
        (nesting,) = [note for note in kernel["notes"] if "nested" in note]
        depths = dict(zip(("none", "maxpool2", "up"), nesting.split(" nested ")[1].split()[0].split("/")))
        assert set(depths.values()) <= {"1", "2"}, nesting
        for mode, value in per_piece.items():
            assert value > 0 and (depths[mode] == "1" or value % 9 == 0), (per_piece, nesting)
