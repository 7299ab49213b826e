"""unetpp_fast.accelerate: structure detection, parameter sharing, equal outputs, clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unetpp_fast
from unetpp_fast.compat import BasicUNetPlusPlus, NestedUNet, UnetPlusPlus
from unetpp_fast.ops.testing import relative_error

TOL = 1e-5
NB = (4, 8, 8, 16, 16)


class _Block(nn.Module):
    def __init__(self, c_in, c_mid, c_out):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid)
        self.conv2, self.bn2 = nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class SomeoneElsesUNetPP(nn.Module):
    """pytorch-nested-unet's NestedUNet structure under another class name, with a loop forward."""

    def __init__(self, num_classes, input_channels, deep_supervision, nb=NB, up_mode="bilinear"):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        kwargs = {"align_corners": True} if up_mode == "bilinear" else {}
        self.up = nn.Upsample(scale_factor=2, mode=up_mode, **kwargs)
        for j in range(5):
            for i in range(5 - j):
                c_in = (input_channels if i == 0 else nb[i - 1]) if j == 0 else nb[i] * j + nb[i + 1]
                self.add_module(f"conv{i}_{j}", _Block(c_in, nb[i], nb[i]))
        heads = [f"final{j}" for j in range(1, 5)] if deep_supervision else ["final"]
        for head in heads:
            self.add_module(head, nn.Conv2d(nb[0], num_classes, 1))

    def forward(self, x):
        nodes = {(0, 0): self.conv0_0(x)}
        for k in range(1, 5):
            nodes[k, 0] = getattr(self, f"conv{k}_0")(self.pool(nodes[k - 1, 0]))
            for j in range(1, k + 1):
                i = k - j
                cat = torch.cat([nodes[i, m] for m in range(j)] + [self.up(nodes[i + 1, j - 1])], 1)
                nodes[i, j] = getattr(self, f"conv{i}_{j}")(cat)
        if self.deep_supervision:
            return [getattr(self, f"final{j}")(nodes[0, j]) for j in range(1, 5)]
        return self.final(nodes[0, 4])


def _outputs(out):
    if isinstance(out, tuple):
        return list(out)
    return out if isinstance(out, list) else [out]


def _check_equal(original, accelerated, x):
    for train in (True, False):
        original.train(train)
        accelerated.train(train)
        torch.manual_seed(3)
        want = _outputs(original(x))
        torch.manual_seed(3)
        got = _outputs(accelerated(x))
        assert len(got) == len(want)
        assert max(relative_error(g, w) for g, w in zip(got, want)) <= TOL


def _assert_shares(original, accelerated):
    assert list(accelerated.state_dict()) == list(original.state_dict())
    assert {id(p) for p in accelerated.parameters()} == {id(p) for p in original.parameters()}


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_nested_unet_structure_under_any_class_name(deep_supervision):
    torch.manual_seed(0)
    original = SomeoneElsesUNetPP(2, 3, deep_supervision)
    fast = unetpp_fast.accelerate(original)
    assert isinstance(fast, NestedUNet)
    _assert_shares(original, fast)
    _check_equal(original, fast, torch.randn(2, 3, 32, 32))


def test_training_the_accelerated_model_trains_the_original():
    torch.manual_seed(0)
    original = SomeoneElsesUNetPP(1, 1, deep_supervision=False)
    fast = unetpp_fast.accelerate(original)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    x = torch.randn(2, 1, 32, 32)
    fast.train()
    fast(x).square().mean().backward()
    optimizer.step()
    _check_equal(original, fast, x)  # eval uses folded BN: the cache must see the update


def test_monai_model_is_recognised():
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    original = monai_nets.BasicUNetPlusPlus(
        spatial_dims=2, features=(8, 8, 16, 16, 32, 8), deep_supervision=True
    )
    fast = unetpp_fast.accelerate(original)
    assert isinstance(fast, BasicUNetPlusPlus)
    _assert_shares(original, fast)
    _check_equal(original, fast, torch.randn(1, 1, 32, 32))


def test_smp_model_is_recognised():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    original = smp.UnetPlusPlus("resnet18", encoder_weights=None, decoder_channels=(64, 32, 16, 16, 8))
    fast = unetpp_fast.accelerate(original)
    assert isinstance(fast, UnetPlusPlus)
    _assert_shares(original, fast)
    _check_equal(original, fast, torch.randn(1, 3, 64, 64))


def test_compat_models_are_returned_as_they_are():
    model = NestedUNet(1, input_channels=1)
    assert unetpp_fast.accelerate(model) is model


def test_unrecognised_models_get_a_clear_error():
    with pytest.raises(TypeError) as info:
        unetpp_fast.accelerate(nn.Sequential(nn.Conv2d(1, 1, 3)))
    message = str(info.value)
    assert "Sequential" in message
    assert "NestedUNet: no submodules conv0_0" in message
    assert "BasicUNetPlusPlus: submodules conv_0_0" in message
    assert "UnetPlusPlus: no submodule encoder" in message

    nearest = SomeoneElsesUNetPP(1, 1, False, up_mode="nearest")  # right names, other upsampling
    with pytest.raises(TypeError, match="align_corners=True"):
        unetpp_fast.accelerate(nearest)

    wrapped = nn.DataParallel(SomeoneElsesUNetPP(1, 1, False))
    with pytest.raises(TypeError, match="pass model.module"):
        unetpp_fast.accelerate(wrapped)
    assert isinstance(unetpp_fast.accelerate(wrapped.module), NestedUNet)

    with pytest.raises(TypeError, match="nn.Module"):
        unetpp_fast.accelerate("NestedUNet")


# --- issue 13, item 7: every child accounted for; the mode follows the original -----------------


class _LeakyBlock(_Block):
    """A VGG block whose activation is a LeakyReLU under another attribute name."""

    def __init__(self, c_in, c_mid, c_out):
        super().__init__(c_in, c_mid, c_out)
        del self.relu
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


def test_renamed_activation_is_refused_naming_it():
    torch.manual_seed(0)
    model = SomeoneElsesUNetPP(1, 1, False)
    model.conv2_1 = _LeakyBlock(model.conv2_1.conv1.in_channels, NB[2], NB[2])
    with pytest.raises(TypeError, match=r"conv2_1\.act \(LeakyReLU\)"):
        unetpp_fast.accelerate(model)


def test_extra_dropout_children_are_refused_naming_them():
    model = SomeoneElsesUNetPP(1, 1, False)
    model.dropout = nn.Dropout2d(0.3)
    with pytest.raises(TypeError, match=r"unaccounted child module\(s\) dropout \(Dropout2d\)"):
        unetpp_fast.accelerate(model)
    model = SomeoneElsesUNetPP(1, 1, False)
    model.conv0_0.drop = nn.Dropout2d(0.3)
    with pytest.raises(TypeError, match=r"conv0_0\.drop \(Dropout2d\)"):
        unetpp_fast.accelerate(model)


def test_monai_extra_child_is_refused():
    torch.manual_seed(0)
    model = BasicUNetPlusPlus(spatial_dims=2, features=(2, 2, 4, 4, 8, 2))
    model.upcat_1_1.convs.conv_0.extra = nn.Dropout(0.5)
    with pytest.raises(TypeError, match=r"upcat_1_1\.convs\.conv_0\.extra \(Dropout\)"):
        BasicUNetPlusPlus.from_monai(model)


def test_accelerated_model_follows_the_originals_mode():
    torch.manual_seed(0)
    original = SomeoneElsesUNetPP(1, 1, False)
    fast = unetpp_fast.accelerate(original)
    x = torch.randn(2, 1, 32, 32)
    original.eval()
    stats = original.conv1_0.bn1.running_mean.clone()
    with torch.no_grad():
        got = fast(x)
        want = original(x)
    assert not fast.training
    assert torch.equal(original.conv1_0.bn1.running_mean, stats)  # eval: statistics untouched
    assert relative_error(got, want) <= TOL
    fast.train()
    assert original.training and original.conv1_0.bn1.training
    fast.eval()
    assert not original.training and not original.conv1_0.bn1.training


def test_monai_accelerated_model_follows_the_originals_mode():
    torch.manual_seed(0)
    original = BasicUNetPlusPlus(spatial_dims=2, features=(2, 2, 4, 4, 8, 2), norm="batch")
    fast = BasicUNetPlusPlus.from_monai(original)
    original.eval()
    with torch.no_grad():
        fast(torch.randn(1, 1, 16, 16))
    assert not fast.training


def test_own_networks_are_returned_as_they_are():
    model = unetpp_fast.UNetPlusPlus(3, 1, (2, 4, 8))
    assert unetpp_fast.accelerate(model) is model
    unet = unetpp_fast.UNet(3, 1, (2, 4, 8))
    assert unetpp_fast.accelerate(unet) is unet
