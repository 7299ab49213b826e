"""The U-Net baselines of the UNet++ paper (Table 2/3), built from the same blocks and operator.

U-Net is the grid with only the encoder X[i,0] and the decoder path X[i,depth-i], each decoder
node reading [X[i,0], up(X[i+1,depth-i-1])]; the key names are those of pytorch-nested-unet's
``UNet`` (``conv0_0``..``conv4_0``, ``conv3_1``, ``conv2_2``, ``conv1_3``, ``conv0_4``, ``final``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unetpp_fast.nn.blocks import conv_class
from unetpp_fast.nn.node_grid import NodeGrid, _check_positive_int

Tensor = torch.Tensor

WIDE_UNET_FILTERS = (35, 70, 140, 280, 560)


class UNet(NodeGrid):
    """U-Net: blocks ``conv_bn_relu`` or ``conv_relu``, the same upsample options as UNet++;
    ``spatial_dims=3`` for volumes [N, C, D, H, W]."""

    dense = False

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1,
        filters: Sequence[int] = (32, 64, 128, 256, 512),
        block: str = "conv_bn_relu",
        upsample: str = "bilinear_ac",
        pad_to_multiple: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(in_channels, filters, block, upsample, pad_to_multiple, spatial_dims=spatial_dims)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.final = conv_class(self.spatial_dims)(self.filters[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x, box = self.pad_input(x, self.depth)
        nodes = self.compute_nodes(x, self.depth)
        return self.crop(self.head(self.final, nodes[0, self.depth]), box)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, filters={self.filters}, "
            f"block={self.block!r}, upsample={self.upsample!r}, pad_to_multiple={self.pad_to_multiple}"
            + (f", spatial_dims={self.spatial_dims}" if self.spatial_dims != 2 else "")
        )


def wide_unet(in_channels: int = 3, num_classes: int = 1, **kwargs) -> UNet:
    """The paper's wide U-Net: filters (35, 70, 140, 280, 560), about as many parameters as UNet++
    (``spatial_dims=3`` in `kwargs` for the 3D one)."""
    if "filters" in kwargs:
        raise ValueError("wide_unet fixes filters to (35, 70, 140, 280, 560); use UNet(filters=...) instead")
    return UNet(in_channels, num_classes, WIDE_UNET_FILTERS, **kwargs)
