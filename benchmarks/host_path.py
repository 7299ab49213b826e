"""Host cost of the triton backend's GPU path, measured on a CPU with Triton's compile and launch stubbed.

The real launchers run on CPU tensors (the GPU code path: channels_last layouts, piece tables,
tuning, direct launch of the compiled kernel); only the last step is replaced, through the
project's seam `unetpp_fast.ops.triton.launch_common.set_runtime`: a stub runtime records each
compilation (kernel, constexprs, config) and counts launches instead of compiling and launching.
No kernel runs, so outputs are garbage: this measures Python, not arithmetic.

    python benchmarks/host_path.py [--json results.json] [--repeats 300]

Prints and writes:
  per_call_us            median host time of one fused_conv call, per piece pattern (channels_last
                         pieces; `per_call_nchw_us`: NCHW pieces, which the GPU path converts)
  eager_node_us          cat + interpolate/max_pool2d + conv2d + relu on the same tiny CPU tensors
                         (includes their CPU arithmetic: an upper bound of eager's host cost)
  launcher_us            the triton launcher alone (fused_conv_forward), channels_last pieces
  op_layer_us            per_call_us - launcher_us: what the operator layer above the launcher costs
  model_forward_host_ms  UNet++ forward (accurate, and fast mode pruned L1..L4), bf16, eval, with
                         tiny filters (the BatchNorm folding is CPU arithmetic here)
  train_step_host_ms     forward + backward of the same tiny model in training mode (BatchNorm runs
                         eagerly on the CPU, so an upper bound of the host time)
  compiles               forward_accurate, train_step, after_resize (batch 16 -> 8, 96 -> 128)
Run with one thread (the script sets torch.set_num_threads(1)) and without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

PATTERNS = {
    # X[0,1] of UNet++: a plain piece and the up-sampled node below.
    "2-piece": (("none", "up_bilinear_ac"), (4, 4)),
    # Five pieces with every kind of read: three plain, one max-pooled, one up-sampled.
    "5-piece": (("none", "none", "none", "maxpool2", "up_bilinear_ac"), (4, 4, 4, 4, 4)),
}
OUT_HW = 8
C_OUT = 4


class StubRuntime:
    """Records compilations and counts launches; never compiles or touches a GPU."""

    runs_gpu_path_on_cpu = True
    name = "stub"

    def __init__(self) -> None:
        self.compiles: list[dict] = []
        self.launches = 0
        self.benchmarks = 0

    def compile(self, kernel, args, constexprs, config):
        record = {
            "kernel": getattr(kernel, "__name__", None) or kernel.fn.__name__,
            "dtypes": sorted({str(a.dtype) for a in args if isinstance(a, torch.Tensor)}),
            "constexprs": {k: v for k, v in constexprs.items()},
            "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
            "arg_names": list(kernel.arg_names),
        }
        self.compiles.append(record)
        return record

    def launch(self, compiled, grid, args) -> None:
        # What Triton's compiled launcher would be handed: every argument, constexprs included.
        if len(args) != len(compiled["arg_names"]):
            raise AssertionError(f"{compiled['kernel']}: {len(args)} arguments for {compiled['arg_names']}")
        if len(grid) != 3 or min(grid) < 1:
            raise AssertionError(f"{compiled['kernel']}: grid {grid}")
        self.launches += 1

    def bench(self, fn: Callable[[], None]) -> float:
        self.benchmarks += 1
        fn()
        return 1.0  # every config ties: the tuner keeps the first, deterministically

    def device_name(self, device) -> str:
        return "stub"


@contextlib.contextmanager
def stubbed(cache_dir: str | None = None) -> Iterator[StubRuntime]:
    """Install a fresh stub runtime; tuning choices persist in `cache_dir` (default: a new empty one,
    so compile counts are a first run's)."""
    from unetpp_fast.ops.triton import launch_common

    if launch_common.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the harness measures the GPU path, not the interpreter")
    stub = StubRuntime()
    old_env = os.environ.get("UNETPP_FAST_CACHE_DIR")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["UNETPP_FAST_CACHE_DIR"] = cache_dir or scratch
        previous = launch_common.set_runtime(stub)
        try:
            yield stub
        finally:
            launch_common.set_runtime(previous)
            if old_env is None:
                os.environ.pop("UNETPP_FAST_CACHE_DIR", None)
            else:
                os.environ["UNETPP_FAST_CACHE_DIR"] = old_env


def _median_us(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def pattern_inputs(name: str, layout: str, seed: int = 0):
    """Pieces (fresh random), resample names, weight, bias of a piece pattern: output OUT_HW^2."""
    modes, channels = PATTERNS[name]
    gen = torch.Generator().manual_seed(seed)
    pieces = []
    for mode, c in zip(modes, channels):
        size = OUT_HW // 2 if mode.startswith("up_") else OUT_HW * 2 if mode == "maxpool2" else OUT_HW
        piece = torch.randn(1, c, size, size, generator=gen)
        pieces.append(piece.contiguous(memory_format=torch.channels_last) if layout == "cl" else piece)
    weight = torch.randn(C_OUT, sum(channels), 3, 3, generator=gen)
    bias = torch.randn(C_OUT, generator=gen)
    return pieces, list(modes), weight, bias


def eager_node(pieces, modes, weight, bias):
    """What users run today: materialise the resampled pieces and their concatenation, then conv."""
    read = []
    for piece, mode in zip(pieces, modes):
        if mode == "maxpool2":
            piece = F.max_pool2d(piece, 2)
        elif mode == "up_bilinear_ac":
            piece = F.interpolate(piece, scale_factor=2, mode="bilinear", align_corners=True)
        read.append(piece)
    return F.relu(F.conv2d(torch.cat(read, dim=1), weight, bias, padding=1))


def measure_calls(repeats: int) -> dict:
    """Per pattern: the whole operator call, the triton launcher alone, and eager, interleaved."""
    import unetpp_fast
    from unetpp_fast.ops import conv_spec
    from unetpp_fast.ops.triton.fused_conv_forward import fused_conv_forward

    per_call, per_call_nchw, launcher, eager = {}, {}, {}, {}
    with torch.no_grad(), stubbed():
        for name in PATTERNS:
            for layout, into in (("cl", per_call), ("nchw", per_call_nchw)):
                p, m, w, b = pattern_inputs(name, layout)
                into[name] = _median_us(
                    lambda p=p, m=m, w=w, b=b: unetpp_fast.fused_conv(p, w, b, m, "relu", backend="triton"),
                    repeats,
                )
            p, m, w, b = pattern_inputs(name, "cl")
            codes = [conv_spec.resample_code(mode) for mode in m]
            launcher[name] = _median_us(
                lambda p=p, c=codes, w=w, b=b: fused_conv_forward(p, c, w, b, "relu"), repeats
            )
            p, m, w, b = pattern_inputs(name, "nchw")
            eager[name] = _median_us(lambda p=p, m=m, w=w, b=b: eager_node(p, m, w, b), repeats)
    return {
        "per_call_us": per_call,
        "per_call_nchw_us": per_call_nchw,
        "launcher_us": launcher,
        "op_layer_us": {name: per_call[name] - launcher[name] for name in PATTERNS},
        "eager_node_us": eager,
    }


def _model(dtype=torch.bfloat16, filters=(32, 64, 128, 256, 512)):
    from unetpp_fast import UNetPlusPlus

    torch.manual_seed(0)
    model = UNetPlusPlus(3, 1, filters, deep_supervision=True, block="conv_bn_relu", upsample="bilinear_ac")
    return model.to(dtype=dtype, memory_format=torch.channels_last)


def _image(batch: int, size: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)


def measure_model(repeats: int) -> dict:
    import unetpp_fast

    # Tiny filters: the eval forward folds BatchNorm into each weight, real arithmetic on the CPU
    # (a kernel on the GPU) that would otherwise dominate what is meant to be Python time.
    model = _model(filters=(4, 8, 8, 8, 8)).eval()
    x = _image(1, 32)
    host_ms = {}
    with torch.no_grad(), unetpp_fast.use_backend("triton"), stubbed() as stub:
        variants = [("accurate", "accurate", None)] + [(f"L{i}", "fast", i) for i in range(1, 5)]
        launches = {}
        for label, mode, prune in variants:
            model.mode, model.prune = mode, prune
            host_ms[label] = _median_us(lambda: model(x), max(10, repeats // 10), warmup=3) / 1e3
            before = stub.launches
            model(x)
            launches[label] = stub.launches - before
    model.mode, model.prune = "accurate", None
    model.train()
    with unetpp_fast.use_backend("triton"), stubbed() as stub:

        def step():
            model.zero_grad(set_to_none=True)
            sum(o.float().mean() for o in model(x)).backward()

        train_ms = _median_us(step, max(10, repeats // 20), warmup=3) / 1e3
        before = stub.launches
        step()
        train_launches = stub.launches - before
    model.eval()
    return {
        "model_forward_host_ms": host_ms,
        "model_forward_launches": launches,
        "train_step_host_ms": train_ms,
        "train_step_launches": train_launches,
    }


def measure_compiles() -> dict:
    import unetpp_fast

    model = _model()
    result = {}
    with unetpp_fast.use_backend("triton"):
        with torch.no_grad(), stubbed() as stub:
            model.eval()
            model(_image(16, 96))
            result["forward_accurate"] = len(stub.compiles)
            forward_records = list(stub.compiles)
            model(_image(8, 128))
            result["after_resize"] = len(stub.compiles) - result["forward_accurate"]
        with stubbed() as stub:
            model.train()
            outputs = model(_image(2, 64))
            sum(o.float().mean() for o in outputs).backward()
            result["train_step"] = len(stub.compiles)
            train_records = list(stub.compiles)
            model.zero_grad(set_to_none=True)
            outputs = model(_image(1, 32))
            sum(o.float().mean() for o in outputs).backward()
            result["train_after_resize"] = len(stub.compiles) - result["train_step"]
    model.eval()
    compiled = {"forward_accurate": forward_records, "train_step": train_records}
    return {"compiles": result, "compiled": compiled}


def run(repeats: int = 300, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    results = {"threads": threads, "repeats": repeats, "torch": torch.__version__}
    results.update(measure_calls(repeats))
    results.update(measure_model(repeats))
    results.update(measure_compiles())
    return results


def format_results(results: dict) -> str:
    lines = [f"host path of the triton backend (stubbed driver, {results['threads']} thread)"]
    for name in PATTERNS:
        fused, eager = results["per_call_us"][name], results["eager_node_us"][name]
        lines.append(
            f"  {name}: per_call_us {fused:7.1f} (nchw {results['per_call_nchw_us'][name]:7.1f})   "
            f"launcher_us {results['launcher_us'][name]:6.1f}   "
            f"op_layer_us {results['op_layer_us'][name]:6.1f}   "
            f"eager_node_us {eager:7.1f}   ratio {fused / eager:4.2f}"
        )
    for label, ms in results["model_forward_host_ms"].items():
        launches = results["model_forward_launches"][label]
        lines.append(f"  model forward {label:8s} {ms:7.2f} ms host, {launches} launches")
    lines.append(
        f"  train step (fwd+bwd)  {results['train_step_host_ms']:7.2f} ms host, "
        f"{results['train_step_launches']} launches"
    )
    lines.append("  compiles: " + ", ".join(f"{k} {v}" for k, v in results["compiles"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    results = run(args.repeats, args.threads)
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
