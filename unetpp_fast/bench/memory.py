"""Measuring memory on any machine: bytes saved for backward, and bytes materialised by resample/cat.

saved_for_backward(fn, exclude=()) -> SavedBytes
    Runs `fn()` (a forward pass) under `torch.autograd.graph.saved_tensors_hooks` and counts the
    tensors autograd keeps for backward. `unique_bytes` counts each storage once, keyed by
    `untyped_storage().data_ptr()` (a piece saved by several nodes is one allocation);
    `naive_bytes` sums every saved tensor's storage, as a per-node count would. Storages of the
    tensors in `exclude` (the parameters) are left out: they live regardless of training.
materialising_ops(fn, device) -> MaterialisedOps
    Runs `fn()` under `torch.profiler` (CPU activity, memory profiling) and reports, for the
    nested aten ops that materialise a concatenation or a resample (`aten::cat`,
    `aten::upsample_*`, `aten::max_pool2d*`), how many ran and the bytes they allocated. The
    profiler records ops nested inside a custom operator's implementation, which a
    TorchDispatchMode would not see.
unetpp_saved_figures(size, batch, spatial_dims=2, **model_kwargs) -> {'fused', 'plain'}
    The whole-model figure (training forward, deep supervision, filters 32..512) computed under
    FakeTensorMode: shapes and aliasing are exact, nothing is computed, so a 64^3 volume costs
    nothing. `python -m unetpp_fast.bench.memory --dims 3` prints the 3D table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MIB = 1024 * 1024
MATERIALISING_PREFIXES = ("aten::cat", "aten::upsample_", "aten::max_pool2d", "aten::max_pool3d")


@dataclass(frozen=True)
class SavedBytes:
    unique_bytes: int  # each saved storage once
    naive_bytes: int  # every saved tensor's storage, duplicates included
    unique_storages: int
    saved_tensors: int

    @property
    def unique_mib(self) -> float:
        return self.unique_bytes / MIB

    @property
    def naive_mib(self) -> float:
        return self.naive_bytes / MIB


def _has_data(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not isinstance(tensor, FakeTensor) and tensor.device.type != "meta"


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """The allocation a tensor lives in: its storage's data pointer (the storage object itself for
    fake and meta tensors, which have no data; the figures are then computed without any compute)."""
    storage = tensor.untyped_storage()
    if _has_data(tensor):
        return str(tensor.device), storage.data_ptr()
    return "storage", storage._cdata


def saved_for_backward(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> SavedBytes:
    """Bytes autograd saves for backward while `fn()` runs (see the module docstring).

    The outputs of `fn()` are held until counting ends, so no saved storage is freed and its
    address reused by another one during the count.
    """
    excluded = {_storage_key(t) for t in exclude}
    unique: dict[tuple[str, int], int] = {}
    naive = 0
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal naive, count
        key = _storage_key(tensor)
        if key not in excluded and (key[1] != 0 or not _has_data(tensor)):
            nbytes = tensor.untyped_storage().nbytes()
            unique[key] = nbytes
            naive += nbytes
            count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = fn()
    result = SavedBytes(
        unique_bytes=sum(unique.values()), naive_bytes=naive, unique_storages=len(unique), saved_tensors=count
    )
    del outputs
    return result


def model_saved_for_backward(model: torch.nn.Module, x: torch.Tensor, conv_mode: str = "fused") -> SavedBytes:
    """`saved_for_backward` of a training-mode forward of `model` on `x`, parameters excluded.

    conv_mode: 'fused' (the model as it is: every convolution through the fused operator, on the
    backend selected as usual) or 'plain' (each fused convolution replaced by cat / interpolate /
    conv2d — conv3d for a 5-D `x` — the materialising baseline).
    """
    from unetpp_fast.bench.timing import plain_pytorch_convs

    if conv_mode not in ("fused", "plain"):
        raise ValueError(f"conv_mode must be 'fused' or 'plain', got {conv_mode!r}")
    model.train()
    params = list(model.parameters()) + list(model.buffers())
    x = x.detach().requires_grad_(False)
    if conv_mode == "plain":
        with plain_pytorch_convs():
            return saved_for_backward(lambda: model(x), exclude=params)
    return saved_for_backward(lambda: model(x), exclude=params)


PAPER_FILTERS = (32, 64, 128, 256, 512)


def unetpp_saved_figures(
    size: int, batch: int, spatial_dims: int = 2, in_channels: int | None = None, **model_kwargs: Any
) -> dict[str, SavedBytes]:
    """Saved-for-backward figures of a training forward of UNet++ (filters 32..512, deep
    supervision) on a `size`^spatial_dims input: {'fused': ..., 'plain': ...}, under FakeTensorMode
    on the reference backend (nothing is computed; shapes and aliasing are exact).

    in_channels defaults to 3 in 2D and 1 in 3D (the paper's CT volumes); `model_kwargs` go to
    `UNetPlusPlus` (block, upsample, ...).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unetpp_fast.nn import UNetPlusPlus
    from unetpp_fast.ops import backends

    channels = in_channels if in_channels is not None else (1 if spatial_dims == 3 else 3)
    figures = {}
    with FakeTensorMode(), backends.use_backend("reference"):
        x = torch.randn(batch, channels, *[size] * spatial_dims)
        for mode in ("fused", "plain"):
            kwargs = {"filters": PAPER_FILTERS, "deep_supervision": True, **model_kwargs}
            net = UNetPlusPlus(channels, 1, spatial_dims=spatial_dims, **kwargs)
            figures[mode] = model_saved_for_backward(net, x, conv_mode=mode)
    return figures


@dataclass(frozen=True)
class MaterialisedOps:
    # outermost materialising ops only (aten::max_pool2d, not also the max_pool2d_with_indices inside it)
    counts: dict[str, int] = field(default_factory=dict)  # op name -> number of calls
    # op name -> bytes allocated, children included
    bytes_allocated: dict[str, int] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_allocated.values())


def is_materialising(op_name: str) -> bool:
    return op_name.startswith(MATERIALISING_PREFIXES)


def materialising_ops(fn: Callable[[], Any], device: torch.device | str = "cpu") -> MaterialisedOps:
    """Count the cat / upsample / max-pool aten ops that `fn()` runs and the bytes they allocate."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        outputs = fn()
    del outputs
    counts: dict[str, int] = {}
    allocated: dict[str, int] = {}
    for event in prof.events():
        if not is_materialising(event.name) or _inside_materialising(event):
            continue
        # inclusive figure: the output is allocated by a nested aten::empty, not by the op itself
        own = event.device_memory_usage if device.type == "cuda" else event.cpu_memory_usage
        counts[event.name] = counts.get(event.name, 0) + 1
        allocated[event.name] = allocated.get(event.name, 0) + max(int(own or 0), 0)
    return MaterialisedOps(counts=counts, bytes_allocated=allocated)


def _inside_materialising(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if is_materialising(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """Print the whole-model saved-for-backward table (plain vs fused), e.g. `--dims 3`."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=3)
    parser.add_argument("--size", type=int, default=None, help="default: 96 in 2D, 64 in 3D")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    size = args.size or (64 if args.dims == 3 else 96)
    configs = {"conv_bn_relu, bilinear_ac (default)": {}}
    if args.dims == 3:
        configs = {
            "conv_bn_relu, trilinear_ac (default)": {},
            "conv_relu, deconv (the paper's)": {"block": "conv_relu", "upsample": "deconv"},
        }
    print("| model | input | plain | fused | ratio |\n|---|---|---|---|---|")
    for label, kwargs in configs.items():
        fig = unetpp_saved_figures(size, args.batch, args.dims, **kwargs)
        plain, fused = fig["plain"], fig["fused"]
        ratio = fused.unique_bytes / plain.unique_bytes
        print(
            f"| UNet++ {label} | {'x'.join([str(size)] * args.dims)}, batch {args.batch} | "
            f"{plain.unique_mib:.1f} MiB | {fused.unique_mib:.1f} MiB | {ratio:.2f}x |"
        )


if __name__ == "__main__":
    main()
