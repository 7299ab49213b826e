"""The convolution block of UNet++ and U-Net, run on `fused_conv`, with BatchNorm folding at eval.

A block is two 3x3 convolutions. Its first convolution reads the node's inputs as virtual pieces
(a max-pooled encoder feature, or the dense skips plus an upsampled feature), its second reads
the first's output. Two kinds:

* ``conv_bn_relu``: conv (bias) -> BatchNorm -> ReLU, twice; the keys of pytorch-nested-unet's
  ``VGGBlock`` (``conv1``, ``bn1``, ``conv2``, ``bn2``).
* ``conv_relu``: conv -> ReLU, twice; the block of the UNet++ paper (no normalisation).

BatchNorm that normalises with batch statistics (training) runs after the fused convolution; with
running statistics (eval) it is folded into the convolution's weight and bias, so each convolution
is a single fused call with ReLU in its epilogue. The fold is recomputed on every forward: it is
O(parameters) (a few element-wise ops on C_out x C_in x 9 values), while a cache keyed on version
counters is silently stale after fused optimizer steps, `.data` edits, `bn.eps` changes or
`torch.func.functional_call`. The one cache is the explicit `freeze()` of inference deployments
(see `NodeGrid.freeze`), which refuses to train.
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
        # Folded (weight, bias) per convolution, only between freeze() and unfreeze(); a plain
        # attribute, so never part of the state_dict.
        self._frozen: list[tuple[Tensor, Tensor]] | None = None

    def freeze(self) -> None:
        """Fold the BatchNorms (running statistics) once; `_step` reuses them until `unfreeze()`."""
        if self.block != "conv_bn_relu":
            return
        if not (_bn_uses_running_stats(self.bn1) and _bn_uses_running_stats(self.bn2)):
            raise RuntimeError("freeze() needs BatchNorm in eval mode with running statistics")
        with torch.no_grad():
            self._frozen = [fold_batchnorm(self.conv1, self.bn1), fold_batchnorm(self.conv2, self.bn2)]

    def unfreeze(self) -> None:
        self._frozen = None

    def _step(self, step: int, pieces: Sequence[Tensor], resample: Sequence[int]) -> Tensor:
        conv: nn.Conv2d = self.conv1 if step == 0 else self.conv2
        if self.block == "conv_relu":
            return fused_conv(pieces, conv.weight, conv.bias, resample, "relu")
        bn: nn.BatchNorm2d = self.bn1 if step == 0 else self.bn2
        if self._frozen is not None:
            sources = (conv.weight, conv.bias, bn.weight, bn.bias)
            if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in sources):
                raise RuntimeError(
                    "this model is frozen for inference (freeze()): its folded weights would not pass "
                    "gradients to the parameters; run under torch.no_grad() / inference_mode(), or "
                    "call unfreeze() to train"
                )
            return fused_conv(pieces, *self._frozen[step], resample, "relu")
        if _bn_uses_running_stats(bn):
            weight, bias = fold_batchnorm(conv, bn)
            return fused_conv(pieces, weight, bias, resample, "relu")
        return F.relu(bn(fused_conv(pieces, conv.weight, conv.bias, resample, "none")))

    def forward(self, pieces: Sequence[Tensor], resample: Sequence[int] | None = None) -> Tensor:
        """`pieces` (with one resample code each, default none) -> the block's output."""
        if resample is None:
            resample = [conv_spec.NONE] * len(pieces)
        hidden = self._step(0, pieces, resample)
        return self._step(1, [hidden], [conv_spec.NONE])
