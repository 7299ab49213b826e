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

3D (``spatial_dims=3``): the same block with Conv3d (3x3x3) and BatchNorm3d; the operator takes
the 5-D pieces, and folding is the same per-output-channel scale.
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
SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in SPATIAL_DIMS or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    return spatial_dims


def conv_class(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def conv_transpose_class(spatial_dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d


def batchnorm_class(spatial_dims: int) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


def check_block(block: str) -> str:
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    return block


def fold_batchnorm(conv: nn.Conv2d | nn.Conv3d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(weight, bias) of one convolution equal to `bn(conv(x))` with `bn`'s running statistics."""
    dtype = conv.weight.dtype
    work = torch.promote_types(dtype, torch.float32)  # half-precision statistics fold in float32
    scale = torch.rsqrt(bn.running_var.to(work) + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.to(work)
    weight = conv.weight.to(work) * scale.reshape(-1, *[1] * (conv.weight.dim() - 1))
    bias = conv.bias.to(work) if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - bn.running_mean.to(work)) * scale
    if bn.affine:
        shift = shift + bn.bias.to(work)
    return weight.to(dtype), shift.to(dtype)


def _bn_uses_running_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


class ConvBlock(nn.Module):
    """Two 3x3 (3x3x3 when ``spatial_dims=3``) convolutions (``conv_bn_relu`` or ``conv_relu``);
    the first reads virtual pieces."""

    def __init__(
        self, in_channels: int, out_channels: int, block: str = "conv_bn_relu", spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.block = check_block(block)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        conv, norm = conv_class(spatial_dims), batchnorm_class(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        if block == "conv_bn_relu":
            self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        if block == "conv_bn_relu":
            self.bn2 = norm(out_channels)
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
