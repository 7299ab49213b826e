"""unetpp_fast.compat.NestedUNet against pytorch-nested-unet's NestedUNet, rebuilt from its structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unetpp_fast.compat import NestedUNet
from unetpp_fast.ops.testing import relative_error

TOL = 1e-5


class VGGBlock(nn.Module):
    """pytorch-nested-unet's block: conv-BN-ReLU twice."""

    def __init__(self, in_channels, middle_channels, out_channels):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class OriginalNestedUNet(nn.Module):
    """pytorch-nested-unet's NestedUNet (archs.py), with its names, order and forward."""

    def __init__(
        self, num_classes, input_channels=3, deep_supervision=False, nb_filter=(32, 64, 128, 256, 512)
    ):
        super().__init__()
        nb = nb_filter
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv0_0 = VGGBlock(input_channels, nb[0], nb[0])
        self.conv1_0 = VGGBlock(nb[0], nb[1], nb[1])
        self.conv2_0 = VGGBlock(nb[1], nb[2], nb[2])
        self.conv3_0 = VGGBlock(nb[2], nb[3], nb[3])
        self.conv4_0 = VGGBlock(nb[3], nb[4], nb[4])
        self.conv0_1 = VGGBlock(nb[0] + nb[1], nb[0], nb[0])
        self.conv1_1 = VGGBlock(nb[1] + nb[2], nb[1], nb[1])
        self.conv2_1 = VGGBlock(nb[2] + nb[3], nb[2], nb[2])
        self.conv3_1 = VGGBlock(nb[3] + nb[4], nb[3], nb[3])
        self.conv0_2 = VGGBlock(nb[0] * 2 + nb[1], nb[0], nb[0])
        self.conv1_2 = VGGBlock(nb[1] * 2 + nb[2], nb[1], nb[1])
        self.conv2_2 = VGGBlock(nb[2] * 2 + nb[3], nb[2], nb[2])
        self.conv0_3 = VGGBlock(nb[0] * 3 + nb[1], nb[0], nb[0])
        self.conv1_3 = VGGBlock(nb[1] * 3 + nb[2], nb[1], nb[1])
        self.conv0_4 = VGGBlock(nb[0] * 4 + nb[1], nb[0], nb[0])
        if deep_supervision:
            self.final1 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
            self.final2 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
            self.final3 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
            self.final4 = nn.Conv2d(nb[0], num_classes, kernel_size=1)
        else:
            self.final = nn.Conv2d(nb[0], num_classes, kernel_size=1)

    def forward(self, input):
        x0_0 = self.conv0_0(input)
        x1_0 = self.conv1_0(self.pool(x0_0))
        x0_1 = self.conv0_1(torch.cat([x0_0, self.up(x1_0)], 1))
        x2_0 = self.conv2_0(self.pool(x1_0))
        x1_1 = self.conv1_1(torch.cat([x1_0, self.up(x2_0)], 1))
        x0_2 = self.conv0_2(torch.cat([x0_0, x0_1, self.up(x1_1)], 1))
        x3_0 = self.conv3_0(self.pool(x2_0))
        x2_1 = self.conv2_1(torch.cat([x2_0, self.up(x3_0)], 1))
        x1_2 = self.conv1_2(torch.cat([x1_0, x1_1, self.up(x2_1)], 1))
        x0_3 = self.conv0_3(torch.cat([x0_0, x0_1, x0_2, self.up(x1_2)], 1))
        x4_0 = self.conv4_0(self.pool(x3_0))
        x3_1 = self.conv3_1(torch.cat([x3_0, self.up(x4_0)], 1))
        x2_2 = self.conv2_2(torch.cat([x2_0, x2_1, self.up(x3_1)], 1))
        x1_3 = self.conv1_3(torch.cat([x1_0, x1_1, x1_2, self.up(x2_2)], 1))
        x0_4 = self.conv0_4(torch.cat([x0_0, x0_1, x0_2, x0_3, self.up(x1_3)], 1))
        if self.deep_supervision:
            return [self.final1(x0_1), self.final2(x0_2), self.final3(x0_3), self.final4(x0_4)]
        return self.final(x0_4)


def _as_list(out):
    return out if isinstance(out, list) else [out]


def _compare(theirs, ours, x, train: bool) -> float:
    theirs.train(train)
    ours.train(train)
    want, got = theirs(x), ours(x)
    assert type(got) is type(want)
    want, got = _as_list(want), _as_list(got)
    assert len(got) == len(want)
    errors = [relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= TOL, errors
    return max(errors)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_same_keys_same_init_same_outputs_train_and_eval(deep_supervision):
    torch.manual_seed(0)
    theirs = OriginalNestedUNet(num_classes=2, input_channels=3, deep_supervision=deep_supervision)
    torch.manual_seed(0)
    ours = NestedUNet(2, input_channels=3, deep_supervision=deep_supervision)
    keys = list(theirs.state_dict())
    assert list(ours.state_dict()) == keys
    assert len(keys) == (218 if deep_supervision else 212)
    for key, a in ours.state_dict().items():
        assert torch.equal(a, theirs.state_dict()[key]), f"{key}: initial values differ under the same seed"
    with torch.no_grad():  # move away from the initial BN statistics so that folding is exercised
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True, False):  # eval, train (updates running stats), eval with the new stats
        _compare(theirs, ours, x, train)
    for a, b in zip(theirs.buffers(), ours.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_parameter_count_matches_the_published_model():
    assert sum(p.numel() for p in NestedUNet(1).parameters()) == 9_163_329
    assert sum(p.numel() for p in NestedUNet(1, deep_supervision=True).parameters()) == 9_163_428


@pytest.mark.parametrize("train", [True, False])
def test_gradients_match_in_float64(train):
    """Train: BN on batch statistics after the fused conv; eval: BN folded, gradients through the fold."""
    torch.manual_seed(0)
    theirs = OriginalNestedUNet(1, 1, deep_supervision=True, nb_filter=(4, 8, 8, 16, 16)).double()
    ours = NestedUNet.from_nested_unet(theirs)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(2, 1, 32, 32, dtype=torch.float64) for _ in range(4)]
    theirs.train(train)
    want = torch.autograd.grad(theirs(x), [x, *theirs.parameters()], grads)
    ours.train(train)
    got = torch.autograd.grad(ours(x), [x, *ours.parameters()], grads)
    names = ["input"] + [n for n, _ in ours.named_parameters()]
    scale = max(w.abs().max().item() for w in want)
    for name, g, w in zip(names, got, want):
        # Conv biases before training-mode BN get ~1e-14 gradients (BN removes them): compare absolutely.
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12 * scale), name


def test_from_nested_unet_shares_parameter_objects():
    torch.manual_seed(0)
    theirs = OriginalNestedUNet(3, 2, deep_supervision=True, nb_filter=(4, 8, 8, 16, 16))
    ours = NestedUNet.from_nested_unet(theirs)
    assert [id(p) for p in ours.parameters()] == [id(p) for p in theirs.parameters()]
    assert [id(b) for b in ours.buffers()] == [id(b) for b in theirs.buffers()]
    x = torch.randn(1, 2, 32, 32)
    _compare(theirs, ours, x, train=False)
    with torch.no_grad():  # a change through the original is seen by the wrapper (fold cache refreshed)
        theirs.conv2_1.conv1.weight.mul_(1.5)
    _compare(theirs, ours, x, train=False)


def test_bad_input_size_is_named():
    model = NestedUNet(1, input_channels=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 1, 40, 24))


@pytest.mark.cuda
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_parity_on_cuda(deep_supervision, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the original's convs in true fp32
    torch.manual_seed(0)
    theirs = OriginalNestedUNet(2, 3, deep_supervision=deep_supervision).cuda()
    ours = NestedUNet.from_nested_unet(theirs)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    for train in (True, False):
        _compare(theirs, ours, x, train)


@pytest.mark.parametrize("convert", ["double", "half_then_float", "original_double"])
def test_conversions_keep_the_two_models_one(convert):
    # .to()/.double() on either model must convert the shared state once: the original's running
    # statistics keep following training of the wrapper (a checkpoint saved from it is current).
    torch.manual_seed(0)
    theirs = OriginalNestedUNet(1, 3, nb_filter=(4, 8, 8, 8, 8))
    ours = NestedUNet.from_nested_unet(theirs)
    if convert == "double":
        ours.double()
    elif convert == "half_then_float":
        ours.half()
        ours.float()
    else:
        theirs.double()
    dtype = torch.float64 if "double" in convert else torch.float32
    ours.train()
    ours(torch.randn(2, 3, 32, 32, dtype=dtype))
    mine, original = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == original.keys()
    for key, value in mine.items():
        assert value.dtype == original[key].dtype, key
        assert value.data_ptr() == original[key].data_ptr(), key
    assert ours.conv0_0.bn1.num_batches_tracked.item() == 1
    assert theirs.conv0_0.bn1.num_batches_tracked.item() == 1
    _compare(theirs, ours, torch.randn(1, 3, 32, 32, dtype=dtype), train=False)
