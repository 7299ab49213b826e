"""Speed of the C++ 'cpu' backend against plain PyTorch on this machine's CPU, at 1..N threads.

    python benchmarks/bench_native_cpu.py                     # nodes, 1 and all threads
    python benchmarks/bench_native_cpu.py --threads 1,2 --model --size 64
    pytest benchmarks/bench_native_cpu.py                     # the nodes under pytest-benchmark

Node cases are UNet++ nodes at batch 2 (fp32): the 96x96 level (an encoder conv reading
maxpool(x), a dense skip node reading [x, x, up(x)], a second conv reading one plain piece) and
the deepest levels (12x12 and 6x6, 256..768 channels), where a GEMM is tall and narrow. Each is
timed on the 'cpu' backend and on the 'reference' backend (plain PyTorch: cat + interpolate /
max_pool + conv2d). `--model` adds UNet++ L1..L4 (fast mode, head L only): inference and one
training step (forward, backward, Adam), fused on 'cpu' against plain PyTorch ('eager').

The backends alternate round by round (ABAB...), so load from other processes falls on both; the
table gives medians and the ratio cpu / plain (below 1: the fused backend is faster). Thread
counts are switched inside the one process (torch.set_num_threads), so every row is the same run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import pytest
import torch

import unetpp_fast
from unetpp_fast.bench import timing

NONE, NEAREST, BILINEAR, BILINEAR_AC, MAXPOOL = range(5)

# name: (per-piece (channels, resample, source size), C_out, k)
CASES = {
    "encoder_x10_maxpool": ([(32, MAXPOOL, 192)], 64, 3),
    "skip_x02_bilinear": ([(32, NONE, 96), (32, NONE, 96), (64, BILINEAR, 48)], 32, 3),
    "second_conv_plain": ([(32, NONE, 96)], 32, 3),
    "deep_x31_bilinear": ([(256, NONE, 12), (512, BILINEAR_AC, 6)], 256, 3),
    "deep_x40_maxpool": ([(256, MAXPOOL, 12)], 512, 3),
    "deep_second_conv": ([(512, NONE, 6)], 512, 3),
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


def node_call(name: str, backend: str, backward: bool) -> Callable[[], None]:
    """One node's forward (and backward) on `backend`, inputs made once."""
    pieces, modes, weight, bias = make_inputs(name, requires_grad=backward)

    def call() -> None:
        out = unetpp_fast.fused_conv(pieces, weight, bias, resample=modes, backend=backend)
        if backward:
            out.sum().backward()

    return call


def model_call(level: int, backend: str, train: bool, batch: int, size: int) -> Callable[[], None]:
    """UNet++ pruned to head `level`: one inference or one training step on benchmark `backend`."""
    net = timing.build_model("unetpp", prune=level, device="cpu", dtype=torch.float32)
    if train:
        with timing.run_with(backend):
            step = timing.make_training_step(net, batch, size, torch.float32, backend=backend)
    else:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

        def step() -> None:
            with torch.no_grad():
                net(x)

    def call() -> None:
        with timing.run_with(backend):
            step()

    return call


def interleaved_medians(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each entry, timed round-robin after one warm-up call each."""
    samples: dict[str, list[float]] = {key: [] for key in calls}
    for call in calls.values():
        timing.time_callable(call, "cpu", warmup=0, rounds=1)
    for _ in range(rounds):
        for key, call in calls.items():
            samples[key].append(timing.time_callable(call, "cpu", warmup=0, rounds=1).median_s)
    return {key: statistics.median(values) for key, values in samples.items()}


def print_row(label: str, threads: int, what: str, plain_s: float, cpu_s: float) -> None:
    print(f"{label:22} {threads:>7} {what:9} {plain_s * 1e3:10.1f} {cpu_s * 1e3:9.1f} {cpu_s / plain_s:9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_threads = torch.get_num_threads()
    parser.add_argument("--threads", default=f"1,{all_threads}", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per row, median reported")
    parser.add_argument("--cases", default=",".join(CASES), help="node cases, comma-separated ('' for none)")
    parser.add_argument("--model", action="store_true", help="add UNet++ L1..L4 inference and training rows")
    parser.add_argument("--levels", default="1,2,3,4", help="UNet++ levels of --model")
    parser.add_argument("--batch", type=int, default=4, help="images per batch of --model")
    parser.add_argument("--size", type=int, default=96, help="image size of --model")
    args = parser.parse_args(argv)
    threads = sorted({int(t) for t in args.threads.split(",")})
    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}, expected some of {', '.join(CASES)}")
    reason = unetpp_fast.ops.backends.why_unusable("cpu", "cpu")
    if reason:
        raise SystemExit(f"the cpu backend is unusable here: {reason}")

    print(f"torch {torch.__version__}, fp32, median of {args.rounds} alternating rounds; ratio = cpu / plain")
    print(f"{'case':22} {'threads':>7} {'pass':9} {'plain ms':>10} {'cpu ms':>9} {'cpu/plain':>9}")
    for n in threads:
        torch.set_num_threads(n)
        for name in cases:
            for backward in (False, True):
                calls = {b: node_call(name, b, backward) for b in ("reference", "cpu")}
                t = interleaved_medians(calls, args.rounds)
                print_row(name, n, "fwd+bwd" if backward else "fwd", t["reference"], t["cpu"])
        if args.model:
            for level in (int(x) for x in args.levels.split(",")):
                for train in (False, True):
                    calls = {b: model_call(level, b, train, args.batch, args.size) for b in ("eager", "cpu")}
                    t = interleaved_medians(calls, args.rounds)
                    label = f"UNet++ L{level} b{args.batch} {args.size}px"
                    print_row(label, n, "train" if train else "inference", t["eager"], t["cpu"])


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_bench_native_cpu(benchmark, name, backend, backward):
    if unetpp_fast.ops.backends.why_unusable(backend, "cpu"):
        pytest.skip(unetpp_fast.ops.backends.why_unusable(backend, "cpu"))
    benchmark.group = f"{name} {'fwd+bwd' if backward else 'fwd'}"
    benchmark.extra_info.update(case=name, backend=backend, batch=BATCH, threads=torch.get_num_threads())
    benchmark.pedantic(node_call(name, backend, backward), rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    main()
