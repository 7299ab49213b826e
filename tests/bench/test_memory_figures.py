"""Machine-independent memory figures of the whole UNet++: the training-memory claim on any machine.

* Bytes saved for backward (unique storages, parameters excluded), fused operator vs the plain
  materialising model, at 96^2 and 512^2. Computed under FakeTensorMode: shapes and aliasing are
  exact, nothing is computed, so 512^2 costs nothing.
* Bytes that cat / upsample / max-pool allocate during a forward: exactly the concatenated and
  resampled tensors for the plain model, none for the fused native backend.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from unetpp_fast import fused_conv
from unetpp_fast.bench import memory, roofline
from unetpp_fast.bench import timing as bench
from unetpp_fast.ops import backends, conv_spec

FILTERS = (32, 64, 128, 256, 512)
F32 = 4


def _model_cls():
    model = pytest.importorskip("unetpp_fast.nn.unetpp")
    return model.UNetPlusPlus


def _cat_bytes(cases: list[roofline.ConvCase], element_size: int) -> int:
    """The concatenated inputs of the multi-piece convs: what conv2d saves in the plain model."""
    return sum(
        element_size * c.batch * c.in_channels * c.out_hw[0] * c.out_hw[1] for c in cases if len(c.pieces) > 1
    )


def _resampled_bytes(cases: list[roofline.ConvCase], codes: tuple[int, ...], element_size: int) -> int:
    return sum(
        element_size * c.batch * p.channels * c.out_hw[0] * c.out_hw[1]
        for c in cases
        for p in c.pieces
        if p.resample in codes
    )


def _saved(size: int, batch: int) -> dict[str, memory.SavedBytes]:
    unetpp = _model_cls()
    figures = {}
    with FakeTensorMode(), backends.use_backend("reference"):
        x = torch.randn(batch, 3, size, size)
        for mode in ("fused", "plain"):
            net = unetpp(in_channels=3, num_classes=1, filters=FILTERS, deep_supervision=True)
            figures[mode] = memory.model_saved_for_backward(net, x, conv_mode=mode)
    return figures


@pytest.mark.parametrize(("size", "batch"), [(96, 2), (512, 1), (512, 2)])
def test_fused_model_saves_far_less_for_backward(size: int, batch: int) -> None:
    figures = _saved(size, batch)
    fused, plain = figures["fused"], figures["plain"]
    print(
        f"\n{size}px batch {batch}: saved for backward (unique) plain {plain.unique_mib:.1f} MiB -> fused "
        f"{fused.unique_mib:.1f} MiB ({fused.unique_bytes / plain.unique_bytes:.2f}x); naive sums "
        f"{plain.naive_mib:.1f} -> {fused.naive_mib:.1f} MiB"
    )
    # DESIGN section 6: 134.8 -> 76.0 MiB (0.56x) for a NestedUNet-shaped model at 96^2, batch 2
    assert fused.unique_bytes < 0.65 * plain.unique_bytes
    # what the plain model keeps and the fused one cannot: every concatenated input (saved by conv2d)
    # and every max-pooled piece (a new tensor, saved by the conv that reads it)
    cases = roofline.unetpp_conv_cases(size, batch, FILTERS)
    must_differ = _cat_bytes(cases, F32) + _resampled_bytes(cases, (conv_spec.MAXPOOL2,), F32)
    assert plain.unique_bytes - fused.unique_bytes >= must_differ
    # counting every saved tensor hides most of the saving: the unique count is the honest one
    assert plain.naive_bytes - fused.naive_bytes < plain.unique_bytes - fused.unique_bytes


def test_figures_scale_with_batch_and_area() -> None:
    """Activation memory is linear in batch x pixels: a sanity check on the counting itself."""
    small, large = _saved(96, 1)["fused"], _saved(192, 2)["fused"]
    assert large.unique_storages == small.unique_storages
    # 2x batch, 4x pixels; only per-channel statistics (BatchNorm) do not scale
    assert large.unique_bytes == pytest.approx(8 * small.unique_bytes, rel=1e-3)


def test_saved_bytes_count_each_storage_once() -> None:
    """Two convs reading the same piece: the naive sum counts it twice, the unique figure once."""
    x = torch.randn(1, 4, 8, 8)
    w1, w2 = torch.randn(3, 4, 3, 3, requires_grad=True), torch.randn(3, 4, 3, 3, requires_grad=True)

    def forward():
        with backends.use_backend("reference"):
            return fused_conv([x], w1, activation="none") + fused_conv([x], w2, activation="none")

    figures = memory.saved_for_backward(forward, exclude=[w1, w2])
    assert figures.unique_bytes == x.numel() * F32
    assert figures.naive_bytes == 2 * x.numel() * F32


def test_plain_model_materialises_exactly_the_cat_and_resampled_tensors() -> None:
    unetpp = _model_cls()
    size, batch = 64, 1
    torch.manual_seed(0)
    # fast mode on the last head: the whole network, without the heads' average (one more cat)
    depth = len(FILTERS) - 1
    net = unetpp(in_channels=3, num_classes=1, filters=FILTERS, mode="fast", prune=depth).eval()
    x = torch.randn(batch, 3, size, size)
    with bench.plain_pytorch_convs(), torch.no_grad():
        ops = memory.materialising_ops(lambda: net(x))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
    # the baseline really is plain PyTorch: the fused operator never ran
    assert not [e.name for e in prof.events() if e.name.startswith("unetpp_fast")]
    cases = roofline.unetpp_conv_cases(size, batch, FILTERS)
    assert ops.bytes_allocated.get("aten::cat") == _cat_bytes(cases, F32)
    upsampled = sum(v for k, v in ops.bytes_allocated.items() if k.startswith("aten::upsample_"))
    assert upsampled == _resampled_bytes(cases, conv_spec.UPSAMPLING_MODES, F32)
    pooled = sum(v for k, v in ops.bytes_allocated.items() if k.startswith("aten::max_pool2d"))
    assert pooled >= _resampled_bytes(cases, (conv_spec.MAXPOOL2,), F32)


def _native_cpu_reason() -> str:
    return backends.why_unusable("cpu", "cpu")


def test_native_cpu_node_forward_backward_materialises_nothing() -> None:
    reason = _native_cpu_reason()
    if reason:
        pytest.skip(f"native 'cpu' backend: {reason}")
    case = next(c for c in roofline.unetpp_conv_cases(16, 2, (4, 8, 8, 8, 8)) if c.name.startswith("X0,2"))
    pieces, codes, weight, bias = case.make_inputs(requires_grad=True)

    def node() -> torch.Tensor:
        out = fused_conv(pieces, weight, bias, codes, case.activation, backend="cpu")
        out.backward(torch.randn_like(out))
        return out

    node()  # warm-up outside the profile
    ops = memory.materialising_ops(node)
    assert ops.total_calls == 0, ops.counts
    assert ops.total_bytes == 0


def test_native_cpu_model_forward_backward_materialises_nothing() -> None:
    reason = _native_cpu_reason()
    if reason:
        pytest.skip(f"native 'cpu' backend: {reason}")
    unetpp = _model_cls()
    net = unetpp(in_channels=3, num_classes=1, filters=(4, 8, 8, 8, 8), deep_supervision=True).train()
    x = torch.randn(2, 3, 32, 32)

    def step() -> list[torch.Tensor]:
        heads = net(x)
        sum(h.mean() for h in heads).backward()
        return heads

    with backends.use_backend("cpu"):
        ops = memory.materialising_ops(step)
    assert ops.total_calls == 0, ops.counts
    assert ops.total_bytes == 0


def _cat_and_pool_bytes_3d(size: int, batch: int, filters: tuple[int, ...], deconv: bool) -> int:
    """What the plain 3D model keeps and the fused one cannot: every concatenated input of a decoder
    node and every max-pooled piece, counted from the network's definition. With deconv the
    transposed convolution's output is a real tensor that the fused conv saves as a piece, so only
    the cat's copy of the skips counts."""
    depth, total = len(filters) - 1, 0
    for i in range(1, depth + 1):  # encoder X[i,0] reads maxpool(X[i-1,0])
        total += batch * filters[i - 1] * (size // 2**i) ** 3
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):  # X[i,j] reads cat(X[i,0..j-1], up(X[i+1,j-1]))
            up = 0 if deconv else filters[i + 1]
            total += batch * (filters[i] * j + up) * (size // 2**i) ** 3
    return F32 * total


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"block": "conv_relu", "upsample": "deconv"}],
    ids=["conv_bn_relu-trilinear", "paper-deconv"],
)
def test_3d_unetpp_64_cubed_batch_2_fused_saves_at_most_0_6_of_plain(kwargs) -> None:
    figures = memory.unetpp_saved_figures(64, 2, spatial_dims=3, **kwargs)
    fused, plain = figures["fused"], figures["plain"]
    print(
        f"\n64^3 batch 2 {kwargs or 'default'}: plain {plain.unique_mib:.1f} MiB -> fused "
        f"{fused.unique_mib:.1f} MiB ({fused.unique_bytes / plain.unique_bytes:.3f}x)"
    )
    assert fused.unique_bytes <= 0.6 * plain.unique_bytes
    must_differ = _cat_and_pool_bytes_3d(64, 2, FILTERS, kwargs.get("upsample") == "deconv")
    assert plain.unique_bytes - fused.unique_bytes >= must_differ
    # the figure counts activations only: 8x the voxels is 8x the bytes (BatchNorm statistics aside)
    small = memory.unetpp_saved_figures(32, 2, spatial_dims=3, **kwargs)["fused"]
    assert small.unique_storages == fused.unique_storages
    assert fused.unique_bytes == pytest.approx(8 * small.unique_bytes, rel=2e-3)


def test_plain_3d_baseline_materialises_and_fused_3d_does_not_call_it() -> None:
    """The 3D plain baseline really is plain PyTorch (cat / upsample / max_pool3d, no fused op)."""
    unetpp = _model_cls()
    net = unetpp(1, 1, (2, 4, 6), deep_supervision=True, spatial_dims=3).train()
    x = torch.randn(1, 1, 8, 8, 8)
    with bench.plain_pytorch_convs():
        ops = memory.materialising_ops(lambda: net(x))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
    assert not [e.name for e in prof.events() if e.name.startswith("unetpp_fast")]
    assert ops.counts.get("aten::cat", 0) == 3  # X[0,1], X[1,1], X[0,2]
    assert any(k.startswith("aten::max_pool3d") for k in ops.counts)
    with backends.use_backend("reference"):
        fused = memory.saved_for_backward(lambda: net(x), exclude=list(net.parameters()))
    assert fused.unique_storages > 0
