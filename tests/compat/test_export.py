"""Deployment: torch.export keeps the fused op as one node; ONNX files of standard operators run in
onnxruntime with PyTorch's outputs, per pruning level, with dynamic batch and size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unetpp_fast
from unetpp_fast.compat import BasicUNetPlusPlus, NestedUNet, UnetPlusPlus
from unetpp_fast.compat import export as deploy
from unetpp_fast.ops import backends
from unetpp_fast.ops.testing import relative_error

NB = (4, 8, 8, 16, 16)  # narrow filters: CI stays fast
ONNX_TOL = 1e-4  # fp32, relative norm (the bar)
EXPORT_TOL = 1e-6  # the exported program runs the same fused op as eager
EXAMPLE = (1, 3, 32, 32)
OTHER = (2, 3, 48, 32)  # another batch and size than the example: the dims are dynamic


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _inputs(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _VGGBlock(nn.Module):
    def __init__(self, c_in, c_mid, c_out):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid)
        self.conv2, self.bn2 = nn.Conv2d(c_mid, c_out, 3, padding=1), nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class OriginalNestedUNet(nn.Module):
    """pytorch-nested-unet's NestedUNet structure (narrow), as `accelerate` recognises it."""

    def __init__(self, num_classes=1, input_channels=3, deep_supervision=True, nb=NB):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        for j in range(5):
            for i in range(5 - j):
                c_in = (input_channels if i == 0 else nb[i - 1]) if j == 0 else nb[i] * j + nb[i + 1]
                self.add_module(f"conv{i}_{j}", _VGGBlock(c_in, nb[i], nb[i]))
        for head in [f"final{j}" for j in range(1, 5)] if deep_supervision else ["final"]:
            self.add_module(head, nn.Conv2d(nb[0], num_classes, 1))

    def forward(self, x):  # only the accelerated model runs; the original's forward is not needed
        raise NotImplementedError


def _monai(**kwargs) -> nn.Module:
    from monai.networks.nets import BasicUNetPlusPlus as MonaiUNetPP

    return MonaiUNetPP(spatial_dims=2, in_channels=3, out_channels=2, features=(4, 4, 8, 8, 16, 4), **kwargs)


def _smp() -> nn.Module:
    return UnetPlusPlus(
        "resnet18", encoder_depth=3, encoder_weights=None, decoder_channels=(16, 8, 8), classes=2
    )


def _unetpp(**kwargs) -> unetpp_fast.UNetPlusPlus:
    kwargs.setdefault("filters", NB)
    return unetpp_fast.UNetPlusPlus(3, 2, **kwargs)


MODELS = {
    "unetpp_accurate": lambda: _unetpp(deep_supervision=True),
    "unetpp_single_head": lambda: _unetpp(deep_supervision=False),
    "unet": lambda: unetpp_fast.UNet(3, 2, filters=NB),
    "nested_unet": lambda: NestedUNet(2, 3, deep_supervision=True),
    "monai_compat": lambda: BasicUNetPlusPlus(2, 3, 2, features=(4, 4, 8, 8, 16, 4), deep_supervision=True),
    "smp_compat": _smp,
    "accelerated_nested_unet": lambda: unetpp_fast.accelerate(OriginalNestedUNet()),
    "accelerated_monai": lambda: unetpp_fast.accelerate(_monai(deep_supervision=True)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_export_round_trip_with_dynamic_batch_and_size(name):
    torch.manual_seed(0)
    model = _randomise(MODELS[name]()).train()
    example = _inputs(EXAMPLE, seed=1)
    program = deploy.export_program(model, example)
    assert model.training, "export_program must restore the caller's training mode"
    # Each fused convolution stays one node; nothing materialises a concatenation around it.
    assert deploy.count_fused_convs(program) == _plain_convs(model)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not {"aten.cat.default", "aten.upsample_bilinear2d.vec"} & targets
    x = _inputs(OTHER, seed=2)
    # One backend for both: eager `auto` may measure its way to another backend than the program's.
    with torch.no_grad(), unetpp_fast.use_backend(backends.resolve_name("cpu")):
        want = _outputs(model.eval()(x))
        got = _outputs(program.module()(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= EXPORT_TOL


def _plain_convs(model: nn.Module) -> int:
    """The model's Conv2d modules that run fused: all of them (eval mode, accurate), smp's decoder only."""
    scope = model.decoder if isinstance(model, UnetPlusPlus) else model
    return sum(1 for m in scope.modules() if type(m) is nn.Conv2d)


def _expected_convs(level: int | None) -> int:
    # Nodes X[i,j] with i + j <= L: (L+1)(L+2)/2 blocks of two convs, plus the heads kept.
    if level is None:
        return 30 + 4  # depth 4: 15 blocks and 4 averaged heads (accurate mode)
    return (level + 1) * (level + 2) + 1


@pytest.mark.parametrize("level", [1, 2, 3, 4, None])
def test_onnx_parity_and_conv_count_per_level(tmp_path, level):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(level or 0)
    model = _randomise(_unetpp(deep_supervision=True), seed=level or 0).eval()
    example = _inputs(EXAMPLE, seed=3)
    path = unetpp_fast.export_onnx(model, tmp_path / "unetpp.onnx", example, level=level)
    ops = deploy.onnx_op_counts(path)
    # Only standard operators; BatchNorm folded into the Conv weights (no BN, no Mul left).
    assert set(ops) <= {"Conv", "Relu", "Concat", "Resize", "MaxPool", "Unsqueeze", "ReduceMean"}
    assert ops["Conv"] == _expected_convs(level)
    # Dynamic: a batch and a size other than the example's.
    error = deploy.onnx_relative_error(path, model, _inputs(OTHER, seed=4), level=level)
    assert error <= ONNX_TOL


# (factory, level, Conv nodes expected, activation op); small where the model allows.
OTHER_MODELS = {
    # depth 2 (filters 4, 8, 8): 5 nodes of two convs, one head; nearest upsampling, no BN
    "unet_nearest": (lambda: unetpp_fast.UNet(3, 2, NB[:3], "conv_relu", "nearest"), None, 11, "Relu"),
    # depth 2: 6 nodes, one head; bilinear upsampling without align_corners
    "unetpp_bilinear": (
        lambda: _unetpp(filters=NB[:3], deep_supervision=False, upsample="bilinear"),
        None,
        13,
        "Relu",
    ),
    # pytorch-nested-unet's structure, accelerated, pruned to L2: 6 nodes and head 2
    "accelerated_nested_unet_L2": (lambda: unetpp_fast.accelerate(OriginalNestedUNet()), 2, 13, "Relu"),
    # MONAI defaults: instance norm (not foldable), LeakyReLU 0.1, deconv upsampling, head X0_4
    "accelerated_monai": (lambda: unetpp_fast.accelerate(_monai()), None, 31, "LeakyRelu"),
    # smp: its encoder's convs (BN folded by the ONNX optimizer) + 14 fused decoder convs + 3x3 head;
    # the count depends on smp's encoder, so only the fused part is pinned (at least 14 + 1)
    "smp_compat": (_smp, None, None, "Relu"),
}


@pytest.mark.parametrize("name", sorted(OTHER_MODELS))
def test_onnx_parity_other_models(tmp_path, name):
    pytest.importorskip("onnxruntime")
    make, level, convs, activation = OTHER_MODELS[name]
    torch.manual_seed(0)
    model = _randomise(make()).eval()
    example = _inputs(EXAMPLE, seed=5)
    path = unetpp_fast.export_onnx(model, tmp_path / f"{name}.onnx", example, level=level)
    ops = deploy.onnx_op_counts(path)
    if convs is None:
        assert ops["Conv"] >= 15
    else:
        assert ops["Conv"] == convs  # ConvTranspose (MONAI's deconv) is an op type of its own
    assert activation in ops
    # BatchNorm folded completely: no BN node, and no per-channel arithmetic left over from the fold.
    assert not {"BatchNormalization", "Mul", "Sub", "Div", "Sqrt", "ConstantOfShape"} & set(ops), ops
    assert deploy.onnx_relative_error(path, model, _inputs(OTHER, seed=6), level=level) <= ONNX_TOL


def test_onnx_static_shapes_when_not_dynamic(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _randomise(unetpp_fast.UNet(3, 1, filters=NB[:3])).eval()
    example = _inputs((2, 3, 48, 32), seed=7)
    path = unetpp_fast.export_onnx(model, tmp_path / "static.onnx", example, dynamic=False)
    assert deploy.onnx_relative_error(path, model, _inputs((2, 3, 48, 32), seed=8)) <= ONNX_TOL
    with pytest.raises(Exception):  # noqa: B017  (onnxruntime's own error for a wrong input shape)
        deploy.run_onnx(path, _inputs((1, 3, 32, 32), seed=9))


def test_bad_arguments_are_named(tmp_path):
    unet = unetpp_fast.UNet(3, 1, filters=NB)
    example = _inputs(EXAMPLE, seed=10)
    with pytest.raises(ValueError, match="level"):
        deploy.export_program(unet, example, level=2)
    with pytest.raises(ValueError, match="level"):
        deploy.export_program(_unetpp(deep_supervision=True), example, level=5)
    with pytest.raises(ValueError, match="example"):
        deploy.export_program(unet, _inputs((1, 3, 40, 32), seed=11))
    with pytest.raises(TypeError, match="example"):
        deploy.export_program(unet, example.numpy())
    with pytest.raises(ValueError, match="example"):
        deploy.export_program(unet, example.double())
    with pytest.raises(ValueError, match="opset"):
        unetpp_fast.export_onnx(unet, tmp_path / "x.onnx", example, opset=7)


def test_cli_export_of_a_trained_checkpoint(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from unetpp_fast import cli
    from unetpp_fast.train.synthetic_data import write_synthetic_dataset

    if "export" not in cli.SUBCOMMANDS:
        pytest.skip("the export subcommand is not registered in unetpp_fast.cli")
    write_synthetic_dataset(str(tmp_path / "data"), n=8, size=32)
    run = tmp_path / "run"
    train = ["train", "--data", str(tmp_path / "data"), "--out", str(run), "--epochs", "1", "--size", "32"]
    assert cli.main([*train, "--batch-size", "4", "--filters", "4,8,16", "--no-progress"]) == 0
    capsys.readouterr()
    # Depth 2 with deep supervision: level 1 keeps X00, X10, X01 and head 1 (7 Conv nodes).
    assert cli.main(["export", str(run), "--onnx", str(tmp_path / "l1.onnx"), "--level", "1"]) == 0
    out = capsys.readouterr().out
    assert "[torch.onnx]" not in out  # the exporter's progress lines are silenced
    assert "7 Conv" in out and "relative error" in out and out.rstrip().endswith("ok")
    assert deploy.onnx_op_counts(tmp_path / "l1.onnx")["Conv"] == 7
    # A level the model does not have is a one-line usage error (exit 2).
    assert cli.main(["export", str(run), "--onnx", str(tmp_path / "x.onnx"), "--level", "3"]) == 2
    assert "level" in capsys.readouterr().err


def test_frozen_model_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _randomise(_unetpp(deep_supervision=True)).freeze()  # folded weights as plain tensors
    example = _inputs(EXAMPLE, seed=12)
    program = deploy.export_program(model, example)
    x = _inputs(OTHER, seed=13)
    with torch.no_grad():
        assert relative_error(program.module()(x), model(x)) <= EXPORT_TOL
    path = unetpp_fast.export_onnx(model, tmp_path / "frozen_l1.onnx", example, level=1)
    assert deploy.onnx_op_counts(path)["Conv"] == _expected_convs(1)
    assert deploy.onnx_relative_error(path, model, x, level=1) <= ONNX_TOL
    assert model.frozen and not model.training
