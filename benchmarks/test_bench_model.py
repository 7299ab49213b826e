"""Model suite: inference images/s per pruning level (the paper's Fig. 3), U-Net and wide U-Net,
a training step (forward + backward + Adam) with its peak memory, and bytes saved for backward.

Backends (see `unetpp_fast.bench`): 'fused' (the fused operator, backend picked automatically),
'eager' (the same model with plain PyTorch convolutions), 'compile' (eager under torch.compile),
'fused_graph' ('fused' replayed through a CUDA graph, inference on CUDA only), or a fused backend
name. Ratios to eager are measured in the same run; benchmarks/report.py adds
the ratio to torch.compile. Each row says which backend ran how many fused convolutions per call
(`ran`, from `backends.count_calls`). The `_3d` tests time the 3D networks (one-channel volumes,
3x3x3 convolutions; conftest's BENCH_3D_* settings: 64^3 bf16 on a GPU), labelled "3D ...".
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unetpp_fast.bench import memory
from unetpp_fast.bench import timing as bench
from unetpp_fast.nn.cuda_graph import capture_inference
from unetpp_fast.ops import backends

MODELS = {
    "L1": ("unetpp", 1),
    "L2": ("unetpp", 2),
    "L3": ("unetpp", 3),
    "L4": ("unetpp", 4),
    "unetpp": ("unetpp", None),  # accurate mode: every head, averaged
    "unet": ("unet", None),
    "wide_unet": ("wide_unet", None),
}
LABELS = {"unet": "U-Net", "wide_unet": "wide U-Net", "unetpp": "UNet++ (all heads)"}


def _label(name: str, dims: int = 2) -> str:
    return ("3D " if dims == 3 else "") + LABELS.get(name, f"UNet++ {name}")


def _input(batch: int, channels: int, size: int, dims: int, cfg: Any, dtype: torch.dtype, cl: bool) -> Any:
    x = torch.randn(batch, channels, *(size,) * dims, generator=torch.Generator().manual_seed(0))
    x = x.to(device=cfg.device, dtype=dtype)
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    return x.contiguous(memory_format=layout) if cl else x


def _factory(cfg: Any, name: str, dtype: torch.dtype, channels_last: bool, dims: int = 2) -> Any:
    if name not in MODELS:
        raise ValueError(f"BENCH_MODELS entries must be among {tuple(MODELS)}, got {name!r}")
    arch, prune = MODELS[name]
    kw: dict[str, Any] = {
        "prune": prune,
        "device": cfg.device,
        "dtype": dtype,
        "channels_last": channels_last,
    }
    if dims == 3:
        kw.update(spatial_dims=3, in_channels=1)
    if cfg.filters is not None and arch != "wide_unet":
        kw["filters"] = cfg.filters
    return lambda: bench.build_model(arch, **kw)


def _skip_unusable(backend: str, cfg: Any, dtype_name: str, dims: int = 2) -> None:
    reason = bench.backend_unusable(backend, cfg.device, dims)
    if reason:
        pytest.skip(f"backend {backend}: {reason}")
    if cfg.device.type == "cpu" and dtype_name in ("fp16", "bf16") and not cfg.smoke:
        pytest.skip("low-precision models are timed on GPUs only")


def _eager_reference(cfg: Any, key: tuple, measure_eager: Any) -> float:
    if key not in cfg.eager_cache:
        cfg.eager_cache[key] = measure_eager()
    return cfg.eager_cache[key]


def test_inference(
    model_name: str,
    model_size: int,
    model_backend: str,
    dtype_name: str,
    layout: str,
    bench_cfg: Any,
    measure: Any,
) -> None:
    _inference(model_name, model_size, model_backend, dtype_name, layout, bench_cfg, measure, dims=2)


def test_inference_3d(
    model_name_3d: str,
    size_3d: int,
    model_backend: str,
    dtype_name_3d: str,
    layout: str,
    bench_cfg: Any,
    measure: Any,
) -> None:
    _inference(model_name_3d, size_3d, model_backend, dtype_name_3d, layout, bench_cfg, measure, dims=3)


def _inference(
    model_name: str,
    model_size: int,
    model_backend: str,
    dtype_name: str,
    layout: str,
    cfg: Any,
    measure: Any,
    dims: int,
) -> None:
    _skip_unusable(model_backend, cfg, dtype_name, dims)
    dtype = bench.dtype_from_name(dtype_name)
    batch = (cfg.model_batch_3d if dims == 3 else cfg.model_batch).get(model_size, 1)
    channels, channels_last = (1 if dims == 3 else 3), layout == "cl"
    factory = _factory(cfg, model_name, dtype, channels_last, dims)
    net = factory()
    x = _input(batch, channels, model_size, dims, cfg, dtype, channels_last)
    if model_backend == bench.COMPILE:
        torch._dynamo.reset()

    with bench.run_with(model_backend):
        if model_backend == bench.COMPILE:
            forward = torch.compile(net, mode=cfg.compile_mode)
        elif model_backend == bench.FUSED_GRAPH:
            forward = capture_inference(net, x, warmup=max(cfg.warmup, 1))
        else:
            forward = net

        def step() -> Any:
            with torch.no_grad():
                return forward(x)

        label = _label(model_name, dims)
        group = f"model {model_size}px b{batch} {label} {dtype_name} {layout}"
        row = {
            "suite": "model",
            "dims": dims,
            "model": label,
            "model_key": model_name,
            "size": model_size,
            "batch": batch,
            "backend": model_backend,
            "dtype": dtype_name,
            "layout": layout,
            "params": sum(p.numel() for p in net.parameters()),
        }
        if model_backend == bench.COMPILE:
            row["compile_mode"] = cfg.compile_mode
        row = measure.run(step, group, row)
        with backends.count_calls() as ran:
            step()
        row.update(ran=bench.calls_text(dict(ran)), ran_calls=dict(ran))

    median_s = row["median_ms"] / 1e3
    key = ("model", dims, model_name, model_size, dtype_name, layout)
    if model_backend == bench.EAGER:
        cfg.eager_cache[key] = median_s
    eager_s = _eager_reference(
        cfg,
        key,
        lambda: (
            bench.model_timing(
                factory,
                batch,
                model_size,
                cfg.device,
                dtype,
                channels_last,
                bench.EAGER,
                cfg.warmup,
                cfg.rounds,
                in_channels=channels,
                spatial_dims=dims,
            ).median_s_per_batch
        ),
    )
    row.update(
        images_per_s=batch / median_s,
        s_per_10k=bench.IMAGES_FOR_FIG3 * median_s / batch,
        ratio_vs_eager=eager_s / median_s,
    )
    measure.record(row)
    assert row["images_per_s"] > 0


def test_training_step(
    model_size: int,
    train_backend: str,
    dtype_name: str,
    layout: str,
    bench_cfg: Any,
    measure: Any,
) -> None:
    """Forward + backward + Adam on UNet++ with deep supervision; bf16/fp16 under autocast."""
    _training_step(model_size, train_backend, dtype_name, layout, bench_cfg, measure, dims=2)


def test_training_step_3d(
    size_3d: int,
    train_backend: str,
    dtype_name_3d: str,
    layout: str,
    bench_cfg: Any,
    measure: Any,
) -> None:
    """The training step of the 3D UNet++ on one-channel volumes."""
    _training_step(size_3d, train_backend, dtype_name_3d, layout, bench_cfg, measure, dims=3)


def _training_step(
    model_size: int, train_backend: str, dtype_name: str, layout: str, cfg: Any, measure: Any, dims: int
) -> None:
    model_name = "unetpp"
    _skip_unusable(train_backend, cfg, dtype_name, dims)
    if train_backend == bench.FUSED_GRAPH:
        pytest.skip("CUDA-graph replay is an inference benchmark")
    batch = (cfg.model_batch_3d if dims == 3 else cfg.model_batch).get(model_size, 1)
    channels_last = layout == "cl"
    kw: dict[str, Any] = {"device": cfg.device, "dtype": torch.float32, "channels_last": channels_last}
    channels = 3
    if dims == 3:
        kw.update(spatial_dims=3, in_channels=1)
        channels = 1
    if cfg.filters is not None:
        kw["filters"] = cfg.filters
    if train_backend == bench.COMPILE:
        torch._dynamo.reset()
    net = bench.build_model("unetpp", **kw)
    rounds = max(1, cfg.rounds // 2)
    with bench.run_with(train_backend):
        step = bench.make_training_step(
            net,
            batch,
            model_size,
            dtype_name,
            channels_last,
            train_backend,
            in_channels=channels,
            compile_mode=cfg.compile_mode,
            spatial_dims=dims,
        )
        with backends.count_calls() as ran:
            step()  # first step: Adam state, compilation, autotuning
        if cfg.device.type == "cuda":
            bench.synchronize(cfg.device)
            torch.cuda.reset_peak_memory_stats(cfg.device)
        label = _label(model_name, dims)
        row = {
            "suite": "train",
            "dims": dims,
            "model": label,
            "size": model_size,
            "batch": batch,
            "backend": train_backend,
            "ran": bench.calls_text(dict(ran)),
            "ran_calls": dict(ran),
            "dtype": dtype_name,
            "layout": layout,
            "pass": "train",
        }
        group = f"train {model_size}px b{batch} {label} {dtype_name} {layout}"
        row = measure.run(step, group, row, rounds=rounds)
    if cfg.device.type == "cuda":
        row["peak_memory_mib"] = torch.cuda.max_memory_allocated(cfg.device) / memory.MIB
    median_s = row["median_ms"] / 1e3
    row["images_per_s"] = batch / median_s
    key = ("train", dims, model_name, model_size, dtype_name, layout)
    if train_backend == bench.EAGER:
        cfg.eager_cache[key] = median_s
    if key in cfg.eager_cache:
        row["ratio_vs_eager"] = cfg.eager_cache[key] / median_s
    measure.record(row)
    assert row["images_per_s"] > 0


def test_saved_for_backward(model_size: int, bench_cfg: Any) -> None:
    """Bytes autograd keeps for backward (unique storages), fused vs plain, whole UNet++ model."""
    cfg = bench_cfg
    batch = cfg.model_batch.get(model_size, 1)
    kw: dict[str, Any] = {"device": cfg.device}
    if cfg.filters is not None:
        kw["filters"] = cfg.filters
    x = torch.randn(batch, 3, model_size, model_size, generator=torch.Generator().manual_seed(0)).to(
        cfg.device
    )
    figures = {}
    for mode in ("fused", "plain"):
        net = bench.build_model("unetpp", **kw)
        with bench.run_with("reference"):  # the fused operator saves its pieces whatever the backend
            figures[mode] = memory.model_saved_for_backward(net, x, conv_mode=mode)
    row = {
        "suite": "memory",
        "model": "UNet++ (deep supervision)",
        "size": model_size,
        "batch": batch,
        "device": str(cfg.device),
        "saved_fused_mib": figures["fused"].unique_mib,
        "saved_plain_mib": figures["plain"].unique_mib,
        "saved_ratio": figures["fused"].unique_bytes / figures["plain"].unique_bytes,
        "naive_fused_mib": figures["fused"].naive_mib,
        "naive_plain_mib": figures["plain"].naive_mib,
    }
    cfg.record(row)
    assert figures["fused"].unique_bytes < figures["plain"].unique_bytes


def test_saved_for_backward_3d(size_3d: int, bench_cfg: Any) -> None:
    """Bytes autograd keeps for backward in the 3D UNet++ (paper filters 32..512, one-channel volume),
    fused vs plain: shapes only (FakeTensorMode), so the figure does not depend on the machine."""
    cfg = bench_cfg
    batch = cfg.model_batch_3d.get(size_3d, 1)
    figures = memory.unetpp_saved_figures(size_3d, batch, spatial_dims=3)
    row = {
        "suite": "memory",
        "dims": 3,
        "model": "3D UNet++ (deep supervision)",
        "size": size_3d,
        "batch": batch,
        "device": "shapes only",
        "saved_fused_mib": figures["fused"].unique_mib,
        "saved_plain_mib": figures["plain"].unique_mib,
        "saved_ratio": figures["fused"].unique_bytes / figures["plain"].unique_bytes,
        "naive_fused_mib": figures["fused"].naive_mib,
        "naive_plain_mib": figures["plain"].naive_mib,
    }
    cfg.record(row)
    assert figures["fused"].unique_bytes < figures["plain"].unique_bytes
