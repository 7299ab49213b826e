"""The reference backend: plain PyTorch (`cat`, `interpolate`/`max_pool2d`, `conv2d`, activation);
in 3D (5-D pieces) `interpolate(trilinear)`/`max_pool3d`/`conv3d`.

The ground truth for every test and benchmark. It materialises the concatenation on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.backends import BackendImpl, register_backend


def apply_resample(x: torch.Tensor, code: int) -> torch.Tensor:
    """One piece's resample, as PyTorch computes it."""
    if code == conv_spec.NONE:
        return x
    if x.numel() == 0:  # PyTorch's resampling ops refuse empty tensors; the result is just empty
        return x.new_empty(*x.shape[:2], *conv_spec.resampled_shape(x.shape[2:], code))
    if x.dim() == 5:
        return _apply_resample_3d(x, code)
    if code == conv_spec.UP_NEAREST:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if code == conv_spec.UP_BILINEAR:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if code == conv_spec.UP_BILINEAR_AC:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    if code == conv_spec.MAXPOOL2:
        return F.max_pool2d(x, 2)
    raise ValueError(f"unknown resample code {code}")


def _apply_resample_3d(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == conv_spec.UP_NEAREST:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if code in (conv_spec.UP_BILINEAR, conv_spec.UP_BILINEAR_AC):
        return F.interpolate(
            x, scale_factor=2, mode="trilinear", align_corners=code == conv_spec.UP_BILINEAR_AC
        )
    if code == conv_spec.MAXPOOL2:
        return F.max_pool3d(x, 2)
    raise ValueError(f"unknown resample code {code}")


def _conv(dims: int):
    """(conv, grad w.r.t. input, grad w.r.t. weight) for 2 or 3 spatial dimensions."""
    if dims == 3:
        return F.conv3d, torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight
    return F.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    kind, slope = conv_spec.parse_activation(activation)
    if kind == "relu":
        return F.relu(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, slope)
    return x


def activation_grad(grad_out: torch.Tensor, out: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Gradient before the activation, read from the activation's output (the saved one)."""
    kind, slope = conv_spec.parse_activation(activation)
    if kind == "none":
        return grad_out
    positive = out > 0
    if kind == "relu":
        return torch.where(positive, grad_out, torch.zeros_like(grad_out))
    return torch.where(positive, grad_out, grad_out * slope)


def _concatenated(resampled: list[torch.Tensor]) -> torch.Tensor:
    # One piece is its own virtual input: torch.cat of one tensor would copy it.
    return resampled[0] if len(resampled) == 1 else torch.cat(resampled, dim=1)


def conv_preactivation(
    pieces: Sequence[torch.Tensor], resample: Sequence[int], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    virtual = _concatenated([apply_resample(p, int(c)) for p, c in zip(pieces, resample)])
    return _conv(weight.dim() - 2)[0](virtual, weight, bias, padding=weight.shape[-1] // 2)


def forward(
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    out = apply_activation(conv_preactivation(pieces, resample, weight, bias), activation)
    return out.contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))


def resample_adjoint(grad: torch.Tensor, piece: torch.Tensor, code: int) -> torch.Tensor:
    """Gradient w.r.t. a piece, given the gradient w.r.t. its resampled version.

    Written with the adjoint operators directly: the backward op runs below autograd, where
    `torch.autograd.grad` cannot re-enter.
    """
    if code == conv_spec.NONE:
        return grad
    if piece.numel() == 0:
        return torch.zeros_like(piece)
    if piece.dim() == 5:
        return _resample_adjoint_3d(grad, piece, code)
    height, width = piece.shape[-2:]
    if code == conv_spec.UP_NEAREST:
        return grad.unflatten(3, (width, 2)).unflatten(2, (height, 2)).sum(dim=(3, 5))
    if code in (conv_spec.UP_BILINEAR, conv_spec.UP_BILINEAR_AC):
        return torch.ops.aten.upsample_bilinear2d_backward(
            grad, [2 * height, 2 * width], list(piece.shape), code == conv_spec.UP_BILINEAR_AC
        )
    if code == conv_spec.MAXPOOL2:
        _, indices = F.max_pool2d(piece, 2, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, piece, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )
    raise ValueError(f"unknown resample code {code}")


def _resample_adjoint_3d(grad: torch.Tensor, piece: torch.Tensor, code: int) -> torch.Tensor:
    depth, height, width = piece.shape[-3:]
    if code == conv_spec.UP_NEAREST:
        return (
            grad.unflatten(4, (width, 2))
            .unflatten(3, (height, 2))
            .unflatten(2, (depth, 2))
            .sum(dim=(3, 5, 7))
        )
    if code in (conv_spec.UP_BILINEAR, conv_spec.UP_BILINEAR_AC):
        return torch.ops.aten.upsample_trilinear3d_backward(
            grad, [2 * depth, 2 * height, 2 * width], list(piece.shape), code == conv_spec.UP_BILINEAR_AC
        )
    if code == conv_spec.MAXPOOL2:
        _, indices = F.max_pool3d(piece, 2, return_indices=True)
        return torch.ops.aten.max_pool3d_with_indices_backward(
            grad, piece, [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False, indices
        )
    raise ValueError(f"unknown resample code {code}")


def backward(
    grad_out: torch.Tensor,
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    out: torch.Tensor | None,
    has_bias: bool,
    activation: str,
) -> list[torch.Tensor]:
    grad_pre = activation_grad(grad_out, out, activation)
    resampled = [apply_resample(p, int(c)) for p, c in zip(pieces, resample)]
    virtual = _concatenated(resampled)
    padding = weight.shape[-1] // 2
    _, conv_input, conv_weight = _conv(weight.dim() - 2)
    grad_virtual = conv_input(virtual.shape, weight, grad_pre, padding=padding)
    grad_weight = conv_weight(virtual, weight.shape, grad_pre, padding=padding)
    result = []
    for piece, code, grad in zip(pieces, resample, grad_virtual.split([p.shape[1] for p in pieces], dim=1)):
        grad_piece = resample_adjoint(grad.contiguous(), piece, int(code))
        result.append(grad_piece.contiguous(memory_format=conv_spec.output_memory_format(piece)))
    result.append(grad_weight.contiguous())
    spatial = tuple(range(2, grad_pre.dim()))
    result.append(grad_pre.sum(dim=(0, *spatial)) if has_bias else grad_pre.new_empty(0))
    # An operator's outputs may not alias each other or its inputs (views of one split do).
    return [r.clone() if r._base is not None or r is grad_out else r for r in result]


register_backend("reference", lambda device: "", lambda: BackendImpl(forward=forward, backward=backward))
