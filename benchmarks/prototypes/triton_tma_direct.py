"""Prototype, not used by the package: a 3x3 convolution of one channels_last piece whose A tiles
come from a device-side TMA descriptor (OOB boxes zero-filled by the hardware: the padding), to
read from its sm_90 SASS what a trip of the Triton forward's direct loop would cost with TMA
instead of per-row cp.async addresses and masks. No GPU needed (AOT compile + cuobjdump):

    python benchmarks/prototypes/triton_tma_direct.py --bh 8 --bw 16 --bk 32 --warps 4

Prints, per hot loop, the warp instructions per trip and the tensor-core instructions in it. The
first loop is the trip; loops listed after it close through the out-of-line mbarrier wait-retry
stubs (SYNCS.PHASECHK.TRYWAIT, taken only while a TMA load is still in flight), not real trips.
At BH 8, BW 16, BN 32, 4 warps: 102 warp instructions per K 32 trip (4 HGMMA), 126 per K 64 trip
(8 HGMMA), against 117 per K 32 trip (2 HGMMA, 8 warps) in the forward's direct loop today.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from unetpp_fast.ops.kernel_resources import find_cuobjdump
from unetpp_fast.ops.sass import disassemble, hot_loops, parse_sass


@triton.jit
def conv3x3_tma(x_ptr, w_ptr, out_ptr, N, H, W, C, C_OUT, TILES_W, TILES_H,
                BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    tx = pid % TILES_W
    rest = pid // TILES_W
    ty = rest % TILES_H
    n = rest // TILES_H
    y0 = ty * BH
    x0 = tx * BW
    x_desc = tl.make_tensor_descriptor(
        x_ptr, shape=[N, H, W, C], strides=[H * W * C, W * C, C, 1], block_shape=[1, BH, BW, BK]
    )
    # The weight as [(tap, C_in), C_out] rows, C_out contiguous.
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[9 * C, C_OUT], strides=[C_OUT, 1], block_shape=[BK, BN])
    acc = tl.zeros((BH * BW, BN), dtype=tl.float32)
    c0 = C * 0
    tap = C * 0
    for _ in range(0, 9 * tl.cdiv(C, BK)):  # (tap, channel block) from carried counters, no division
        a = x_desc.load([n, y0 + tap // 3 - 1, x0 + tap % 3 - 1, c0]).reshape(BH * BW, BK)
        b = w_desc.load([tap * C + c0, 0])
        acc = tl.dot(a, b, acc)
        c0 += BK
        wrap = c0 >= C
        c0 = tl.where(wrap, 0, c0)
        tap += wrap.to(tl.int32)
    out_desc = tl.make_tensor_descriptor(
        out_ptr,
        shape=[N, H, W, C_OUT],
        strides=[H * W * C_OUT, W * C_OUT, C_OUT, 1],
        block_shape=[1, BH, BW, BN],
    )
    out_desc.store([n, y0, x0, 0], acc.to(tl.bfloat16).reshape(1, BH, BW, BN))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bh", type=int, default=8)
    parser.add_argument("--bw", type=int, default=16)
    parser.add_argument("--bk", type=int, default=32)
    parser.add_argument("--bn", type=int, default=32)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    args = parser.parse_args()
    constexprs = dict(BH=args.bh, BW=args.bw, BK=args.bk, BN=args.bn)
    signature = {name: "*bf16" for name in ("x_ptr", "w_ptr", "out_ptr")}
    signature.update({name: "i32" for name in ("N", "H", "W", "C", "C_OUT", "TILES_W", "TILES_H")})
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(
        fn=conv3x3_tma,
        signature=signature,
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in range(3)},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": args.warps, "num_stages": args.stages}
    )
    tool = find_cuobjdump()
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "conv3x3_tma.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        (function,) = parse_sass(disassemble(path, tool))
    print(f"BH {args.bh} BW {args.bw} BK {args.bk} BN {args.bn} warps {args.warps} stages {args.stages}")
    for loop in hot_loops(function):
        counts = {k: v for k, v in loop.max_path_counts.items() if v}
        trip = f"{loop.max_path} warp instructions per trip"
        print(f"  loop 0x{loop.head:x}: {trip}, {loop.tensor_opcodes}, {counts}")


if __name__ == "__main__":
    main()
