"""UNet++ and U-Net: shapes, outputs against a plain-PyTorch formulation, BatchNorm folding, inputs,
parameter counts, state_dict, torch.compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import unetpp_fast
from unetpp_fast.nn.unetpp import UNet, UNetPlusPlus, wide_unet

SMALL = (4, 8, 16, 32, 64)
BLOCKS = ("conv_bn_relu", "conv_relu")
UPSAMPLES = ("bilinear_ac", "bilinear", "nearest", "deconv")


@pytest.fixture(autouse=True)
def reference_backend():
    # Tiny tensors: one intra-op thread is faster, and immune to a loaded machine's oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with unetpp_fast.use_backend("reference"):
            yield
    finally:
        torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics, so folding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.5 * torch.randn(n, generator=gen))
                module.bias.copy_(0.5 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def plain_nodes(model, x: torch.Tensor) -> dict:
    """Every node X[i,j], with torch.cat / F.max_pool2d / F.interpolate / nn.Conv2d / nn.BatchNorm2d."""

    def block(name: str, inp: torch.Tensor) -> torch.Tensor:
        b = getattr(model, name)
        if model.block == "conv_bn_relu":
            return F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(inp))))))
        return F.relu(b.conv2(F.relu(b.conv1(inp))))

    def up(t: torch.Tensor, i: int, j: int) -> torch.Tensor:
        if model.upsample == "deconv":
            return getattr(model, f"up{i}_{j}")(t)
        if model.upsample == "nearest":
            return F.interpolate(t, scale_factor=2, mode="nearest")
        return F.interpolate(
            t, scale_factor=2, mode="bilinear", align_corners=model.upsample == "bilinear_ac"
        )

    depth, dense = model.depth, isinstance(model, UNetPlusPlus)
    nodes = {(0, 0): block("conv0_0", x)}
    for i in range(1, depth + 1):
        nodes[i, 0] = block(f"conv{i}_0", F.max_pool2d(nodes[i - 1, 0], 2))
    for j in range(1, depth + 1):
        for i in range(depth - j + 1):
            if dense or i + j == depth:
                skips = [nodes[i, k] for k in range(j)] if dense else [nodes[i, 0]]
                nodes[i, j] = block(f"conv{i}_{j}", torch.cat([*skips, up(nodes[i + 1, j - 1], i, j)], dim=1))
    return nodes


def plain_forward(model, x: torch.Tensor):
    nodes = plain_nodes(model, x)
    if isinstance(model, UNet) or not model.deep_supervision:
        return model.final(nodes[0, model.depth])
    heads = [getattr(model, f"final{j}")(nodes[0, j]) for j in range(1, model.depth + 1)]
    return heads if model.training else sum(heads) / len(heads)


def as_list(y):
    return y if isinstance(y, list) else [y]


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_output_shapes(depth, deep_supervision):
    model = UNetPlusPlus(2, 3, SMALL[: depth + 1], deep_supervision=deep_supervision)
    x = torch.randn(2, 2, 16, 32)
    y = model(x)
    if deep_supervision:
        assert isinstance(y, list) and len(y) == depth
        assert all(t.shape == (2, 3, 16, 32) for t in y)
    else:
        assert y.shape == (2, 3, 16, 32)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 16, 32)
        model.mode = "fast"
        assert model(x).shape == (2, 3, 16, 32)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_unetpp_matches_plain_pytorch(block, upsample):
    """Train (with gradients and BN statistics) and eval (BN folded) equal the plain network, fp64."""
    torch.manual_seed(0)
    model = UNetPlusPlus(3, 2, SMALL[:4], block=block, upsample=upsample).double()
    randomise_bn(model)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    outs, expected = model(x), plain_forward(plain, x)
    assert len(outs) == len(expected) == 3
    for got, want in zip(outs, expected):
        assert rel_err(got, want) <= 1e-6
    weights = torch.randn(len(outs))
    sum(w * o.square().mean() for w, o in zip(weights, outs)).backward()
    sum(w * o.square().mean() for w, o in zip(weights, expected)).backward()
    # Relative to the largest gradient: a conv bias before BatchNorm has a gradient of zero plus rounding.
    scale = max(q.grad.norm().item() for q in plain.parameters())
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad - q.grad).norm().item() <= 1e-6 * max(q.grad.norm().item(), 1e-3 * scale), name
    for (name, b), c in zip(model.named_buffers(), plain.buffers()):  # BN running statistics
        assert torch.allclose(b, c, rtol=1e-12, atol=0), name

    model.eval()
    plain.eval()
    with torch.no_grad():
        assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6
    assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6  # eval with autograd: uncached fold


@pytest.mark.parametrize("block,upsample", [("conv_bn_relu", "bilinear_ac"), ("conv_relu", "deconv")])
def test_unet_matches_plain_pytorch(block, upsample):
    torch.manual_seed(1)
    model = UNet(1, 2, SMALL[:4], block=block, upsample=upsample).double()
    randomise_bn(model)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6
    assert sorted(k.split(".")[0] for k in model.state_dict() if k.endswith("conv1.weight")) == [
        "conv0_0", "conv0_3", "conv1_0", "conv1_2", "conv2_0", "conv2_1", "conv3_0"
    ]  # fmt: skip


def test_auto_backend_matches_reference():
    """Whatever backend `auto` picks on this machine computes the same network as the reference."""
    torch.manual_seed(2)
    model = UNetPlusPlus(3, 1, SMALL[:4]).double()
    randomise_bn(model)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    want = model(x)
    with unetpp_fast.use_backend("auto"):
        got = model(x)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-9


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def test_eval_folds_batchnorm_into_fused_relu_convs():
    model = UNetPlusPlus(3, 1, SMALL[:4]).eval()
    randomise_bn(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        with OpRecorder() as recorder:
            model(x)
    fused = [args for func, args in recorder.calls if func is torch.ops.unetpp_fast.fused_conv.default]
    num_nodes = len(model.node_indices())
    assert len(fused) == 2 * num_nodes + model.depth  # two convs per node, one per head
    assert sorted(args[4] for args in fused).count("relu") == 2 * num_nodes
    names = {str(func) for func, _ in recorder.calls}
    # The fold itself (rsqrt, mul, ...) runs each forward on the weights; BatchNorm and ReLU never
    # run on activations.
    assert not any("batch_norm" in n or "relu" in n for n in names), names


def test_fold_follows_optimizer_steps_bn_updates_and_state_dict():
    torch.manual_seed(3)
    model = UNetPlusPlus(3, 1, SMALL[:4]).double()
    randomise_bn(model)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer_plain = torch.optim.SGD(plain.parameters(), lr=0.5)
    model.eval()
    plain.eval()
    with torch.no_grad():
        model(x)
    # An optimizer step in eval mode (no train()/eval() flip) is seen by the next forward.
    model(x).square().mean().backward()
    plain_forward(plain, x).square().mean().backward()
    optimizer.step()
    optimizer_plain.step()
    with torch.no_grad():
        assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6
        # Running statistics changed in place, and a state_dict loaded, likewise.
        model.conv2_0.bn2.running_var.mul_(3.0)
        plain.conv2_0.bn2.running_var.mul_(3.0)
        assert rel_err(model(x), plain_forward(plain, x)) <= 1e-6
        other = UNetPlusPlus(3, 1, SMALL[:4]).double().eval()
        randomise_bn(other, seed=7)
        model.load_state_dict(other.state_dict())
        assert rel_err(model(x), other(x)) <= 1e-6
        assert rel_err(model(x), plain_forward(other, x)) <= 1e-6


def test_odd_sizes_need_multiple_or_pad():
    torch.manual_seed(4)
    model = UNetPlusPlus(3, 2, SMALL[:4]).eval()
    x = torch.randn(1, 3, 37, 45)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(x)
    padded = UNetPlusPlus(3, 2, SMALL[:4], pad_to_multiple=True).eval()
    padded.load_state_dict(model.state_dict())
    with torch.no_grad():
        y = padded(x)
        assert y.shape == (1, 2, 37, 45)
        # Same as running the model on the zero-padded 40x48 input and cropping back.
        full = model(F.pad(x, (1, 2, 1, 2)))
        assert torch.equal(y, full[..., 1:38, 1:46])
    padded.train()
    assert all(t.shape == (1, 2, 37, 45) for t in padded(x))
    assert UNet(3, 1, SMALL[:4], pad_to_multiple=True)(x).shape == (1, 1, 37, 45)


def test_bad_inputs_and_arguments():
    model = UNetPlusPlus(3, 1, SMALL[:3])
    with pytest.raises(ValueError, match="has 1 channels but the model expects in_channels=3"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 16, 16))
    for filters in [(4, 8), (4, 8, 16, 32, 64, 128, 256), (4, 8.0, 16), (4, -8, 16), 5]:
        with pytest.raises(ValueError, match="filters"):
            UNetPlusPlus(filters=filters)
    with pytest.raises(ValueError, match="block"):
        UNetPlusPlus(filters=SMALL[:3], block="conv_gn_relu")
    with pytest.raises(ValueError, match="upsample"):
        UNetPlusPlus(filters=SMALL[:3], upsample="bicubic")
    with pytest.raises(ValueError, match="mode"):
        UNetPlusPlus(filters=SMALL[:3], mode="quick")
    with pytest.raises(ValueError, match="deep_supervision"):
        UNetPlusPlus(filters=SMALL[:3], deep_supervision=False, mode="fast", prune=1)
    with pytest.raises(ValueError, match="1..2"):
        UNetPlusPlus(filters=SMALL[:3], mode="fast", prune=3)
    with pytest.raises(ValueError, match="mode='fast'"):
        UNetPlusPlus(filters=SMALL[:3], prune=1)
    model.eval()
    model.mode = "fastest"  # attributes are checked again at forward time
    with pytest.raises(ValueError, match="mode"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="in_channels"):
        UNet(in_channels=0)
    with pytest.raises(ValueError, match="filters"):
        wide_unet(filters=(8, 16, 32))


def nested_unet_keys(depth: int, deep_supervision: bool) -> set[str]:
    """The state_dict keys of pytorch-nested-unet's NestedUNet, from its published structure."""
    keys = set()
    for i in range(depth + 1):
        for j in range(depth + 1 - i):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                keys |= {f"conv{i}_{j}.{conv}.{p}" for p in ("weight", "bias")}
                stats = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                keys |= {f"conv{i}_{j}.{bn}.{p}" for p in stats}
    heads = [f"final{j}" for j in range(1, depth + 1)] if deep_supervision else ["final"]
    return keys | {f"{h}.{p}" for h in heads for p in ("weight", "bias")}


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_nested_unet_shaped_config_counts_and_keys():
    for ds, keys in [(False, 212), (True, 218)]:
        model = UNetPlusPlus(3, 1, deep_supervision=ds)
        state = model.state_dict()
        assert len(state) == keys
        assert set(state) == nested_unet_keys(4, ds)
    assert param_count(UNetPlusPlus(3, 1, deep_supervision=False)) == 9_163_329
    assert param_count(UNetPlusPlus(3, 1, deep_supervision=True)) == 9_163_428
    assert param_count(UNetPlusPlus(1, 1, deep_supervision=False)) == 9_162_753


def test_paper_parameter_counts():
    """The official Keras models (conv-ReLU blocks, 2x2 transposed convs), in=1, counted in ANCHORS.md."""
    paper = dict(block="conv_relu", upsample="deconv")
    assert param_count(UNetPlusPlus(1, 1, deep_supervision=False, **paper)) == 9_041_601  # paper: 9.04M
    assert param_count(UNetPlusPlus(1, 1, deep_supervision=True, **paper)) == 9_041_700
    assert param_count(UNet(1, 1, **paper)) == 7_759_521  # paper: 7.76M
    assert param_count(UNet(3, 1)) == 7_852_545  # pytorch-nested-unet UNet
    # Wide U-Net: channels x 35/32 scale the U-Net's weights by (35/32)^2.
    wide = param_count(wide_unet(1, 1, **paper))
    assert wide == 9_282_246
    assert abs(wide / 7_759_521 - (35 / 32) ** 2) < 1e-3


def test_state_dict_round_trip():
    torch.manual_seed(5)
    source = UNetPlusPlus(3, 2, SMALL[:4], upsample="deconv")
    randomise_bn(source)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = UNetPlusPlus(3, 2, SMALL[:4], upsample="deconv")
    target.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(target.state_dict()) == set(source.state_dict())
    assert {k for k in source.state_dict() if k.startswith("up")} == {
        f"up{i}_{j}.{p}" for i in range(3) for j in range(1, 4 - i) for p in ("weight", "bias")
    }
    x = torch.randn(1, 3, 16, 16)
    source.eval()
    target.eval()
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


@pytest.mark.parametrize("training", [False, True])
def test_compile_has_no_graph_breaks(training):
    torch._dynamo.reset()
    model = UNetPlusPlus(3, 1, SMALL[:3]).train(training)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model(x)  # a filled fold cache must not matter to the compiler
    with torch.set_grad_enabled(training):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
