"""UNet++ / U-Net in 3D (`spatial_dims=3`): compared in fp64 with a plain-PyTorch 3D UNet++ built
here (torch.cat + interpolate + max_pool3d + Conv3d), BN folding, freeze, deep supervision,
pruning (FLOPs and outputs), pad_to_multiple, state_dict keys, and the paper's 3D configuration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import unetpp_fast
from unetpp_fast.nn import UNet, UNetPlusPlus, wide_unet
from unetpp_fast.ops.testing import relative_error

SMALL = (2, 4, 6, 8, 10)
PAPER_FILTERS = (32, 64, 128, 256, 512)  # k = 32 * 2^i, the paper's lung-nodule network


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny volumes: one thread is faster and leaves the cores to others
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PlainBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.bn = bn
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm3d(cout), nn.BatchNorm3d(cout)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(self.bn1(x) if self.bn else x)
        x = self.conv2(x)
        return F.relu(self.bn2(x) if self.bn else x)


class PlainUNetPP3d(nn.Module):
    """A 3D UNet++ in plain PyTorch (materialised cat, interpolate, max_pool3d), written from the
    paper independently of the package; the keys follow pytorch-nested-unet's naming."""

    def __init__(self, cin, classes, filters, bn=True, upsample="deconv", deep_supervision=True):
        super().__init__()
        self.depth, self.upsample, self.ds = len(filters) - 1, upsample, deep_supervision
        f = filters
        for i in range(self.depth + 1):
            setattr(self, f"conv{i}_0", PlainBlock3d(cin if i == 0 else f[i - 1], f[i], bn))
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                up = f[i] if upsample == "deconv" else f[i + 1]
                setattr(self, f"conv{i}_{j}", PlainBlock3d(f[i] * j + up, f[i], bn))
                if upsample == "deconv":
                    setattr(self, f"up{i}_{j}", nn.ConvTranspose3d(f[i + 1], f[i], 2, stride=2))
        if deep_supervision:
            for j in range(1, self.depth + 1):
                setattr(self, f"final{j}", nn.Conv3d(f[0], classes, 1))
        else:
            self.final = nn.Conv3d(f[0], classes, 1)

    def up(self, x, i, j):
        if self.upsample == "deconv":
            return getattr(self, f"up{i}_{j}")(x)
        if self.upsample == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(
            x, scale_factor=2, mode="trilinear", align_corners=self.upsample == "trilinear_ac"
        )

    def forward(self, x):
        nodes = {(0, 0): self.conv0_0(x)}
        for i in range(1, self.depth + 1):
            nodes[i, 0] = getattr(self, f"conv{i}_0")(F.max_pool3d(nodes[i - 1, 0], 2))
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                cat = torch.cat([nodes[i, k] for k in range(j)] + [self.up(nodes[i + 1, j - 1], i, j)], 1)
                nodes[i, j] = getattr(self, f"conv{i}_{j}")(cat)
        if not self.ds:
            return self.final(nodes[0, self.depth])
        heads = [getattr(self, f"final{j}")(nodes[0, j]) for j in range(1, self.depth + 1)]
        return heads if self.training else torch.stack(heads).mean(0)


def _randomise_bn(model: nn.Module, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(
                    0.3 * torch.randn(m.num_features, generator=gen, dtype=m.running_mean.dtype)
                )
                m.running_var.copy_(
                    0.5 + torch.rand(m.num_features, generator=gen, dtype=m.running_var.dtype)
                )
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen, dtype=m.bias.dtype))


def _assert_grad_matches(name: str, got: torch.Tensor, want: torch.Tensor, block: str) -> None:
    # A conv bias right before a training-mode BatchNorm has a zero gradient (the batch mean takes it
    # out): both sides are round-off, so it is checked to be ~0, not by relative error.
    if block == "conv_bn_relu" and ".conv" in name and name.endswith(".bias"):
        assert got.abs().max() < 1e-10 and want.abs().max() < 1e-10, name
        return
    assert relative_error(got, want) < 1e-10, name


def _pair(block, upsample, deep_supervision=True, filters=SMALL[:4]):
    torch.manual_seed(0)
    fused = UNetPlusPlus(
        1, 2, filters, deep_supervision, block=block, upsample=upsample, spatial_dims=3
    ).double()
    plain = PlainUNetPP3d(1, 2, filters, block == "conv_bn_relu", upsample, deep_supervision).double()
    plain.load_state_dict(fused.state_dict())  # strict: the same keys and shapes
    _randomise_bn(fused)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize(
    "block, upsample",
    [
        ("conv_relu", "deconv"),
        ("conv_bn_relu", "deconv"),
        ("conv_bn_relu", "trilinear_ac"),
        ("conv_relu", "nearest"),
    ],
)
def test_unetpp_3d_matches_plain_pytorch_train_and_eval(block, upsample):
    fused, plain = _pair(block, upsample)
    x = torch.randn(2, 1, 8, 8, 16, dtype=torch.float64)
    # Eval: BatchNorm folded into the fused convolutions, heads averaged.
    fused.eval(), plain.eval()
    with torch.no_grad():
        assert relative_error(fused(x), plain(x)) < 1e-12
    # Training: deep-supervision heads, and the gradient of every parameter.
    fused.train(), plain.train()
    outs, want = fused(x), plain(x)
    assert len(outs) == len(want) == 3
    for o, w in zip(outs, want):
        assert o.shape == (2, 2, 8, 8, 16) and relative_error(o, w) < 1e-12
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(want, grads)
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        _assert_grad_matches(name, p.grad, plain_params[name].grad, block)


def test_upsample_names_in_3d_mean_trilinear():
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    torch.manual_seed(1)
    a = UNetPlusPlus(1, 1, SMALL[:3], upsample="bilinear_ac", spatial_dims=3).double().eval()
    b = UNetPlusPlus(1, 1, SMALL[:3], upsample="trilinear_ac", spatial_dims=3).double().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_freeze_folds_once_in_3d():
    fused, _ = _pair("conv_bn_relu", "deconv")
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    fused.eval()
    with torch.no_grad():
        want = fused(x)
        fused.freeze()
        got = fused(x)
    assert fused.frozen and relative_error(got, want) < 1e-14
    with pytest.raises(RuntimeError, match="frozen"):
        fused.train()
    fused.unfreeze().train()


def test_state_dict_keys_match_2d_naming():
    for build in (
        lambda d: UNetPlusPlus(1, 1, SMALL, block="conv_relu", upsample="deconv", spatial_dims=d),
        lambda d: UNet(1, 1, SMALL, spatial_dims=d),
        lambda d: wide_unet(1, 1, spatial_dims=d),
    ):
        keys2, state3 = list(build(2).state_dict()), build(3).state_dict()
        assert keys2 == list(state3)
        assert all(t.dim() == 5 for k, t in state3.items() if k.endswith("conv1.weight"))


def test_paper_3d_parameter_count_equals_plain_pytorch_unetpp():
    """The paper's 3D network: k = 32 * 2^i filters, 3x3x3 kernels, one input channel, one class."""
    counts = {}
    for block in ("conv_relu", "conv_bn_relu"):
        for ds in (True, False):
            fused = UNetPlusPlus(1, 1, PAPER_FILTERS, ds, block=block, upsample="deconv", spatial_dims=3)
            plain = PlainUNetPP3d(1, 1, PAPER_FILTERS, block == "conv_bn_relu", "deconv", ds)
            n = sum(p.numel() for p in fused.parameters())
            assert n == sum(p.numel() for p in plain.parameters())
            plain.load_state_dict(fused.state_dict())  # strict: same keys and shapes
            counts[block, ds] = n
    # Stated in the README; the heads differ by (32 + 1) per extra deep-supervision head.
    assert counts["conv_relu", False] == 26_198_273
    assert counts["conv_relu", True] == counts["conv_relu", False] + 3 * 33
    assert counts["conv_bn_relu", False] == counts["conv_relu", False] + 2 * 2 * sum(
        f * (5 - i) for i, f in enumerate(PAPER_FILTERS)
    )


def test_unet_and_wide_unet_3d_match_their_2d_structure_and_run():
    torch.manual_seed(3)
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    unet = UNet(1, 2, SMALL[:4], block="conv_relu", upsample="deconv", spatial_dims=3).double().eval()
    with torch.no_grad():
        y = unet(x)
    assert y.shape == (1, 2, 8, 8, 8) and torch.isfinite(y).all()
    conv2d = sum(p.numel() for p in UNet(1, 1, block="conv_relu", upsample="deconv").parameters())
    conv3d = sum(
        p.numel() for p in UNet(1, 1, block="conv_relu", upsample="deconv", spatial_dims=3).parameters()
    )
    assert conv3d > 2.5 * conv2d  # 27 taps instead of 9 per convolution
    assert wide_unet(1, 1, spatial_dims=3).filters == (35, 70, 140, 280, 560)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def test_pruning_3d_flops_grow_with_level_and_outputs_equal_the_full_heads():
    torch.manual_seed(4)
    model = UNetPlusPlus(1, 1, SMALL, block="conv_bn_relu", upsample="deconv", spatial_dims=3).double()
    _randomise_bn(model)
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        nodes = model.compute_nodes(x, model.depth)  # the full model's nodes
    flops = []
    for level in range(1, 5):
        model.mode, model.prune = "fast", level
        small = model.pruned(level)
        assert small.spatial_dims == 3 and set(small.state_dict()) <= set(model.state_dict())
        assert (len(small.state_dict()) < len(model.state_dict())) == (level < 4)
        with torch.no_grad():
            out, out_small = model(x), small(x)
            head = model.head(getattr(model, f"final{level}"), nodes[0, level])
        assert relative_error(out, head) < 1e-12  # level L's output is the full model's head L
        assert relative_error(out_small, out) < 1e-12
        flops.append(forward_flops(model, x))
        assert forward_flops(small, x) == flops[-1]
    assert flops == sorted(flops) and len(set(flops)) == 4, flops


def test_pad_to_multiple_3d_pads_and_crops_back():
    torch.manual_seed(6)
    model = (
        UNetPlusPlus(1, 1, SMALL[:3], block="conv_relu", spatial_dims=3, pad_to_multiple=True).double().eval()
    )
    x = torch.randn(1, 1, 5, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        full = model(F.pad(x, (0, 1, 1, 1, 1, 2)))  # 8x8x8: pads split low // 2 / rest high
    assert y.shape == (1, 1, 5, 6, 7)
    assert torch.equal(y, full[:, :, 1:6, 1:7, 0:7])


def test_3d_model_bad_inputs():
    model = UNetPlusPlus(1, 1, SMALL[:3], spatial_dims=3)
    with pytest.raises(ValueError, match=r"input must be a 5-D tensor \[N, C, D, H, W\]"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"depth, height and width must be multiples of 4.*got 8x8x6"):
        model(torch.randn(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="spatial_dims must be 2 .* or 3"):
        UNetPlusPlus(1, 1, SMALL[:3], spatial_dims=1)
    with pytest.raises(ValueError, match="upsample must be one of"):
        UNetPlusPlus(1, 1, SMALL[:3], upsample="trilinear")  # a 3D name on a 2D model
    with pytest.raises(ValueError, match="input must be a 4-D tensor"):
        UNetPlusPlus(1, 1, SMALL[:3])(torch.randn(1, 1, 4, 8, 8))


@pytest.mark.parametrize("block, upsample", [("conv_bn_relu", "trilinear_ac"), ("conv_relu", "deconv")])
def test_3d_model_on_the_cpu_backend_matches_the_reference_train_and_eval(block, upsample):
    from unetpp_fast.ops import backends

    reason = backends.why_unusable("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    fused, _ = _pair(block, upsample)
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    results = {}
    start = {k: v.clone() for k, v in fused.state_dict().items()}
    for name in ("reference", "cpu"):
        fused.load_state_dict(start)  # the training forward updates the BatchNorm running statistics
        fused.zero_grad()
        with unetpp_fast.use_backend(name):
            fused.train()
            heads = fused(x)
            sum(
                (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum() for h in heads
            ).backward()
            fused.eval()
            with torch.no_grad():
                out = fused(x)
        results[name] = [*heads, out, *(p.grad.clone() for p in fused.parameters())]
    names = ["heads"] * (len(results["cpu"]) - len(list(fused.parameters()))) + [
        n for n, _ in fused.named_parameters()
    ]
    for name, got, want in zip(names, results["cpu"], results["reference"]):
        _assert_grad_matches(name, got, want, block)


def test_3d_model_refuses_a_forced_2d_only_backend():
    # Every backend takes 3D now: register 'reference' again declaring 2D only, then restore.
    from unetpp_fast.ops import backends

    saved = backends.registered("reference")
    model = UNetPlusPlus(1, 1, SMALL[:3], spatial_dims=3).eval()
    try:
        backends.register_backend("reference", saved[0], saved[1], backends.Capabilities(spatial_dims=(2,)))
        refused = pytest.raises(ValueError, match="takes 2D")
        with torch.no_grad(), unetpp_fast.use_backend("reference"), refused:
            model(torch.randn(1, 1, 4, 4, 4))
    finally:
        backends.register_backend("reference", *saved)
    with torch.no_grad(), unetpp_fast.use_backend("reference"):
        assert model(torch.randn(1, 1, 4, 4, 4)).shape == (1, 1, 4, 4, 4)


def test_3d_model_compiles_without_graph_breaks():
    model = UNetPlusPlus(1, 1, SMALL[:3], block="conv_bn_relu", upsample="deconv", spatial_dims=3)
    x = torch.randn(1, 1, 8, 8, 8)
    for train in (True, False):
        model.train(train)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
