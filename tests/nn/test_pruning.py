"""Pruning: mode='fast', prune=L computes only nodes X[i,j] with i + j <= L (FLOPs prove it), and
model.pruned(L) is a smaller standalone module with the same output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import unetpp_fast
from unetpp_fast.nn.unetpp import UNetPlusPlus

SMALL = (4, 8, 16, 32, 64)


@pytest.fixture(autouse=True)
def reference_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster
    try:
        with unetpp_fast.use_backend("reference"):
            yield
    finally:
        torch.set_num_threads(threads)


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def randomise(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))


def test_fused_conv_flop_formula_matches_aten_convolution():
    x = torch.randn(2, 5, 4, 6)
    skip = torch.randn(2, 3, 8, 12)
    weight = torch.randn(7, 8, 3, 3, requires_grad=True)
    fused = FlopCounterMode(display=False)
    with fused:
        out = unetpp_fast.fused_conv([skip, x], weight, None, ["none", "up_bilinear"])
    plain = FlopCounterMode(display=False)
    with plain:
        F.conv2d(torch.cat([skip, F.interpolate(x, scale_factor=2, mode="bilinear")], 1), weight, padding=1)
    assert fused.get_total_flops() == plain.get_total_flops() == 2 * 2 * 8 * 12 * 7 * 8 * 9
    backward = FlopCounterMode(display=False)
    with backward:
        out.sum().backward()
    assert backward.get_total_flops() == 2 * fused.get_total_flops()  # input and weight gradients


@pytest.mark.parametrize("upsample", ["bilinear_ac", "deconv"])
def test_pruned_flops_strictly_increase_and_last_is_full_network(upsample):
    depth = 4
    model = UNetPlusPlus(3, 1, SMALL, upsample=upsample, mode="fast").eval()
    x = torch.randn(1, 3, 16, 16)
    flops = []
    for level in range(1, depth + 1):
        model.prune = level
        flops.append(forward_flops(model, x))
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    # prune=depth is the full network with one head: the same as without deep supervision.
    single_head = UNetPlusPlus(3, 1, SMALL, deep_supervision=False, upsample=upsample).eval()
    assert flops[-1] == forward_flops(single_head, x)
    model.prune = None
    assert flops[-1] == forward_flops(model, x)
    # Accurate mode adds only the other depth - 1 heads (1x1, filters[0] -> 1 channel each).
    model.mode = "accurate"
    head = 2 * 16 * 16 * SMALL[0] * 1
    assert forward_flops(model, x) == flops[-1] + (depth - 1) * head
    # The standalone pruned module does exactly the work of prune=L.
    for level in range(1, depth + 1):
        assert forward_flops(model.pruned(level), x) == flops[level - 1]


def expected_keys(full: UNetPlusPlus, level: int) -> set[str]:
    kept = set()
    for key in full.state_dict():
        name = key.split(".")[0]
        if name.startswith("final"):
            if int(name[len("final") :]) <= level:
                kept.add(key)
            continue
        i, j = (int(v) for v in name[len("conv") if name.startswith("conv") else len("up") :].split("_"))
        if i + j <= level:
            kept.add(key)
    return kept


@pytest.mark.parametrize(
    "block,upsample", [("conv_bn_relu", "bilinear_ac"), ("conv_relu", "deconv"), ("conv_bn_relu", "nearest")]
)
def test_pruned_module_equals_fast_mode(block, upsample):
    torch.manual_seed(0)
    model = UNetPlusPlus(2, 3, SMALL[:4], block=block, upsample=upsample, mode="fast").double().eval()
    randomise(model)
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    full_params = sum(p.numel() for p in model.parameters())
    sizes = []
    with torch.no_grad():
        for level in range(1, 4):
            model.prune = level
            small = model.pruned(level)
            assert not small.training and next(small.parameters()).dtype == torch.float64
            assert set(small.state_dict()) == expected_keys(model, level)
            assert torch.equal(small(x), model(x))
            sizes.append(sum(p.numel() for p in small.parameters()))
            # Its parameters are its own.
            small.conv0_0.conv1.weight.add_(1.0)
            assert not torch.equal(small.conv0_0.conv1.weight, model.conv0_0.conv1.weight)
    assert sizes[0] < sizes[1] < sizes[2] == full_params


def test_prune_runs_only_the_kept_nodes():
    """With prune=L, the parameters of nodes with i + j > L take no part in the output."""
    model = UNetPlusPlus(3, 1, SMALL[:4], block="conv_relu", mode="fast", prune=2).eval()
    x = torch.randn(1, 3, 16, 16)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        module = name.split(".")[0]
        if module.startswith("final"):
            used = module == "final2"
        else:
            i, j = (int(v) for v in module[len("conv") :].split("_"))
            used = i + j <= 2
        assert (p.grad is not None) == used, name


def test_pruning_training_output_and_odd_sizes():
    torch.manual_seed(1)
    model = UNetPlusPlus(3, 1, SMALL[:4], mode="fast", prune=1, pad_to_multiple=True)
    x = torch.randn(1, 3, 13, 10)
    assert len(model(x)) == 3  # training always returns every head (deep supervision)
    model.eval()
    small = model.pruned(1)
    with torch.no_grad():
        # Level 1 needs multiples of 2 only: both pad 13x10 to 14x10 and crop back.
        assert small(x).shape == (1, 1, 13, 10)
        assert torch.equal(small(x), model(x))
    strict = UNetPlusPlus(3, 1, SMALL[:4], mode="fast", prune=2).eval()
    with pytest.raises(ValueError, match="multiples of 4"):
        strict(torch.randn(1, 3, 14, 16))
    with pytest.raises(ValueError, match="level"):
        model.pruned(4)
    with pytest.raises(ValueError, match="deep_supervision"):
        UNetPlusPlus(3, 1, SMALL[:4], deep_supervision=False).pruned(1)
