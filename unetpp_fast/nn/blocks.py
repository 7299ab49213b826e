"""The convolution block of UNet++ and U-Net, run on `fused_conv`, with BatchNorm folding at eval.

A block is two 3x3 convolutions. Its first convolution reads the node's inputs as virtual pieces
(a max-pooled encoder feature, or the dense skips plus an upsampled feature), its second reads
the first's output. Two kinds:

* ``conv_bn_relu``: conv (bias) -> BatchNorm -> ReLU, twice; the keys of pytorch-nested-unet's
  ``VGGBlock`` (``conv1``, ``bn1``, ``conv2``, ``bn2``).
* ``conv_relu``: conv -> ReLU, twice; the block of the UNet++ paper (no normalisation).

BatchNorm that normalises with batch statistics (training) runs after the fused convolution; with
running statistics (eval) it is folded into the convolution's weight and bias, so each convolution
is a single fused call with ReLU in its epilogue. The folded tensors are cached and recomputed
when a parameter or running statistic changes (version counter or storage), when the mode flips,
or when autograd needs them (then they are recomputed every call so gradients reach the originals).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetpp_fast.ops import conv_spec
from unetpp_fast.ops.fused_op import fused_conv

Tensor = torch.Tensor

BLOCKS = ("conv_bn_relu", "conv_relu")


def check_block(block: str) -> str:
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return block


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of one convolution equal to `bn(conv(x))` with `bn`'s running statistics."""
    dtype = conv.weight.dtype
    work = torch.promote_types(dtype, torch.float32)  # half-precision statistics fold in float32
    scale = torch.rsqrt(bn.running_var.to(work) + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.to(work)
    weight = conv.weight.to(work) * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias.to(work) if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.to(work)) * scale
    if bn.affine:
        shift = shift + bn.bias.to(work)
    return weight.to(dtype), shift.to(dtype)


def _bn_uses_running_stats(bn: nn.BatchNorm2d) -> bool:
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def _state_key(tensors: Sequence[Tensor | None]) -> tuple:
    """What identifies the current values of `tensors`: storage, version counter, dtype, device.

    In-place updates (optimizer steps, `load_state_dict`, `copy_` under no_grad) bump the version;
    `.data = ...` and `.to()` change the storage. The cache keeps the old storages alive (see
    `_folded_params`), so a new tensor cannot reuse an old address. Edits through `x.data` bypass
    the version counter: `model.eval()` clears the cache after such edits.
    """
    key = [torch.is_inference_mode_enabled()]
    for t in tensors:
        key.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(key)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions (``conv_bn_relu`` or ``conv_relu``); the first reads virtual pieces."""

    def __init__(self, in_channels: int, out_channels: int, block: str = "conv_bn_relu") -> None:
        super().__init__()
        self.block = check_block(block)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if block == "conv_bn_relu":
            self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if block == "conv_bn_relu":
            self.bn2 = nn.BatchNorm2d(out_channels)
        # (key, pinned sources, weight, bias) per step; plain attributes, so never part of the state_dict.
        self._folded: list[tuple | None] = [None, None]

    def train(self, mode: bool = True) -> ConvBlock:
        self._folded = [None, None]
        return super().train(mode)

    def _folded_params(self, step: int, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
        needs_graph = torch.is_grad_enabled() and any(
            p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None
        )
        if needs_graph or torch.compiler.is_compiling():
            # A cached graph could not be backpropagated twice; under the compiler the fold is
            # part of the traced graph (a few element-wise ops on the weights).
            return fold_batchnorm(conv, bn)
        sources = [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = _state_key(sources)
        cached = self._folded[step]
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weight, bias = fold_batchnorm(conv, bn)
            # Holding detached views of the sources pins their storages (see `_state_key`).
            pins = [t.detach() for t in sources if t is not None]
            cached = self._folded[step] = (key, pins, weight, bias)
        return cached[2], cached[3]

    def _step(self, step: int, pieces: Sequence[Tensor], resample: Sequence[int]) -> Tensor:
        conv: nn.Conv2d = self.conv1 if step == 0 else self.conv2
        if self.block == "conv_relu":
            return fused_conv(pieces, conv.weight, conv.bias, resample, "relu")
        bn: nn.BatchNorm2d = self.bn1 if step == 0 else self.bn2
        if _bn_uses_running_stats(bn):
            weight, bias = self._folded_params(step, conv, bn)
            return fused_conv(pieces, weight, bias, resample, "relu")
        return F.relu(bn(fused_conv(pieces, conv.weight, conv.bias, resample, "none")))

    def forward(self, pieces: Sequence[Tensor], resample: Sequence[int] | None = None) -> Tensor:
        """`pieces` (with one resample code each, default none) -> the block's output."""
        if resample is None:
            resample = [conv_spec.NONE] * len(pieces)
        hidden = self._step(0, pieces, resample)
        return self._step(1, [hidden], [conv_spec.NONE])
