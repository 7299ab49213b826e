"""Measuring speed: the timing helpers shared by the benchmark suites and `unetpp-fast bench`.

Public API
----------
time_callable(fn, device, warmup=3, rounds=20) -> TimingStats
    Times `fn()` (no arguments). CUDA: one pair of CUDA events per round around the call, the
    device synchronised before the first and after the last round; CPU: `time.perf_counter`.
    Warm-up calls (compilation, autotuning, allocator growth) are excluded. Median reported.
build_model(arch, *, prune, device, dtype, channels_last, filters, ...) -> nn.Module
    'unetpp' (`prune`=1..depth: fast mode, head L only; None: every head averaged), 'unet' or
    'wide_unet', on a device and dtype, in eval mode, optionally channels_last.
run_with(backend)                 context manager: the enclosed model calls run on `backend` (below)
backend_unusable(backend, device) -> str      '' when usable, else why not
plain_fused_conv(...), plain_pytorch_convs()  the plain-PyTorch baseline ('eager') and its switch
prepare_inference(...) / prepare_training_step(...) -> TimedRun    a model built and warmed up on a backend
interleaved_timing(runs, device, rounds) -> {backend: Throughput | exception}
    Times several prepared runs round-robin (each round calls every backend once, the first one
    rotating), so a slow spell of a shared machine falls on every backend alike.
model_timing(model_factory, batch, size, device, dtype, channels_last, backend, ...) -> Throughput
training_step_timing(model_factory, batch, size, device, dtype, channels_last, backend, ...)
    -> Throughput (forward + backward + Adam step, `peak_memory_bytes` on CUDA)
training_step_throughputs(model_factory, backends, ...)  training steps of several backends, interleaved
make_training_step(net, batch, size, dtype, channels_last, backend) -> step()   (call inside run_with)
pruning_throughput(batch, size, device, dtype, channels_last, backends_to_run, levels, ...) -> list[dict]
    Rows for a table: UNet++ L1..L4, U-Net, wide U-Net for each backend (the backends of one
    model interleaved), with images/s, ms per batch, seconds per 10k images (the paper's Fig. 3)
    and the ratios to the 'eager' and 'compile' rows of the same model.
format_table(rows, columns) -> str                        a markdown table of such rows
calls_text(counts) -> str         'cpu 31' / 'reference 20, cpu 11': which backend ran the convolutions

3D: `spatial_dims=3` in build_model, model_timing, training_step_timing, make_training_step and
pruning_throughput makes the models 3D (3x3x3 convolutions) and the inputs [batch, C, size,
size, size] (channels_last means channels_last_3d). Each Throughput and row also says which
fused backend ran how many convolutions per call (`backend_calls`, from `backends.count_calls`).

Backends of a benchmark (`backend` argument)
--------------------------------------------
'eager'    the same model with every fused convolution replaced by plain PyTorch (`torch.cat`,
           `F.interpolate` / `F.max_pool2d`, `F.conv2d`, activation): what users run today.
'compile'  'eager' under `torch.compile(mode=compile_mode)` (default 'max-autotune').
'fused'    the fused operator with the backend picked automatically ('auto').
'fused_graph'  'fused' captured once into a CUDA graph and replayed (inference, CUDA only).
'reference' | 'triton' | 'cuda' | 'cpu'   the fused operator forced onto that backend.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from unetpp_fast.ops import backends, conv_spec, reference

EAGER = "eager"
COMPILE = "compile"
FUSED = "fused"
FUSED_GRAPH = "fused_graph"
FUSED_BACKENDS = ("reference", "triton", "cuda", "cpu")
BENCH_BACKENDS = (EAGER, COMPILE, FUSED, FUSED_GRAPH, *FUSED_BACKENDS)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
IMAGES_FOR_FIG3 = 10_000  # the paper's Fig. 3 reports the time to segment 10k images


@dataclass(frozen=True)
class TimingStats:
    """Seconds per call over `rounds` timed calls (warm-up excluded)."""

    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    stdev_s: float
    rounds: int
    device: str
    samples_s: tuple[float, ...] = field(repr=False, default=())

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("samples_s")
        return out


@dataclass(frozen=True)
class Throughput:
    """One model measurement: images/s from the median time per batch."""

    images_per_s: float
    median_s_per_batch: float
    batch: int
    size: int
    timing: TimingStats
    peak_memory_bytes: int | None = None
    # fused_conv forward calls per timed call, per backend ({} when none ran: plain PyTorch, graphs)
    backend_calls: dict[str, float] = field(default_factory=dict)

    @property
    def seconds_per_10k(self) -> float:
        return IMAGES_FOR_FIG3 / self.images_per_s if self.images_per_s > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# timing


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 3, rounds: int = 20
) -> TimingStats:
    """Median seconds per call of `fn()`; on CUDA timed with events, synchronised, warm-up excluded."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        synchronize(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(rounds)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(rounds):
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return TimingStats(
        median_s=statistics.median(samples),
        mean_s=statistics.fmean(samples),
        min_s=min(samples),
        max_s=max(samples),
        stdev_s=statistics.stdev(samples) if len(samples) > 1 else 0.0,
        rounds=rounds,
        device=str(device),
        samples_s=tuple(samples),
    )


# ----------------------------------------------------------------------------------------------
# the plain-PyTorch baseline


def plain_fused_conv(
    pieces: Sequence[torch.Tensor] | torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    resample: Sequence[int | str] | None = None,
    activation: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """`fused_conv` written as users would write it: cat, interpolate / max_pool, conv2d / conv3d, activation.

    No custom operator, so autograd saves the concatenation and torch.compile sees every op.
    """
    del backend
    if isinstance(pieces, torch.Tensor):
        pieces = [pieces]
    pieces = list(pieces)
    codes = [conv_spec.NONE] * len(pieces) if resample is None else resample
    dims = weight.dim() - 2  # 2D or 3D: conv2d or conv3d on the materialised input
    codes = [conv_spec.resample_code(m, f"resample[{i}]", dims) for i, m in enumerate(codes)]
    if torch.is_autocast_enabled(weight.device.type):
        cast = torch.get_autocast_dtype(weight.device.type)
        pieces = [p.to(cast) for p in pieces]
        weight = weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    resampled = [reference.apply_resample(p, c) for p, c in zip(pieces, codes)]
    virtual = resampled[0] if len(resampled) == 1 else torch.cat(resampled, dim=1)
    conv = F.conv3d if dims == 3 else F.conv2d
    out = conv(virtual, weight, bias, padding=weight.shape[-1] // 2)
    return reference.apply_activation(out, activation)


@contextlib.contextmanager
def plain_pytorch_convs() -> Iterator[None]:
    """Inside this block every `fused_conv` the package's modules call is `plain_fused_conv`.

    The model code stays untouched: the name `fused_conv` is swapped in each loaded `unetpp_fast`
    module that bound it, and restored on exit.
    """
    from unetpp_fast.ops import fused_op

    original = fused_op.fused_conv
    patched: list[tuple[Any, str]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "unetpp_fast" or name.startswith("unetpp_fast.")):
            continue
        for attr in ("fused_conv",):
            if getattr(module, attr, None) is original:
                setattr(module, attr, plain_fused_conv)
                patched.append((module, attr))
    try:
        yield
    finally:
        for module, attr in patched:
            setattr(module, attr, original)


@contextlib.contextmanager
def run_with(backend: str) -> Iterator[None]:
    """Run the enclosed model calls with benchmark backend `backend` (see the module docstring)."""
    if backend not in BENCH_BACKENDS:
        raise ValueError(f"backend must be one of {BENCH_BACKENDS}, got {backend!r}")
    if backend in (EAGER, COMPILE):
        with plain_pytorch_convs():
            yield
    elif backend in (FUSED, FUSED_GRAPH):
        with backends.use_backend("auto"):
            yield
    else:
        with backends.use_backend(backend):
            yield


def backend_unusable(backend: str, device: torch.device | str, spatial_dims: int = 2) -> str:
    """'' when `backend` can run on `device` (calls of `spatial_dims`), else why not (skips, notes)."""
    device = torch.device(device)
    if backend not in BENCH_BACKENDS:
        return f"unknown backend {backend!r}"
    if backend in FUSED_BACKENDS:
        refusal = backends.why_cannot_take(backend, None, None, spatial_dims)
        return backends.why_unusable(backend, device) or (refusal[1] if refusal else "")
    if backend == FUSED_GRAPH and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return ""


# ----------------------------------------------------------------------------------------------
# models


def build_model(
    arch: str = "unetpp",
    *,
    prune: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    filters: Sequence[int] | None = None,
    in_channels: int = 3,
    num_classes: int = 1,
    block: str = "conv_bn_relu",
    upsample: str = "bilinear_ac",
    spatial_dims: int = 2,
) -> torch.nn.Module:
    """An eval-mode model for inference benchmarks: 'unetpp' (pruned to head `prune`), 'unet', 'wide_unet'."""
    from unetpp_fast.nn import unetpp as model_module

    kw: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes, "block": block}
    kw["upsample"] = upsample
    if spatial_dims != 2:
        kw["spatial_dims"] = spatial_dims
    if arch == "unetpp":
        if filters is not None:
            kw["filters"] = tuple(filters)
        if prune is None:
            net = model_module.UNetPlusPlus(**kw, deep_supervision=True, mode="accurate")
        else:
            net = model_module.UNetPlusPlus(**kw, deep_supervision=True, mode="fast", prune=prune)
    elif arch == "unet":
        if filters is not None:
            kw["filters"] = tuple(filters)
        net = model_module.UNet(**kw)
    elif arch == "wide_unet":
        net = model_module.wide_unet(**kw)
    else:
        raise ValueError(f"arch must be 'unetpp', 'unet' or 'wide_unet', got {arch!r}")
    net = net.to(device=torch.device(device), dtype=dtype_from_name(dtype)).eval()
    if channels_last:
        net = net.to(memory_format=_channels_last(spatial_dims))
    return net


def _channels_last(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _input(batch, size, in_channels, device, dtype, channels_last, seed=0, spatial_dims=2) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, in_channels, *(size,) * spatial_dims, generator=generator)
    x = x.to(device=device, dtype=dtype)
    return x.contiguous(memory_format=_channels_last(spatial_dims)) if channels_last else x


def _maybe_compile(fn: Callable, backend: str, compile_mode: str) -> Callable:
    if backend != COMPILE:
        return fn
    # a fresh dynamo cache per model: past the recompile limit dynamo would silently run eager
    torch._dynamo.reset()
    return torch.compile(fn, mode=compile_mode)


def prepare_inference(
    model_factory: Callable[[], torch.nn.Module],
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backend: str = FUSED,
    warmup: int = 3,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> TimedRun:
    """`model_factory()`'s inference (no_grad) on a random batch, built and warmed up on `backend`."""
    device = torch.device(device)
    dtype = dtype_from_name(dtype)
    reason = backend_unusable(backend, device, spatial_dims)
    if reason:
        raise RuntimeError(f"benchmark backend {backend!r} cannot run on {device}: {reason}")
    net = model_factory()
    x = _input(batch, size, in_channels, device, dtype, channels_last, spatial_dims=spatial_dims)
    with run_with(backend):
        if backend == FUSED_GRAPH:
            from unetpp_fast.nn.cuda_graph import capture_inference

            forward = capture_inference(net, x, warmup=max(warmup, 1))
        else:
            forward = _maybe_compile(net, backend, compile_mode)

        def step() -> Any:
            with torch.no_grad():
                return forward(x)

        for _ in range(max(warmup, 1 if backend == COMPILE else 0)):
            step()
    return TimedRun(backend, step, batch, size)


def model_timing(
    model_factory: Callable[[], torch.nn.Module],
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backend: str = FUSED,
    warmup: int = 3,
    rounds: int = 20,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> Throughput:
    """Inference (no_grad) timing of `model_factory()` on a random batch [batch, in_channels, size, size]
    ([batch, in_channels, size, size, size] with spatial_dims=3)."""
    run = prepare_inference(
        model_factory,
        batch,
        size,
        device,
        dtype,
        channels_last,
        backend,
        warmup,
        in_channels,
        compile_mode,
        spatial_dims,
    )
    return _timed_alone(run, device, rounds)


def make_training_step(
    net: torch.nn.Module,
    batch: int,
    size: int,
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backend: str = FUSED,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> Callable[[], None]:
    """One training step of `net` (fp32 weights, train mode): forward, loss, backward, Adam.

    Low-precision `dtype` runs under autocast. The loss is the mean over the heads (deep
    supervision) of BCE-with-logits against random {0, 1} targets. Call the step inside
    `run_with(backend)`; with backend 'compile' the forward is torch.compile'd.
    """
    dtype = dtype_from_name(dtype)
    device = next(net.parameters()).device
    net = net.to(dtype=torch.float32).train()
    if channels_last:
        net = net.to(memory_format=_channels_last(spatial_dims))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = _input(batch, size, in_channels, device, torch.float32, channels_last, spatial_dims=spatial_dims)
    generator = torch.Generator(device="cpu").manual_seed(1)
    target_shape = (batch, _num_classes(net), *(size,) * spatial_dims)
    target = (torch.rand(target_shape, generator=generator) > 0.5).float().to(device)
    autocast = dtype not in (torch.float32, torch.float64)
    forward = _maybe_compile(net, backend, compile_mode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            outputs = forward(x)
        heads = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = sum(F.binary_cross_entropy_with_logits(h.float(), target) for h in heads) / len(heads)
        loss.backward()
        optimizer.step()

    return step


def prepare_training_step(
    model_factory: Callable[[], torch.nn.Module],
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backend: str = FUSED,
    warmup: int = 2,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> TimedRun:
    """A training step (see `make_training_step`) built and warmed up on `backend`.

    On CUDA its `peak_memory_bytes` is measured here, on one extra step, while no other prepared
    run's step is running (the figure is the peak allocated during that step).
    """
    device = torch.device(device)
    reason = backend_unusable(backend, device, spatial_dims)
    if reason:
        raise RuntimeError(f"benchmark backend {backend!r} cannot run on {device}: {reason}")
    net = model_factory().to(device=device)
    peak = None
    with run_with(backend):
        step = make_training_step(
            net, batch, size, dtype, channels_last, backend, in_channels, compile_mode, spatial_dims
        )
        for _ in range(max(warmup, 1)):
            step()
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            synchronize(device)
            peak = int(torch.cuda.max_memory_allocated(device))
    return TimedRun(backend, step, batch, size, peak)


def training_step_timing(
    model_factory: Callable[[], torch.nn.Module],
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backend: str = FUSED,
    warmup: int = 2,
    rounds: int = 10,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> Throughput:
    """Forward + backward + Adam step timing (see `make_training_step`).

    On CUDA `peak_memory_bytes` is the peak allocated during one step.
    """
    run = prepare_training_step(
        model_factory,
        batch,
        size,
        device,
        dtype,
        channels_last,
        backend,
        warmup,
        in_channels,
        compile_mode,
        spatial_dims,
    )
    return _timed_alone(run, device, rounds)


def training_step_throughputs(
    model_factory: Callable[[], torch.nn.Module],
    backends_to_run: Sequence[str],
    batch: int,
    size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    warmup: int = 2,
    rounds: int = 10,
    in_channels: int = 3,
    compile_mode: str = "max-autotune",
    spatial_dims: int = 2,
) -> dict[str, Throughput | BaseException]:
    """training_step_timing for several backends, their timed steps interleaved round by round.

    A backend that fails (while being prepared or timed) maps to its exception.
    """
    prepared: list[TimedRun] = []
    failed: dict[str, Throughput | BaseException] = {}
    for backend in backends_to_run:
        try:
            prepared.append(
                prepare_training_step(
                    model_factory,
                    batch,
                    size,
                    device,
                    dtype,
                    channels_last,
                    backend,
                    warmup,
                    in_channels,
                    compile_mode,
                    spatial_dims,
                )
            )
        except Exception as exc:  # a failing backend must not hide the others
            failed[backend] = exc
    results = interleaved_timing(prepared, device, rounds) if prepared else {}
    return {b: failed[b] if b in failed else results[b] for b in backends_to_run}


def _num_classes(net: torch.nn.Module) -> int:
    value = getattr(net, "num_classes", None)
    if isinstance(value, int):
        return value
    last_conv = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    return last_conv[-1].out_channels if last_conv else 1


def pruning_throughput(
    batch: int = 16,
    size: int = 96,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    backends_to_run: Sequence[str] = (FUSED, EAGER, COMPILE),
    levels: Sequence[int] = (1, 2, 3, 4),
    include_unet: bool = True,
    include_wide_unet: bool = True,
    warmup: int = 3,
    rounds: int = 20,
    compile_mode: str = "max-autotune",
    filters: Sequence[int] | None = None,
    on_error: str = "record",
    spatial_dims: int = 2,
    in_channels: int | None = None,
) -> list[dict[str, Any]]:
    """Inference rows for UNet++ L1..L4 (fast mode, head L only), U-Net and wide U-Net per backend.

    Each row: model, prune, backend, dtype, channels_last, batch, size, images_per_s, ms_per_batch,
    s_per_10k, ratio_vs_eager and ratio_vs_compile (speed-up over that row of the same model:
    `paired_speedup`, the median of the per-round ratios),
    params, backend_calls (fused_conv calls per forward, per backend), error.
    spatial_dims=3: 3D models on [batch, in_channels, size, size, size] volumes (in_channels
    default: 3 in 2D, 1 in 3D: a CT volume has one channel).
    A backend that cannot run here is skipped; with on_error='record' a failing run becomes a row
    with `error` set instead of raising.
    """
    device = torch.device(device)
    dtype = dtype_from_name(dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    models: list[tuple[str, dict[str, Any]]] = [
        (f"UNet++ L{lv}", {"arch": "unetpp", "prune": lv}) for lv in levels
    ]
    if include_unet:
        models.append(("U-Net", {"arch": "unet"}))
    if include_wide_unet:
        models.append(("wide U-Net", {"arch": "wide_unet"}))
    channels = in_channels if in_channels is not None else (3 if spatial_dims == 2 else 1)
    rows: list[dict[str, Any]] = []
    for label, spec in models:
        kw = dict(spec, device=device, dtype=dtype, channels_last=channels_last, in_channels=channels)
        if spatial_dims != 2:
            kw["spatial_dims"] = spatial_dims
        if filters is not None and spec["arch"] != "wide_unet":
            kw["filters"] = filters

        # One instance for every backend of a model: the same weights at the same addresses, so
        # the rows differ by the convolutions that ran and nothing else (two instances of the same
        # network can differ by 10-20 % on a CPU from where their tensors landed).
        net = build_model(**kw)

        def factory(net: torch.nn.Module = net) -> torch.nn.Module:
            return net

        params = sum(p.numel() for p in net.parameters())
        model_rows: dict[str, dict[str, Any]] = {}
        prepared: list[TimedRun] = []
        for backend in backends_to_run:
            if backend_unusable(backend, device, spatial_dims):
                continue
            row = model_rows[backend] = {
                "model": label,
                "prune": spec.get("prune"),
                "backend": backend,
                "dtype": dtype_name,
                "channels_last": channels_last,
                "batch": batch,
                "size": size,
                "params": params,
                "spatial_dims": spatial_dims,
                "backend_calls": None,
                "images_per_s": None,
                "ms_per_batch": None,
                "s_per_10k": None,
                "ratio_vs_eager": None,
                "ratio_vs_compile": None,
                "error": None,
            }
            try:
                prepared.append(
                    prepare_inference(
                        factory,
                        batch,
                        size,
                        device,
                        dtype,
                        channels_last,
                        backend,
                        warmup,
                        in_channels=channels,
                        compile_mode=compile_mode,
                        spatial_dims=spatial_dims,
                    )
                )
            except Exception as exc:  # a failing backend must not hide the other rows
                if on_error != "record":
                    raise
                row["error"] = error_text(exc)
        # every backend's rounds interleaved: a slow spell of the machine falls on all of them alike
        timed: dict[str, Throughput] = {}
        for backend, result in interleaved_timing(prepared, device, rounds).items():
            if isinstance(result, BaseException):
                if on_error != "record":
                    raise result
                model_rows[backend]["error"] = error_text(result)
            else:
                model_rows[backend].update(throughput_fields(result))
                timed[backend] = result
        for backend, row in model_rows.items():
            if backend in timed:
                for column, baseline in (("ratio_vs_eager", EAGER), ("ratio_vs_compile", COMPILE)):
                    if baseline in timed:
                        row[column] = paired_speedup(timed[backend], timed[baseline])
        rows += model_rows.values()
    return rows


def paired_speedup(result: Throughput, baseline: Throughput) -> float:
    """How many times faster `result` ran than `baseline` when they were timed interleaved: the
    median over rounds of baseline time / result time within the round (each round runs both back
    to back, so a slow spell of the machine cancels in each ratio). Without paired rounds: the
    ratio of the median times."""
    ours, theirs = result.timing.samples_s, baseline.timing.samples_s
    if not ours or len(ours) != len(theirs) or result.batch != baseline.batch:
        return result.images_per_s / baseline.images_per_s
    return statistics.median(b / a for a, b in zip(ours, theirs))


def error_text(exc: BaseException) -> str:
    """A failed benchmark row's `error`: the exception's type and first line, at most 200 characters."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:200]


def throughput_fields(result: Throughput) -> dict[str, Any]:
    """The row fields of a timed run: images/s, ms per batch, s per 10k images, fused calls per backend."""
    return {
        "images_per_s": result.images_per_s,
        "ms_per_batch": result.median_s_per_batch * 1e3,
        "s_per_10k": result.seconds_per_10k,
        "backend_calls": result.backend_calls,
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` restricted to `columns` (floats with 3 significant digits)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# which backend ran


@dataclass
class TimedRun:
    """A benchmark ready to time: `step()` is one call, run inside `run_with(backend)`."""

    backend: str
    step: Callable[[], Any]
    batch: int
    size: int
    peak_memory_bytes: int | None = None


def _timed_alone(run: TimedRun, device: torch.device | str, rounds: int) -> Throughput:
    result = interleaved_timing([run], device, rounds)[run.backend]
    if isinstance(result, BaseException):
        raise result
    return result


def interleaved_timing(
    runs: Sequence[TimedRun], device: torch.device | str, rounds: int
) -> dict[str, Throughput | BaseException]:
    """Time prepared runs round-robin: each round calls every run once, the first one rotating.

    Timing all rounds of one backend and then the next lets a slow spell of a shared machine fall
    on one backend only; interleaved, the ratios between backends are what is left. Each call is
    timed alone (CUDA: a pair of events, the device synchronised before the first and after the
    last round; CPU: `time.perf_counter`) inside its backend's `run_with` block and `count_calls`,
    both entered outside the timed span. A run that raises maps to its exception and leaves the
    remaining rounds.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    names = [run.backend for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs must have distinct backends, got {names}")
    samples: dict[str, list[Any]] = {run.backend: [] for run in runs}
    counts: dict[str, Counter] = {run.backend: Counter() for run in runs}
    failed: dict[str, BaseException] = {}
    if cuda:
        synchronize(device)
    for r in range(rounds):
        live = [run for run in runs if run.backend not in failed]
        shift = r % len(live) if live else 0
        for run in live[shift:] + live[:shift]:
            with run_with(run.backend), backends.count_calls() as counted:
                try:
                    if cuda:
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                        run.step()
                        end.record()
                        samples[run.backend].append((start, end))
                    else:
                        begin = time.perf_counter()
                        run.step()
                        samples[run.backend].append(time.perf_counter() - begin)
                except Exception as exc:  # one failing backend must not stop the others
                    failed[run.backend] = exc
            counts[run.backend].update(counted)
    if cuda:
        synchronize(device)
    results: dict[str, Throughput | BaseException] = {}
    for run in runs:
        if run.backend in failed:
            results[run.backend] = failed[run.backend]
            continue
        raw = samples[run.backend]
        seconds = [start.elapsed_time(end) / 1e3 for start, end in raw] if cuda else raw
        stats = TimingStats(
            median_s=statistics.median(seconds),
            mean_s=statistics.fmean(seconds),
            min_s=min(seconds),
            max_s=max(seconds),
            stdev_s=statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
            rounds=rounds,
            device=str(device),
            samples_s=tuple(seconds),
        )
        results[run.backend] = Throughput(
            images_per_s=run.batch / stats.median_s,
            median_s_per_batch=stats.median_s,
            batch=run.batch,
            size=run.size,
            timing=stats,
            peak_memory_bytes=run.peak_memory_bytes,
            backend_calls={name: n / rounds for name, n in sorted(counts[run.backend].items())},
        )
    return results


def calls_text(counts: dict[str, float] | None) -> str:
    """'cpu 31', 'reference 20, cpu 11' (most first), or 'none (plain PyTorch)' when no fused call ran."""
    if not counts:
        return "none (plain PyTorch)"
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} {n:g}" if n == int(n) else f"{name} {n:.1f}" for name, n in ordered)
