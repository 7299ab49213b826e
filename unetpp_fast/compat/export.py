"""Deployment: `torch.export` programs and ONNX files of any model that runs on `fused_conv`.

    program = export_program(model, example)               # torch.export, dynamic batch and size
    export_onnx(model, "unetpp.onnx", example, level=2)    # standard ONNX operators only

`torch.export` keeps `unetpp_fast::fused_conv` as one node per convolution (its fake
implementation gives the shapes). For ONNX the node is decomposed into what the reference
backend computes — Concat, Resize (nearest / bilinear / align_corners), MaxPool, Conv,
Relu / LeakyRelu — and the folded BatchNorm arithmetic (the model folds it in eval mode) is
constant-folded into the Conv initializers, so the file runs in any ONNX runtime.

Works for `UNetPlusPlus`, `UNet`, the compat classes (`NestedUNet`, `BasicUNetPlusPlus`,
`UnetPlusPlus`) and `accelerate`d models. `level` exports the pruned sub-network of a UNet++
with deep supervision (only the kept nodes). onnx, onnxruntime and onnxscript are optional:
`pip install "unetpp-fast[export]"`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from unetpp_fast.ops import fused_op as _fused_op  # noqa: F401  (registers the operator)
from unetpp_fast.ops import reference

Tensor = torch.Tensor

FUSED_CONV = torch.ops.unetpp_fast.fused_conv.default
DEFAULT_OPSET = 18
# Largest spatial size a dynamic export accepts (ONNX / torch.export need an upper bound).
MAX_DYNAMIC_SIZE = 8192
MAX_DYNAMIC_BATCH = 4096
_EXPORT_EXTRA = 'pip install "unetpp-fast[export]"  (onnx, onnxruntime, onnxscript)'


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the package {module!r}: {_EXPORT_EXTRA}") from exc


def spatial_multiple(model: nn.Module) -> int | None:
    """The multiple every spatial size must be for `model` (2**depth, the encoder stride), or None.

    None means the rule is unknown: a dynamic export then keeps the example's spatial size.
    """
    depth = getattr(model, "depth", None)
    if hasattr(model, "pad_input") and isinstance(depth, int):  # UNetPlusPlus, UNet, NestedUNet
        return 2**depth
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    if isinstance(stride, int) and stride > 0:  # segmentation_models_pytorch
        return stride
    if all(hasattr(model, f"conv_{i}_0") for i in range(5)) and hasattr(model, "upcat_0_4"):
        return 16  # MONAI's BasicUNetPlusPlus: four max-poolings
    return None


def _select(model: nn.Module, level: int | None) -> nn.Module:
    """The module to export: `model` itself, or its pruned sub-network of head `level`."""
    if level is None:
        return model
    pruned = getattr(model, "pruned", None)
    if pruned is None or not getattr(model, "deep_supervision", False):
        raise ValueError(
            f"level={level!r} needs a UNetPlusPlus with deep_supervision=True (pruning keeps one head); "
            f"{type(model).__name__} has no prunable heads: pass level=None"
        )
    return pruned(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm folded, dropout off) for the export; the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_example(example: Tensor, model: nn.Module) -> None:
    if not isinstance(example, Tensor):
        raise TypeError(f"example must be a tensor [N, C, H, W], got {type(example).__name__}")
    if example.dim() < 3 or not example.is_floating_point():
        raise ValueError(
            f"example must be a floating-point tensor [N, C, *spatial], got {example.dtype} "
            f"of shape {tuple(example.shape)}"
        )
    param = next(model.parameters(), None)
    if param is not None and (param.device != example.device or param.dtype != example.dtype):
        raise ValueError(
            f"example is {example.dtype} on {example.device} but the model is {param.dtype} on "
            f"{param.device}: convert one of them"
        )


def dynamic_shapes(model: nn.Module, example: Tensor) -> tuple[dict[int, object]]:
    """`torch.export` dynamic shapes for `model(example)`: any batch, spatial sizes that are
    multiples of `spatial_multiple(model)` (the example's size stays fixed when that is unknown).
    """
    from torch.export import Dim

    dims: dict[int, object] = {0: Dim("batch", min=1, max=max(MAX_DYNAMIC_BATCH, example.shape[0]))}
    multiple = spatial_multiple(model)
    if multiple is None:
        return (dims,)
    names = ("height", "width") if example.dim() == 4 else tuple(f"size{d}" for d in range(example.dim() - 2))
    for axis, name in zip(range(2, example.dim()), names):
        size = example.shape[axis]
        if size % multiple:
            raise ValueError(
                f"example has size {size} on axis {axis}, not a multiple of {multiple} (what "
                f"{type(model).__name__} needs for a dynamic export); pass such an example, or dynamic=False"
            )
        # A multiple of a Dim: the size constraint is part of the program, so no guard on H % 16.
        dims[axis] = multiple * Dim(name, min=1, max=max(MAX_DYNAMIC_SIZE, size) // multiple)
    return (dims,)


def export_program(
    model: nn.Module, example: Tensor, *, level: int | None = None, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """`torch.export.export` of `model` in eval mode, each fused convolution one graph node.

    Args:
        model: a model of this package, a compat class or an `accelerate`d model.
        example: an input [N, C, H, W] (values unused, shape and dtype matter).
        level: 1..depth for the pruned sub-network of a UNet++ with deep supervision, else None.
        dynamic: batch and spatial sizes symbolic (multiples of `spatial_multiple(model)`).

    The model's training mode is restored afterwards.
    """
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)):
        raise ValueError(f"level must be an int (a pruning level) or None, got {level!r}")
    with _eval_mode(model):
        target = _select(model, level).eval()
        _check_example(example, target)
        shapes = None
        if dynamic:
            shapes = dynamic_shapes(target, example)
            example = _tracing_example(example, spatial_multiple(target))
        # No autograd graph is wanted; the models fold BatchNorm into the traced graph when exporting.
        with torch.no_grad():
            return torch.export.export(target, (example,), dynamic_shapes=shapes)


def _tracing_example(example: Tensor, multiple: int | None) -> Tensor:
    """An input like `example` with no dynamic size equal to 1 (batch, or size / multiple).

    torch.export specialises a dimension whose example value is 1 and then refuses to make it
    dynamic, so a batch-1 example (the usual one for deployment) would fail. Values do not matter.
    """
    shape = list(example.shape)
    shape[0] = max(shape[0], 2)
    if multiple is not None:
        shape[2:] = [max(size, 2 * multiple) for size in shape[2:]]
    if shape == list(example.shape):
        return example
    return torch.randn(shape, dtype=example.dtype, device=example.device)


def count_fused_convs(program: torch.export.ExportedProgram) -> int:
    """How many `unetpp_fast::fused_conv` nodes the program's graph holds."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target == FUSED_CONV)


def _fused_conv_reference(
    pieces: Sequence[Tensor], resample: Sequence[int], weight: Tensor, bias: Tensor | None, activation: str
) -> Tensor:
    # The reference backend's computation: cat(resampled pieces) -> conv2d -> activation, all aten ops.
    pre = reference.conv_preactivation(pieces, [int(c) for c in resample], weight, bias)
    return reference.apply_activation(pre, activation)


def decompose_fused_conv(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every fused convolution replaced by its reference decomposition
    (cat, interpolate / max_pool2d, conv2d, relu / leaky_relu): plain ATen, exportable anywhere."""
    return program.run_decompositions({FUSED_CONV: _fused_conv_reference})


def _output_names(program: torch.export.ExportedProgram) -> list[str]:
    count = len(program.graph_signature.user_outputs)
    return ["logits"] if count == 1 else [f"logits_{k}" for k in range(1, count + 1)]


def _rename_dims(onnx_model, program: torch.export.ExportedProgram) -> None:
    """Name the symbolic input/output sizes 'batch', 'height', 'width' (3D: 'depth', 'height',
    'width'); the exporter writes s77, 16*s39."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs)
    shape = placeholder.meta["val"].shape
    spatial = {4: ("height", "width"), 5: ("depth", "height", "width")}.get(len(shape), ())
    dims = ("batch", None, *spatial) if spatial else ("batch",)
    names = {str(size): name for size, name in zip(shape, dims) if name and isinstance(size, torch.SymInt)}
    ir = _require("onnx_ir")
    for value in [*onnx_model.graph.inputs, *onnx_model.graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape(
                [
                    ir.SymbolicDim(names.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d
                    for d in value.shape
                ]
            )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    level: int | None = None,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write `model` (eval mode) as an ONNX file of standard operators; returns the path.

    Args:
        model: a model of this package, a compat class or an `accelerate`d model.
        path: the .onnx file to write (weights inside it; over 2 GB they go to an external file).
        example: an input [N, C, H, W] of the model's dtype and device (fp32 on CPU is the usual).
        level: 1..depth exports only the sub-network of head `level` of a UNet++ with deep
            supervision (fast mode); None exports the model as it runs (accurate mode: the heads'
            average; NestedUNet / MONAI deep supervision: one output per head).
        dynamic: batch, height and width are symbolic (height and width multiples of
            `spatial_multiple(model)`); False fixes them to the example's.
        opset: ONNX opset version (18 default).

    Inputs are named 'input', outputs 'logits' (or 'logits_1'.. for several). Every fused
    convolution becomes Concat/Resize/MaxPool -> Conv -> Relu/LeakyRelu; BatchNorm in eval mode is
    folded into the Conv weights.
    """
    _require("onnx")
    onnxscript = _require("onnxscript")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    try:
        path = Path(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    program = decompose_fused_conv(export_program(model, example, level=level, dynamic=dynamic))
    onnx_program = torch.onnx.export(
        program,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=_output_names(program),
        optimize=True,
        verbose=False,
    )
    # The exporter's optimizer folds only small constants and keeps ConstantOfShape; the folded
    # BatchNorm of wide layers (weight * scale) is large, and a bias-free conv's fold starts from
    # zeros (ConstantOfShape): fold every subgraph of parameters into initializers, then clean up.
    unlimited = 1 << 40
    onnxscript.optimizer.fold_constants(
        onnx_program.model,
        input_size_limit=unlimited,
        output_size_limit=unlimited,
        should_fold=lambda node: True if node.op_type == "ConstantOfShape" else None,
    )
    onnxscript.optimizer.optimize(onnx_program.model, input_size_limit=unlimited, output_size_limit=unlimited)
    if dynamic:
        _rename_dims(onnx_program.model, program)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    return path


def onnx_op_counts(path: str | Path) -> dict[str, int]:
    """{op_type: count} of the nodes of an ONNX file's main graph."""
    onnx = _require("onnx")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run_onnx(path: str | Path, x: Tensor) -> list[Tensor]:
    """The outputs of an ONNX file on `x`, computed by onnxruntime on the CPU."""
    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [torch.from_numpy(out) for out in session.run(None, {name: x.detach().cpu().numpy()})]


def onnx_relative_error(path: str | Path, model: nn.Module, x: Tensor, *, level: int | None = None) -> float:
    """max over outputs of ||onnxruntime(x) - model(x)|| / ||model(x)||, the model in eval mode
    (pruned to `level` as `export_onnx` does)."""
    with _eval_mode(model), torch.no_grad():
        expected = _select(model, level).eval()(x)
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    got = run_onnx(path, x)
    if len(got) != len(expected):
        raise ValueError(f"the ONNX file has {len(got)} outputs but the model returns {len(expected)}")
    errors = []
    for g, e in zip(got, expected):
        e = e.detach().cpu().to(g.dtype)
        if g.shape != e.shape:
            raise ValueError(f"ONNX output shape {tuple(g.shape)} differs from the model's {tuple(e.shape)}")
        errors.append(float((g - e).norm() / e.norm().clamp_min(torch.finfo(e.dtype).tiny)))
    return max(errors)


__all__ = [
    "DEFAULT_OPSET",
    "count_fused_convs",
    "decompose_fused_conv",
    "dynamic_shapes",
    "export_onnx",
    "export_program",
    "onnx_op_counts",
    "onnx_relative_error",
    "run_onnx",
    "spatial_multiple",
]
