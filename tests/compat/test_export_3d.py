"""Deployment in 3D: torch.export keeps each fused 3D convolution one node, and the ONNX file of
standard operators (Concat / Resize / MaxPool -> Conv -> Relu on 5-D tensors) runs in onnxruntime
with PyTorch's outputs, per pruning level, with a batch and volume size other than the example's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unetpp_fast
from unetpp_fast.compat import export as deploy
from unetpp_fast.ops import backends
from unetpp_fast.ops.testing import relative_error

FILTERS = (4, 8, 8)  # depth 2: volumes a multiple of 4 on every side, CI stays fast
ONNX_TOL = 1e-4  # fp32, relative norm (as in 2D)
EXPORT_TOL = 1e-6
EXAMPLE = (1, 1, 8, 8, 8)
OTHER = (2, 1, 12, 8, 16)  # another batch and size per axis: the dims are dynamic


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong fold shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def _unetpp_3d(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = unetpp_fast.UNetPlusPlus(1, 1, FILTERS, spatial_dims=3, **kw)
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())  # the fold is exercised
    return _randomise(model)


def _inputs(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_torch_export_3d_keeps_fused_nodes_with_dynamic_sizes():
    model = _unetpp_3d(deep_supervision=True).train()
    program = deploy.export_program(model, _inputs(EXAMPLE, seed=1))
    assert model.training, "export_program must restore the caller's training mode"
    # accurate mode, depth 2: 6 nodes of two convs and 2 heads, each one fused node
    assert deploy.count_fused_convs(program) == 6 * 2 + 2
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not {"aten.cat.default", "aten.upsample_trilinear3d.vec", "aten.max_pool3d.default"} & targets
    x = _inputs(OTHER, seed=2)
    # One backend for both: eager `auto` may measure its way to another backend than the program's.
    with torch.no_grad(), unetpp_fast.use_backend(backends.resolve_name("cpu")):
        want = _outputs(model.eval()(x))
        got = _outputs(program.module()(x))
    assert len(got) == len(want) == 1 and got[0].shape == (2, 1, 12, 8, 16)
    assert relative_error(got[0], want[0]) <= EXPORT_TOL


@pytest.mark.parametrize("level", [1, 2, None])
def test_onnx_3d_parity_per_level(tmp_path, level):
    pytest.importorskip("onnxruntime")
    model = _unetpp_3d(deep_supervision=True).eval()
    path = unetpp_fast.export_onnx(model, tmp_path / "unetpp3d.onnx", _inputs(EXAMPLE, seed=3), level=level)
    ops = deploy.onnx_op_counts(path)
    assert set(ops) <= {"Conv", "Relu", "Concat", "Resize", "MaxPool", "Unsqueeze", "ReduceMean"}
    assert ops["Conv"] == (6 * 2 + 2 if level is None else (level + 1) * (level + 2) + 1)
    assert deploy.onnx_relative_error(path, model, _inputs(OTHER, seed=4), level=level) <= ONNX_TOL
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in [*graph.input, *graph.output]:  # named sizes, not the exporter's s77
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", 1, "depth", "height", "width"], (value.name, dims)


def test_onnx_3d_unet_deconv(tmp_path):
    """U-Net 3D with 2x2x2 transposed-convolution upsampling and the paper's conv-ReLU blocks."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    model = unetpp_fast.UNet(1, 2, FILTERS, "conv_relu", "deconv", spatial_dims=3).eval()
    path = unetpp_fast.export_onnx(model, tmp_path / "unet3d.onnx", _inputs(EXAMPLE, seed=5))
    assert deploy.onnx_relative_error(path, model, _inputs(OTHER, seed=6)) <= ONNX_TOL
