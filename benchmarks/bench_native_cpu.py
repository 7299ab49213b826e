"""Speed of the C++ 'cpu' backend against the 'reference' backend on this machine's CPU.

    python benchmarks/bench_native_cpu.py            # table of median times and ratios
    pytest benchmarks/bench_native_cpu.py            # the same cases under pytest-benchmark

Cases are UNet++ nodes at 2x96x96 (fp32): an encoder conv reading maxpool(x), a dense skip
node reading [x, x, up(x)], and a second conv reading one plain piece.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import unetpp_fast

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)

# name: (per-piece (channels, resample, source size), C_out, k)
CASES = {
    "encoder_x10_maxpool": ([(32, MAXPOOL, 192)], 64, 3),
    "skip_x02_bilinear": ([(32, NONE, 96), (32, NONE, 96), (64, BILINEAR, 48)], 32, 3),
    "second_conv_plain": ([(32, NONE, 96)], 32, 3),
}
BATCH = 2


def make_inputs(name: str, requires_grad: bool = False):
    specs, c_out, k = CASES[name]
    gen = torch.Generator().manual_seed(0)
    pieces = [torch.randn(BATCH, c, s, s, generator=gen).requires_grad_(requires_grad) for c, _, s in specs]
    modes = [m for _, m, _ in specs]
    c_in = sum(c for c, _, _ in specs)
    weight = (torch.randn(c_out, c_in, k, k, generator=gen) / (9 * c_in) ** 0.5).requires_grad_(requires_grad)
    bias = torch.randn(c_out, generator=gen).requires_grad_(requires_grad)
    return pieces, modes, weight, bias


def run(name: str, backend: str, backward: bool) -> None:
    pieces, modes, weight, bias = make_inputs(name, requires_grad=backward)
    out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, backend=backend)
    if backward:
        out.sum().backward()


def median_seconds(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_bench_native_cpu(benchmark, name, backend, backward):
    if unetpp_fast.ops.backends.why_unusable(backend, "cpu"):
        pytest.skip(unetpp_fast.ops.backends.why_unusable(backend, "cpu"))
    benchmark.group = f"{name} {'fwd+bwd' if backward else 'fwd'}"
    benchmark.extra_info.update(case=name, backend=backend, batch=BATCH, threads=torch.get_num_threads())
    benchmark.pedantic(run, args=(name, backend, backward), rounds=5, warmup_rounds=1)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {BATCH}")
    print(f"{'case':24} {'pass':8} {'reference ms':>13} {'cpu ms':>9} {'cpu/ref':>8}")
    for name in CASES:
        for backward in (False, True):
            ref = median_seconds(lambda n=name, b=backward: run(n, "reference", b))
            ours = median_seconds(lambda n=name, b=backward: run(n, "cpu", b))
            label = "fwd+bwd" if backward else "fwd"
            print(f"{name:24} {label:8} {ref * 1e3:13.1f} {ours * 1e3:9.1f} {ours / ref:8.2f}")


if __name__ == "__main__":
    main()
