"""The reference backend: plain PyTorch (`cat`, `interpolate`/`max_pool2d`, `conv2d`, activation).

The ground truth for every test and benchmark. It materialises the concatenation on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import conv_spec
from .backends import BackendImpl, register_backend


def apply_resample(x: torch.Tensor, code: int) -> torch.Tensor:
    """One piece's resample, as PyTorch computes it."""
    if code == conv_spec.NONE:
        return x
    if code == conv_spec.UP_NEAREST:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    if code == conv_spec.UP_BILINEAR:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if code == conv_spec.UP_BILINEAR_AC:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    if code == conv_spec.MAXPOOL2:
        return F.max_pool2d(x, 2)
    raise ValueError(f"unknown resample code {code}")


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


def conv_preactivation(
    pieces: Sequence[torch.Tensor], resample: Sequence[int], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    virtual = torch.cat([apply_resample(p, int(c)) for p, c in zip(pieces, resample)], dim=1)
    return F.conv2d(virtual, weight, bias, padding=weight.shape[-1] // 2)


def forward(
    pieces: Sequence[torch.Tensor],
    resample: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    out = apply_activation(conv_preactivation(pieces, resample, weight, bias), activation)
    return out.contiguous(memory_format=conv_spec.output_memory_format(pieces[0]))


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
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in pieces]
        w = weight.detach().requires_grad_()
        pre = conv_preactivation(leaves, resample, w, None)
        grads = torch.autograd.grad(pre, [*leaves, w], grad_pre, allow_unused=True)
    result = [
        g.contiguous(memory_format=conv_spec.output_memory_format(p)) if g is not None else torch.zeros_like(p)
        for g, p in zip(grads[:-1], pieces)
    ]
    result.append(grads[-1])
    result.append(grad_pre.sum(dim=(0, 2, 3)) if has_bias else grad_pre.new_empty(0))
    return result


register_backend("reference", lambda device: "", lambda: BackendImpl(forward=forward, backward=backward))
